"""Train one SAE, or several side by side, on one stream of activation batches.

    trainer = Trainer({"k16": sae_k16, "k32": sae_k32}, TrainConfig(total_steps=10_000), run_dir="runs/a")
    history = trainer.fit(stream)         # stream: any iterable of (batch, d_in) float tensors

    trainer = Trainer.resume("runs/a")    # after a crash, a stop or a stream that ran out
    history = trainer.fit(stream)         # the same stream again: trained batches are skipped

    run = trainer.start(stream)           # the same loop in a background thread; returns at once
    run.stop()                            # ends it at the next step (and checkpoints, with a run_dir)
    history = run.wait()                  # or `await run` in a notebook, which keeps the kernel free

Each batch is read from the stream once and fed to every SAE; each SAE has its own Adam and lr
schedule. Nothing here is global: every piece of run state lives on the Trainer and goes into its
checkpoints.

Under ``torchrun`` (``Trainer(..., dist=init_from_env())``, ``TrainConfig.parallel``) every rank reads
the same global batch from the stream and trains on its slice of the rows; the losses are the global
batch's (:func:`workbench.saes.batch.batch_group`), the gradients are summed over the ranks, and N
ranks take the step one process takes on the whole batch (:mod:`workbench.train.distributed`). Rank 0
writes the checkpoints and the final SAE folders.
"""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import math
import random
import re
import threading
import time
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
from ..saes.batch import batch_group
from . import checkpoint, distributed
from .distributed import STRATEGIES, DistContext, GlobalFiringStats, Sharding, all_reduce_grads_, shard_rows
from .prefetch import BatchError, Prefetcher, ReadBatch, check_batch, count_nonfinite, nonfinite_error
from .schedule import make_scheduler
from .sparse_step import RowAdam, RowGrads, clip_coefficient, dense_sq_norm, row_param_ids

