"""A language model's activations at one site, as a run uses them: the held-out store, the training
store (or stream), and the token contexts to splice SAEs into the model on.

Held-out text is really held out. A text source with train and eval splits (CPython's prose, a hub
dataset with a "validation" split) uses them; a source with one split (a local file, or
``eval_split == train_split``) is split by document: each document goes to the held-out side when a
hash of its text falls below ``held_out_fraction`` (:func:`is_held_out`), so the split is the same on
every run and machine, and copies of one document land on the same side. Training text is checked
context by context against the held-out contexts as it is read (:class:`DisjointCheck`): a held-out set
that overlaps the training rows is an error, whatever the source.

Cache keys come from content (:mod:`workbench.data.fingerprint`): a local text file or folder by a
digest of its bytes, a local model folder by a manifest of its files; hub names stand for themselves.
Nothing is harvested until it is asked for: ``index``/``browse`` open the held-out store only.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .embedded import DEFAULT_MODEL, cpython_texts, load_model
from .fingerprint import model_fingerprint, text_fingerprint
from .harvest import harvest
from .rank_harvest import RankGroup
from .sites import resolve_site
from .store import ActivationStore, CacheKey, default_cache_root
from .streaming import StreamingActivations
from .text import load_texts, tokenize_contexts
from .types import ActivationChunk, TokenBatch

if TYPE_CHECKING:
    from ..runconfig import ModelDataConfig

_HASH_SPAN = float(2**64)


def is_held_out(text: str, fraction: float) -> bool:
    """Whether a document of a one-split source is held out: the first 8 bytes of its BLAKE2b digest,
    read as a number in [0, 1), fall below ``fraction``."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN < fraction


class OverlapError(ValueError):
    """Held-out text that is also training text."""


