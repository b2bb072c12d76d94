"""The on-disk activation cache: harvest a model's activations once, train and browse many times.

    key = CacheKey(model="all-MiniLM-L6-v2", site="blocks.3.hook_resid_post", text="cpython:train",
                   n_tokens=500_000, context_length=128)
    store = ActivationStore.get_or_create(default_cache_root(), key, produce)   # harvest or reuse
    stream = store.batches(4096, seed=0, epochs=None, scale=store.norm_scale())  # for Trainer.fit

``produce(start_context)`` yields :class:`~workbench.data.types.ActivationChunk` s in stream order,
starting at the context whose ``seq`` is ``start_context`` (it may start earlier, e.g. at its own
batch boundary: rows already stored are dropped). It must be deterministic, as a resumed harvest
trusts it to yield the same rows again.

Folder layout, ``<cache_root>/<key.folder_name()>/`` (plain ``.npy``, always read with
``allow_pickle=False``)::

    meta.json                 the key, d, dtype, n_rows, n_contexts, shard row counts, "complete": true
    acts_00000.npy            (rows, D) float32 activations of shard 0; shards hold shard_rows rows,
                              the last one fewer
    token_ids_00000.npy       (rows,) int32  the token at each row
    seq_00000.npy             (rows,) int64  the context each row comes from (TokenBatch.seq_S)
    pos_00000.npy             (rows,) int32  the row's position in its context
    contexts_input_ids.npy    (C, L) int32   every context harvested (up to the last row's), by seq
    contexts_mask.npy         (C, L) uint8   their attention masks
    contexts_seq.npy          (C,)   int64   their seq values

Resume protocol. A harvest writes into ``<folder>.partial/``. Whenever ``shard_rows`` rows have
arrived they are written as one shard, with the contexts finished so far (``ctx_*_00000.npy``), every
file fsynced; then ``progress.json`` is replaced atomically by one that adds the shard and where the
harvest continues after it: ``next_context`` (the seq to restart ``produce`` at) and ``skip_rows``
(rows of that context already stored, as a shard may end inside a context). An interrupted harvest
so loses only the shard being filled: the next ``get_or_create`` checks every file progress.json
names, deletes the rest and calls ``produce(next_context)``; if the check fails, the partial folder
is discarded and the harvest starts again. At the end the contexts are gathered into one table,
meta.json is written with ``"complete": true`` and fsynced, and the folder is renamed into place in
one step, so a folder without a complete meta.json is never opened. On POSIX a lock file,
``<folder>.lock``, makes a second process that wants the same key wait for the first one's harvest
and then reuse it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..fsutil import fsync_path, write_text_atomic
from .types import ActivationChunk, TokenBatch

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, so two harvests of one key must not overlap
    fcntl = None

FORMAT = 1
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
CACHE_ENV = "WORKBENCH_CACHE"

# Per-row arrays of a shard, and the contexts table, with the dtypes they are stored in.
_ROW_DTYPES = {"acts": np.float32, "token_ids": np.int32, "seq": np.int64, "pos": np.int32}
_CONTEXT_DTYPES = {"input_ids": np.int32, "mask": np.uint8, "seq": np.int64}
# The files of one shard while harvesting: its rows, and the contexts finished by its end.
_SHARD_DTYPES = _ROW_DTYPES | {f"ctx_{field}": dtype for field, dtype in _CONTEXT_DTYPES.items()}
_INT32_MAX = np.iinfo(np.int32).max
# Leading words of the numpy seed sequences, so sample(seed=s) and batches(seed=s) never share draws.
_SAMPLE, _BATCHES = 1, 2
# batches() reads shards in blocks of buffer_rows // _BLOCKS_PER_BUFFER rows, so a full buffer
# mixes rows from at least this many places in the text.
_BLOCKS_PER_BUFFER = 16


class CacheError(RuntimeError):
    """A cache folder that cannot be used as asked: unfinished, made for another key, or damaged."""


def default_cache_root() -> Path:
    """Where harvests are cached: ``$WORKBENCH_CACHE`` if set, else ``~/.cache/sae-workbench``.

    One root for every notebook and run on a machine, so a harvest made once is reused by all of
    them; point ``WORKBENCH_CACHE`` at a bigger or shared disk for paper-sized harvests."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sae-workbench").expanduser()


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides which rows a harvest writes. Harvests with equal keys are
    interchangeable, so the key names the cache folder, and any change to it is a new harvest."""

    model: str
    """Model name or path, e.g. "sentence-transformers/all-MiniLM-L6-v2"."""
    site: str
    """Where in the model the activations are read, e.g. "blocks.3.hook_resid_post"."""
    text: str
    """The text source: a description such as "cpython:train", or a dataset name/path and split."""
    n_tokens: int
    """Token budget asked for: the harvest stops after this many rows (fewer if the text runs out)."""
    context_length: int
    """Tokens per context (L)."""
    options: str = ""
    """Anything else that changes the rows, e.g. "exclude_special,drop_outliers=10"."""

    def __post_init__(self) -> None:
        for name in ("model", "site", "text", "options"):
            value = getattr(self, name)
            if not isinstance(value, str) or (name != "options" and not value):
                raise ValueError(f"CacheKey.{name}={value!r} must be a non-empty string")
        for name in ("n_tokens", "context_length"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"CacheKey.{name}={value!r} must be a positive integer")
            object.__setattr__(self, name, int(value))  # a numpy integer would not go into JSON

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """12 hex digits of the sha256 of the key's sorted JSON: the same on every run and machine,
        unlike ``hash()``, so a folder name found on disk can be recomputed from the key."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def folder_name(self) -> str:
        """A readable slug followed by the digest, which alone decides identity, e.g.
        ``all-MiniLM-L6-v2__blocks.3.hook_resid_post__cpython_train__500k-L128__1f0c9e0d2a7b``."""
        model = self.model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        parts = [_slug(model), _slug(self.site), _slug(self.text),
                 f"{_count(self.n_tokens)}-L{self.context_length}", self.digest()]
        return "__".join(parts)


