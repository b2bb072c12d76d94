"""Train one SAE, or several side by side, on one stream of activation batches.

    trainer = Trainer({"k16": sae_k16, "k32": sae_k32}, TrainConfig(total_steps=10_000), run_dir="runs/a")
    history = trainer.fit(stream)         # stream: any iterable of (batch, d_in) float tensors

    trainer = Trainer.resume("runs/a")    # after a crash or a stream that ran out
    history = trainer.fit(stream)         # the same stream again: trained batches are skipped

Each batch is read from the stream once and fed to every SAE; each SAE has its own Adam and lr
schedule. Nothing here is global: every piece of run state lives on the Trainer and goes into its
checkpoints, so distributed training can add a rank to the loop and the checkpoint writer without
changing either.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..eval.metrics import FiringStats
from ..saes.base import BaseSAE, SAEOutput, UnitNormDecoder
from . import checkpoint
from .schedule import make_scheduler

STATE_FORMAT = 2
_NAME_RE = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*")


class BatchError(ValueError):
    """A batch from the activation stream that the SAEs cannot train on, or no batch at all."""


class NonFiniteError(ValueError):
    """An SAE's loss or weights became NaN or infinite; training stopped before saving them."""


@dataclass
class TrainConfig:
    """How to train: length, learning-rate schedule, optimiser, logging and checkpoints."""

    total_steps: int
    """Number of optimiser steps; each step reads one batch from the stream."""
    lr: float | None = None
    """Peak learning rate for every SAE; None uses each SAE's ``default_lr()``, the rate of its paper
    (e.g. 2e-4 / sqrt(d_sae / 2^14) for the k-sparse architectures)."""
    warmup_steps: int = 100
    """Steps of linear lr warm-up from 0; cut short where it would run into the final decay."""
    decay_fraction: float = 0.2
    """Fraction of ``total_steps`` at the end over which the lr decays linearly to 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    grad_clip: float | None = 1.0
    """Clip each SAE's gradient to this global L2 norm before its step; None turns clipping off."""
    log_every: int = 50
    """Add one history row per SAE (and call the callbacks) every this many steps and at the last."""
    checkpoint_every: int | None = None
    """Checkpoint every this many steps (needs a run_dir); one is always written at the end."""
    dead_window_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead: the SAEs' dead-latent
    losses (AuxK) work on those. The history's ``dead_fraction`` counts them too (until that many
    tokens have been seen, the latents that have not fired at all), as
    ``workbench.eval.metrics.FiringStats`` does."""
    seed: int = 0
    """Seed for torch, python ``random`` and numpy when training starts, for whatever draws from
    them (e.g. the stream); each SAE's initial weights come from its own ``cfg.seed``."""
    progress_bar: bool = True
    """Show a tqdm progress bar over the steps."""

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name: str, must: str) -> None:
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} {must}")

        if not _is_int(self.total_steps) or self.total_steps <= 0:
            bad("total_steps", "must be a positive integer")
        if self.lr is not None and not (_is_number(self.lr) and 0 < self.lr < math.inf):
            bad("lr", "must be a positive number, or None for each SAE's default")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            bad("warmup_steps", "must be an integer >= 0")
        if not (_is_number(self.decay_fraction) and 0 <= self.decay_fraction <= 1):
            bad("decay_fraction", "must be between 0 and 1")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            bad("betas", "must be two numbers in [0, 1), e.g. (0.9, 0.999)")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            bad("grad_clip", "must be a positive number, or None to turn clipping off")
        if not _is_int(self.log_every) or self.log_every <= 0:
            bad("log_every", "must be a positive integer")
        every = self.checkpoint_every
        if every is not None and not (_is_int(every) and every > 0):
            bad("checkpoint_every", "must be a positive integer, or None for a checkpoint at the end only")
        if not _is_int(self.dead_window_tokens) or self.dead_window_tokens <= 0:
            bad("dead_window_tokens", "must be a positive integer")
        if not _is_int(self.seed):
            bad("seed", "must be an integer")
        if not isinstance(self.progress_bar, bool):
            bad("progress_bar", "must be True or False")


