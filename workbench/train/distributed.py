"""Training on several processes with ``torch.distributed``: the process group, the data split, the
gradient all-reduce and the batch-wide statistics that make N ranks compute what one process computes.

Launch is ``torchrun``'s: :func:`init_from_env` reads the ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` it
sets and joins the process group (``nccl`` on CUDA, ``gloo`` on the CPU); without them, or at world
size 1, nothing is initialised and every helper here is the identity, so single-process code calls
them unconditionally.

The convention every helper follows (shape suffixes as in :mod:`workbench.saes.base`; B is the
*global* batch, B_r the rows of rank r, sum_r B_r = B):

* **The global batch.** One optimiser step reads one global batch x_BD; rank r computes on its rows
  x_r (:func:`shard_rows`). N ranks must give the loss, the gradients and the step one process gives
  on the whole x_BD.
* **Every rank reports the global loss; it back-propagates its share.** Inside
  :func:`workbench.saes.batch.batch_group` an SAE's forward on x_r returns each loss term as the
  global batch's value V, the same on every rank (the expert-parallel forward too). Rank r
  back-propagates L_r = V / N, so that the global loss is sum_r L_r = V. A rank's share may also be
  written term by term: a mean over tokens, (1/B) sum_b l_b, has the share (1/B) sum_{b in r} l_b,
  the rank's own tokens divided by the *global* count (:func:`token_share`).
* **Gradients are summed.** After ``backward`` on L_r, :func:`all_reduce_grads_` with ``op="sum"``
  leaves dV/dtheta on every rank.
* **Batch-wide statistics** that depend on parameters (Switch's router mean P_i) are all-reduced with
  :func:`global_sum`, torch's differentiable all-reduce
  (``torch.distributed.nn.functional.all_reduce``). Its backward all-reduces the incoming gradient,
  and that is exactly right, not a double count: with S = sum_r s_r,
  dL/ds_r = sum_r' dL_r'/dS, the sum over every rank's use of S, and that sum is what the backward's
  all-reduce computes. The only way to count twice is to break the share rule, i.e. to back-propagate
  the replicated V on every rank instead of V / N (then L = N V and the gradients are N times too
  big). ``tests/test_distributed.py`` checks the gradients against one process.
* Statistics without gradient (token counts, Switch's f_i, the total variance of the data, the
  firing counts: :class:`GlobalFiringStats`) are plain all-reduces.

A data-parallel step under this convention (what :class:`workbench.train.Trainer` does under
``train.parallel: data``): x_r = shard_rows(global batch); the SAE's own forward on x_r inside
``batch_group``; ``(sum(losses) / N).backward()``; ``all_reduce_grads_(params, ctx, "sum")``;
clipping with the (now global) gradient norm; the decoder projection and the optimiser step as on
one process. ``op="mean"`` (DDP's convention) is right only for losses that are each rank's own mean
with equal B_r and no batch-wide statistic.

A sharded strategy (``train.parallel`` naming one of :data:`STRATEGIES` other than "data") splits
an SAE's weights over the ranks; :func:`sharding` says how (:class:`Sharding`). Its replicated
parameters' gradients are summed, its sharded ones are complete on their rank, and clipping uses
:func:`clip_grad_norm_` over both.
"""
from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

from ..eval.metrics import FiringStats
from ..saes.base import BaseSAE, Code

T = TypeVar("T")

_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

STRATEGIES = ("data", "expert")
"""The values of ``TrainConfig.parallel`` (besides None): "data", every SAE replicated on every rank,
and the strategies that shard an SAE's weights (:func:`sharding`)."""