class ActivationStore:
    """A finished activation cache folder (layout and protocol in the module docstring).

    Get one with :meth:`get_or_create` or :meth:`open`. Activations stay on disk: :meth:`batches`,
    :meth:`read_rows` and :meth:`sample` read what they need, so a cache may be larger than memory.
    The per-row ``token_ids``, ``seq`` and ``pos`` arrays are loaded whole on first use.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], acts_offsets: list[int]):
        """Use :meth:`open`, which checks the folder first."""
        self.folder = folder
        self.meta = meta
        self.key = CacheKey(**meta["key"])
        self.d: int = meta["d"]
        self.n_rows: int = meta["n_rows"]
        self.n_contexts: int = meta["n_contexts"]
        self.shard_rows: list[int] = list(meta["shard_rows"])
        self._acts_offsets = acts_offsets
        self._row_starts = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)

    # ---------------------------------------------------------------------------------------------
    # Opening and creating

    @classmethod
    def get_or_create(cls, cache_root: str | Path | None, key: CacheKey,
                      produce: Callable[[int], Iterable[ActivationChunk]], *, shard_rows: int = 65_536,
                      progress: bool = True) -> ActivationStore:
        """The store for ``key`` under ``cache_root`` (None: :func:`default_cache_root`): opened if a
        finished harvest is there (``produce`` is not called), else harvested by calling
        ``produce(start_context)``, resuming an interrupted harvest of the same key.

        ``shard_rows`` rows go in each shard file; an interruption loses at most one shard of work.
        ``progress`` shows a tqdm bar over tokens.
        """
        if not isinstance(key, CacheKey):
            raise TypeError(f"key is a {type(key).__name__}; pass a workbench.data.store.CacheKey")
        if not _is_int(shard_rows) or shard_rows <= 0:
            raise ValueError(f"shard_rows={shard_rows!r} must be a positive integer")
        root = Path(cache_root) if cache_root is not None else default_cache_root()
        folder = root / key.folder_name()
        if not folder.exists():
            root.mkdir(parents=True, exist_ok=True)
            with _locked(root / f"{folder.name}{LOCK_SUFFIX}"):
                if not folder.exists():  # else another process finished it while this one waited
                    _Harvest(folder, key, shard_rows, progress).run(produce)
        return cls.open(folder, expect=key)

    @classmethod
    def open(cls, folder: str | Path, expect: CacheKey | None = None) -> ActivationStore:
        """Open a finished cache folder, checking that every file is there whole; ``expect`` also
        checks that it was harvested for that key."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no activation cache at {folder}; harvest one with "
                                    f"ActivationStore.get_or_create(cache_root, key, produce)")
        meta = _read_json(folder / META_FILE)
        if meta is None or meta.get("complete") is not True:
            raise CacheError(f"{folder} is an unfinished harvest (no complete meta.json); rerun the "
                             f"harvest (ActivationStore.get_or_create with the same key) to resume it")
        if meta.get("format") != FORMAT:
            raise CacheError(f"cache folder {folder} has format {meta.get('format')!r} but this "
                             f"workbench reads format {FORMAT}; delete it and harvest again")
        try:
            made = CacheKey(**meta["key"])
            n_rows, n_contexts, d = meta["n_rows"], meta["n_contexts"], meta["d"]
            shard_rows = meta["shard_rows"]
            consistent = (sum(shard_rows) == n_rows and meta["n_shards"] == len(shard_rows)
                          and meta["dtype"] == "float32")
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"cache folder {folder} is damaged: meta.json is unreadable ({exc}); "
                             f"delete the folder and harvest again") from None
        if not consistent:
            raise CacheError(f"cache folder {folder} is damaged: meta.json's shard row counts do not "
                             f"add up to n_rows={n_rows}; delete the folder and harvest again")
        if expect is not None and made != expect:
            raise CacheError(_mismatch(folder, made, expect))

        acts_offsets = []
        for i, rows in enumerate(shard_rows):
            acts_offsets.append(_check_file(folder, _shard_file("acts", i), (rows, d), np.float32))
            for field in ("token_ids", "seq", "pos"):
                _check_file(folder, _shard_file(field, i), (rows,), _ROW_DTYPES[field])
        L = made.context_length
        for field, dtype in _CONTEXT_DTYPES.items():
            shape = (n_contexts,) if field == "seq" else (n_contexts, L)
            _check_file(folder, _context_file(field), shape, dtype)
        return cls(folder, meta, acts_offsets)

    def __repr__(self) -> str:
        return (f"ActivationStore(model={self.key.model!r}, site={self.key.site!r}, "
                f"n_rows={self.n_rows}, d={self.d}, n_contexts={self.n_contexts}, "
                f"folder='{self.folder}')")

    # ---------------------------------------------------------------------------------------------
    # Rows and contexts

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    def shard_acts(self, shard: int) -> np.ndarray:
        """Shard ``shard``'s (rows, D) float32 activations, memory-mapped read-only (each call maps
        the file anew, so many shards never hold many file descriptors at once)."""
        if not _is_int(shard) or not 0 <= shard < self.n_shards:
            raise IndexError(f"shard={shard!r} is out of range; this store has {self.n_shards} shards")
        return np.load(self.folder / _shard_file("acts", shard), mmap_mode="r", allow_pickle=False)

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` in harvest order as a (stop - start, D) float32 tensor, read as
        contiguous slices of the shard files (e.g. to run an SAE over the whole cache in pieces)."""
        if not (_is_int(start) and _is_int(stop) and 0 <= start <= stop <= self.n_rows):
            raise IndexError(f"rows {start!r}:{stop!r} are out of range; this store has "
                             f"{self.n_rows} rows")
        out_ND = np.empty((stop - start, self.d), np.float32)
        first = int(np.searchsorted(self._row_starts, start, side="right")) - 1
        at = start
        for shard in range(first, self.n_shards):
            if at >= stop:
                break
            begin = self._row_starts[shard]
            end = min(stop, self._row_starts[shard + 1])
            self._read_into(shard, at - begin, end - begin, out_ND[at - start:end - start])
            at = end
        return torch.from_numpy(out_ND)

    @cached_property
    def token_ids(self) -> np.ndarray:
        """(n_rows,) int32: the token at each row."""
        return self._concat_rows("token_ids")

    @cached_property
    def seq(self) -> np.ndarray:
        """(n_rows,) int64: the context (``TokenBatch.seq_S``) each row comes from."""
        return self._concat_rows("seq")

    @cached_property
    def pos(self) -> np.ndarray:
        """(n_rows,) int32: each row's position in its context."""
        return self._concat_rows("pos")

    @cached_property
    def context_seq(self) -> np.ndarray:
        """(n_contexts,) int64: the seq of each context in the table, increasing."""
        return np.load(self.folder / _context_file("seq"), allow_pickle=False)

    @cached_property
    def _context_tables(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.load(self.folder / _context_file(field), mmap_mode="r", allow_pickle=False)
                     for field in ("input_ids", "mask"))

    def context(self, seq: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token_ids_L int64, mask_L bool) of the context with this seq value (a row's ``seq``); an
        array of K seq values gives (K, L) arrays, e.g. to show a feature's top rows in context."""
        seq_K = np.asarray(seq, dtype=np.int64)
        index_K = np.searchsorted(self.context_seq, seq_K)
        last = self.n_contexts - 1
        found = (index_K <= last) & (self.context_seq[np.minimum(index_K, last)] == seq_K)
        if not np.all(found):
            missing = seq_K[~found] if seq_K.ndim else seq_K
            raise KeyError(f"no context with seq {np.ravel(missing)[:5].tolist()} in this store; pass "
                           f"seq values from store.seq (the contexts rows were harvested from)")
        ids_CL, mask_CL = self._context_tables
        return ids_CL[index_K].astype(np.int64), mask_CL[index_K].astype(bool)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """min(n, n_rows) distinct rows drawn at random (seeded), as an (n, D) float32 tensor in the
        order drawn: for normalisation statistics and the geometric-median init of b_pre."""
        _check_seed(seed)
        if not _is_int(n) or n <= 0:
            raise ValueError(f"n={n!r} must be a positive integer")
        n = min(n, self.n_rows)
        rows_N = np.random.default_rng([_SAMPLE, seed]).choice(self.n_rows, n, replace=False)
        order_N = np.argsort(rows_N)
        sorted_N = rows_N[order_N]  # in file order, so each shard is read front to back
        out_ND = np.empty((n, self.d), np.float32)
        bounds = np.searchsorted(sorted_N, self._row_starts)
        for shard in range(self.n_shards):
            lo, hi = bounds[shard], bounds[shard + 1]
            if lo < hi:
                out_ND[order_N[lo:hi]] = self.shard_acts(shard)[sorted_N[lo:hi] - self._row_starts[shard]]
        return torch.from_numpy(out_ND)

    def norm_scale(self, n_sample: int = 65_536, seed: int = 0) -> float:
        """The factor s with E||s·x||² = d over a seeded sample of rows, for training on ``s·x``
        (Gemma Scope §3.1, dictionary_learning): one lr and sparsity penalty then suit every model
        and site. Saved in meta.json, so later calls with the same arguments read no rows."""
        saved = self.meta.get("norm_scale")
        if saved and saved["n_sample"] == n_sample and saved["seed"] == seed:
            return saved["value"]
        x_ND = self.sample(n_sample, seed).double()
        mean_sq = float(x_ND.pow(2).sum(dim=1).mean())
        if not math.isfinite(mean_sq) or mean_sq <= 0:
            raise CacheError(f"the sampled activations of {self.folder} have mean squared norm "
                             f"{mean_sq}, so they cannot be normalised; check the harvest's site")
        value = math.sqrt(self.d / mean_sq)
        self.meta["norm_scale"] = {"n_sample": n_sample, "seed": seed, "value": value}
        try:
            _write_json_atomic(self.folder / META_FILE, self.meta)
        except OSError:  # a read-only cache: the scale is just recomputed next time
            pass
        return value

    # ---------------------------------------------------------------------------------------------
    # Training batches

    def batches(self, batch_size: int, *, seed: int = 0, buffer_rows: int = 262_144,
                epochs: int | None = 1, drop_last: bool = True,
                scale: float | None = None) -> Iterator[Tensor]:
        """Shuffled (batch_size, D) float32 tensors, the same sequence for the same arguments (so
        ``Trainer.resume`` can skip what it trained on), a different one for another ``seed``.

        Each epoch cuts the shards into blocks of ``buffer_rows // 16`` rows, reads the blocks in a
        seeded random order as contiguous slices into a buffer of ``buffer_rows`` rows, and draws
        each batch at random from the buffer, topping it up with the next block as it empties. Every
        row is yielded once per epoch (``drop_last`` drops the last, short batch of each epoch).
        Memory stays near ``buffer_rows · D · 4`` bytes (+1/16) whatever the cache's size.

        ``epochs``: passes over the cache, None for endless. ``scale`` multiplies every batch, e.g.
        ``scale=store.norm_scale()``.
        """
        _check_seed(seed)
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if not _is_int(buffer_rows) or buffer_rows < batch_size:
            raise ValueError(f"buffer_rows={buffer_rows!r} must be an integer >= batch_size={batch_size}; "
                             f"the buffer is what batches are drawn from")
        if epochs is not None and (not _is_int(epochs) or epochs <= 0):
            raise ValueError(f"epochs={epochs!r} must be a positive integer, or None for endless")
        if scale is not None and not (isinstance(scale, (int, float, np.floating))
                                      and not isinstance(scale, bool) and 0 < scale < math.inf):
            raise ValueError(f"scale={scale!r} must be a positive number, or None for raw activations")
        if drop_last and self.n_rows < batch_size:
            raise ValueError(f"batch_size={batch_size} is more than the {self.n_rows} rows in this "
                             f"store, so drop_last=True would yield nothing; use a smaller batch")
        return self._batches(batch_size, seed, min(buffer_rows, self.n_rows), epochs, drop_last, scale)

    def _batches(self, B: int, seed: int, capacity: int, epochs: int | None, drop_last: bool,
                 scale: float | None) -> Iterator[Tensor]:
        rng = np.random.default_rng([_BATCHES, seed])
        block_rows = max(1, capacity // _BLOCKS_PER_BUFFER)
        blocks = [(shard, start, min(start + block_rows, rows))
                  for shard, rows in enumerate(self.shard_rows) for start in range(0, rows, block_rows)]
        # Rows [0, n) of buf_ND are the buffer; it is topped up while below capacity, so it may
        # overshoot by one block.
        buf_ND = np.empty((capacity + block_rows, self.d), np.float32)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(blocks))
            n, next_block = 0, 0
            while True:
                while n < capacity and next_block < len(order):
                    shard, start, stop = blocks[order[next_block]]
                    self._read_into(shard, start, stop, buf_ND[n:n + stop - start])
                    n += stop - start
                    next_block += 1
                if n < B:  # every block read (capacity >= B): the epoch's last, short batch
                    if n and not drop_last:
                        yield _scaled(buf_ND[rng.permutation(n)], scale)
                    break
                pick_B = rng.choice(n, B, replace=False)
                batch_BD = buf_ND[pick_B]
                # Close the holes: move the rows of the buffer's last B slots that were not picked
                # into the picked slots below them.
                tail = n - B
                kept_B = np.ones(B, dtype=bool)
                kept_B[pick_B[pick_B >= tail] - tail] = False
                buf_ND[pick_B[pick_B < tail]] = buf_ND[tail + np.flatnonzero(kept_B)]
                n = tail
                yield _scaled(batch_BD, scale)
            epoch += 1

    # ---------------------------------------------------------------------------------------------

    def _read_into(self, shard: int, start: int, stop: int, out_ND: np.ndarray) -> None:
        """Read rows start:stop of a shard into out_ND with one contiguous file read."""
        want = (stop - start) * self.d * 4
        with open(self.folder / _shard_file("acts", shard), "rb") as f:
            f.seek(self._acts_offsets[shard] + start * self.d * 4)
            got = f.readinto(out_ND.reshape(-1).view(np.uint8))
        if got != want:
            raise CacheError(f"cache folder {self.folder} is damaged: {_shard_file('acts', shard)} "
                             f"ended early; delete the folder and harvest again")

    def _concat_rows(self, field: str) -> np.ndarray:
        return np.concatenate([np.load(self.folder / _shard_file(field, i), allow_pickle=False)
                               for i in range(self.n_shards)])


# -------------------------------------------------------------------------------------------------
# Harvesting


class _Harvest:
    """Writes one harvest into ``<folder>.partial`` and renames it into place when complete."""

    def __init__(self, folder: Path, key: CacheKey, shard_rows: int, progress_bar: bool):
        self.folder, self.key, self.shard_rows, self.progress_bar = folder, key, shard_rows, progress_bar
        self.partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        self.shards: list[dict[str, int]] = []  # completed shards, as recorded in progress.json
        self.d: int | None = None
        # Rows and contexts received but not yet in a completed shard, in stream order.
        self.rows: list[dict[str, np.ndarray]] = []
        self.n_pending = 0
        self.contexts: list[dict[str, np.ndarray]] = []
        self.last_seq = -1  # the largest context seq received (or stored) so far

    def run(self, produce: Callable[[int], Iterable[ActivationChunk]]) -> None:
        self._start_or_resume()
        n_rows = sum(shard["rows"] for shard in self.shards)
        limit = self.key.n_tokens
        if self.shards:
            last = self.shards[-1]
            start, skip, resume_pos = last["next_context"], last["skip_rows"], last["last_pos"]
        else:
            start, skip, resume_pos = 0, 0, -1
        with tqdm(total=limit, initial=n_rows, desc="harvest", unit="tok",
                  disable=not self.progress_bar) as bar:
            chunks = iter(produce(start)) if n_rows < limit else iter(())
            try:
                for index, chunk in enumerate(chunks):
                    rows, contexts = _chunk_arrays(chunk, index, self.key.context_length, self.d)
                    self.d = rows["acts"].shape[1]
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
        if self.n_pending:
            self._write_shard(self.n_pending)
        if n_rows == 0:
            shutil.rmtree(self.partial)
            raise ValueError(f"produce yielded no activation rows for {self.key}; check that the "
                             f"text source {self.key.text!r} is not empty")
        if n_rows < limit:
            warnings.warn(f"the text ran out after {n_rows} of the {limit} tokens asked for; the cache "
                          f"{self.folder.name} holds {n_rows} rows (meta.json n_rows)", stacklevel=3)
        self._finish(n_rows)

    # ---------------------------------------------------------------------------------------------

    def _start_or_resume(self) -> None:
        """Load a resumable partial harvest (deleting the files of its unfinished shard), or start an
        empty one, discarding a partial folder that does not check out."""
        if self.partial.exists():
            problem = self._load_progress()
            if problem is None:
                expected = {PROGRESS_FILE} | {_shard_file(field, i) for i in range(len(self.shards))
                                              for field in _SHARD_DTYPES}
                for path in self.partial.iterdir():
                    if path.name not in expected:
                        _remove(path)
                return
            if (self.partial / PROGRESS_FILE).exists():  # else no shard was finished: nothing lost
                warnings.warn(f"discarding the unfinished harvest in {self.partial} ({problem}); "
                              f"harvesting again from the start", stacklevel=4)
            shutil.rmtree(self.partial)
            self.shards, self.d, self.last_seq = [], None, -1
        self.partial.mkdir(parents=True)

    def _load_progress(self) -> str | None:
        """Set shards, d and last_seq from progress.json; what is wrong with it, or None."""
        progress = _read_json(self.partial / PROGRESS_FILE)
        if progress is None:
            return "progress.json is missing or unreadable"
        try:
            if progress["format"] != FORMAT or progress["key"] != self.key.to_dict():
                return "progress.json is for another key or format"
            shards, d = progress["shards"], progress["d"]
            fields = ("rows", "contexts", "next_context", "skip_rows", "last_pos")
            if not (shards and _is_int(d) and d > 0
                    and all(isinstance(s, dict) and all(_is_int(s.get(f)) for f in fields) for s in shards)):
                return "progress.json is malformed"
        except (KeyError, TypeError):
            return "progress.json is malformed"
        L = self.key.context_length
        for i, shard in enumerate(shards):
            rows, n_ctx = shard["rows"], shard["contexts"]
            expected = {"acts": (rows, d), "token_ids": (rows,), "seq": (rows,), "pos": (rows,),
                        "ctx_input_ids": (n_ctx, L), "ctx_mask": (n_ctx, L), "ctx_seq": (n_ctx,)}
            for field, shape in expected.items():
                problem, _ = _file_problem(self.partial / _shard_file(field, i), shape, _SHARD_DTYPES[field])
                if problem is not None:
                    return problem
        self.shards, self.d = shards, d
        self.last_seq = shards[-1]["next_context"] - 1
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

        for field, dtype in _ROW_DTYPES.items():
            shape = (n, self.d) if field == "acts" else (n,)
            _write_npy(self.partial / _shard_file(field, index), shape, dtype, [p[field] for p in taken])
        for field, dtype in _CONTEXT_DTYPES.items():
            _write_npy(self.partial / _shard_file(f"ctx_{field}", index), self._context_shape(field, n_ctx),
                       dtype, [p[field] for p in finished])
        self.shards.append({"rows": n, "contexts": n_ctx, "next_context": next_context,
                            "skip_rows": skip, "last_pos": last_pos})
        _write_json_atomic(self.partial / PROGRESS_FILE,
                           {"format": FORMAT, "key": self.key.to_dict(), "d": self.d, "shards": self.shards})

    def _finish(self, n_rows: int) -> None:
        """Gather the contexts table, write meta.json and rename the folder into place."""
        n_contexts = (sum(shard["contexts"] for shard in self.shards)
                      + sum(len(piece["seq"]) for piece in self.contexts))
        for field, dtype in _CONTEXT_DTYPES.items():
            pieces = itertools.chain(  # one shard's contexts in memory at a time
                (np.load(self.partial / _shard_file(f"ctx_{field}", i), allow_pickle=False)
                 for i in range(len(self.shards))),
                (piece[field] for piece in self.contexts))
            _write_npy(self.partial / _context_file(field), self._context_shape(field, n_contexts), dtype,
                       pieces)
        shard_rows = [shard["rows"] for shard in self.shards]
        meta = {"format": FORMAT, "complete": True, "key": self.key.to_dict(), "digest": self.key.digest(),
                "d": self.d, "dtype": "float32", "n_rows": n_rows, "n_contexts": n_contexts,
                "n_shards": len(shard_rows), "shard_rows": shard_rows,
                "text_ran_out": n_rows < self.key.n_tokens}
        _write_json_atomic(self.partial / META_FILE, meta)
        os.rename(self.partial, self.folder)
        fsync_path(self.folder.parent)
        # Leftovers of the harvest; a crash before they go leaves harmless extra files.
        for i in range(len(self.shards)):
            for field in _CONTEXT_DTYPES:
                _remove(self.folder / _shard_file(f"ctx_{field}", i))
        _remove(self.folder / PROGRESS_FILE)

    def _context_shape(self, field: str, n_contexts: int) -> tuple[int, ...]:
        return (n_contexts,) if field == "seq" else (n_contexts, self.key.context_length)


def _chunk_arrays(chunk: Any, index: int, L: int, d: int | None) -> tuple[dict[str, np.ndarray],
                                                                          dict[str, np.ndarray]]:
    """A chunk's rows and contexts as numpy arrays in their stored dtypes, after checking that they
    fit together; a one-line ValueError naming what is wrong otherwise."""
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
    for arrays, dtypes in ((rows, _ROW_DTYPES), (contexts, _CONTEXT_DTYPES)):
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


# -------------------------------------------------------------------------------------------------
# Files


def _shard_file(field: str, shard: int) -> str:
    return f"{field}_{shard:05d}.npy"


def _context_file(field: str) -> str:
    return f"contexts_{field}.npy"


def _write_npy(path: Path, shape: tuple[int, ...], dtype: type, pieces: Iterable[np.ndarray]) -> None:
    """Write the concatenation of pieces, of this total shape, as one .npy file, piece by piece (no
    concatenated copy in memory), and fsync it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for piece in pieces:
            f.write(np.ascontiguousarray(piece, dtype=dtype).data)
        f.flush()
        os.fsync(f.fileno())


def _check_file(folder: Path, name: str, shape: tuple[int, ...], dtype: type) -> int:
    """The data offset of a whole .npy file with this shape and dtype; a CacheError otherwise."""
    problem, offset = _file_problem(folder / name, shape, dtype)
    if problem is not None:
        raise CacheError(f"cache folder {folder} is damaged: {problem}; delete the folder and harvest again")
    return offset


def _file_problem(path: Path, shape: tuple[int, ...], dtype: type) -> tuple[str | None, int]:
    """(what is wrong with the .npy file at path, or None; its data offset), from its header and
    size alone: cheap enough to check every shard of a large cache."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, fortran, found_dtype = read_header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path.name} is missing", 0
    except (OSError, ValueError) as exc:
        return f"{path.name} is not a readable .npy file ({exc})", 0
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype) or fortran:
        return (f"{path.name} holds {found_shape} {found_dtype}, expected {tuple(shape)} "
                f"{np.dtype(dtype)}"), offset
    expected = offset + math.prod(shape) * np.dtype(dtype).itemsize
    if size != expected:
        return f"{path.name} is {size} bytes, expected {expected}", offset
    return None, offset


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on path (kept on disk: deleting lock files races)."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -------------------------------------------------------------------------------------------------
# Small helpers


def _mismatch(folder: Path, made: CacheKey, expect: CacheKey) -> str:
    if (made.model, made.site) != (expect.model, expect.site):
        names = ["model", "site"]
    else:
        names = [field.name for field in dataclasses.fields(CacheKey)
                 if getattr(made, field.name) != getattr(expect, field.name)]

    def show(key: CacheKey) -> str:
        return " ".join(f"{name}={getattr(key, name)}" for name in names)

    return (f"cache folder {folder} was made for {show(made)}, not {show(expect)}; use another cache "
            f"folder or delete it")


def _scaled(batch_BD: np.ndarray, scale: float | None) -> Tensor:
    if scale is not None:
        batch_BD *= np.float32(scale)
    return torch.from_numpy(batch_BD)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("._")[:40] or "_"


def _count(n: int) -> str:
    """500000 -> "500k", 2000000 -> "2M"; other numbers as they are."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _check_seed(seed: Any) -> None:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
