"""Read the next activation batch while the current one trains (``TrainConfig.prefetch``).

A background thread draws batches from the stream one ahead of the training step, checks each on
the CPU (:func:`check_batch`: shape, dtype, NaN/Inf, so no check needs a device sync), pins it
when the SAEs are on a GPU, and hands it over with what a checkpoint must record *after* that batch:
the stream's own position (``state_dict``) and the random generators' states. The trainer copies a
pinned batch to the device with ``non_blocking=True``, and saves the position and generators of
the last batch it trained on, not of the one read ahead, so that resuming stays exact.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor


class BatchError(ValueError):
    """A batch from the activation stream that the SAEs cannot train on, or no batch at all."""


class ReadBatch(NamedTuple):
    index: int
    batch: Tensor
    stream_state: dict[str, Any] | None
    """The stream's ``state_dict()`` just after this batch (None for a stream without one)."""
    rng_state: dict[str, Any] | None
    """The random generators just after this batch was drawn."""


def check_batch(index: int, batch: Any, d_in: int, dtype: torch.dtype) -> Tensor:
    """``batch`` cast to ``dtype`` (still where it was), or a one-line BatchError saying how to fix it.
    The NaN/Inf count is read here only for a batch on the CPU, where it costs no device sync; a
    batch already on a GPU is checked by the trainer on the device (:func:`count_nonfinite`)."""
    if not isinstance(batch, Tensor):
        raise BatchError(f"batch {index} is a {type(batch).__name__}, not a torch.Tensor; "
                         f"convert it upstream with torch.as_tensor")
    if batch.ndim != 2:
        raise BatchError(f"batch {index} has shape {tuple(batch.shape)} but the SAEs need a 2-D "
                         f"(batch, d_in={d_in}) tensor; flatten it upstream, e.g. x.reshape(-1, {d_in})")
    if batch.shape[1] != d_in:
        raise BatchError(f"batch {index} has {batch.shape[1]} columns but the SAEs read d_in={d_in}; "
                         f"stream activations from the site the SAEs were built for, or build them "
                         f"with d_in={batch.shape[1]}")
    if batch.shape[0] == 0:
        raise BatchError(f"batch {index} has no rows; drop empty batches upstream")
    if not batch.is_floating_point():
        raise BatchError(f"batch {index} has dtype {batch.dtype}; the SAEs need floating-point "
                         f"activations, cast them upstream with .float()")
    batch = batch.to(dtype)
    if batch.device.type == "cpu":
        n_bad = int(count_nonfinite(batch))
        if n_bad:
            raise nonfinite_error(index, n_bad, dtype)
    return batch


def count_nonfinite(x: Tensor) -> Tensor:
    return (~torch.isfinite(x)).sum()


def nonfinite_error(index: int, n_bad: int, dtype: torch.dtype) -> BatchError:
    """``n_bad`` < 0: a batch checked on the device, where only whether it had any was kept."""
    many = f"{n_bad}" if n_bad >= 0 else "some"
    return BatchError(f"batch {index} contains {many} NaN/Inf values (after casting to {dtype}); drop "
                      f"or clip them upstream, e.g. with torch.nan_to_num")


class Prefetcher:
    """Iterate (index, batch) pairs of ``batches`` as :class:`ReadBatch`, read ``ahead`` batches in
    advance by a daemon thread. ``prepare(index, batch)`` runs in that thread (checking, pinning);
    ``stream_state()`` and ``rng_state()`` are called there right after each batch is drawn. What the
    thread raises is raised by ``next`` in the trainer, in order. ``close()`` stops the thread."""

    _END = object()

    def __init__(self, batches: Iterator[tuple[int, Any]], prepare: Callable[[int, Any], Tensor],
                 stream_state: Callable[[], dict[str, Any] | None], rng_state: Callable[[], dict[str, Any]],
                 ahead: int = 1):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(batches, prepare, stream_state, rng_state),
                                        name="workbench-prefetch", daemon=True)
        self._thread.start()

    def _read(self, batches, prepare, stream_state, rng_state) -> None:
        try:
            for index, batch in batches:
                item = ReadBatch(index, prepare(index, batch), stream_state(), rng_state())
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the training thread
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> ReadBatch:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)  # later calls end too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        while True:  # free a reader blocked on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