class DisjointCheck:
    """Passes training contexts through, raising :class:`OverlapError` once training contexts have
    repeated ``max(2, 1%)`` of the held-out contexts token for token (the held-out store's context
    table). Identical splits repeat every one of them; a lone match is tolerated, as two documents
    that open with the same boilerplate can give one identical context."""

    def __init__(self, held_out: ActivationStore, describe: str):
        ids_CL, _ = held_out.context(held_out.context_seq)
        self.held_out = {row.tobytes(): int(seq) for row, seq in zip(ids_CL.astype(np.int64), held_out.context_seq)}
        self.limit = min(len(self.held_out), max(2, len(self.held_out) // 100))
        self.describe = describe

    def __call__(self, batches: Iterable[TokenBatch]) -> Iterator[TokenBatch]:
        matched: dict[int, int] = {}  # held-out seq -> training seq
        for batch in batches:
            for s, row in enumerate(batch.input_ids_SL.numpy().astype(np.int64)):
                seq = self.held_out.get(row.tobytes())
                if seq is not None:
                    matched.setdefault(seq, int(batch.seq_S[s]))
                    if len(matched) >= self.limit:
                        first = min(matched.items(), key=lambda item: item[1])
                        raise OverlapError(
                            f"held-out text is also training text: {len(matched)} held-out contexts repeat "
                            f"training contexts token for token (held-out context {first[0]} = training context "
                            f"{first[1]}), as {self.describe}; held-out numbers would be measured on training "
                            f"text. Set eval_split equal to train_split to hold out documents by hash")
            yield batch


class TextSplit:
    """Which documents of ``cfg.text`` are trained on and which are held out (see the module
    docstring), and how the cache keys name each side. Reads text only, never the model."""

    def __init__(self, cfg: ModelDataConfig, cache_root: Path):
        self.cfg = cfg
        self.cache_root = cache_root

    @cached_property
    def one_split(self) -> bool:
        """Whether the text is split by document (a local file, or eval_split == train_split)."""
        return Path(self.cfg.text).expanduser().is_file() or self.cfg.eval_split == self.cfg.train_split

    @cached_property
    def text_id(self) -> str:
        """The text source in cache keys: local files and folders by a digest of their bytes."""
        text = self.cfg.text
        path = Path(text).expanduser()
        if text != "cpython" and path.exists():
            return f"{path.resolve().name}@sha256:{text_fingerprint(path, self.cache_root)}"
        return text

    def name(self, held_out: bool) -> str:
        """Which text each side reads, as the cache key and the metadata record it."""
        cfg = self.cfg
        if not self.one_split:
            return cfg.eval_split if held_out else cfg.train_split
        side = "held out" if held_out else "trained on"
        return f"{cfg.train_split}[documents {side}: blake2b < {cfg.held_out_fraction:g}]"

    def texts(self, held_out: bool) -> Iterable[str]:
        """The documents of one side, in source order."""
        cfg = self.cfg
        split = cfg.train_split if self.one_split else (cfg.eval_split if held_out else cfg.train_split)
        if cfg.text == "cpython":
            docs = cpython_texts(split)
        else:
            docs = load_texts(cfg.text, split=split, text_column=cfg.text_column)
        if not self.one_split:
            return docs
        return self._side(docs, held_out)

    def _side(self, docs: Iterable[str], held_out: bool) -> Iterator[str]:
        fraction, n_docs, n_kept = self.cfg.held_out_fraction, 0, 0
        for doc in docs:
            n_docs += 1
            if is_held_out(doc, fraction) == held_out:
                n_kept += 1
                yield doc
        if n_docs and not n_kept:
            side = "held-out" if held_out else "training"
            raise ValueError(f"none of the {n_docs} documents of {self.cfg.text!r} fell on the {side} side of "
                             f"its split by document (held_out_fraction={fraction:g}); a text with one split needs "
                             f"many documents (one per line of a .txt, one per row of a .jsonl)")

    def check_local(self) -> None:
        """Open a local text source (which checks that it is there and not empty) without reading it."""
        if self.cfg.text != "cpython" and Path(self.cfg.text).expanduser().exists():
            load_texts(self.cfg.text, split=self.cfg.train_split, text_column=self.cfg.text_column)

    def overlap_cause(self) -> str:
        """What a training context equal to held-out ones would mean, for :class:`DisjointCheck`."""
        cfg = self.cfg
        if self.one_split:
            return f"{cfg.text!r} repeats long passages across documents"
        return f"eval_split {cfg.eval_split!r} and train_split {cfg.train_split!r} of {cfg.text!r} hold the same documents"


class ActivationSource:
    """The activations ``cfg`` (a :class:`~workbench.runconfig.ModelDataConfig`) describes.

    ``eval`` (the held-out store) and ``train`` (the training store) are harvested, or opened from the
    cache, when first used; :meth:`training_stream` gives the batches to train on, from the training
    store or, with ``cfg.cache`` false, straight from the model.
    """

    def __init__(self, cfg: ModelDataConfig, eval_tokens: int, progress: bool = True,
                 ranks: RankGroup | None = None):
        """``ranks``: under torchrun, the job's ranks, which share the harvests (:meth:`prepare`)."""
        cfg.validate()
        self.cfg = cfg
        self.ranks = ranks if ranks is not None and ranks.world_size > 1 else None
        self.eval_tokens = eval_tokens
        self.progress = progress
        self.cache_root = Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_root()
        self.split = TextSplit(cfg, self.cache_root)
        self.split.check_local()  # a missing or empty local file fails now, not after the model loads
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_model(cfg.name, device=device)
        self.site = resolve_site(self.model, cfg.site)
        self._options = f"exclude_special={cfg.exclude_special},drop_outliers={cfg.drop_outliers}"

    @cached_property
    def model_id(self) -> str:
        """The model in cache keys: a local folder by the manifest of its files."""
        name = self.cfg.name
        path = Path(name).expanduser()
        if name != DEFAULT_MODEL and path.is_dir():
            return f"{path.resolve().name}@files:{model_fingerprint(path)}"
        return name

    def contexts(self, held_out: bool) -> Iterator[TokenBatch]:
        """Token contexts of the training or the held-out text (training contexts checked against the
        held-out ones as they are read)."""
        batches = tokenize_contexts(self.split.texts(held_out), self.tokenizer,
                                    context_length=self.cfg.context_length, progress=False)
        if held_out:
            return batches
        return DisjointCheck(self.eval, self.split.overlap_cause())(batches)

    def metadata(self) -> dict[str, Any]:
        return {"model": self.cfg.name, "site": self.site.name, "text": self.cfg.text,
                "context_length": self.cfg.context_length, "prepend_bos": True, "text_id": self.split.text_id,
                "train_text": self.split.name(False), "held_out_text": self.split.name(True)}

    # ---------------------------------------------------------------------------------------------
    # Stores and streams

    @cached_property
    def eval(self) -> ActivationStore:
        """The held-out store (eval_tokens rows), always cached: it is small and read many times."""
        return self._store(True, self.eval_tokens, "float32")

    @cached_property
    def train(self) -> ActivationStore:
        """The training store (n_tokens rows, in cfg.cache_dtype)."""
        if not self.cfg.cache:
            raise ValueError("data.model.cache is false, so the training activations are streamed, not "
                             "stored; use training_stream(), or set cache: true to harvest them to disk")
        return self._store(False, self.cfg.n_tokens, self.cfg.cache_dtype)

    @property
    def d(self) -> int:
        return self.eval.d

    @cached_property
    def scale(self) -> float | None:
        """The factor that brings activations to E|x|^2 = d (None when cfg.normalize is off), from
        the training store, or from the held-out store when streaming (no training rows are kept)."""
        if not self.cfg.normalize:
            return None
        return (self.train if self.cfg.cache else self.eval).norm_scale()

    def training_stream(self, batch_size: int, seed: int) -> Iterable[Tensor]:
        """Endless shuffled training batches, normalised by :attr:`scale`: from the training store,
        or computed from the model as needed (cfg.cache false; resumable through the trainer's
        checkpoints, see :class:`~workbench.data.streaming.StreamingActivations`)."""
        if self.cfg.cache:
            return self.train.batches(batch_size, seed=seed, epochs=None, scale=self.scale)
        device = next(self.model.parameters()).device
        # Under torchrun every rank streams on its own (a stream is not a harvest the ranks share).
        return StreamingActivations(self._produce(False, shared=False), batch_size=batch_size,
                                    buffer_tokens=self.cfg.stream_buffer_tokens, n_tokens=self.cfg.n_tokens,
                                    context_length=self.cfg.context_length, seed=seed, scale=self.scale,
                                    device=device)

    def prepare(self) -> None:
        """Harvest (or open) the held-out and the training store now. Under torchrun every rank takes
        part: each runs the model on its share of the batches and rank 0 writes the caches
        (:mod:`workbench.data.rank_harvest`); the others open them when rank 0 is done."""
        if self.ranks is None or self.ranks.rank == 0:
            try:
                _ = self.eval
                if self.cfg.cache:
                    _ = self.train
            finally:
                if self.ranks is not None:
                    self.ranks.finish()
            return
        self.ranks.serve({int(held_out): self._contexts_and_run(held_out) for held_out in (True, False)})
        _ = self.eval
        if self.cfg.cache:
            _ = self.train

    def _contexts_and_run(self, held_out: bool):
        special = self.tokenizer.all_special_ids if self.cfg.exclude_special else ()

        def contexts(start_context: int) -> Iterator[TokenBatch]:
            return (b for b in self.contexts(held_out) if int(b.seq_S[-1]) >= start_context)

        def run(batches: Iterable[TokenBatch]) -> Iterator[ActivationChunk]:
            return harvest(self.model, self.site, batches, exclude_special_ids=special,
                           drop_outliers=self.cfg.drop_outliers, progress=False)  # the store counts tokens

        return contexts, run

    def _produce(self, held_out: bool, shared: bool = True):
        """``produce(start_context)`` of a store's harvest; ``shared``: run by every rank under
        torchrun (rank 0's cache writer gets the other ranks' chunks)."""
        contexts, run = self._contexts_and_run(held_out)
        if shared and self.ranks is not None and self.ranks.rank == 0:
            return self.ranks.split(int(held_out), contexts, run)

        def produce(start_context: int) -> Iterator[ActivationChunk]:
            return run(contexts(start_context))

        return produce

    def _store(self, held_out: bool, n_tokens: int, dtype: str) -> ActivationStore:
        text = f"{self.split.text_id}:{self.split.name(held_out)}"
        key = CacheKey(model=self.model_id, site=self.site.name, text=text, n_tokens=n_tokens, context_length=self.cfg.context_length, options=self._options,
                       dtype=dtype)
        return ActivationStore.get_or_create(self.cache_root, key, self._produce(held_out), progress=self.progress)

    def downstream_batches(self) -> Iterator[TokenBatch]:
        """The first ``downstream_contexts`` held-out contexts."""
        remaining = self.cfg.downstream_contexts
        for batch in self.contexts(held_out=True):
            if remaining <= 0:
                return
            yield TokenBatch(*(t[:remaining] for t in batch))
            remaining -= batch.seq_S.shape[0]
