"""A harvest shared by the ranks of a ``torchrun`` job: each rank runs the model on its share of the
token batches, rank 0 writes the one activation cache.

    group = RankGroup(rank, world_size)              # over gloo, whatever the training backend
    produce = group.split(job, contexts, run)        # rank 0: the cache writer calls produce(start)
    ...                                              # rank 0: get_or_create(..., produce) for each store
    group.finish()                                   # rank 0, when every store is there
    group.serve({job: (contexts, run), ...})         # every other rank, meanwhile: until finish()

Batch i after the writer's start context is computed by rank i mod N; rank 0 receives the chunks and
hands them to the ordinary cache writer in their order, so the cache is the one a single process
writes (same rows, same shards, same key: the key does not name the world size), and its resume
protocol and lock are untouched. Every rank tokenises the same text (cheap beside the model) and so
knows which batches are its own without being told.

The ranks move in rounds of N batches: rank 0 announces each round (or the end of a harvest, or the
end of all of them), every rank runs its batch of the round and sends the chunk to rank 0. The
announcement comes from the writer's pull, so a writer that has its tokens stops the round-robin at a
round boundary and nothing is left blocked. Chunks travel as CPU tensors over a gloo group (NCCL
groups carry only GPU tensors). Assumes a file system shared by the ranks, as torchrun jobs on one
machine have.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from .types import ActivationChunk, TokenBatch

JOB, ROUND, DONE, QUIT = 1, 2, 3, 4
"""Announcements from rank 0: a harvest starting at a context, a round of N batches, the end of that
harvest, the end of all harvests."""

Contexts = Callable[[int], Iterator[TokenBatch]]
"""The token batches from a start context on (the same on every rank)."""
Run = Callable[[Iterable[TokenBatch]], Iterator[ActivationChunk]]
"""The model's harvest of some batches: one chunk per batch."""


class RankGroup:
    """The ranks of one job, for sharing harvests (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, group=None):
        import torch.distributed as dist
        self.rank, self.world_size = rank, world_size
        self.batches_run = 0
        """Token batches this rank has run the model on, in every harvest so far."""
        self._dist = dist
        # Chunks are CPU tensors: a gloo group carries them whatever the training backend is.
        self.group = group if group is not None else (
            dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None)

    # --- rank 0 -----------------------------------------------------------------------------------

    def split(self, job: int, contexts: Contexts, run: Run) -> Callable[[int], Iterator[ActivationChunk]]:
        """The ``produce(start_context)`` for rank 0's cache writer: its own batches run here, the
        others' arrive from their ranks, all in batch order. ``job`` names the harvest (the other
        ranks serve it with their own ``contexts`` and ``run`` of that number)."""
        def produce(start_context: int) -> Iterator[ActivationChunk]:
            self._announce(JOB, start_context, job)
            batches = contexts(start_context)
            try:
                while True:
                    self._announce(ROUND)
                    round_ = [next(batches, None) for _ in range(self.world_size)]
                    chunks = [self._run(run, round_[0])]
                    chunks += [self._receive(src) for src in range(1, self.world_size)]
                    for batch, chunk in zip(round_, chunks):
                        if batch is None:
                            return
                        yield chunk
            finally:
                self._announce(DONE)
        return produce

    def finish(self) -> None:
        """Rank 0: every harvest is done; the other ranks' :meth:`serve` returns."""
        self._announce(QUIT)

    # --- the other ranks --------------------------------------------------------------------------

    def serve(self, jobs: dict[int, tuple[Contexts, Run]]) -> None:
        """Run this rank's batches of every harvest rank 0 starts, until it calls :meth:`finish`."""
        batches: Iterator[TokenBatch] | None = None
        run: Run | None = None
        while True:
            kind, start, job = self._listen()
            if kind == QUIT:
                return
            if kind == JOB:
                contexts, run = jobs[job]
                batches = contexts(start)
            elif kind == ROUND:
                round_ = [next(batches, None) for _ in range(self.world_size)]
                self._send(self._run(run, round_[self.rank]))
            elif kind == DONE:
                batches = None

    def _run(self, run: Run, batch: TokenBatch | None) -> ActivationChunk | None:
        if batch is None:
            return None
        self.batches_run += 1
        return next(iter(run([batch])))

    # --- messages ---------------------------------------------------------------------------------

    def _announce(self, kind: int, start: int = 0, job: int = 0) -> None:
        self._dist.broadcast(torch.tensor([kind, start, job], dtype=torch.long), src=0, group=self.group)

    def _listen(self) -> tuple[int, int, int]:
        message = torch.zeros(3, dtype=torch.long)
        self._dist.broadcast(message, src=0, group=self.group)
        return int(message[0]), int(message[1]), int(message[2])

    def _send(self, chunk: ActivationChunk | None) -> None:
        """A chunk as a header of sizes and two tensors: the rows' values and their integer fields."""
        dist = self._dist
        if chunk is None:
            dist.send(torch.tensor([-1, 0, 0, 0], dtype=torch.long), dst=0, group=self.group)
            return
        acts_ND = chunk.acts_ND.float().contiguous()
        (S, L), (N, D) = chunk.batch.input_ids_SL.shape, acts_ND.shape
        ints = torch.cat([chunk.token_ids_N, chunk.seq_N, chunk.pos_N, chunk.batch.input_ids_SL.reshape(-1),
                          chunk.batch.attention_mask_SL.reshape(-1), chunk.batch.seq_S]).long()
        dist.send(torch.tensor([N, D, S, L], dtype=torch.long), dst=0, group=self.group)
        dist.send(acts_ND, dst=0, group=self.group)
        dist.send(ints, dst=0, group=self.group)

    def _receive(self, src: int) -> ActivationChunk | None:
        dist = self._dist
        header = torch.zeros(4, dtype=torch.long)
        dist.recv(header, src=src, group=self.group)
        N, D, S, L = (int(v) for v in header)
        if N < 0:
            return None
        acts_ND = torch.empty(N, D)
        ints = torch.empty(3 * N + 2 * S * L + S, dtype=torch.long)
        dist.recv(acts_ND, src=src, group=self.group)
        dist.recv(ints, src=src, group=self.group)
        token_ids_N, seq_N, pos_N, ids, mask, seq_S = torch.split(ints, [N, N, N, S * L, S * L, S])
        batch = TokenBatch(ids.reshape(S, L).clone(), mask.reshape(S, L).clone(), seq_S.clone())
        return ActivationChunk(acts_ND, token_ids_N.clone(), seq_N.clone(), pos_N.clone(), batch)