@dataclass
class DistContext:
    """Where this process stands in the run: its rank among ``world_size`` processes, its rank on its
    machine (``local_rank``, which picks its GPU), the backend and the process group its collectives
    use (None: the default group; unused at world size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    group: Any = None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints, SAE folders and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: the collectives talk to other ranks."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """Where this rank computes: GPU ``local_rank`` under nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing at world size 1)."""
        if self.distributed:
            dist.barrier(group=self.group)

    def destroy(self) -> None:
        """Leave the process group (if this context joined one)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env() -> DistContext:
    """Join the process group ``torchrun`` describes in the environment, or stay single-process.

    With RANK, WORLD_SIZE and LOCAL_RANK set and WORLD_SIZE > 1, calls
    ``torch.distributed.init_process_group`` (``nccl`` when CUDA is available, after selecting GPU
    ``LOCAL_RANK``; ``gloo`` otherwise; the rendezvous address is torchrun's MASTER_ADDR/MASTER_PORT).
    Otherwise returns rank 0 of 1 and initialises nothing.
    """
    present = [name for name in _ENV_VARS if name in os.environ]
    if not present:
        return DistContext()
    if len(present) != len(_ENV_VARS):
        missing = sorted(set(_ENV_VARS) - set(present))
        raise ValueError(f"the environment sets {present} but not {missing}; launch with torchrun, which sets all "
                         f"three, or unset them for a single process")
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in _ENV_VARS)
    except ValueError:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                         f"{[os.environ[name] for name in _ENV_VARS]}; launch with torchrun") from None
    if world_size <= 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world_size - 1}; launch with torchrun")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def current_context(group: Any = None) -> DistContext:
    """The context of an already initialised process group (rank 0 of 1 when there is none), for code
    that was not handed one."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    world_size = dist.get_world_size(group)
    return DistContext(rank=dist.get_rank(group), world_size=world_size,
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend(group), group=group)


# --- data parallel: which rows each rank reads ------------------------------------------------------

def rank_batches(stream: Iterable[T], rank: int, world_size: int) -> Iterator[T]:
    """Every ``world_size``-th batch of ``stream``, starting at batch ``rank``.

    Step k then reads stream batches kN .. kN+N-1, one per rank in rank order: with the share
    convention that equals one process whose batch is those N batches concatenated, i.e. N ranks at
    batch b equal one process at batch N*b only if the stream cut into batches of N*b yields the same
    rows in the same order (true of a deterministic row stream, not of one whose shuffle depends on
    the batch size). The exact split, used by the equivalence tests: every rank reads the global batch
    and keeps its rows with :func:`shard_rows` (each rank reads the whole batch, which the synthetic
    stream and the on-disk cache make cheap).
    """
    _check_rank(rank, world_size)
    return itertools.islice(stream, rank, None, world_size)


def shard_rows(x_BD: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of the global batch: rows r*B/N .. (r+1)*B/N - 1.

    Concatenating the slices of ranks 0..N-1 gives the batch back, so per-token results gathered in
    rank order line up with one process's. This is the split the trainer uses: deterministic and, with
    the share convention of this module, equal to one process at the global batch B.
    """
    _check_rank(rank, world_size)
    n_rows = x_BD.shape[0]
    if n_rows % world_size:
        suggestion = n_rows // world_size * world_size or world_size
        raise ValueError(f"a global batch of {n_rows} rows does not split evenly over {world_size} ranks; "
                         f"use a batch size divisible by the world size (e.g. {suggestion})")
    per_rank = n_rows // world_size
    return x_BD[rank * per_rank:(rank + 1) * per_rank]


def _check_rank(rank: int, world_size: int) -> None:
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an integer in 0..{world_size - 1} for world_size={world_size}")


# --- gradients ------------------------------------------------------------------------------------

