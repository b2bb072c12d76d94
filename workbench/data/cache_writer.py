"""Writing an activation cache: a resumable harvest into ``<folder>.partial/``, renamed into place when
complete (the finished folder's layout is in :mod:`.store`).

Resume protocol. Whenever ``shard_rows`` rows have arrived they are written as one shard, with the
contexts finished so far (``ctx_*_00000.npy``), every file fsynced; then ``progress.json`` is replaced
atomically by one that adds the shard and where the harvest continues after it: ``next_context`` (the
seq to restart ``produce`` at) and ``skip_rows`` (rows of that context already stored, as a shard may
end inside a context). An interrupted harvest so loses only the shard being filled: the next
``get_or_create`` checks every file progress.json names, deletes the rest and calls
``produce(next_context)``; if the check fails, the partial folder is discarded and the harvest starts
again. At the end the contexts are gathered into one table, meta.json is written with
``"complete": true`` and fsynced, and the folder is renamed into place in one step, so a folder
without a complete meta.json is never opened. A lock file, ``<folder>.lock`` (``filelock``, so on
every OS), makes a second process that wants the same key wait for the first one's harvest and then
reuse it.

Values. Rows arrive as float32 and are stored in the key's dtype, rounded to nearest (bfloat16 as its
raw uint16 bits). A value a float16 or bfloat16 cache cannot hold is refused rather than stored as
inf. Entries with |x| above 1e6 times the RMS entry of the first chunk are counted (``n_extreme`` in
meta.json) and reported once at the end of the harvest: finite, but they dominate an SAE's loss.

Full disk. The harvest refuses up front, at the first chunk (when D is known), if its estimated size
exceeds the free space; if a write still fails with ENOSPC or EDQUOT, it deletes its partial folder
(so the next, smaller harvest is not starved of space) and raises a one-line CacheError.
"""
from __future__ import annotations

import errno
import itertools
import math
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor
from tqdm.auto import tqdm

from ..fsutil import fsync_path
from .cache_files import (ACTS_STORAGE, CONTEXT_DTYPES, FORMAT, INDEX_BYTES_PER_ROW, INDEX_DTYPES,
                          LOCK_SUFFIX, META_FILE, PARTIAL_SUFFIX, PROGRESS_FILE, CacheError, context_file,
                          file_problem, is_int, read_json, shard_file, write_json_atomic)
from .cache_key import CACHE_ENV, CacheKey
from .types import ActivationChunk, TokenBatch

# Rows as they are held between arriving and being written: acts stay float32 until written, so the
# extreme-value count sees the values the model gave.
_ROW_DTYPES = {"acts": np.float32} | INDEX_DTYPES
_INT32_MAX = np.iinfo(np.int32).max
# The largest |x| each half dtype holds; beyond it, rounding gives inf.
_HALF_MAX = {"float16": float(torch.finfo(torch.float16).max),
             "bfloat16": float(torch.finfo(torch.bfloat16).max)}
