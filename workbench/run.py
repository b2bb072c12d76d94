"""One training run from one config: data -> SAEs trained side by side -> held-out evaluation.

``workbench train CONFIG`` and ``workbench demo`` both go through :func:`run`; a notebook can too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configtools import from_dict
from .data.synthetic import SyntheticConfig, SyntheticData, recovery_score
from .eval.metrics import evaluate
from .saes import BaseSAE, build_sae, make_config
from .train.trainer import TrainConfig, Trainer

DATA_SOURCES = ("synthetic",)


@dataclass
class DataConfig:
    """Where the activations come from and how they are batched."""

    source: str = "synthetic"
    """"synthetic": activations built from known feature directions in superposition, so that
    recovery of the true features can be scored."""
    batch_size: int = 1024
    """Activations (tokens) per training batch."""
    eval_tokens: int = 32_768
    """Held-out tokens the trained SAEs are evaluated on (never seen in training)."""
    seed: int = 0
    """Seed of the training stream; the held-out stream uses another."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Settings of the synthetic data (used when source is "synthetic")."""

    def validate(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source={self.source!r} must be one of {DATA_SOURCES}")
        for name in ("batch_size", "eval_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be a positive integer")
        self.synthetic.validate()


@dataclass
class RunConfig:
    """A whole run: the SAEs, how to train them, on what data, and where to write them."""

    saes: dict[str, dict[str, Any]]
    """The SAEs to train side by side on one stream, by name: {name: {architecture: topk | gated |
    relu | switch, <field>: <value>, ...}}. d_in defaults to the data's width; the fields of each
    architecture are listed below."""
    train: TrainConfig
    """How to train (steps, learning rate, schedule, checkpoints)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the activations come from."""
    run_dir: str = "runs/latest"
    """Folder for checkpoints, the trained SAE folders (saes/<name>/) and metrics.json."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        cfg = from_dict(cls, data)
        cfg.data.validate()
        if not isinstance(cfg.saes, dict) or not cfg.saes:
            raise ValueError("saes: give at least one SAE, e.g. {my_sae: {architecture: topk, d_sae: 1024, k: 8}}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_saes(cfg: RunConfig, d_in: int) -> dict[str, BaseSAE]:
    saes = {}
    for name, fields in cfg.saes.items():
        if not isinstance(fields, dict) or "architecture" not in fields:
            raise ValueError(f"saes.{name} must be a mapping with an 'architecture' key (topk, gated, relu, switch)")
        fields = {"d_in": d_in, **fields}
        if fields["d_in"] != d_in:
            raise ValueError(f"saes.{name}.d_in={fields['d_in']} but the data has d={d_in}; "
                             f"drop d_in to use the data's width")
        try:
            saes[name] = build_sae(make_config(**fields))
        except ValueError as e:
            raise ValueError(f"saes.{name}: {e}") from None
    return saes


def run(cfg: RunConfig, resume: bool = False) -> dict[str, dict[str, Any]]:
    """Train the configured SAEs, evaluate them on held-out data, write ``metrics.json``.

    Returns {sae name: metrics} (see :func:`workbench.eval.metrics.evaluate`; synthetic data adds
    "recovery", the mean best cosine of each true feature with a decoder row).
    """
    data = SyntheticData(cfg.data.synthetic)
    run_dir = Path(cfg.run_dir)
    if resume:
        trainer = Trainer.resume(run_dir, cfg.train)
    else:
        trainer = Trainer(build_saes(cfg, cfg.data.synthetic.d), cfg.train, run_dir=run_dir)
    trainer.fit(data.batches(cfg.data.batch_size, seed=cfg.data.seed))

    eval_x = data.sample(cfg.data.eval_tokens, seed=cfg.data.seed + 1_000_003)
    results = {}
    for name, sae in trainer.saes.items():
        metrics = evaluate(sae, eval_x.split(cfg.data.batch_size))
        metrics["recovery"] = recovery_score(data.features_FD, sae.W_dec)
        results[name] = metrics
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return results


COLUMNS = [("mse", "MSE", "{:.4f}"), ("fvu", "FVU", "{:.3f}"), ("l0", "L0", "{:.1f}"),
           ("dead_fraction", "dead", "{:.1%}"), ("gamma", "gamma", "{:.3f}"), ("recovery", "recovery", "{:.3f}")]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The evaluation as an aligned text table, one row per SAE."""
    header = ["SAE"] + [title for _, title, _ in COLUMNS]
    rows = [[name] + [fmt.format(m[key]) for key, _, fmt in COLUMNS] for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