@torch.no_grad()
def all_reduce_grads_(params: Iterable[Tensor], ctx: DistContext, op: str = "sum") -> None:
    """All-reduce the gradients of ``params`` in place, in one flattened bucket per dtype and device.

    ``op="sum"`` gives the gradient of the global loss under the share convention (the module
    docstring); ``op="mean"`` divides by the world size (for losses that are each rank's own mean).
    Parameters that do not require gradient are skipped. A parameter whose ``grad`` is None counts as
    zero; it gets a gradient if any rank had one and stays None if no rank had (so Adam skips it as a
    single process would). Every rank must pass the same parameters in the same order. At world size
    1 nothing happens.
    """
    if op not in ("sum", "mean"):
        raise ValueError(f"op={op!r} must be 'sum' or 'mean'")
    params = [p for p in params if p.requires_grad]
    if not ctx.distributed or not params:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        buckets.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), group in buckets.items():
        # One flag per parameter after the gradients: how many ranks had a gradient for it.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
                         + [torch.tensor([float(p.grad is not None) for p in group], dtype=dtype, device=device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        if op == "mean":
            flat /= ctx.world_size
        flags = flat[flat.numel() - len(group):]
        start = 0
        for p, flag in zip(group, flags.tolist()):
            n = p.numel()
            if flag:
                grad = flat[start:start + n].view_as(p)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            start += n


@torch.no_grad()
def global_grad_norm(local_params: Iterable[Tensor], replicated_params: Iterable[Tensor],
                     ctx: DistContext) -> Tensor:
    """The L2 norm of the whole model's gradient when ``local_params`` are sharded (each rank holds
    different rows, as expert-parallel experts) and ``replicated_params`` are the same on every rank
    (after :func:`all_reduce_grads_`): sqrt(all_reduce(sum of the local squares) + the replicated
    squares, counted once). Clip with this, not with each rank's own norm."""
    local_params, replicated_params = list(local_params), list(replicated_params)
    params = local_params + replicated_params
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32

    def squares(ps: list[Tensor]) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in ps:
            if p.grad is not None:
                total += p.grad.double().pow(2).sum()
        return total

    # Every rank joins the all-reduce, whatever gradients it holds.
    sq_local = global_sum_(squares(local_params), ctx)
    return (sq_local + squares(replicated_params)).sqrt().to(dtype)


@torch.no_grad()
def clip_grad_norm_(local_params: Iterable[Tensor], replicated_params: Iterable[Tensor], max_norm: float,
                    ctx: DistContext) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model spread over ranks: every gradient is
    multiplied by min(1, max_norm / (norm + 1e-6)) with the :func:`global_grad_norm`, so all ranks
    scale alike and as one process would. Call it after the gradient all-reduce. Returns the norm."""
    local_params, replicated_params = list(local_params), list(replicated_params)
    norm = global_grad_norm(local_params, replicated_params, ctx)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in local_params + replicated_params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


# --- batch-wide statistics ------------------------------------------------------------------------

def global_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """sum over ranks of ``t``, differentiable (identity at world size 1).

    The result is replicated. Its backward all-reduces the gradient, which gives each rank's ``t``
    the gradient of the global loss sum_r L_r: use the result in rank r's loss as its share (a
    replicated value V enters as V / N), never as the whole.
    """
    if not ctx.distributed:
        return t
    with warnings.catch_warnings():
        # torch 2.x marks these autograd collectives deprecated in favour of the functional ones,
        # which have no autograd for all_reduce; they are the differentiable collectives torch has.
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.group)


@torch.no_grad()
def global_sum_(t: Tensor, ctx: DistContext) -> Tensor:
    """In-place sum over ranks of a tensor without gradient (counts, metric totals); returns it."""
    if ctx.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.group)
    return t


@torch.no_grad()
def broadcast_(tensors: Iterable[Tensor], ctx: DistContext) -> None:
    """Overwrite ``tensors`` (parameters, buffers) on every rank with rank 0's, in place."""
    if ctx.distributed:
        for t in tensors:
            dist.broadcast(t.detach(), group=ctx.group, group_src=0)


@torch.no_grad()
def same_on_every_rank(t: Tensor, ctx: DistContext, rtol: float = 1e-6) -> bool:
    """Whether ``t`` agrees across ranks (e.g. the global batch each rank read), judged by its sum
    and its sum of absolute values to ``rtol``; the same answer on every rank."""
    if not ctx.distributed:
        return True
    stats = torch.stack([t.sum(), t.abs().sum()]).double()
    high, low = stats.clone(), stats.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=ctx.group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=ctx.group)
    return bool(((high - low) <= rtol * high.abs().clamp_min(1.0)).all())


@torch.no_grad()
def earliest_(firsts: Tensor, ctx: DistContext) -> Tensor:
    """Elementwise over ranks, the smallest non-negative entry of an int64 tensor of first indices
    (-1 where no rank has one); in place, returned (``firsts`` itself at world size 1)."""
    if not ctx.distributed:
        return firsts
    big = 2**62  # a max of (big - index) picks the smallest index; 0 stands for none
    code = torch.where(firsts >= 0, big - firsts, 0)
    dist.all_reduce(code, op=dist.ReduceOp.MAX, group=ctx.group)
    return firsts.copy_(torch.where(code > 0, big - code, -1))


def global_count(n_rows: int, ctx: DistContext, device: torch.device | str = "cpu") -> int:
    """The global batch size: the sum over ranks of each rank's row count."""
    if not ctx.distributed:
        return n_rows
    return int(global_sum_(torch.tensor([n_rows], dtype=torch.long, device=device), ctx))


def global_mean_rows(t_BX: Tensor, ctx: DistContext) -> Tensor:
    """The mean over the global batch of the rows of ``t`` (dim 0), replicated and differentiable:
    global_sum(sum_{b in r} t_b) / B."""
    n_rows = global_count(t_BX.shape[0], ctx, t_BX.device)
    return global_sum(t_BX.sum(0), ctx) / n_rows


