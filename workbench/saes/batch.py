"""Statistics over the training batch, which under data parallelism is the union of every rank's rows.

    with batch_group(group, world_size):   # the trainer, under train.parallel: data (or expert)
        out = sae(x_local_BD)              # each loss term is the *global* batch's, equal on every rank

The architectures take every batch-wide quantity of their losses through these functions: means over
tokens (:func:`batch_mean`), the batch's total variance, the fraction of tokens per expert, BatchTopK's
batch-wide selection. Outside a group, on one process, each is the plain local computation and costs
nothing more.

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


def batch_rows(n_local: int, device: torch.device | str = "cpu") -> int:
    """The number of rows of the whole batch (``n_local`` on one process)."""
    if _CURRENT.get() is None:
        return n_local
    return int(batch_sum_(torch.tensor([n_local], dtype=torch.long, device=device)))


def batch_mean(t_BX: Tensor) -> Tensor:
    """The mean over the whole batch of the rows of ``t`` (dim 0), differentiable."""
    if _CURRENT.get() is None:
        return t_BX.mean(0)
    return batch_sum(t_BX.sum(0)) / batch_rows(t_BX.shape[0], t_BX.device)


@torch.no_grad()
def batch_all_gather(t: Tensor) -> Tensor:
    """The concatenation (dim 0) of every rank's ``t``, in rank order, without gradient; ranks may hold
    different numbers of rows. ``t`` itself on one process."""
    current = _CURRENT.get()
    if current is None:
        return t
    import torch.distributed as dist
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(current.world_size)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device), group=current.group)
    longest = int(max(int(s) for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(current.world_size)]
    dist.all_gather(parts, padded, group=current.group)
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])
