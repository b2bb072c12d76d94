"""The on-disk activation cache: harvest a model's activations once, train and browse many times.

    key = CacheKey(model="all-MiniLM-L6-v2", site="blocks.3.hook_resid_post", text="cpython:train",
                   n_tokens=500_000, context_length=128)      # dtype="bfloat16" for half the disk
    store = ActivationStore.get_or_create(default_cache_root(), key, produce)   # harvest or reuse
    stream = store.batches(4096, seed=0, epochs=None, scale=store.norm_scale())  # for Trainer.fit

``produce(start_context)`` yields :class:`~workbench.data.types.ActivationChunk` s in stream order,
starting at the context whose ``seq`` is ``start_context`` (it may start earlier, e.g. at its own
batch boundary: rows already stored are dropped). It must be deterministic, as a resumed harvest
trusts it to yield the same rows again.

The cache is three modules, one job each: :mod:`.cache_key` names a harvest (:class:`CacheKey`),
:mod:`.cache_writer` writes one (resumably; its docstring has the resume protocol, the lock and
the full-disk rules), and this one reads a finished one, whatever its stored dtype, as float32.

Folder layout, ``<cache_root>/<key.folder_name()>/`` (plain ``.npy``, always read with
``allow_pickle=False``)::

    meta.json                 the key, d, dtype, n_rows, n_contexts, shard row counts, n_extreme,
                              "complete": true
    acts_00000.npy            (rows, D) activations of shard 0 in the key's dtype: float32, float16,
                              or bfloat16 as uint16 bits; shards hold shard_rows rows, the last fewer
    token_ids_00000.npy       (rows,) int32  the token at each row
    seq_00000.npy             (rows,) int64  the context each row comes from (TokenBatch.seq_S)
    pos_00000.npy             (rows,) int32  the row's position in its context
    contexts_input_ids.npy    (C, L) int32   every context harvested (up to the last row's), by seq
    contexts_mask.npy         (C, L) uint8   their attention masks
    contexts_seq.npy          (C,)   int64   their seq values

A harvest in progress lives in ``<folder>.partial/`` and is renamed into place when complete, so a
folder without a complete meta.json is never opened.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .cache_files import (ACTS_STORAGE, CONTEXT_DTYPES, FORMAT, INDEX_DTYPES, META_FILE, PARTIAL_SUFFIX,
                          CacheError, check_file, context_file, is_int, read_json, shard_file,
                          write_json_atomic)
from .cache_key import CACHE_ENV, CacheKey, default_cache_root
from .cache_writer import harvest_into
from .types import ActivationChunk

__all__ = ["CACHE_ENV", "PARTIAL_SUFFIX", "ActivationStore", "CacheError", "CacheKey", "default_cache_root"]

# Leading words of the numpy seed sequences, so sample(seed=s) and batches(seed=s) never share draws.
_SAMPLE, _BATCHES = 1, 2
# batches() reads shards in blocks of buffer_rows // _BLOCKS_PER_BUFFER rows, so a full buffer
# mixes rows from at least this many places in the text.
_BLOCKS_PER_BUFFER = 16


class ActivationStore:
    """A finished activation cache folder (layout in the module docstring).

    Get one with :meth:`get_or_create` or :meth:`open`. Activations stay on disk: :meth:`batches`,
    :meth:`read_rows`, :meth:`read_shard_rows` and :meth:`sample` read what they need, so a cache may
    be larger than memory, and all of them give float32 whatever ``dtype`` the cache stores.
    The per-row ``token_ids``, ``seq`` and ``pos`` arrays are loaded whole on first use.
    """

    def __init__(self, folder: Path, meta: dict[str, Any], acts_offsets: list[int]):
        """Use :meth:`open`, which checks the folder first."""
        self.folder = folder
        self.meta = meta
        self.key = CacheKey(**meta["key"])
        self.d: int = meta["d"]
        self.dtype: str = self.key.dtype
        self._stored = ACTS_STORAGE[self.dtype]
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
        ``progress`` shows a tqdm bar over tokens. A harvest that does not fit on the disk raises a
        CacheError and leaves nothing behind (see :mod:`.cache_writer`).
        """
        if not isinstance(key, CacheKey):
            raise TypeError(f"key is a {type(key).__name__}; pass a workbench.data.store.CacheKey")
        if not is_int(shard_rows) or shard_rows <= 0:
            raise ValueError(f"shard_rows={shard_rows!r} must be a positive integer")
        root = Path(cache_root) if cache_root is not None else default_cache_root()
        folder = root / key.folder_name()
        if not folder.exists():
            harvest_into(folder, key, produce, shard_rows=shard_rows, progress=progress)
        return cls.open(folder, expect=key)

    @classmethod
    def open(cls, folder: str | Path, expect: CacheKey | None = None) -> ActivationStore:
        """Open a finished cache folder, checking that every file is there whole; ``expect`` also
        checks that it was harvested for that key."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no activation cache at {folder}; harvest one with "
                                    f"ActivationStore.get_or_create(cache_root, key, produce)")
        meta = read_json(folder / META_FILE)
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
            consistent = sum(shard_rows) == n_rows and meta["n_shards"] == len(shard_rows)
            dtype = meta["dtype"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"cache folder {folder} is damaged: meta.json is unreadable ({exc}); "
                             f"delete the folder and harvest again") from None
        if not consistent:
            raise CacheError(f"cache folder {folder} is damaged: meta.json's shard row counts do not "
                             f"add up to n_rows={n_rows}; delete the folder and harvest again")
        if dtype != made.dtype:
            raise CacheError(f"cache folder {folder} is damaged: meta.json says dtype {dtype!r} but its "
                             f"key says {made.dtype!r}; delete the folder and harvest again")
        if expect is not None and made != expect:
            raise CacheError(_mismatch(folder, made, expect))

        acts_offsets = []
        stored = ACTS_STORAGE[made.dtype]
        for i, rows in enumerate(shard_rows):
            acts_offsets.append(check_file(folder, shard_file("acts", i), (rows, d), stored))
            for field, dtype in INDEX_DTYPES.items():
                check_file(folder, shard_file(field, i), (rows,), dtype)
        L = made.context_length
        for field, dtype in CONTEXT_DTYPES.items():
            shape = (n_contexts,) if field == "seq" else (n_contexts, L)
            check_file(folder, context_file(field), shape, dtype)
        return cls(folder, meta, acts_offsets)

    def __repr__(self) -> str:
        dtype = "" if self.dtype == "float32" else f", dtype={self.dtype!r}"
        return (f"ActivationStore(model={self.key.model!r}, site={self.key.site!r}, "
                f"n_rows={self.n_rows}, d={self.d}{dtype}, n_contexts={self.n_contexts}, "
                f"folder='{self.folder}')")

    # ---------------------------------------------------------------------------------------------
    # Rows and contexts

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    def shard_acts(self, shard: int) -> np.ndarray:
        """Shard ``shard``'s (rows, D) float32 activations: memory-mapped read-only from a float32
        cache, decoded into memory (rows · D · 4 bytes) from a half-precision one. To pick a few rows,
        :meth:`read_shard_rows` reads only those."""
        if self.dtype == "float32":
            return self._stored_acts(shard)
        return self.read_shard_rows(shard, slice(None))

    def read_shard_rows(self, shard: int, rows: np.ndarray | slice) -> np.ndarray:
        """Rows ``rows`` (an index array or slice, numbered within the shard) of shard ``shard`` as a
        float32 (R, D) array, reading only those rows from the file."""
        stored_RD = self._stored_acts(shard)[rows]
        out_RD = np.empty(stored_RD.shape, np.float32)
        _decode_into(stored_RD, self.dtype, out_RD)
        return out_RD

    def _stored_acts(self, shard: int) -> np.ndarray:
        """The acts file of a shard in its stored dtype, memory-mapped read-only (each call maps the
        file anew, so many shards never hold many file descriptors at once)."""
        if not is_int(shard) or not 0 <= shard < self.n_shards:
            raise IndexError(f"shard={shard!r} is out of range; this store has {self.n_shards} shards")
        return np.load(self.folder / shard_file("acts", shard), mmap_mode="r", allow_pickle=False)

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` in harvest order as a (stop - start, D) float32 tensor, read as
        contiguous slices of the shard files (e.g. to run an SAE over the whole cache in pieces)."""
        if not (is_int(start) and is_int(stop) and 0 <= start <= stop <= self.n_rows):
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
        return np.load(self.folder / context_file("seq"), allow_pickle=False)

    @cached_property
    def _context_tables(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.load(self.folder / context_file(field), mmap_mode="r", allow_pickle=False)
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
        if not is_int(n) or n <= 0:
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
                rows_R = sorted_N[lo:hi] - self._row_starts[shard]
                out_ND[order_N[lo:hi]] = self.read_shard_rows(shard, rows_R)
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
            write_json_atomic(self.folder / META_FILE, self.meta)
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
        Memory stays near ``buffer_rows · D · 4`` bytes (+1/16) whatever the cache's size; a
        half-precision cache is decoded block by block, so the same holds.

        ``epochs``: passes over the cache, None for endless. ``scale`` multiplies every batch, e.g.
        ``scale=store.norm_scale()``.
        """
        _check_seed(seed)
        if not is_int(batch_size) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if not is_int(buffer_rows) or buffer_rows < batch_size:
            raise ValueError(f"buffer_rows={buffer_rows!r} must be an integer >= batch_size={batch_size}; "
                             f"the buffer is what batches are drawn from")
        if epochs is not None and (not is_int(epochs) or epochs <= 0):
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
        """Read rows start:stop of a shard into out_ND (float32, C-contiguous) with one contiguous
        file read, straight into out_ND from a float32 cache."""
        stored_ND = out_ND if self._stored == np.float32 else np.empty(out_ND.shape, self._stored)
        row_bytes = self.d * self._stored.itemsize
        with open(self.folder / shard_file("acts", shard), "rb") as f:
            f.seek(self._acts_offsets[shard] + start * row_bytes)
            got = f.readinto(stored_ND.reshape(-1).view(np.uint8))
        if got != (stop - start) * row_bytes:
            raise CacheError(f"cache folder {self.folder} is damaged: {shard_file('acts', shard)} "
                             f"ended early; delete the folder and harvest again")
        if stored_ND is not out_ND:
            _decode_into(stored_ND, self.dtype, out_ND)

    def _concat_rows(self, field: str) -> np.ndarray:
        return np.concatenate([np.load(self.folder / shard_file(field, i), allow_pickle=False)
                               for i in range(self.n_shards)])




def _decode_into(stored_ND: np.ndarray, dtype: str, out_ND: np.ndarray) -> None:
    """Stored activations as float32 into out_ND (C-contiguous). A bfloat16 is the top half of the
    float32 it stands for, so shifting its bits up 16 is the exact conversion."""
    if dtype == "bfloat16":
        bits_ND = out_ND.view(np.uint32)
        bits_ND[...] = stored_ND
        bits_ND <<= 16
    else:
        out_ND[...] = stored_ND


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


def _check_seed(seed: Any) -> None:
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