class Trainer:
    """Trains ``saes`` (one SAE, or a dict name -> SAE) with ``cfg``; ``run_dir`` (optional) receives
    checkpoints and the final SAEs (layout in :mod:`workbench.train.checkpoint`).

    Public state: ``saes``, ``optimizers`` and ``schedulers`` (dicts by name), ``step`` (steps done),
    ``tokens_seen`` and ``history`` (the rows :meth:`fit` returns).
    """

    def __init__(self, saes: BaseSAE | dict[str, BaseSAE], cfg: TrainConfig,
                 run_dir: str | Path | None = None, *, metadata: dict[str, Any] | None = None,
                 input_scale: float | None = None):
        self.saes = _named(saes)
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Written into every saved SAE's cfg.json (e.g. the model and site it was trained on).
        self.metadata = dict(metadata or {})
        # The stream holds input_scale * raw activations; the final SAE folders get the scale folded
        # in so they read raw activations (checkpoints keep the SAEs as trained).
        self.input_scale = input_scale
        if cfg.checkpoint_every is not None and self.run_dir is None:
            raise ValueError(f"TrainConfig.checkpoint_every={cfg.checkpoint_every} needs a run_dir to "
                             f"write checkpoints to; pass Trainer(..., run_dir=...)")
        self.d_in = _shared("d_in", {name: sae.cfg.d_in for name, sae in self.saes.items()})
        self.device = _shared("device", {name: sae.W_dec.device for name, sae in self.saes.items()})
        self.dtype = _shared("dtype", {name: sae.W_dec.dtype for name, sae in self.saes.items()})

        self.optimizers = {name: _adam(sae, sae.default_lr() if cfg.lr is None else cfg.lr, cfg.betas)
                           for name, sae in self.saes.items()}
        self.schedulers = {name: make_scheduler(opt, cfg.total_steps, cfg.warmup_steps, cfg.decay_fraction)
                           for name, opt in self.optimizers.items()}
        self._decoders = {name: UnitNormDecoder([sae.W_dec]) for name, sae in self.saes.items()}
        # The one firing counter of each SAE: its dead mask goes into forward, its dead fraction
        # into the history.
        self.firing = {name: FiringStats(sae.cfg.d_sae, cfg.dead_window_tokens, self.device)
                       for name, sae in self.saes.items()}
        self.step = 0
        self.tokens_seen = 0
        self.history: list[dict[str, Any]] = []
        self._callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._resumed_rng: dict[str, Any] | None = None
        self._checkpointed_step: int | None = None
        # The first step (0-based) at which each SAE's loss was not finite, -1 while it is: kept on
        # the device and read only when a row is logged or a checkpoint written, so a step costs no sync.
        self._bad_step = {name: torch.tensor(-1, device=self.device) for name in self.saes}
        # A stream that can say where it is (StreamingActivations): its position, saved in checkpoints.
        self._stream: Any = None
        self._stream_state: dict[str, Any] | None = None

    def add_callback(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(row)`` with each history row as it is added (e.g. a live dashboard)."""
        self._callbacks.append(fn)

    # ---------------------------------------------------------------------------------------------
    # The loop

    def fit(self, stream: Iterable[Tensor]) -> list[dict[str, Any]]:
        """Train until ``cfg.total_steps`` or the end of ``stream``, and return the history.

        ``stream`` is read from its start. If this trainer has already trained (a resumed run, or
        an earlier ``fit`` whose stream ran out), the batches it has trained on are skipped: pass the
        same deterministic stream again and training continues exactly where it stopped. A stream
        with ``state_dict``/``load_state_dict`` (:class:`~workbench.data.streaming.StreamingActivations`)
        is not replayed: its saved position goes into every checkpoint and is restored instead.

        Each SAE's loss is checked for NaN/Inf at every step without a device sync (the first bad
        step is kept on the device and read when a row is logged or a checkpoint written): a run
        that diverges stops with a :class:`NonFiniteError` naming the SAE, the step and the last good
        checkpoint, and never saves the broken weights.

        History rows (one per SAE every ``log_every`` steps and at the last step): ``step`` (steps
        done), ``sae``, ``tokens``, ``lr`` (used in that step), ``loss`` and ``loss/<term>`` for
        each term the SAE returns, ``mse``, ``l0``, ``dead_fraction``, and the metrics the SAE
        reports about the step's batch (``summarize_metrics``). Values are Python numbers and
        lists, ready for a DataFrame.
        """
        batches = self._open_stream(stream)
        for sae in self.saes.values():
            sae.train()
        try:
            self._fit_loop(batches)
        finally:
            if self._stream is not None:
                self._stream_state = self._stream.state_dict()
            self._stream = None
        for sae in self.saes.values():
            sae.eval()
        return self.history

    def _fit_loop(self, batches: Iterator[tuple[int, Any]]) -> None:
        stats = None
        with tqdm(total=self.cfg.total_steps, initial=self.step, desc="train", unit="step",
                  disable=not self.cfg.progress_bar) as bar:
            while self.step < self.cfg.total_steps:
                item = next(batches, None)
                if item is None:
                    break
                x_BD = self._check_batch(*item)
                if self.step == 0:
                    for sae in self.saes.values():
                        sae.init_from_data_(x_BD)
                stats = self.train_step(x_BD)
                bar.update()
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.total_steps:
                    self._check_finite()
                    self._log(stats, bar)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self._checkpoint()

        if self.step == 0:
            raise BatchError("the activation stream yielded no batches; pass a non-empty iterable of "
                             f"(batch, {self.d_in}) tensors (an exhausted generator yields nothing: "
                             "create it anew for each fit)")
        if self.step < self.cfg.total_steps:
            warnings.warn(f"the activation stream ran out after {self.step} batches, so only {self.step} "
                          f"of {self.cfg.total_steps} steps ran and the lr schedule did not finish; pass "
                          f"a longer stream (Trainer.resume continues a run from its checkpoint) or "
                          f"lower total_steps", stacklevel=3)
            if stats is not None and (not self.history or self.history[-1]["step"] != self.step):
                self._log(stats, None)  # the last step is always in the history
        self._check_finite(weights=True)
        if self.run_dir is not None:
            if self._checkpointed_step != self.step:
                self._checkpoint()
            checkpoint.save_final_saes(self.run_dir, self.saes, self._metadata(), self.input_scale)

    def train_step(self, x_BD: Tensor) -> dict[str, dict[str, Any]]:
        """One optimiser step of every SAE on the batch ``x_BD`` (on the SAEs' device and dtype);
        returns each SAE's step statistics (device tensors, turned into a row only when logged)."""
        stats = {name: self._train_step(name, x_BD) for name in self.saes}
        self.step += 1
        self.tokens_seen += x_BD.shape[0]
        return stats

    def _train_step(self, name: str, x_BD: Tensor) -> dict[str, Any]:
        sae, optimizer, firing = self.saes[name], self.optimizers[name], self.firing[name]
        sae.on_step(self.step)
        out = sae(x_BD, dead_mask=firing.silent_for(self.cfg.dead_window_tokens))
        loss = sum(out.losses.values())
        bad = self._bad_step[name]
        self._bad_step[name] = torch.where((bad < 0) & ~torch.isfinite(loss.detach()), self.step, bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], self.cfg.grad_clip)
        self._decoders[name].project_grads()
        optimizer.step()
        self._decoders[name].renormalise()
        lr = optimizer.param_groups[0]["lr"]
        self.schedulers[name].step()
        firing.update(out.code)
        return _step_stats(out, loss, x_BD, lr)

    # ---------------------------------------------------------------------------------------------
    # The stream

    def _check_batch(self, index: int, batch: Any) -> Tensor:
        """The batch on the SAEs' device and dtype, or a one-line BatchError saying how to fix it."""
        d = self.d_in
        if not isinstance(batch, Tensor):
            raise BatchError(f"batch {index} is a {type(batch).__name__}, not a torch.Tensor; "
                             f"convert it upstream with torch.as_tensor")
        if batch.ndim != 2:
            raise BatchError(f"batch {index} has shape {tuple(batch.shape)} but the SAEs need a 2-D "
                             f"(batch, d_in={d}) tensor; flatten it upstream, e.g. x.reshape(-1, {d})")
        if batch.shape[1] != d:
            raise BatchError(f"batch {index} has {batch.shape[1]} columns but the SAEs read d_in={d}; "
                             f"stream activations from the site the SAEs were built for, or build them "
                             f"with d_in={batch.shape[1]}")
        if batch.shape[0] == 0:
            raise BatchError(f"batch {index} has no rows; drop empty batches upstream")
        if not batch.is_floating_point():
            raise BatchError(f"batch {index} has dtype {batch.dtype}; the SAEs need floating-point "
                             f"activations, cast them upstream with .float()")
        x_BD = batch.to(self.device, self.dtype)
        n_bad = int((~torch.isfinite(x_BD)).sum())
        if n_bad:
            raise BatchError(f"batch {index} contains {n_bad} NaN/Inf values (after casting to "
                             f"{self.dtype}); drop or clip them upstream, e.g. with torch.nan_to_num")
        return x_BD

    def _open_stream(self, stream: Iterable[Tensor]) -> Iterator[tuple[int, Any]]:
        """(position, batch) pairs from the first batch not yet trained on. Seeds the generators
        first and, on a resumed run, restores their saved states after skipping, so a stream that
        draws from them replays exactly as in the uninterrupted run."""
        if self.step == 0 and self.run_dir is not None and checkpoint.latest_checkpoint(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a run with checkpoints; continue it with "
                             f"Trainer.resume({str(self.run_dir)!r}) or train into a new run_dir")
        _seed_all(self.cfg.seed)
        if _has_position(stream):
            self._stream = stream
            if self.step > 0 and self._stream_state is not None:
                stream.load_state_dict(self._stream_state)  # continue where it was; nothing to skip
                return enumerate(stream, start=self.step)
        batches = enumerate(stream)
        for seen in range(self.step):
            if next(batches, None) is None:
                raise ValueError(f"the activation stream ended after {seen} batches while skipping the "
                                 f"{self.step} this run has already trained on; resume with the same "
                                 f"stream the run started with")
        if self._resumed_rng is not None:
            checkpoint.set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        return batches

    # ---------------------------------------------------------------------------------------------
    # Logging and checkpoints

    def _log(self, stats: dict[str, dict[str, Any]], bar: tqdm | None) -> None:
        """Turn the step's stats into one history row per SAE and hand each to the callbacks."""
        losses = {}
        for name, sae_stats in stats.items():
            row: dict[str, Any] = {"step": self.step, "sae": name, "tokens": self.tokens_seen}
            for key, value in sae_stats.items():
                if key != "metrics":
                    row[key] = value.tolist() if isinstance(value, Tensor) else value
            row["dead_fraction"] = self.firing[name].dead_fraction()
            row.update(self.saes[name].summarize_metrics(*sae_stats["metrics"]))
            self.history.append(row)
            losses[name] = f"{row['loss']:.3g}"
            for fn in self._callbacks:
                fn(row)
        if bar is not None:
            bar.set_postfix(losses, refresh=False)

    def _check_finite(self, weights: bool = False) -> None:
        """Stop with a one-line error if an SAE's loss was NaN/Inf at any step so far (or, with
        ``weights``, if its weights are), before anything of it is logged or saved."""
        for name, sae in self.saes.items():
            bad = int(self._bad_step[name])
            if bad < 0 and weights and not all(bool(p.isfinite().all()) for p in sae.parameters()):
                bad = self.step - 1
            if bad >= 0:
                where = (checkpoint.latest_checkpoint(self.run_dir) if self.run_dir is not None else None)
                last = (f"the last good checkpoint is {where} (resume continues from it)" if where is not None
                        else "no checkpoint was written before it")
                raise NonFiniteError(
                    f"SAE {name!r}: the loss became NaN or infinite at step {bad + 1}, so training stopped and "
                    f"nothing after step {bad} was saved; {last}. Lower the lr, turn on grad_clip, or check "
                    f"the activations for huge values (e.g. normalize them)")

    def _checkpoint(self) -> None:
        self._check_finite(weights=True)
        metadata = self._metadata()
        if self.input_scale is not None:
            metadata["reads_scaled_input"] = self.input_scale  # checkpointed SAEs are not folded
        checkpoint.write_checkpoint(self.run_dir, self.step, self.saes, self.state_dict(), metadata)
        self._checkpointed_step = self.step

    def _metadata(self) -> dict[str, Any]:
        return {**self.metadata, "trained_steps": self.step, "trained_tokens": self.tokens_seen}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run, as tensors and plain Python values only."""
        return {
            "format": STATE_FORMAT,
            "train_cfg": dataclasses.asdict(self.cfg),
            "step": self.step,
            # One batch per step, so this equals step; kept apart because it is what resuming skips
            # (and what a per-rank stream position would be under distributed training).
            "batches_consumed": self.step,
            "tokens_seen": self.tokens_seen,
            "saes": {name: {"module": sae.state_dict(),
                            "optimizer": self.optimizers[name].state_dict(),
                            "scheduler": self.schedulers[name].state_dict(),
                            "firing": self.firing[name].state_dict()}
                     for name, sae in self.saes.items()},
            "history": list(self.history),
            "rng": checkpoint.rng_state(),
            "stream": self._stream.state_dict() if self._stream is not None else self._stream_state,
            "metadata": self.metadata,
            "input_scale": self.input_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"trainer state has format {state.get('format')!r}; this workbench reads "
                             f"format {STATE_FORMAT}")
        if list(state["saes"]) != list(self.saes):
            raise ValueError(f"trainer state is for SAEs {list(state['saes'])}, this trainer has "
                             f"{list(self.saes)}")
        for name, sae in self.saes.items():
            sae_state = state["saes"][name]
            sae.load_state_dict(sae_state["module"])
            self.optimizers[name].load_state_dict(sae_state["optimizer"])
            self.schedulers[name].load_state_dict(sae_state["scheduler"])
            self.firing[name].load_state_dict(sae_state["firing"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.history = list(state["history"])
        self._resumed_rng = state["rng"]
        self._stream_state = state.get("stream")
        self.metadata = dict(state["metadata"])
        self.input_scale = state["input_scale"]
        self._checkpointed_step = self.step

    @classmethod
    def resume(cls, run_dir: str | Path, cfg: TrainConfig | None = None,
               device: str | torch.device = "cpu") -> Trainer:
        """Rebuild a run from the latest complete checkpoint in ``run_dir``; then call :meth:`fit`
        with the same stream. Leftovers of an interrupted checkpoint write are deleted. ``cfg``
        replaces the saved TrainConfig (e.g. to turn the progress bar off; changing the schedule
        changes the run); ``device`` is where the rebuilt SAEs go."""
        checkpoint.remove_partial_writes(run_dir)
        folder = checkpoint.latest_checkpoint(run_dir)
        if folder is None:
            where = Path(run_dir) / checkpoint.CHECKPOINTS_DIR
            raise FileNotFoundError(f"no complete checkpoint under {where}; start the run with "
                                    f"Trainer(...).fit(stream) instead")
        saes, state = checkpoint.load_checkpoint(folder)
        trainer = cls({name: sae.to(device) for name, sae in saes.items()},
                      cfg or TrainConfig(**state["train_cfg"]), run_dir)
        trainer.load_state_dict(state)
        return trainer


@torch.no_grad()
def _step_stats(out: SAEOutput, loss: Tensor, x_BD: Tensor, lr: float) -> dict[str, Any]:
    """The numbers a history row reports, kept as device tensors so steps that are not logged cost
    no device sync; ``metrics`` holds the SAE's metric totals and the batch's token count."""
    stats: dict[str, Any] = {"lr": lr, "loss": loss.detach()}
    stats.update({f"loss/{term}": value.detach() for term, value in out.losses.items()})
    stats["mse"] = (out.recon_BD.detach() - x_BD).pow(2).mean()
    stats["l0"] = out.code.l0().float().mean()
    stats["metrics"] = ({name: value.detach() for name, value in out.metrics.items()}, x_BD.shape[0])
    return stats


def _adam(sae: BaseSAE, lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    params = [p for p in sae.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # no fused kernel for this device
        return torch.optim.Adam(params, lr=lr, betas=betas)


def _named(saes: BaseSAE | dict[str, BaseSAE]) -> dict[str, BaseSAE]:
    if isinstance(saes, BaseSAE):
        return {saes.cfg.architecture: saes}
    if not isinstance(saes, dict) or not saes:
        raise ValueError(f"Trainer needs an SAE or a non-empty dict name -> SAE, got {saes!r}")
    for name, sae in saes.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f"SAE name {name!r} must be usable as a folder name: letters, digits and "
                             f"_ . = + - only, not starting with '.'")
        if not isinstance(sae, BaseSAE):
            raise ValueError(f"saes[{name!r}] is a {type(sae).__name__}, not a workbench SAE")
    return dict(saes)


def _shared(what: str, values: dict[str, Any]) -> Any:
    if len(set(values.values())) > 1:
        raise ValueError(f"the SAEs differ in {what}: {values}; one Trainer feeds the same batches to "
                         f"all of them, so they need the same {what}")
    return next(iter(values.values()))


def _has_position(stream: Any) -> bool:
    """Whether a stream saves and restores its own position (``state_dict``/``load_state_dict``)."""
    return callable(getattr(stream, "state_dict", None)) and callable(getattr(stream, "load_state_dict", None))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
