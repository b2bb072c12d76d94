"""One training run from one config: data -> SAEs trained side by side -> held-out evaluation.

``workbench train CONFIG`` and ``workbench demo`` both go through :func:`run`; a notebook can too.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from .data.rank_harvest import RankGroup
from .data.source import ActivationSource
from .data.synthetic import SyntheticData, recovery_score
from .eval.downstream import splice_scores_many
from .eval.features import index_sae, unembedding
from .eval.metrics import evaluate
from .io import fold_input_scale
from .io import load as load_sae
from .runconfig import DataConfig, ModelDataConfig, RunConfig, build_saes
from .train import checkpoint
from .train.distributed import DistContext, init_from_env
from .train.trainer import Trainer

__all__ = ["ActivationSource", "DataConfig", "ModelDataConfig", "RunConfig", "build_saes", "run", "format_table",
           "read_run", "read_history", "run_sae_names", "features_dir", "index_run"]

RUN_CONFIG_FILE = "run_config.json"
"""Written into run_dir/checkpoints/ when a run starts, so that ``resume`` can refuse a changed config."""
RESUMABLE_CHANGES = {("run_dir",), ("train", "progress_bar"), ("train", "checkpoint_every"), ("train", "log_every"),
                     ("data", "model", "cache_dir"), ("data", "model", "device")}
"""Config fields that may differ on resume: where things are and how often to report, not what is
computed."""

RUN_ARTEFACTS = {"checkpoints", "saes", "features", "metrics.json", "history.json", "config.json"}
"""What a run writes into its run_dir; ``run(overwrite=True)`` deletes only a folder made of these."""


def _clear_run_dir(run_dir: Path, delete: bool = True) -> None:
    if not run_dir.exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ARTEFACTS)
    if foreign:
        raise ValueError(f"overwrite=True would delete {run_dir}, which holds files a run does not write "
                         f"({', '.join(foreign[:3])}); choose another run_dir")
    if delete:
        shutil.rmtree(run_dir)


def run(cfg: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False, *,
        dist: DistContext | None = None) -> dict[str, dict[str, Any]]:
    """Train the configured SAEs, evaluate them on held-out data, write ``metrics.json`` and the
    training history (``history.json``, read back with :func:`read_history`).

    Returns {sae name: metrics} (see :func:`workbench.eval.metrics.evaluate`). Synthetic data adds
    "recovery" (the mean best cosine of each true feature with a decoder row); model activations
    add the downstream scores of :func:`workbench.eval.downstream.splice_scores`.

    ``overwrite=True`` first deletes what an earlier run left in ``run_dir`` (so a notebook cell can
    be run again); without it, a run_dir with checkpoints is an error unless ``resume``.

    Under ``torchrun`` (``dist``; by default the environment's, :func:`~workbench.train.distributed.init_from_env`)
    every rank calls it and trains as ``cfg.train.parallel`` says; rank 0 writes the run's files,
    evaluates and returns the results, the other ranks return {} once training has ended. Leaving
    the process group is the caller's (``dist.destroy()``).
    """
    ctx = dist if dist is not None else init_from_env()
    cfg.validate()
    if overwrite and resume:
        raise ValueError("overwrite=True deletes the run that resume=True would continue; choose one")
    if ctx.distributed and cfg.data.batch_size % ctx.world_size:
        size, n = cfg.data.batch_size, ctx.world_size
        raise ValueError(f"data.batch_size={size} does not split over {n} ranks (each trains on an equal share of "
                         f"every global batch); use a multiple of {n}, e.g. {max(size // n, 1) * n}")
    cfg.train.progress_bar = cfg.train.progress_bar and progress
    run_dir = Path(cfg.run_dir)
    data = cfg.data
    if overwrite:
        _clear_run_dir(run_dir, delete=ctx.is_writer)
        ctx.barrier()  # no rank looks at run_dir before rank 0 has emptied it
    # Before any model loads: a bad run_dir fails now, not after training.
    _prepare_run_dir(cfg, run_dir, resume, write=ctx.is_writer)
    if data.source == "synthetic":
        synthetic = SyntheticData(data.synthetic)
        d_in, scale, metadata = data.synthetic.d, None, {"data": "synthetic"}
        stream = synthetic.batches(data.batch_size, seed=data.seed)
        eval_batches = partial(synthetic.sample(data.eval_tokens, seed=data.seed + 1_000_003).split,
                               data.batch_size)
    else:
        # Every rank runs the model on its share of the harvests (the held-out store, and the training
        # store when cached), rank 0 writes them; a streamed training run (cache false) streams on
        # every rank on its own.
        ranks = RankGroup(ctx.rank, ctx.world_size) if ctx.distributed else None
        source = ActivationSource(data.model, data.eval_tokens, progress and ctx.is_writer, ranks=ranks)
        if ranks is not None:
            source.prepare()
        d_in, scale, metadata = source.d, source.scale, source.metadata()
        stream = source.training_stream(data.batch_size, seed=data.seed)
        eval_batches = partial(source.eval.batches, data.batch_size, epochs=1, drop_last=False, scale=scale)

    # One process trains on the CPU; on several ranks the Trainer moves the SAEs to each rank's device.
    if resume:
        trainer = Trainer.resume(run_dir, cfg.train, dist=ctx)
    else:
        trainer = Trainer(build_saes(cfg, d_in), cfg.train, run_dir=run_dir, metadata=metadata, input_scale=scale,
                          dist=ctx)
    trainer.fit(stream)
    trained = trainer.gathered_saes()  # a collective when the SAEs are sharded
    if not ctx.is_writer:
        return {}

    results = {name: evaluate(sae, eval_batches()) for name, sae in trained.items()}
    if data.source == "synthetic":
        for name, sae in trained.items():
            results[name]["recovery"] = recovery_score(synthetic.features_FD, sae.W_dec.cpu())
    else:
        device = next(source.model.parameters()).device
        raw_saes = {name: (fold_input_scale(sae, scale) if scale is not None else sae).to(device)
                    for name, sae in trained.items()}
        scores = splice_scores_many(source.model, raw_saes, source.site, source.downstream_batches(),
                                    progress=False)
        for name in results:
            results[name].update(scores[name])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (run_dir / "history.json").write_text(json.dumps(trainer.history) + "\n")
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return results


def _prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, write: bool = True) -> None:
    """Check run_dir before anything is computed, and (with ``write``: rank 0) record the config a
    resume must match."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir={str(run_dir)!r} is a file, not a folder; choose another run_dir")
    saved_config = run_dir / checkpoint.CHECKPOINTS_DIR / RUN_CONFIG_FILE
    if resume:
        if saved_config.is_file():
            diff = config_diff(json.loads(saved_config.read_text()), cfg.to_dict())
            if diff:
                raise ValueError(f"the config differs from the one {run_dir} was started with, so resuming would "
                                 f"train one run and describe another: {'; '.join(diff)}. Resume with the "
                                 f"original config, or start a new run_dir")
        return
    if checkpoint.latest_checkpoint(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a run with checkpoints; continue it with --resume "
                         f"(resume=True), or choose a new run_dir (overwrite=True deletes it)")
    if not write:
        return
    try:
        saved_config.parent.mkdir(parents=True, exist_ok=True)
        saved_config.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise ValueError(f"cannot write into run_dir={str(run_dir)!r} ({e.strerror}); choose another "
                         f"run_dir") from None


def config_diff(before: Any, after: Any, path: tuple[str, ...] = ()) -> list[str]:
    """The fields where two config dicts differ, as "saes.<name>.k: 32 -> 16" lines, leaving out
    :data:`RESUMABLE_CHANGES`."""
    if path in RESUMABLE_CHANGES:
        return []
    where = ".".join(path) or "config"
    if isinstance(before, dict) and isinstance(after, dict):
        lines = []
        for key in sorted(set(before) | set(after), key=str):
            if key not in after:
                lines.append(f"{where}.{key} removed (was {before[key]!r})")
            elif key not in before:
                lines.append(f"{where}.{key} added ({after[key]!r})")
            else:
                lines += config_diff(before[key], after[key], (*path, str(key)))
        return lines
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        before, after = list(before), list(after)
    return [] if before == after else [f"{where}: {before!r} -> {after!r}"]


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
    cache when that is still there; only the held-out store is opened or harvested, never the
    training one). Saved SAEs read raw activations, so nothing is rescaled.
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