# An entry beyond this multiple of the first chunk's RMS entry value is reported as extreme.
EXTREME_FACTOR = 1e6
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def harvest_into(folder: Path, key: CacheKey, produce: Callable[[int], Iterable[ActivationChunk]], *,
                 shard_rows: int, progress: bool) -> None:
    """Harvest ``key`` into ``folder`` (see the module docstring), unless another process finished
    that folder while this one waited for the lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The lock file stays on disk: deleting lock files races with a process about to lock them.
    with FileLock(folder.parent / f"{folder.name}{LOCK_SUFFIX}"):
        if not folder.exists():
            _Harvest(folder, key, shard_rows, progress).run(produce)


class _Harvest:
    """Writes one harvest into ``<folder>.partial`` and renames it into place when complete."""

    def __init__(self, folder: Path, key: CacheKey, shard_rows: int, progress_bar: bool):
        self.folder, self.key, self.shard_rows, self.progress_bar = folder, key, shard_rows, progress_bar
        self.partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        self.stored = ACTS_STORAGE[key.dtype]
        # The files of one shard while harvesting: its rows, and the contexts finished by its end.
        self.shard_dtypes = ({"acts": self.stored} | INDEX_DTYPES
                             | {f"ctx_{field}": dtype for field, dtype in CONTEXT_DTYPES.items()})
        self.shards: list[dict[str, int]] = []  # completed shards, as recorded in progress.json
        self.d: int | None = None
        # Rows and contexts received but not yet in a completed shard, in stream order.
        self.rows: list[dict[str, np.ndarray]] = []
        self.n_pending = 0
        self.contexts: list[dict[str, np.ndarray]] = []
        self.last_seq = -1  # the largest context seq received (or stored) so far
        self.extreme_bound: float | None = None  # set by the first chunk with a nonzero entry
        self.extreme_example: list[int] | None = None  # [seq, pos] of the first extreme entry stored

    def run(self, produce: Callable[[int], Iterable[ActivationChunk]]) -> None:
        try:
            self._start_or_resume()
            n_rows = self._receive(produce)
            if self.n_pending:
                self._write_shard(self.n_pending)
            if n_rows == 0:
                shutil.rmtree(self.partial)
                raise ValueError(f"produce yielded no activation rows for {self.key}; check that the "
                                 f"text source {self.key.text!r} is not empty")
            limit = self.key.n_tokens
            if n_rows < limit:
                warnings.warn(f"the text ran out after {n_rows} of the {limit} tokens asked for; the cache "
                              f"{self.folder.name} holds {n_rows} rows (meta.json n_rows)", stacklevel=4)
            n_extreme = sum(shard["n_extreme"] for shard in self.shards)
            if n_extreme:
                seq, pos = self.extreme_example
                warnings.warn(f"{n_extreme} activations of {self.folder.name} have |x| > "
                              f"{self.extreme_bound:.3g} ({EXTREME_FACTOR:.0e} x the first chunk's RMS "
                              f"value), e.g. at context seq {seq}, pos {pos}; such values dominate an "
                              f"SAE's loss: set drop_outliers or check the site (meta.json n_extreme)",
                              stacklevel=4)
            self._finish(n_rows)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            _remove(self.partial)
            raise CacheError(self._no_space(self.key.n_tokens)) from None

    # ---------------------------------------------------------------------------------------------

    def _receive(self, produce: Callable[[int], Iterable[ActivationChunk]]) -> int:
        """Take chunks from ``produce`` until the token budget or the text runs out, writing each
        shard as it fills; the number of rows harvested, those of resumed shards included."""
        n_rows = sum(shard["rows"] for shard in self.shards)
        limit = self.key.n_tokens
        if self.shards:
            last = self.shards[-1]
            start, skip, resume_pos = last["next_context"], last["skip_rows"], last["last_pos"]
        else:
            start, skip, resume_pos = 0, 0, -1
        space_checked = False
        with tqdm(total=limit, initial=n_rows, desc="harvest", unit="tok",
                  disable=not self.progress_bar) as bar:
            chunks = iter(produce(start)) if n_rows < limit else iter(())
            try:
                for index, chunk in enumerate(chunks):
                    rows, contexts = _chunk_arrays(chunk, index, self.key.context_length, self.d)
                    self.d = rows["acts"].shape[1]
                    if not space_checked:
                        self._check_space(limit - n_rows)
                        space_checked = True
                    # A producer may restart before `start`: drop what the completed shards hold.
                    rows = _select(rows, rows["seq"] >= start)
                    contexts = _select(contexts, contexts["seq"] >= start)
                    if not len(contexts["seq"]):
                        continue
                    if skip:
                        if (contexts["seq"][0] != start or np.count_nonzero(rows["seq"] == start) < skip
                                or rows["pos"][skip - 1] != resume_pos):
                            raise CacheError(
                                f"produce({start}) yielded other rows for context {start} than the "
                                f"interrupted harvest stored; produce must be deterministic (delete "
                                f"{self.partial} to harvest from scratch)")
                        rows = _select(rows, slice(skip, None))
                        skip = 0
                    if contexts["seq"][0] <= self.last_seq:
                        raise ValueError(f"chunk {index} starts at context {contexts['seq'][0]}, not "
                                         f"after context {self.last_seq}; produce must yield contexts in "
                                         f"increasing seq order")
                    n_new = len(rows["seq"])
                    reached = n_rows + n_new >= limit
                    if reached:
                        rows = _select(rows, slice(0, limit - n_rows))
                        contexts = _select(contexts, contexts["seq"] <= rows["seq"][-1])
                        n_new = limit - n_rows
                    if n_new:
                        self._check_range(rows["acts"], index)
                        if self.extreme_bound is None:
                            self._set_extreme_bound(rows["acts"])
                        self.rows.append(rows)
                    self.contexts.append(contexts)
                    self.n_pending += n_new
                    self.last_seq = int(contexts["seq"][-1])
                    n_rows += n_new
                    bar.update(n_new)
                    while self.n_pending >= self.shard_rows:
                        self._write_shard(self.shard_rows)
                    if reached:
                        break
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        return n_rows

    def _check_range(self, acts_ND: np.ndarray, index: int) -> None:
        """Refuse values the cache's dtype would turn into inf."""
        limit = _HALF_MAX.get(self.key.dtype)
        if limit is None:
            return
        n_over = int(np.count_nonzero(np.abs(acts_ND) > limit))
        if n_over:
            _remove(self.partial)  # the same rows would fail again: nothing there is worth keeping
            wider = "bfloat16 or float32" if self.key.dtype == "float16" else "float32"
            raise ValueError(f"chunk {index} has {n_over} activations with |x| > {limit:.6g}, the largest "
                             f"{self.key.dtype} value; harvest with cache_dtype {wider} (CacheKey.dtype) "
                             f"rather than store them as inf")

    def _set_extreme_bound(self, acts_ND: np.ndarray) -> None:
        rms = math.sqrt(float(np.square(acts_ND, dtype=np.float64).mean()))
        if rms > 0:  # an all-zero first chunk gives no scale: wait for one with values
            self.extreme_bound = EXTREME_FACTOR * rms

    def _bytes_needed(self, n_rows: int) -> int:
        return n_rows * (self.d * self.stored.itemsize + INDEX_BYTES_PER_ROW)

    def _no_space(self, n_rows: int) -> str:
        root = self.folder.parent
        try:
            free = f"; {shutil.disk_usage(root).free / 1e6:,.0f} MB free"
        except OSError:
            free = ""
        size = (f"about {math.ceil(self._bytes_needed(n_rows) / 1e6):,} MB ({n_rows:,} rows of {self.d} "
                f"{self.key.dtype} values + {INDEX_BYTES_PER_ROW} index bytes{free})"
                if self.d is not None else f"room for {n_rows:,} rows{free}")
        return (f"no space left on {root}: this harvest needs {size}; free space or point {CACHE_ENV} "
                f"at a bigger disk")

    def _check_space(self, n_rows: int) -> None:
        """Refuse a harvest that cannot fit before writing any of it."""
        if self._bytes_needed(n_rows) > shutil.disk_usage(self.partial).free:
            _remove(self.partial)
            raise CacheError(self._no_space(n_rows))

    def _start_or_resume(self) -> None:
        """Load a resumable partial harvest (deleting the files of its unfinished shard), or start an
        empty one, discarding a partial folder that does not check out."""
        if self.partial.exists():
            problem = self._load_progress()
            if problem is None:
                expected = {PROGRESS_FILE} | {shard_file(field, i) for i in range(len(self.shards))
                                              for field in self.shard_dtypes}
                for path in self.partial.iterdir():
                    if path.name not in expected:
                        _remove(path)
                return
            if (self.partial / PROGRESS_FILE).exists():  # else no shard was finished: nothing lost
                warnings.warn(f"discarding the unfinished harvest in {self.partial} ({problem}); "
                              f"harvesting again from the start", stacklevel=5)
            shutil.rmtree(self.partial)
            self.shards, self.d, self.last_seq = [], None, -1
        self.partial.mkdir(parents=True)

    def _load_progress(self) -> str | None:
        """Set shards, d, last_seq and the extreme-value record from progress.json; what is wrong
        with it, or None."""
        progress = read_json(self.partial / PROGRESS_FILE)
        if progress is None:
            return "progress.json is missing or unreadable"
        try:
            if progress["format"] != FORMAT or progress["key"] != self.key.to_dict():
                return "progress.json is for another key or format"
            shards, d = progress["shards"], progress["d"]
            bound, example = progress["extreme_bound"], progress["extreme_example"]
            fields = ("rows", "contexts", "next_context", "skip_rows", "last_pos", "n_extreme")
            if not (shards and is_int(d) and d > 0
                    and all(isinstance(s, dict) and all(is_int(s.get(f)) for f in fields) for s in shards)
                    and (bound is None or isinstance(bound, float))
                    and (example is None or isinstance(example, list))):
                return "progress.json is malformed"
        except (KeyError, TypeError):
            return "progress.json is malformed"
        L = self.key.context_length
        for i, shard in enumerate(shards):
            rows, n_ctx = shard["rows"], shard["contexts"]
            expected = {"acts": (rows, d), "token_ids": (rows,), "seq": (rows,), "pos": (rows,),
                        "ctx_input_ids": (n_ctx, L), "ctx_mask": (n_ctx, L), "ctx_seq": (n_ctx,)}
            for field, shape in expected.items():
                path = self.partial / shard_file(field, i)
                problem, _ = file_problem(path, shape, self.shard_dtypes[field])
                if problem is not None:
                    return problem
        self.shards, self.d = shards, d
        self.last_seq = shards[-1]["next_context"] - 1
        self.extreme_bound, self.extreme_example = bound, example
        return None

    def _write_shard(self, n: int) -> None:
        """Write the first n pending rows, and the contexts finished before the next row's context,
        as the next shard; then record it in progress.json."""
        index = len(self.shards)
        taken = _take(self.rows, n)
        self.n_pending -= n
        last_seq, last_pos = int(taken[-1]["seq"][-1]), int(taken[-1]["pos"][-1])
        # Where the harvest continues: the next pending row's context, or after every context seen.
        next_context = int(self.rows[0]["seq"][0]) if self.n_pending else self.last_seq + 1
        skip = 0
        if next_context == last_seq:  # the shard ends inside a context
            skip = sum(int(np.count_nonzero(piece["seq"] == last_seq)) for piece in taken)
            if self.shards and self.shards[-1]["next_context"] == last_seq:
                skip += self.shards[-1]["skip_rows"]
        n_ctx = sum(int(np.count_nonzero(piece["seq"] < next_context)) for piece in self.contexts)
        finished = _take(self.contexts, n_ctx)
        n_extreme = sum(self._count_extreme(piece) for piece in taken)

        _write_npy(self.partial / shard_file("acts", index), (n, self.d), self.stored,
                   (_encode(piece["acts"], self.key.dtype) for piece in taken))
        for field, dtype in INDEX_DTYPES.items():
            _write_npy(self.partial / shard_file(field, index), (n,), dtype, [p[field] for p in taken])
        for field, dtype in CONTEXT_DTYPES.items():
            _write_npy(self.partial / shard_file(f"ctx_{field}", index), self._context_shape(field, n_ctx),
                       dtype, [p[field] for p in finished])
        self.shards.append({"rows": n, "contexts": n_ctx, "next_context": next_context,
                            "skip_rows": skip, "last_pos": last_pos, "n_extreme": n_extreme})
        write_json_atomic(self.partial / PROGRESS_FILE,
                          {"format": FORMAT, "key": self.key.to_dict(), "d": self.d, "shards": self.shards,
                           "extreme_bound": self.extreme_bound, "extreme_example": self.extreme_example})

    def _count_extreme(self, rows: dict[str, np.ndarray]) -> int:
        """The entries of these rows beyond the extreme bound; the first one's place is kept."""
        if self.extreme_bound is None:
            return 0
        extreme_N = (np.abs(rows["acts"]) > self.extreme_bound).sum(axis=1)
        if self.extreme_example is None and extreme_N.any():
            first = int(np.flatnonzero(extreme_N)[0])
            self.extreme_example = [int(rows["seq"][first]), int(rows["pos"][first])]
        return int(extreme_N.sum())

    def _finish(self, n_rows: int) -> None:
        """Gather the contexts table, write meta.json and rename the folder into place."""
        n_contexts = (sum(shard["contexts"] for shard in self.shards)
                      + sum(len(piece["seq"]) for piece in self.contexts))
        for field, dtype in CONTEXT_DTYPES.items():
            pieces = itertools.chain(  # one shard's contexts in memory at a time
                (np.load(self.partial / shard_file(f"ctx_{field}", i), allow_pickle=False)
                 for i in range(len(self.shards))),
                (piece[field] for piece in self.contexts))
            _write_npy(self.partial / context_file(field), self._context_shape(field, n_contexts), dtype,
                       pieces)
        shard_rows = [shard["rows"] for shard in self.shards]
        meta = {"format": FORMAT, "complete": True, "key": self.key.to_dict(), "digest": self.key.digest(),
                "d": self.d, "dtype": self.key.dtype, "n_rows": n_rows, "n_contexts": n_contexts,
                "n_shards": len(shard_rows), "shard_rows": shard_rows,
                "text_ran_out": n_rows < self.key.n_tokens,
                "n_extreme": sum(shard["n_extreme"] for shard in self.shards),
                "extreme_bound": self.extreme_bound}
        write_json_atomic(self.partial / META_FILE, meta)
        os.rename(self.partial, self.folder)
        fsync_path(self.folder.parent)
        # Leftovers of the harvest; a crash before they go leaves harmless extra files.
        for i in range(len(self.shards)):
            for field in CONTEXT_DTYPES:
                _remove(self.folder / shard_file(f"ctx_{field}", i))
        _remove(self.folder / PROGRESS_FILE)

    def _context_shape(self, field: str, n_contexts: int) -> tuple[int, ...]:
        return (n_contexts,) if field == "seq" else (n_contexts, self.key.context_length)