def global_total_variance(x_BD: Tensor, ctx: DistContext) -> Tensor:
    """E_b ||x_b - mean_b x||^2 over the global batch (clamped at 1e-12), as
    :func:`workbench.saes.topk.total_variance` computes on one process: the mean first (one
    all-reduce), then the squared deviations from it (a second), which is as exact as the
    single-process two-pass formula; replicated and differentiable."""
    n_rows = global_count(x_BD.shape[0], ctx, x_BD.device)
    mean_D = global_sum(x_BD.sum(0), ctx) / n_rows
    return (global_sum((x_BD - mean_D).pow(2).sum(), ctx) / n_rows).clamp_min(1e-12)


def token_share(n_local: int, ctx: DistContext, device: torch.device | str = "cpu") -> float:
    """B_r / B: the factor that turns a rank's mean over its own tokens into its share of the global
    mean over tokens (for loss terms that are plain per-token means, e.g. a Gated SAE's)."""
    return n_local / global_count(n_local, ctx, device)


# --- the firing counter ---------------------------------------------------------------------------

class GlobalFiringStats(FiringStats):
    """A :class:`~workbench.eval.metrics.FiringStats` over the global batch: each update all-reduces
    the rank's fire counts (4 bytes per latent) and counts N times its tokens (the ranks hold equal
    row shards), so every rank keeps the counter one process would keep, and the dead masks agree."""

    def __init__(self, d_sae: int, window_tokens: int | None, device: str | torch.device, ctx: DistContext):
        super().__init__(d_sae, window_tokens, device)
        self.ctx = ctx

    def update(self, code: Code) -> None:
        self.check_width(code)
        # int32 on the wire (a batch's count fits), half the bytes of the int64 counter.
        counts_F = global_sum_(code.fire_counts().to(torch.int32), self.ctx)
        self.add_counts(counts_F, code.acts.shape[0] * self.ctx.world_size)


# --- sharded strategies ---------------------------------------------------------------------------

class Sharding(NamedTuple):
    """How a sharded strategy splits an SAE over the ranks; the trainer uses these and nothing else.

    A rank's part is itself an SAE: its ``forward`` on the rank's rows is a collective that returns
    the global batch's loss terms (as under :func:`~workbench.saes.batch.batch_group`), its code
    carries the whole SAE's latent ids, and its ``init_from_data_`` on the global batch sets what the
    whole SAE's would (then sharded)."""

    check: Callable[[BaseSAE, int], None]
    """``check(sae, world_size)``: a one-line ValueError if the SAE cannot be split over that many ranks."""
    shard: Callable[[BaseSAE, DistContext], BaseSAE]
    """``shard(sae, ctx)``: this rank's part of the whole SAE (every rank passes the same one)."""
    gather: Callable[[BaseSAE, DistContext], BaseSAE | None]
    """``gather(part, ctx)``: the whole SAE on rank 0, on the CPU; None on the other ranks. A collective."""
    sharded_parameters: Callable[[BaseSAE], list[Tensor]]
    """The trainable parameters split over the ranks: their gradients are complete on their rank."""
    replicated_parameters: Callable[[BaseSAE], list[Tensor]]
    """The trainable parameters every rank holds whole: their gradients are summed over the ranks."""


def sharding(strategy: str | None) -> Sharding | None:
    """How ``strategy`` (a value of ``TrainConfig.parallel``) shards SAEs; None for "data" and None."""
    if strategy == "expert":
        # Imported here, not at the top: expert_parallel builds on this module.
        from .expert_parallel import SHARDING
        return SHARDING
    return None


# --- local ranks (tests, benchmarks, a notebook on one machine) -----------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a local process group's rendezvous."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_ranks(fn: Any, world_size: int, args: tuple = (), preload: Iterable[str] = ("workbench.saes",)) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` processes on this machine and wait
    for them (an exception in one is raised here). ``fn`` joins the group itself (gloo,
    ``tcp://127.0.0.1:port``, or MASTER_ADDR/MASTER_PORT and :func:`init_from_env`).

    The ranks are forked where this process runs no other Python thread: they start in milliseconds
    instead of importing torch and the workbench afresh. Otherwise a fresh single-threaded
    "forkserver" imports ``preload`` (package names: the server sets its sys.path after preloading)
    once and forks them, since forking a process in which another thread may hold a lock can hang the
    child. torchrun is the launcher for real runs; this is for a group spawned by a test or a script."""
    import multiprocessing
    import sys
    import threading

    import torch.multiprocessing as mp
    if sys.platform == "linux" and threading.active_count() == 1:
        method = "fork"
    else:
        multiprocessing.set_forkserver_preload(list(preload))
        method = "forkserver"
    mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=True, start_method=method)
