"""Statistics over the training batch, which under data parallelism is the union of every rank's rows.

    with batch_group(group, world_size):   # the trainer, under train.parallel: data (or expert)
        out = sae(x_local_BD)              # each loss term is the *global* batch's, equal on every rank

The architectures take every batch-wide quantity of their losses through these functions: means over
tokens (:func:`batch_mean`, :func:`batch_means`), the batch's total variance and FVU
(:func:`batch_total_variance`, :func:`batch_fvu`), the fraction of tokens per expert
(:func:`batch_sum_` of the counts), BatchTopK's batch-wide selection (:func:`batch_all_gather_sizes`
of the candidates, :func:`batch_min_` of the smallest kept activation). Outside a group, on one
process, each is the plain local computation and costs nothing more.

Inside a group every rank must call the SAE's training forward (and its backward) in lockstep, with
the same ``dead_mask``: the collectives of the forward and of the differentiable all-reduces' backward
pair up across ranks in the order they are issued.

Inside a group each function all-reduces over the ranks of ``group`` (``torch.distributed``), with
torch's differentiable all-reduce where the quantity carries gradient. The convention (see
:mod:`workbench.train.distributed` for the proof): every loss term an SAE returns is the global value
V, the same on every rank; the trainer back-propagates V / world_size on each rank and sums the
gradients over ranks, which gives every rank dV/dtheta, what one process computes on the whole batch.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor


class _Group(NamedTuple):
    group: Any
    """A ``torch.distributed`` process group (None: the default group)."""
    world_size: int


_CURRENT: ContextVar[_Group | None] = ContextVar("workbench_batch_group", default=None)


@contextmanager
def batch_group(group: Any, world_size: int) -> Iterator[None]:
    """Within the block, batch statistics span the rows of every rank of ``group``. A world size of 1
    changes nothing."""
    token = _CURRENT.set(_Group(group, world_size) if world_size > 1 else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def in_group() -> bool:
    """Whether batch statistics currently span several ranks."""
    return _CURRENT.get() is not None


def world_size() -> int:
    current = _CURRENT.get()
    return 1 if current is None else current.world_size


def batch_sum(t: Tensor) -> Tensor:
    """The sum over ranks of a per-rank partial sum ``t``, differentiable; ``t`` itself on one process."""
    current = _CURRENT.get()
    if current is None:
        return t
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn
    with warnings.catch_warnings():
        # torch marks its autograd collectives deprecated; they are still the differentiable ones it has.
        warnings.simplefilter("ignore", FutureWarning)
        return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM, group=current.group)


@torch.no_grad()
def batch_sum_(t: Tensor) -> Tensor:
    """In place, without gradient (counts, totals): the sum over ranks of ``t``; returns it."""
    current = _CURRENT.get()
    if current is not None:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=current.group)
    return t


@torch.no_grad()
def batch_min_(t: Tensor) -> Tensor:
    """In place, without gradient: the elementwise minimum over ranks of ``t``; returns it."""
    current = _CURRENT.get()
    if current is not None:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=current.group)
    return t


def batch_rows(n_local: int, device: torch.device | str = "cpu") -> int:
    """The number of rows of the whole batch (``n_local`` on one process)."""
    if _CURRENT.get() is None:
        return n_local
    return int(batch_sum_(torch.tensor([n_local], dtype=torch.long, device=device)))


def batch_count(n_local: int, device: torch.device | str = "cpu") -> Tensor:
    """The number of rows of the whole batch as a 0-d int64 tensor on ``device``, never read back to
    the host (no device sync, unlike :func:`batch_rows`)."""
    return batch_sum_(torch.full((), n_local, dtype=torch.long, device=device))


def batch_rank() -> int:
    """This process's rank in the group (0 on one process)."""
    current = _CURRENT.get()
    if current is None:
        return 0
    import torch.distributed as dist
    return dist.get_rank(current.group)


def batch_mean(t_BX: Tensor, n_rows: int | Tensor | None = None) -> Tensor:
    """The mean over the whole batch of the rows of ``t`` (dim 0), differentiable. ``n_rows``, the
    whole batch's row count if the caller has it (:func:`batch_count`), saves one all-reduce."""
    if _CURRENT.get() is None:
        return t_BX.mean(0)
    if n_rows is None:
        n_rows = batch_count(t_BX.shape[0], t_BX.device)
    return batch_sum(t_BX.sum(0)) / n_rows


def batch_means(*terms_B: Tensor) -> tuple[Tensor, ...]:
    """The means over the whole batch of per-token terms, each (B,): on one process ``t.mean()`` of
    each; in a group one all-reduce of their local sums (and one of the row count), differentiable."""
    if _CURRENT.get() is None:
        return tuple(t.mean() for t in terms_B)
    first = terms_B[0]
    n_rows = batch_count(first.shape[0], first.device)
    return tuple((batch_sum(torch.stack([t.sum() for t in terms_B])) / n_rows).unbind())


def batch_total_variance(x_BD: Tensor, n_rows: int | Tensor | None = None) -> Tensor:
    """E_b ||x_b - mean_b x||^2 over the whole batch, clamped away from 0 (the FVU's denominator,
    :func:`workbench.saes.topk.total_variance` on one process); differentiable. In a group it is two
    passes as on one process: the global mean first, then the squared deviations from it."""
    if _CURRENT.get() is None:
        return (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    if n_rows is None:
        n_rows = batch_count(x_BD.shape[0], x_BD.device)
    mean_D = batch_sum(x_BD.sum(0)) / n_rows
    return (batch_sum((x_BD - mean_D).pow(2).sum()) / n_rows).clamp_min(1e-12)


def batch_fvu(x_BD: Tensor, err_BD: Tensor) -> Tensor:
    """E_b ||err_b||^2 / E_b ||x_b - mean_b x||^2 over the whole batch, differentiable: on one process
    exactly ``err.pow(2).sum(-1).mean() / total_variance(x)``; in a group three all-reduces (the row
    count, the mean of x, then the squared deviations and squared errors together)."""
    if _CURRENT.get() is None:
        return err_BD.pow(2).sum(-1).mean() / (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    n_rows = batch_count(x_BD.shape[0], x_BD.device)
    mean_D = batch_sum(x_BD.sum(0)) / n_rows
    sums = batch_sum(torch.stack([(x_BD - mean_D).pow(2).sum(), err_BD.pow(2).sum()])) / n_rows
    return sums[1] / sums[0].clamp_min(1e-12)


@torch.no_grad()
def batch_all_gather(t: Tensor) -> Tensor:
    """The concatenation (dim 0) of every rank's ``t``, in rank order, without gradient; ranks may hold
    different numbers of rows. ``t`` itself on one process."""
    return batch_all_gather_sizes(t)[0]


@torch.no_grad()
def batch_all_gather_sizes(t: Tensor) -> tuple[Tensor, list[int]]:
    """:func:`batch_all_gather` and every rank's number of rows, in rank order (``[len(t)]`` on one
    process)."""
    current = _CURRENT.get()
    if current is None:
        return t, [t.shape[0]]
    import torch.distributed as dist
    sizes_t = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(current.world_size)]
    dist.all_gather(sizes_t, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device), group=current.group)
    sizes = [int(s) for s in sizes_t]
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(current.world_size)]
    dist.all_gather(parts, padded, group=current.group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes
