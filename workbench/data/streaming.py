"""Training batches straight from a model's forward passes, for runs whose activations do not fit a
disk: ``data.model.cache: false``.

    stream = StreamingActivations(produce, batch_size=4096, buffer_tokens=262_144, n_tokens=10**8,
                                  seed=0, scale=s, device="cuda")
    trainer.fit(stream)   # the trainer checkpoints stream.state_dict(); resume restores it

``produce(start_context)`` yields :class:`~workbench.data.types.ActivationChunk` s of the training text
from the context whose seq is ``start_context`` (the same callable a cached harvest takes). The stream
fills a buffer with the rows of ``buffer_tokens / context_length`` consecutive contexts, moves it to
``device``, shuffles it with a generator seeded by (seed, epoch, buffer) and cuts it into batches; the
rows left over after the last whole batch of a buffer are dropped (fewer than one batch per buffer).
After ``n_tokens`` rows (or the end of the text) an epoch ends and the next one starts from the first
context with a new shuffle, as the cached stream cycles over its cache.

Its position is (epoch, buffer, batch, the buffer's first context, the epoch's rows before it): a
resumed run re-runs the model on at most one buffer's contexts (re-tokenising the text up to there,
which costs no forward passes) and continues with the very batches the uninterrupted run would have
drawn.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .types import ActivationChunk

STATE_KEYS = ("epoch", "buffer", "batch", "start_context", "rows_before")


class StreamingActivations:
    """An endless, resumable stream of shuffled (batch_size, D) float32 batches computed on demand
    (see the module docstring). Iterating it continues from :attr:`position`."""

    def __init__(self, produce: Callable[[int], Iterable[ActivationChunk]], *, batch_size: int,
                 buffer_tokens: int, n_tokens: int, context_length: int, seed: int = 0,
                 scale: float | None = None, device: str | torch.device = "cpu"):
        for name, value in (("batch_size", batch_size), ("buffer_tokens", buffer_tokens),
                            ("n_tokens", n_tokens), ("context_length", context_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if buffer_tokens < batch_size:
            raise ValueError(f"buffer_tokens={buffer_tokens} must be at least batch_size={batch_size}")
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
            raise ValueError(f"scale={scale!r} must be a positive finite number, or None")
        self.produce = produce
        self.batch_size, self.buffer_tokens, self.n_tokens = batch_size, buffer_tokens, n_tokens
        self.contexts_per_buffer = max(1, math.ceil(buffer_tokens / context_length))
        self.seed, self.scale, self.device = seed, scale, torch.device(device)
        self.position = dict.fromkeys(STATE_KEYS, 0)

    # ---------------------------------------------------------------------------------------------
    # Position

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (plain ints) and the settings that decide its batches."""
        return {**self.position, "seed": self.seed, "batch_size": self.batch_size,
                "contexts_per_buffer": self.contexts_per_buffer, "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; a position saved under other settings is an error, as
        the batches after it would not be the ones that run would have drawn."""
        for name in ("seed", "batch_size", "contexts_per_buffer", "n_tokens"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"the checkpoint's activation stream has {name}={state.get(name)!r} but this "
                                 f"one has {getattr(self, name)!r}; resume with the data settings the run "
                                 f"started with")
        self.position = {key: int(state[key]) for key in STATE_KEYS}

    # ---------------------------------------------------------------------------------------------
    # Batches

    def __iter__(self) -> Iterator[Tensor]:
        pos = self.position
        chunks: Iterator[ActivationChunk] | None = None
        leftover: tuple[Tensor, Tensor] | None = None
        batches_this_epoch = pos["batch"] + pos["buffer"]  # > 0 once anything of the epoch was drawn
        try:
            while True:
                if chunks is None:
                    chunks = iter(self.produce(pos["start_context"]))
                    leftover = None
                buffer_ND, leftover, epoch_over = self._fill(chunks, leftover)
                n_batches = buffer_ND.shape[0] // self.batch_size
                if epoch_over and n_batches == 0 and batches_this_epoch == 0:
                    raise ValueError(f"one pass over the text gives {buffer_ND.shape[0]} activation rows, fewer "
                                     f"than one batch of {self.batch_size}; give more text or a smaller batch")
                order = torch.randperm(buffer_ND.shape[0], device=self.device, generator=self._generator())
                first = pos["batch"]
                next_start = pos["start_context"] + self.contexts_per_buffer
                rows_after = pos["rows_before"] + buffer_ND.shape[0]
                for i in range(first, n_batches):
                    if i == n_batches - 1:  # the position after this batch is the next buffer's start
                        self._advance(epoch_over, next_start, rows_after)
                    else:
                        pos["batch"] = i + 1
                    batches_this_epoch += 1
                    batch_BD = buffer_ND[order[i * self.batch_size:(i + 1) * self.batch_size]]
                    yield batch_BD * self.scale if self.scale is not None else batch_BD
                if first >= n_batches:  # nothing (more) to draw from this buffer
                    self._advance(epoch_over, next_start, rows_after)
                if epoch_over:
                    _close(chunks)
                    chunks = None
                    batches_this_epoch = 0
        finally:
            _close(chunks)

    def _advance(self, epoch_over: bool, next_start: int, rows_after: int) -> None:
        pos = self.position
        if epoch_over:
            pos.update(epoch=pos["epoch"] + 1, buffer=0, batch=0, start_context=0, rows_before=0)
        else:
            pos.update(buffer=pos["buffer"] + 1, batch=0, start_context=next_start, rows_before=rows_after)

    def _fill(self, chunks: Iterator[ActivationChunk], leftover: tuple[Tensor, Tensor] | None
              ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, bool]:
        """The rows of the buffer's contexts (on the stream's device), the rows read past its last
        context, and whether the epoch ends with this buffer (n_tokens reached or text run out)."""
        start = self.position["start_context"]
        stop = start + self.contexts_per_buffer
        room = self.n_tokens - self.position["rows_before"]
        pieces: list[Tensor] = []
        n = 0
        while n < room:
            if leftover is not None:
                acts_ND, seq_N = leftover
                leftover = None
            else:
                chunk = next(chunks, None)
                if chunk is None:
                    return self._buffer(pieces), None, True
                acts_ND, seq_N = chunk.acts_ND, chunk.seq_N
            mine_N = (seq_N >= start) & (seq_N < stop)
            if bool((seq_N >= stop).any()):
                leftover = (acts_ND[seq_N >= stop], seq_N[seq_N >= stop])
            take_ND = acts_ND[mine_N][:room - n]
            pieces.append(take_ND)
            n += take_ND.shape[0]
            if leftover is not None:
                break
        return self._buffer(pieces), leftover, n >= room

    def _buffer(self, pieces: list[Tensor]) -> Tensor:
        if not pieces:
            return torch.empty(0, 0, device=self.device)
        return torch.cat(pieces).to(self.device, torch.float32)

    def _generator(self) -> torch.Generator:
        pos = self.position
        blob = f"{self.seed},{pos['epoch']},{pos['buffer']}".encode()
        seed = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") >> 1
        return torch.Generator(device=self.device).manual_seed(seed)


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()