STATE_FORMAT = 2
OPTIMIZERS = (None, "adam", "sparse_adam")
_NAME_RE = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*")


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
    optimizer: str | None = None
    """``"adam"``: torch's fused Adam over every parameter. ``"sparse_adam"``: for SAEs whose
    dictionary weights get gradient only in the rows of the latents that fired (those that declare
    ``row_sparse_weights()``: the k-sparse architectures), a step that touches those rows only:
    row-sparse gradients, clipping, decoder projection and a lazy Adam on them
    (:mod:`workbench.train.sparse_step`; an untouched row's moments are neither decayed nor
    applied), fused Adam on the other parameters. Its cost then grows with the latents that fire per
    batch, not with the dictionary. None: ``"adam"``."""
    autocast: bool = False
    """Run each SAE's forward in bfloat16 under ``torch.autocast`` (the encoder matmul is the step);
    weights, gradients, Adam and the loss stay float32. CUDA only: on a CPU bf16 matmul is ~150x
    slower than float32, so the trainer refuses it there."""
    compile: bool = False
    """``torch.compile`` each SAE's forward (graph breaks where its code is data-dependent: a
    grouped dispatch, the touched rows). Pays on a GPU, where it fuses the elementwise work
    around the matmuls; on a CPU the compilation alone takes longer than a short run."""
    prefetch: bool | None = None
    """Read the next batch in a background thread while the current one trains (checked for
    NaN/Inf there, on the CPU, and pinned for a ``non_blocking`` copy to the GPU). None: on when
    the SAEs are on a GPU. Checkpoints record the stream position of the batch last trained on."""
    parallel: str | None = None
    """How a ``torchrun`` launch trains on its N ranks (in one process: no effect). ``"data"``: every
    rank holds every SAE whole and trains on its 1/N of the rows of each global batch (every
    architecture; data.batch_size must be divisible by N). The other value of
    ``workbench.train.distributed.STRATEGIES`` shards the experts of a mixture-of-experts SAE over
    the ranks (their weights and Adam state; the rest replicated), for SAEs that offer it. Either way
    N ranks take the step one process takes on the global batch. Refuses ``sparse_adam``."""

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
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {OPTIMIZERS}")
        for name in ("autocast", "compile"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.prefetch is not None and not isinstance(self.prefetch, bool):
            bad("prefetch", "must be True, False, or None (on for a GPU)")
        if self.parallel is not None and self.parallel not in STRATEGIES:
            bad("parallel", f"must be None or one of {STRATEGIES}")


class Trainer:
    """Trains ``saes`` (one SAE, or a dict name -> SAE) with ``cfg``; ``run_dir`` (optional) receives
    checkpoints and the final SAEs (layout in :mod:`workbench.train.checkpoint`).

    Public state: ``saes``, ``optimizers`` and ``schedulers`` (dicts by name), ``step`` (steps done),
    ``tokens_seen`` and ``history`` (the rows :meth:`fit` returns). :meth:`fit` trains in the calling
    thread, :meth:`start` in a background one; a trainer runs one of them at a time.

    ``dist`` (:func:`workbench.train.distributed.init_from_env`) is this process's place in a
    ``torchrun`` launch; on several ranks, every rank builds the Trainer from the same SAEs and
    config and calls :meth:`fit` with the same stream, and ``cfg.parallel`` says how they share the
    work. The SAEs then train on ``dist.device`` (the rank's GPU under nccl), moved there (after
    sharding, so a whole sharded SAE never occupies a GPU); under a sharded strategy ``saes`` holds
    this rank's shards (:meth:`gathered_saes` gives the whole SAEs).
    """

    def __init__(self, saes: BaseSAE | dict[str, BaseSAE], cfg: TrainConfig,
                 run_dir: str | Path | None = None, *, metadata: dict[str, Any] | None = None,
                 input_scale: float | None = None, dist: DistContext | None = None):
        self.saes = _named(saes)
        self.cfg = cfg
        self.dist = dist if dist is not None else DistContext()
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
        self._sharding = self._check_launch()
        # Taken from the whole SAEs: a shard's own config is that of its part.
        lrs = {name: sae.default_lr() if cfg.lr is None else cfg.lr for name, sae in self.saes.items()}
        widths = {name: sae.cfg.d_sae for name, sae in self.saes.items()}
        if self._sharding is not None:
            self.saes = {name: self._sharding.shard(sae, self.dist) for name, sae in self.saes.items()}
        if self.dist.distributed:  # moved after sharding: a whole sharded SAE never reaches the device
            self.device = self.dist.device
            self.saes = {name: sae.to(self.device) for name, sae in self.saes.items()}
        if cfg.autocast and self.device.type != "cuda":
            raise ValueError(f"TrainConfig.autocast=True runs the forward in bfloat16, which needs the SAEs on a "
                             f"CUDA device (they are on {self.device.type}): on a CPU bf16 matmul is ~150x slower "
                             f"than float32; leave autocast off there")
        self._forward = {name: torch.compile(sae) if cfg.compile else sae for name, sae in self.saes.items()}
        self._prefetch = cfg.prefetch if cfg.prefetch is not None else self.device.type == "cuda"
        # With prefetch: the batch last trained on, with the stream position and generators after it.
        self._consumed: ReadBatch | None = None
        # A batch that arrived on the GPU is checked there: the first bad one's index, read when logged.
        self._bad_batch = torch.tensor(-1, device=self.device)

        # With sparse_adam, each SAE's row-sparse weights get a RowAdam and the rest the fused Adam.
        self.row_optimizers = {name: RowAdam(sae, cfg.betas) if cfg.optimizer == "sparse_adam" else None
                               for name, sae in self.saes.items()}
        self.optimizers = {name: _adam(sae, lrs[name], cfg.betas,
                                       skip=row_param_ids(sae) if self.row_optimizers[name] else set())
                           for name, sae in self.saes.items()}
        self.schedulers = {name: make_scheduler(opt, cfg.total_steps, cfg.warmup_steps, cfg.decay_fraction)
                           for name, opt in self.optimizers.items()}
        # Unit-norm decoders stepped densely (a row-sparse decoder is renormalised row by row).
        self._decoders = {name: UnitNormDecoder([] if self.row_optimizers[name] else [sae.W_dec])
                          for name, sae in self.saes.items()}
        # The one firing counter of each SAE: its dead mask goes into forward, its dead fraction
        # into the history. On several ranks it counts the global batch, the same on every rank.
        self.firing = {name: GlobalFiringStats(width, cfg.dead_window_tokens, self.device, self.dist)
                       if self.dist.distributed else FiringStats(width, cfg.dead_window_tokens, self.device)
                       for name, width in widths.items()}
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
        # Held while fit or a started run trains; the stop flag is read once per step.
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._stopped = False  # the last fit ended at a stop() before its last step

    def _check_launch(self) -> Sharding | None:
        """Refuse a launch the run does not fit, in one line; the sharding of a sharded strategy on
        several ranks, else None."""
        ctx, cfg = self.dist, self.cfg
        if not ctx.distributed:
            return None
        where = f"this process is rank {ctx.rank} of {ctx.world_size} (torchrun)"
        if cfg.parallel is None:
            raise ValueError(f"{where} but TrainConfig.parallel is None; set train.parallel to one of {STRATEGIES} "
                             f"(\"data\" trains any SAE), or run one process")
        if cfg.optimizer == "sparse_adam":
            raise ValueError(f"{where}: TrainConfig.optimizer='sparse_adam' is refused under torchrun (its row-sparse "
                             f"step is not reduced across ranks); use optimizer 'adam' under torchrun")
        sharding = distributed.sharding(cfg.parallel)
        if sharding is not None:
            for name, sae in self.saes.items():
                try:
                    sharding.check(sae, ctx.world_size)
                except ValueError as e:
                    raise ValueError(f"train.parallel={cfg.parallel!r}, SAE {name!r}: {e}") from None
        return sharding

    def add_callback(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(row)`` with each history row as it is added (e.g. a live dashboard), in the
        thread that trains (a started run's own); on several ranks, on rank 0 only. A function added
        twice is called once."""
        if fn not in self._callbacks:
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
        self._claim()
        try:
            self._stop.clear()
            with self._progress_bar() as bar:
                return self._fit(stream, bar)
        finally:
            self._busy.release()

    def start(self, stream: Iterable[Tensor]) -> TrainingRun:
        """Train as :meth:`fit` does, in a background thread, and return at once a
        :class:`TrainingRun`: ``wait()`` (or ``await run`` in a notebook) for the history,
        ``stop()`` to end it at the next step, ``history`` for the rows logged so far.

        The thread runs the same loop as ``fit``, so a run that is not stopped ends with exactly the
        weights ``fit`` would give; the callbacks are called in that thread. Torch releases the GIL
        in its kernels, so a notebook stays responsive while it trains (e.g. a
        :class:`~workbench.ui.TrainingDashboard` draws the rows). A stream that draws from the
        global random generators shares them with whatever else runs meanwhile; the workbench's own
        streams carry their own generators. One run per trainer at a time: starting a second, or
        calling ``fit``, while one trains is a RuntimeError.
        """
        if self.dist.distributed:
            raise RuntimeError("Trainer.start trains in a background thread of one process, and a stop() there "
                               "would leave the other ranks waiting; under torchrun call fit() on every rank")
        self._claim()
        try:
            if self.step == 0:
                self._refuse_used_run_dir()  # said now, not at wait()
            self._stop.clear()
            # Made here so that a notebook shows it under the cell that started the run.
            bar = self._progress_bar()
        except BaseException:
            self._busy.release()
            raise
        run = TrainingRun(self)
        # The thread runs in a copy of this context: Jupyter sends what it prints (and the
        # progress bar's updates) to the cell that started it, not to whichever cell runs then.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(run._train, stream, bar),
                                  name="workbench-train", daemon=True)
        run._thread = thread
        thread.start()
        return run

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this trainer is already training (a started run); wait for it with "
                               "run.wait() or end it with run.stop() before training it again")

    def _progress_bar(self) -> tqdm:
        return tqdm(total=self.cfg.total_steps, initial=self.step, desc="train", unit="step",
                    disable=not (self.cfg.progress_bar and self.dist.is_writer))

    def _fit(self, stream: Iterable[Tensor], bar: tqdm) -> list[dict[str, Any]]:
        """The body of :meth:`fit`, run by ``fit`` in the caller's thread and by :meth:`start` in
        its own."""
        self._stopped = False
        batches = self._open_stream(stream)
        for sae in self.saes.values():
            sae.train()
        if self._prefetch:
            batches = Prefetcher(batches, lambda index, batch: self._read_batch(index, batch),
                                 self._live_stream_state, checkpoint.rng_state)
        try:
            self._fit_loop(batches, bar)
        finally:
            if isinstance(batches, Prefetcher):
                batches.close()
            if self._stream is not None:
                self._stream_state = self._stream_position()
            self._stream = None
            self._consumed = None
        for sae in self.saes.values():
            sae.eval()
        return self.history

    def _fit_loop(self, batches: Iterator[tuple[int, Any]], bar: tqdm) -> None:
        stats = None
        while self.step < self.cfg.total_steps:
            if self._stop.is_set():  # a TrainingRun's stop(): end at this step boundary
                self._end_stopped()
                return
            item = next(batches, None)
            if item is None:
                break
            if isinstance(item, ReadBatch):  # read ahead and checked by the prefetch thread
                index, batch = item.index, item.batch
                self._consumed = item
            else:
                index, batch = item[0], self._read_batch(*item)
            stats = self.train_step(self._rank_rows(index, batch))
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
            if self.dist.is_writer:
                warnings.warn(f"the activation stream ran out after {self.step} batches, so only {self.step} "
                              f"of {self.cfg.total_steps} steps ran and the lr schedule did not finish; pass "
                              f"a longer stream (Trainer.resume continues a run from its checkpoint) or "
                              f"lower total_steps", stacklevel=3)
            if stats is not None and (not self.history or self.history[-1]["step"] != self.step):
                self._log(stats, None)  # the last step is always in the history
        self._check_finite(weights=True)
        if self.run_dir is not None:
            whole = self.gathered_saes()
            if self._checkpointed_step != self.step:
                self._checkpoint(whole)
            if self.dist.is_writer:
                checkpoint.save_final_saes(self.run_dir, whole, self._metadata(), self.input_scale)
            self.dist.barrier()  # the other ranks return once the run's folders are written

    def _end_stopped(self) -> None:
        """A stopped run: checkpointed as at a checkpoint step (with a run_dir), so that
        ``Trainer.resume`` (or ``fit`` on this trainer) continues it exactly; the final SAE folders
        are left to the run that reaches its last step. No history row is added."""
        self._stopped = True
        self._check_finite(weights=True)
        if self.run_dir is not None and self.step > 0 and self._checkpointed_step != self.step:
            self._checkpoint()
        if self.step > 0:
            # fit on this same trainer replays the stream to here, then restores the generators as
            # they are now, as Trainer.resume does from the checkpoint.
            self._resumed_rng = self._rng_position()

    def train_step(self, x_BD: Tensor) -> dict[str, dict[str, Any]]:
        """One optimiser step of every SAE on the batch ``x_BD`` (on the SAEs' device and dtype; on
        several ranks, this rank's rows of the global batch, every rank as many); returns each SAE's
        step statistics (device tensors, turned into a row only when logged)."""
        stats = {name: self._train_step(name, x_BD) for name in self.saes}
        self.step += 1
        self.tokens_seen += x_BD.shape[0] * self.dist.world_size
        return stats

    def _train_step(self, name: str, x_BD: Tensor) -> dict[str, Any]:
        sae, optimizer, firing = self.saes[name], self.optimizers[name], self.firing[name]
        row_optimizer = self.row_optimizers[name]
        lr = optimizer.param_groups[0]["lr"]
        sae.on_step(self.step)
        if row_optimizer is None:
            out, loss = self._forward_backward(name, x_BD)
            if self.dist.distributed:
                self._reduce_and_clip(name)
            elif self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], self.cfg.grad_clip)
            self._decoders[name].project_grads()
            optimizer.step()
            self._decoders[name].renormalise()
        else:  # the row-sparse step: the same operations on the rows of the latents that fired
            with RowGrads(sae) as rows:
                out, loss = self._forward_backward(name, x_BD)
            params, coef = optimizer.param_groups[0]["params"], None
            if self.cfg.grad_clip is not None:
                coef = clip_coefficient(dense_sq_norm(params) + rows.sq_norm(), self.cfg.grad_clip)
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
            self._decoders[name].project_grads()  # a unit-norm weight that is not row-sparse, if any
            optimizer.step()
            self._decoders[name].renormalise()
            row_optimizer.step(rows, lr, coef)  # clip, project, Adam and renormalise, row by row
        self.schedulers[name].step()
        firing.update(out.code)
        return _step_stats(out, loss, x_BD, lr)

    def _forward_backward(self, name: str, x_BD: Tensor) -> tuple[SAEOutput, Tensor]:
        """The SAE's forward on the batch, its loss (NaN/Inf noted without a sync) and backward. On
        N ranks the loss is the global batch's, the same on every rank, and each back-propagates
        loss / N (the gradients are summed afterwards)."""
        optimizer = self.optimizers[name]
        ctx = self.dist
        with batch_group(ctx.group, ctx.world_size), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            out = self._forward[name](x_BD, dead_mask=self.firing[name].silent_for(self.cfg.dead_window_tokens))
            loss = sum(out.losses.values())
        bad = self._bad_step[name]
        self._bad_step[name] = torch.where((bad < 0) & ~torch.isfinite(loss.detach()), self.step, bad)
        optimizer.zero_grad(set_to_none=True)
        (loss / ctx.world_size if ctx.distributed else loss).backward()
        return out, loss

    def _reduce_and_clip(self, name: str) -> None:
        """On several ranks: sum the gradients over the ranks (a sharded SAE's replicated ones only)
        and clip them to the whole model's norm, as one process would."""
        clip = self.cfg.grad_clip
        if self._sharding is None:
            params = self.optimizers[name].param_groups[0]["params"]
            all_reduce_grads_(params, self.dist, "sum")
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            return
        sharded = self._sharding.sharded_parameters(self.saes[name])
        replicated = self._sharding.replicated_parameters(self.saes[name])
        all_reduce_grads_(replicated, self.dist, "sum")
        if clip is not None:
            distributed.clip_grad_norm_(sharded, replicated, clip, self.dist)

    # ---------------------------------------------------------------------------------------------
    # The stream

    def _rank_rows(self, index: int, batch: Tensor) -> Tensor:
        """This rank's rows of the global batch, on the SAEs' device (the whole batch on one process).
        Before the first step, every SAE's data-dependent init reads the whole global batch; on
        several ranks the first batch must be the same on every rank, and rank 0's init is every
        rank's (so replicas agree bit for bit even if the ranks' copies of a batch differ in rounding)."""
        ctx = self.dist
        if self.step == 0:
            x_BD = self._to_device(index, batch)
            rows_BD = x_BD
            if ctx.distributed:
                if not distributed.same_on_every_rank(x_BD, ctx):
                    raise ValueError("the ranks read different first batches from the stream; under torchrun every "
                                     "rank must read the same global batches (a stream seeded alike on every rank, as "
                                     "the workbench's own are) and trains on its share of the rows")
                rows_BD = shard_rows(x_BD, ctx.rank, ctx.world_size)
            for name, sae in self.saes.items():
                sae.init_from_data_(x_BD)
                if ctx.distributed:
                    distributed.broadcast_(self._replicated_state(name), ctx)
            return rows_BD
        if ctx.distributed:
            batch = shard_rows(batch, ctx.rank, ctx.world_size)
        return self._to_device(index, batch)

    def _replicated_state(self, name: str) -> list[Tensor]:
        """The tensors of an SAE that every rank holds alike: all of a replica, a shard's replicated
        parameters."""
        sae = self.saes[name]
        if self._sharding is not None:
            return self._sharding.replicated_parameters(sae)
        return [*sae.parameters(), *sae.buffers()]

    def _read_batch(self, index: int, batch: Any) -> Tensor:
        """The batch checked and cast (:func:`~workbench.train.prefetch.check_batch`), pinned for a
        non-blocking copy when it is on the CPU and the SAEs on a GPU."""
        batch = check_batch(index, batch, self.d_in, self.dtype)
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        return batch

    def _to_device(self, index: int, batch: Tensor) -> Tensor:
        if batch.device == self.device:
            x_BD = batch
        else:
            x_BD = batch.to(self.device, non_blocking=batch.is_pinned())
        if batch.device.type != "cpu":  # not checked on the CPU: noted on the device, read when logged
            self._bad_batch = torch.where((self._bad_batch < 0) & (count_nonfinite(x_BD) > 0), index,
                                          self._bad_batch)
        return x_BD

    def _live_stream_state(self) -> dict[str, Any] | None:
        return self._stream.state_dict() if self._stream is not None else None

    def _stream_position(self) -> dict[str, Any] | None:
        """The stream's position after the last batch trained on (not after one read ahead)."""
        if self._stream is None:
            return self._stream_state
        if self._prefetch:
            return self._consumed.stream_state if self._consumed is not None else self._stream_state
        return self._stream.state_dict()

    def _rng_position(self) -> dict[str, Any]:
        """The random generators as they were after the last batch trained on was drawn."""
        if self._prefetch and self._consumed is not None:
            return self._consumed.rng_state
        return checkpoint.rng_state()

    def _open_stream(self, stream: Iterable[Tensor]) -> Iterator[tuple[int, Any]]:
        """(position, batch) pairs from the first batch not yet trained on. Seeds the generators
        first and, on a resumed run, restores their saved states after skipping, so a stream that
        draws from them replays exactly as in the uninterrupted run."""
        if self.step == 0:
            self._refuse_used_run_dir()
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

    def _refuse_used_run_dir(self) -> None:
        if self.run_dir is not None and checkpoint.latest_checkpoint(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds a run with checkpoints; continue it with "
                             f"Trainer.resume({str(self.run_dir)!r}) or train into a new run_dir")

    # ---------------------------------------------------------------------------------------------
    # Logging and checkpoints

    def _log(self, stats: dict[str, dict[str, Any]], bar: tqdm | None) -> None:
        """Turn the step's stats into one history row per SAE and hand each to the callbacks."""
        if self.dist.distributed:
            stats = self._global_stats(stats)
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
            if self.dist.is_writer:
                for fn in self._callbacks:
                    fn(row)
        if bar is not None:
            bar.set_postfix(losses, refresh=False)

    @torch.no_grad()
    def _global_stats(self, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The step's ``mse``, ``l0`` and metric totals over the global batch, by one all-reduce at
        a logged step (the ranks hold equal shares of the rows, so a global mean is the mean of the
        ranks' means). The loss terms are the global batch's already."""
        n_ranks = self.dist.world_size
        parts = [t for sae_stats in stats.values()
                 for t in (sae_stats["mse"], sae_stats["l0"], *sae_stats["metrics"][0].values())]
        flat = distributed.global_sum_(torch.cat([t.reshape(-1).double() for t in parts]), self.dist)
        pieces = iter(flat.split([t.numel() for t in parts]))

        def take(t: Tensor, divide: int = 1) -> Tensor:
            return (next(pieces) / divide).view_as(t).to(t.dtype)

        out = {}
        for name, sae_stats in stats.items():
            totals, n_tokens = sae_stats["metrics"]
            out[name] = {**sae_stats, "mse": take(sae_stats["mse"], n_ranks), "l0": take(sae_stats["l0"], n_ranks)}
            out[name]["metrics"] = ({key: take(value) for key, value in totals.items()}, n_tokens * n_ranks)
        return out

    def _check_finite(self, weights: bool = False) -> None:
        """Stop with a one-line error if an SAE's loss was NaN/Inf at any step so far (or, with
        ``weights``, if its weights are), before anything of it is logged or saved."""
        bad_batch, *bad_steps = self._first_bad(weights)
        if bad_batch >= 0:
            raise nonfinite_error(bad_batch, -1, self.dtype)
        for name, bad in zip(self.saes, bad_steps):
            if bad >= 0:
                where = (checkpoint.latest_checkpoint(self.run_dir) if self.run_dir is not None else None)
                last = (f"the last good checkpoint is {where} (resume continues from it)" if where is not None
                        else "no checkpoint was written before it")
                raise NonFiniteError(
                    f"SAE {name!r}: the loss became NaN or infinite at step {bad + 1}, so training stopped and "
                    f"nothing after step {bad} was saved; {last}. Lower the lr, turn on grad_clip, or check "
                    f"the activations for huge values (e.g. normalize them)")

    def _first_bad(self, weights: bool) -> list[int]:
        """The index of the first non-finite batch, then each SAE's first step with a non-finite loss
        (with ``weights``: the last step, if its weights are not finite now); -1 for none. On several
        ranks, the earliest on any rank, so that every rank stops alike."""
        firsts = [self._bad_batch]
        for name, sae in self.saes.items():
            bad = self._bad_step[name]
            if weights:
                finite = torch.stack([p.isfinite().all() for p in sae.parameters()]).all()
                bad = torch.where((bad < 0) & ~finite, self.step - 1, bad)
            firsts.append(bad)
        return distributed.earliest_(torch.stack(firsts), self.dist).tolist()

    def _checkpoint(self, whole: dict[str, BaseSAE] | None = None) -> None:
        """Write a checkpoint (every rank calls it; ``whole``: :meth:`gathered_saes`, if at hand)."""
        self._check_finite(weights=True)
        metadata = self._metadata()
        if self.input_scale is not None:
            metadata["reads_scaled_input"] = self.input_scale  # checkpointed SAEs are not folded
        if whole is None:
            whole = self.gathered_saes()
        state, rank_state = self.state_dict(), None
        if self._sharding is not None:
            state, rank_state = checkpoint.split_rank_state(state)
        checkpoint.write_checkpoint(self.run_dir, self.step, whole, state, metadata, ctx=self.dist,
                                    rank_state=rank_state)
        self._checkpointed_step = self.step

    def gathered_saes(self) -> dict[str, BaseSAE] | None:
        """The whole SAEs: ``saes`` itself, except under a sharded strategy on several ranks, where
        each is gathered from the ranks onto rank 0's CPU (None on the other ranks; a collective:
        every rank calls it)."""
        if self._sharding is None:
            return self.saes
        whole = {name: self._sharding.gather(sae, self.dist) for name, sae in self.saes.items()}
        return whole if self.dist.is_writer else None

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
                            **({"row_optimizer": self.row_optimizers[name].state_dict()}
                               if self.row_optimizers[name] is not None else {}),
                            "scheduler": self.schedulers[name].state_dict(),
                            "firing": self.firing[name].state_dict()}
                     for name, sae in self.saes.items()},
            "history": list(self.history),
            "rng": self._rng_position(),
            "stream": self._stream_position(),
            "metadata": self.metadata,
            "input_scale": self.input_scale,
            "parallel": self._launch(),
        }

    def _launch(self) -> dict[str, Any]:
        """How the run is spread over ranks, as checkpoints record it (strategy None on one process)."""
        return {"strategy": self.cfg.parallel if self.dist.distributed else None, "world_size": self.dist.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"trainer state has format {state.get('format')!r}; this workbench reads "
                             f"format {STATE_FORMAT}")
        if list(state["saes"]) != list(self.saes):
            raise ValueError(f"trainer state is for SAEs {list(state['saes'])}, this trainer has "
                             f"{list(self.saes)}")
        _check_resumable(state.get("parallel"), self._launch(), "the trainer state")
        for name, sae in self.saes.items():
            sae_state = state["saes"][name]
            sae.load_state_dict(sae_state["module"])
            if ("row_optimizer" in sae_state) != (self.row_optimizers[name] is not None):
                saved = "sparse_adam" if "row_optimizer" in sae_state else "adam"
                raise ValueError(f"the checkpoint of SAE {name!r} was trained with optimizer={saved!r}, this "
                                 f"trainer has optimizer={self.cfg.optimizer!r}; resume with the optimizer "
                                 f"the run started with")
            self.optimizers[name].load_state_dict(sae_state["optimizer"])
            if self.row_optimizers[name] is not None:
                self.row_optimizers[name].load_state_dict(sae_state["row_optimizer"])
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
               device: str | torch.device = "cpu", *, dist: DistContext | None = None) -> Trainer:
        """Rebuild a run from the latest complete checkpoint in ``run_dir``; then call :meth:`fit`
        with the same stream. Leftovers of an interrupted checkpoint write are deleted. ``cfg``
        replaces the saved TrainConfig (e.g. to turn the progress bar off; changing the schedule
        changes the run); ``device`` is where the rebuilt SAEs go (on several ranks: ``dist.device``).

        On several ranks (``dist``) every rank calls it. A data-parallel run resumes on any number
        of ranks (every rank's state is the same; keep the global batch); a sharded run only on
        the world size it was written with, each rank from its own ``rank_{r}.pt``."""
        ctx = dist if dist is not None else DistContext()
        if ctx.is_writer:
            checkpoint.remove_partial_writes(run_dir)
        folder = checkpoint.latest_checkpoint(run_dir)
        if folder is None:
            where = Path(run_dir) / checkpoint.CHECKPOINTS_DIR
            raise FileNotFoundError(f"no complete checkpoint under {where}; start the run with "
                                    f"Trainer(...).fit(stream) instead")
        saes, state = checkpoint.load_checkpoint(folder)
        cfg = cfg or TrainConfig(**state["train_cfg"])
        launch = {"strategy": cfg.parallel if ctx.distributed else None, "world_size": ctx.world_size}
        _check_resumable(state.get("parallel"), launch, str(folder))
        if distributed.sharding((state.get("parallel") or {}).get("strategy")) is not None:
            state = checkpoint.with_rank_state(folder, state, ctx.rank)
        trainer = cls({name: sae.to(device) for name, sae in saes.items()}, cfg, run_dir, dist=ctx)
        trainer.load_state_dict(state)
        return trainer


class TrainingRun:
    """A :class:`Trainer` training in a background thread, as :meth:`Trainer.start` returns it.

        run = trainer.start(stream)
        run.history              # the rows logged so far (a copy)
        run.stop()               # end at the next step boundary (checkpointed with a run_dir)
        history = run.wait()     # blocks; or `history = await run` in a notebook, which leaves the
                                 # kernel free (widgets keep drawing, a Stop button works)

    ``wait`` re-raises what the training raised (e.g. :class:`NonFiniteError`), in the caller.
    Interrupting ``wait`` (or ``await run``) stops the run, as interrupting ``fit`` would end it.
    """

    POLL_SECONDS = 0.25
    """How often ``wait`` and ``await run`` look at the thread, and call the :meth:`watch` functions."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._stopped = False
        self._error: BaseException | None = None
        self._watchers: list[Callable[[TrainingRun], None]] = []
        self._done_callbacks: list[Callable[[TrainingRun], None]] = []
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------
    # State

    @property
    def running(self) -> bool:
        """Whether the thread is still training."""
        return not self._finished.is_set()

    @property
    def done(self) -> bool:
        """Whether training has ended: finished, stopped, or failed (then ``error`` says why)."""
        return self._finished.is_set()

    @property
    def stopped(self) -> bool:
        """Whether the run ended because of :meth:`stop` before its last step."""
        return self._stopped

    @property
    def error(self) -> BaseException | None:
        """What the training raised, once it has ended; None while it runs or if it succeeded."""
        return self._error if self.done else None

    @property
    def step(self) -> int:
        """Steps done so far (the trainer's ``step``)."""
        return self.trainer.step

    @property
    def history(self) -> list[dict[str, Any]]:
        """A copy of the history rows logged so far."""
        return list(self.trainer.history)

    def __repr__(self) -> str:
        total = self.trainer.cfg.total_steps
        state = ("running" if self.running else "stopped" if self._stopped
                 else f"failed ({type(self._error).__name__})" if self._error is not None else "finished")
        return f"<TrainingRun {state} at step {self.trainer.step:,} of {total:,}>"

    # ---------------------------------------------------------------------------------------------
    # Control

    def stop(self) -> None:
        """Ask the run to stop at the next step boundary and return at once (``wait`` for it). The
        trainer then writes a checkpoint if it has a run_dir, as at a checkpoint step, so that
        ``Trainer.resume(run_dir).fit(stream)`` (or ``fit`` on this same trainer) continues it
        bit for bit; the final SAE folders are written by the run that reaches its last step. A run
        that has ended ignores it."""
        with self._lock:
            if self.running:
                self.trainer._stop.set()

    def wait(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Block until training ends and return the history, as ``fit`` does; re-raise what the
        training raised. With ``timeout`` (seconds), raise TimeoutError if it is still training
        then. The :meth:`watch` functions are called from this thread while it waits."""
        if self._thread is threading.current_thread():
            raise RuntimeError("wait() was called from the training thread itself (a callback), where it "
                               "would wait forever; call stop() there instead")
        deadline = None if timeout is None else _now() + timeout
        try:
            while not self._finished.wait(self._slice(deadline)):
                self._call_watchers()
                if deadline is not None and _now() >= deadline:
                    raise TimeoutError(f"the run is still training after {timeout:g} s (step "
                                       f"{self.trainer.step:,} of {self.trainer.cfg.total_steps:,}); "
                                       f"wait() again, or stop() it")
        except KeyboardInterrupt:
            self.stop()
            self._finished.wait()
            raise
        return self._result()

    def __await__(self):
        """``history = await run`` in a notebook: wait without blocking the kernel."""
        return self._wait_async().__await__()

    async def _wait_async(self) -> list[dict[str, Any]]:
        try:
            while not self._finished.is_set():
                await asyncio.sleep(self.POLL_SECONDS)
                self._call_watchers()
        except (KeyboardInterrupt, asyncio.CancelledError):
            self.stop()  # an interrupted cell ends the run, at the next step
            raise
        return self._result()

    def watch(self, fn: Callable[[TrainingRun], None]) -> None:
        """Call ``fn(run)`` from the thread that waits on this run (``wait`` or ``await run``),
        every ``POLL_SECONDS`` while it waits and once when it returns, e.g. to draw the rows of a
        dashboard in the notebook's own thread."""
        self._watchers.append(fn)

    def add_done_callback(self, fn: Callable[[TrainingRun], None]) -> None:
        """Call ``fn(run)`` when training ends (in the training thread; at once if it has ended)."""
        with self._lock:
            if not self.done:
                self._done_callbacks.append(fn)
                return
        fn(self)

    # ---------------------------------------------------------------------------------------------
    # The thread

    def _train(self, stream: Iterable[Tensor], bar: tqdm) -> None:
        try:
            with bar:
                self.trainer._fit(stream, bar)
        except BaseException as exc:  # handed to wait(); nothing is printed from the thread
            self._error = exc
        finally:
            trainer = self.trainer
            self._stopped = trainer._stopped and self._error is None
            trainer._stop.clear()
            trainer._busy.release()
            with self._lock:
                self._finished.set()
                callbacks, self._done_callbacks = self._done_callbacks, []
            for fn in callbacks:
                try:
                    fn(self)
                except Exception as exc:  # a broken callback must not hide the run's own result
                    warnings.warn(f"a TrainingRun done callback raised {exc!r}", stacklevel=1)

    def _result(self) -> list[dict[str, Any]]:
        if self._thread is not None:
            self._thread.join()
        self._call_watchers()
        if self._error is not None:
            raise self._error
        return self.trainer.history

    def _call_watchers(self) -> None:
        for fn in list(self._watchers):
            fn(self)

    def _slice(self, deadline: float | None) -> float:
        if deadline is None:
            return self.POLL_SECONDS
        return max(0.0, min(self.POLL_SECONDS, deadline - _now()))


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


def _adam(sae: BaseSAE, lr: float, betas: tuple[float, float], skip: set[int]) -> torch.optim.Adam:
    """Fused Adam over the SAE's trainable parameters, except those whose id is in ``skip``."""
    params = [p for p in sae.parameters() if p.requires_grad and id(p) not in skip]
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except RuntimeError:  # no fused kernel for this device
        return torch.optim.Adam(params, lr=lr, betas=betas)


def _check_resumable(saved: dict[str, Any] | None, now: dict[str, Any], what: str) -> None:
    """Refuse to continue a sharded run with another strategy or world size, or to shard a run that
    was not (a replicated run resumes on any number of ranks)."""
    saved = saved or {"strategy": None, "world_size": 1}
    sharded = [distributed.sharding(launch["strategy"]) is not None for launch in (saved, now)]
    if any(sharded) and (saved["strategy"], saved["world_size"]) != (now["strategy"], now["world_size"]):
        raise ValueError(f"{what} was written with parallel={saved['strategy']!r} on {saved['world_size']} rank(s), "
                         f"this run has parallel={now['strategy']!r} on {now['world_size']}; a run whose weights "
                         f"are sharded resumes only as it was launched (each rank holds its part's Adam state): "
                         f"resume with parallel={saved['strategy']!r} on {saved['world_size']} rank(s), or start a "
                         f"new run from the checkpoint's SAE folders (workbench.io.load)")


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


def _now() -> float:
    return time.monotonic()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