def _encode(acts_ND: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations in their stored form, rounded to nearest even (bfloat16 by torch, as
    numpy has no bfloat16, and kept as its raw bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(acts_ND).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return acts_ND.astype(ACTS_STORAGE[dtype], copy=False)


def _chunk_arrays(chunk: Any, index: int, L: int, d: int | None) -> tuple[dict[str, np.ndarray],
                                                                          dict[str, np.ndarray]]:
    """A chunk's rows and contexts as numpy arrays (acts float32, the rest in their stored dtypes),
    after checking that they fit together; a one-line ValueError naming what is wrong otherwise."""
    if not isinstance(chunk, ActivationChunk):
        raise TypeError(f"produce yielded a {type(chunk).__name__} as chunk {index}; yield "
                        f"workbench.data.types.ActivationChunk records")
    acts = chunk.acts_ND
    if not (isinstance(acts, Tensor) and acts.ndim == 2 and acts.is_floating_point()):
        what = (f"shape {tuple(acts.shape)} dtype {acts.dtype}" if isinstance(acts, Tensor)
                else type(acts).__name__)
        raise ValueError(f"chunk {index}: acts_ND is {what}; it must be an (N, D) float tensor")
    n, width = acts.shape
    if d is not None and width != d:
        raise ValueError(f"chunk {index} has D={width} but the harvest so far has D={d}; one cache "
                         f"holds one site, so give each site its own CacheKey")
    for name in ("token_ids_N", "seq_N", "pos_N"):
        value = getattr(chunk, name)
        if not (isinstance(value, Tensor) and tuple(value.shape) == (n,) and not value.is_floating_point()):
            raise ValueError(f"chunk {index}: {name} must be an integer tensor of shape ({n},), one "
                             f"entry per row of acts_ND")
    batch = chunk.batch
    if not isinstance(batch, TokenBatch):
        raise TypeError(f"chunk {index}: batch is a {type(batch).__name__}; pass the TokenBatch the rows "
                        f"were harvested from")
    ids, mask, seq_S = batch.input_ids_SL, batch.attention_mask_SL, batch.seq_S
    if not (ids.ndim == 2 and ids.shape[1] == L and mask.shape == ids.shape and seq_S.shape == ids.shape[:1]):
        raise ValueError(f"chunk {index}: batch.input_ids_SL {tuple(ids.shape)}, attention_mask_SL "
                         f"{tuple(mask.shape)} and seq_S {tuple(seq_S.shape)} must be (S, {L}), (S, {L}) "
                         f"and (S,), with L = CacheKey.context_length")

    rows = {"acts": acts.detach().to("cpu", torch.float32, copy=True).numpy(),
            "token_ids": chunk.token_ids_N.detach().cpu().numpy(),
            "seq": chunk.seq_N.detach().cpu().numpy().astype(np.int64),
            "pos": chunk.pos_N.detach().cpu().numpy()}
    contexts = {"input_ids": ids.detach().cpu().numpy(), "mask": mask.detach().cpu().numpy(),
                "seq": seq_S.detach().cpu().numpy().astype(np.int64)}
    n_bad = int(np.count_nonzero(~np.isfinite(rows["acts"])))
    if n_bad:
        raise ValueError(f"chunk {index} has {n_bad} NaN/Inf activations; fix them at the source (e.g. "
                         f"fp16 overflow: harvest in float32) rather than caching them")
    for name, values in (("token_ids_N", rows["token_ids"]), ("input_ids_SL", contexts["input_ids"])):
        if values.size and (values.min() < 0 or values.max() > _INT32_MAX):
            raise ValueError(f"chunk {index}: {name} has ids outside [0, {_INT32_MAX}]; pass token ids")
    if n and (rows["pos"].min() < 0 or rows["pos"].max() >= L):
        raise ValueError(f"chunk {index}: pos_N has positions outside [0, {L}); pass each row's position "
                         f"in its context")
    seq_S, seq_N = contexts["seq"], rows["seq"]
    if np.any(np.diff(seq_S) <= 0) or np.any(np.diff(seq_N) < 0):
        raise ValueError(f"chunk {index}: seq_S must increase and seq_N must not decrease; yield contexts "
                         f"and their rows in stream order")
    where_N = np.minimum(np.searchsorted(seq_S, seq_N), len(seq_S) - 1)
    if n and not np.array_equal(seq_S[where_N], seq_N):
        raise ValueError(f"chunk {index}: seq_N names contexts that are not in batch.seq_S; each chunk's "
                         f"rows must come from its own batch")
    for arrays, dtypes in ((rows, _ROW_DTYPES), (contexts, CONTEXT_DTYPES)):
        for field, dtype in dtypes.items():
            arrays[field] = arrays[field].astype(dtype, copy=False)
    return rows, contexts


def _select(arrays: dict[str, np.ndarray], which: np.ndarray | slice) -> dict[str, np.ndarray]:
    return {field: values[which] for field, values in arrays.items()}


def _take(pieces: list[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """Pop the first n entries (rows or contexts) off a list of pieces, splitting one if needed."""
    taken = []
    while n > 0:
        piece = pieces[0]
        size = len(piece["seq"])
        if size <= n:
            taken.append(pieces.pop(0))
        else:
            taken.append(_select(piece, slice(0, n)))
            pieces[0] = _select(piece, slice(n, None))
        n -= min(size, n)
    return taken


def _write_npy(path: Path, shape: tuple[int, ...], dtype: Any, pieces: Iterable[np.ndarray]) -> None:
    """Write the concatenation of pieces, of this total shape, as one .npy file, piece by piece (no
    concatenated copy in memory), and fsync it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for piece in pieces:
            f.write(np.ascontiguousarray(piece, dtype=dtype).data)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
