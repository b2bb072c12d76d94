"""Speed measurements: SAE training steps (ours against plain dense references) and harvesting.

The code behind ``benchmarks/bench_saes.py``, ``benchmarks/bench_harvest.py`` and notebook 09::

    rows = sae_rows(d=384, m=4096, k=16, batch=1024, experts=[16], dense_experts=[16])
    measure(rows, rounds=5)
    by = {row.name: row for row in rows}
    paired_ratio(by["switch dense E=16"], by["switch E=16"])   # how much faster our Switch step is

Every timed thing is a :class:`Timed` row: a callable, its times and, for training steps, the
analytic FLOPs per token. :func:`measure` times the rows round-robin (one call of each per round,
the order rotated every round) after warm-up calls, so a slow spell on a shared machine hits every
row alike; :func:`paired_ratio` then takes the median of the per-round ratios of two rows.

The dense references are what the naive code path does: :class:`DenseTopK` (dense encoder, topk,
scatter into a dense code, dense decoder matmul) and :class:`DenseMaskedSwitch` (the Switch SAE
paper's code: every latent encoded, masked to the chosen expert's block, topk over all of them,
dense decode). Both are built from one of our SAEs and compute the same reconstruction.

Shape suffixes: B batch, D model dim, F latents (M), K active latents, E experts.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .data.harvest import harvest
from .data.sites import Site, block_list
from .data.types import TokenBatch
from .saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE
from .saes import topk as topk_module
from .saes.base import BaseSAE, Code, SAEOutput
from .saes.switch import load_balance_loss
from .train.trainer import TrainConfig, Trainer

# -------------------------------------------------------------------------------------------------
# Dense reference models (plain autograd), initialised from one of ours


class DenseTopK(BaseSAE):
    """Naive TopK: dense pre-activations, topk, scatter into a dense code, dense decoder matmul."""

    def __init__(self, sae: TopKSAE):
        if sae.cfg.latent_bias:
            raise ValueError("DenseTopK copies a TopK SAE without an encoder bias; use latent_bias=False")
        super().__init__(sae.cfg)
        self.W_enc = nn.Parameter(sae.W_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())

    def _code(self, x_BD: Tensor) -> Tensor:
        pre_BF = (x_BD - self.b_dec) @ self.W_enc
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter(1, idx_BK, vals_BK.relu())

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        return Code(self._code(x_BD), None, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        z_BF = self._code(x_BD)
        recon_BD = z_BF @ self.W_dec + self.b_dec
        total_var = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
        losses = {"fvu": (x_BD - recon_BD).pow(2).sum(-1).mean() / total_var}
        return SAEOutput(recon_BD, Code(z_BF, None, self.cfg.d_sae), losses, {})

    def flops_per_token(self, training: bool = False) -> int:
        """Matmul FLOPs: encoder 2*d*M and dense decoder 2*d*M forward; a training step adds four
        dense gradients of 2*d*M each: the decoder weight's, the code's, the encoder weight's and the
        encoder input's (b_dec is subtracted before the encoder, so it needs one)."""
        dm = self.cfg.d_in * self.cfg.d_sae
        return 12 * dm if training else 4 * dm


class DenseMaskedSwitch(BaseSAE):
    """The Switch SAE paper's forward: every latent encoded, masked by p_{i*} on the chosen expert's
    block (0 elsewhere), topk over all M, dense decoder matmul."""

    def __init__(self, sae: SwitchSAE):
        if sae.cfg.gate != "softmax":
            raise ValueError(f"DenseMaskedSwitch follows the paper's softmax gate; this SAE has gate={sae.cfg.gate!r}")
        super().__init__(sae.cfg)
        for name in ("W_enc", "W_dec", "b_dec", "W_router", "b_router"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))
        self.register_buffer("block_F", torch.arange(sae.cfg.d_sae, device=sae.W_dec.device) // sae.cfg.expert_width)

    def _code(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs_BE = torch.softmax((x_BD - self.b_router) @ self.W_router, dim=-1)
        p_top_B, expert_B = probs_BE.max(-1)
        z_BF = torch.relu((x_BD - self.b_dec) @ self.W_enc)
        mask_BF = (self.block_F[None, :] == expert_B[:, None]) * p_top_B[:, None]
        vals_BK, idx_BK = (z_BF * mask_BF).topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(z_BF).scatter(1, idx_BK, vals_BK), probs_BE, expert_B

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        return Code(self._code(x_BD)[0], None, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        dense_BF, probs_BE, expert_B = self._code(x_BD)
        recon_BD = dense_BF @ self.W_dec + self.b_dec
        losses = {"mse": (x_BD - recon_BD).pow(2).mean()}
        if self.cfg.lb_alpha > 0:
            losses["load_balance"] = self.cfg.lb_alpha * load_balance_loss(probs_BE, expert_B)
        return SAEOutput(recon_BD, Code(dense_BF, None, self.cfg.d_sae), losses, {})

    def flops_per_token(self, training: bool = False) -> int:
        """Matmul FLOPs: router 2*d*E, encoder 2*d*M and dense decoder 2*d*M forward; a training step
        adds the router's weight and input gradients (2 * 2*d*E, the input one for b_router) and, as
        :meth:`DenseTopK.flops_per_token`, four dense gradients of 2*d*M each."""
        d, m, e = self.cfg.d_in, self.cfg.d_sae, self.cfg.n_experts
        forward = 2 * d * e + 4 * d * m
        return forward + 2 * 2 * d * e + 8 * d * m if training else forward


# -------------------------------------------------------------------------------------------------
# Timed rows


@dataclass
class Timed:
    """One thing to time: ``run()`` is called once per round; ``times`` collects the seconds."""

    name: str
    run: Callable[[], object]
    flops_per_token: int | None = None
    """Analytic FLOPs per token of one call (training steps only; None where not counted)."""
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """Median seconds per call."""
        if not self.times:
            raise ValueError(f"{self.name!r} has not been timed yet; call measure([...]) first")
        return statistics.median(self.times)


def step_row(name: str, model: BaseSAE, x_BD: Tensor, lr: float, optimizer: str | None = None,
             **train_fields: Any) -> Timed:
    """A training step of ``model`` on the fixed batch ``x_BD``: :meth:`Trainer.train_step` of a
    trainer with the constant rate ``lr`` (no warm-up or decay), ``optimizer`` (a
    ``TrainConfig.optimizer``) and any other ``TrainConfig`` fields (``autocast``, ``compile``), so
    the row times exactly what training runs (fused Adam or the row-sparse step, clipping, the
    decoder constraint, firing counts and step statistics)."""
    cfg = TrainConfig(total_steps=2**62, lr=lr, warmup_steps=0, decay_fraction=0.0, progress_bar=False,
                      optimizer=optimizer, **train_fields)
    trainer = Trainer(model, cfg)
    model.train()
    return Timed(name, lambda: trainer.train_step(x_BD), model.flops_per_token(training=True))


def benchmark_batch(d: int, batch: int, device: str | torch.device = "cpu", seed: int = 0) -> Tensor:
    """The (batch, d) activations every step row trains on: Gaussian with a common offset (so that
    b_dec has something to learn), seeded."""
    gen = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(batch, d, generator=gen) + 2.0 * torch.randn(d, generator=gen)
    return x_BD.to(device)


def sae_rows(d: int, m: int, k: int, batch: int, experts: Iterable[int] = (4, 16, 64),
             dense_experts: Iterable[int] = (16,), *, matmul: bool = True, topk_dense: bool = True,
             device: str | torch.device = "cpu", optimizer: str | None = None) -> list[Timed]:
    """The rows of ``bench_saes.py``, all at width ``m`` and ``k`` on one batch of ``batch`` tokens:

    ``topk`` (our TopKSAE step); ``enc matmul`` (its dense encoder matmul alone) and ``enc matmul
    chunked`` (the same in the row chunks TopKSAE uses on the CPU), when ``matmul``; ``topk dense``
    (:class:`DenseTopK`), when ``topk_dense``; ``switch E=e`` for each e of ``experts`` and
    ``switch dense E=e`` (:class:`DenseMaskedSwitch`) for each e of ``dense_experts``. Our SAEs step
    with ``optimizer`` (``TrainConfig.optimizer``); the dense references always with dense Adam.
    """
    experts, dense_experts = list(experts), list(dense_experts)
    for e in experts + dense_experts:
        if m % e:
            raise ValueError(f"m={m} is not divisible by {e} experts; choose expert counts that divide m")
    x_BD = benchmark_batch(d, batch, device)

    topk = TopKSAE(TopKConfig(d_in=d, d_sae=m, k=k)).to(device)
    topk.init_from_data_(x_BD)
    lr = topk.cfg.default_lr()
    rows = [step_row("topk", topk, x_BD, lr, optimizer)]
    if matmul:
        rows += encoder_matmul_rows(topk, x_BD)
    if topk_dense:
        rows.append(step_row("topk dense", DenseTopK(topk), x_BD, lr))
    for e in sorted(set(experts) | set(dense_experts)):
        switch = SwitchSAE(SwitchConfig(d_in=d, d_sae=m, k=k, n_experts=e)).to(device)
        switch.init_from_data_(x_BD)
        dense = DenseMaskedSwitch(switch) if e in dense_experts else None  # a copy before any step
        if e in experts:
            rows.append(step_row(f"switch E={e}", switch, x_BD, lr, optimizer))
        if dense is not None:
            rows.append(step_row(f"switch dense E={e}", dense, x_BD, lr))
    return rows


def moonshot_rows(d: int, m0: int, k: int, batch: int, experts: int = 32, *, device: str | torch.device = "cpu",
                  optimizer: str | None = None) -> list[Timed]:
    """``topk M=m0`` and ``switch E=experts M=experts*m0``: a Switch SAE ``experts`` times wider
    than the TopK, each expert as wide as the TopK, so both run the same encoder matmul per token;
    everything else in the Switch step should then cost what it costs the TopK (the target is 0.8x
    the TopK's tokens/s or better)."""
    x_BD = benchmark_batch(d, batch, device)
    topk = TopKSAE(TopKConfig(d_in=d, d_sae=m0, k=k)).to(device)
    switch = SwitchSAE(SwitchConfig(d_in=d, d_sae=experts * m0, k=k, n_experts=experts)).to(device)
    rows = []
    for name, sae in ((f"moonshot topk M={m0:,}", topk), (f"moonshot switch E={experts} M={experts * m0:,}", switch)):
        sae.init_from_data_(x_BD)
        rows.append(step_row(name, sae, x_BD, sae.default_lr(), optimizer))
    return rows


def encoder_matmul_rows(topk: TopKSAE, x_BD: Tensor) -> list[Timed]:
    """``enc matmul``: TopK's dense encoder matmul ``(x - b_dec) @ W_enc`` alone, a fresh (B, M)
    output each call; ``enc matmul chunked``: the same in the ~24 MiB row chunks TopKSAE runs it in
    on the CPU, each chunk's output reused while in cache."""
    W_enc, b_dec = topk.W_enc.detach().clone(), topk.b_dec.detach().clone()
    chunk = max(1, topk_module._CHUNK_ELEMENTS // topk.cfg.d_sae)

    @torch.no_grad()
    def encoder_matmul() -> Tensor:
        return (x_BD - b_dec) @ W_enc

    @torch.no_grad()
    def encoder_matmul_in_chunks() -> None:
        xc_BD = x_BD - b_dec
        for start in range(0, x_BD.shape[0], chunk):
            xc_BD[start:start + chunk] @ W_enc

    return [Timed("enc matmul", encoder_matmul), Timed("enc matmul chunked", encoder_matmul_in_chunks)]


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(rows: list[Timed], rounds: int = 5, warmup: int = 1) -> None:
    """Call every row ``warmup`` times untimed, then ``rounds`` rounds of one timed call per row,
    the order rotated by one every round; appends to each row's ``times``."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    for row in rows:
        for _ in range(warmup):
            row.run()
    _synchronize()
    for r in range(rounds):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            t0 = time.perf_counter()
            row.run()
            _synchronize()
            row.times.append(time.perf_counter() - t0)


def paired_ratio(slow: Timed, fast: Timed) -> float:
    """Median over rounds of time(slow) / time(fast): how many times faster ``fast`` is, with a slow
    spell that hits a whole round cancelling out."""
    if not slow.times or len(slow.times) != len(fast.times):
        raise ValueError(f"{slow.name!r} and {fast.name!r} need the same number of timed rounds "
                         f"({len(slow.times)} and {len(fast.times)}); time them together with measure()")
    return statistics.median(ts / tf for ts, tf in zip(slow.times, fast.times))


# -------------------------------------------------------------------------------------------------
# Harvesting


@contextmanager
def truncated(model: nn.Module, layer: int) -> Iterator[None]:
    """Temporarily give ``model`` only its blocks 0..layer (the same block objects)."""
    found = block_list(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks to truncate")
    path, blocks = found
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.ModuleList(list(blocks)[: layer + 1]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


def harvest_rows(model: nn.Module, site: Site, batches: list[TokenBatch],
                 exclude_special_ids: Iterable[int] = ()) -> list[Timed]:
    """Three ways to get the site's activations of ``batches``:

    ``harvest``: :func:`workbench.data.harvest.harvest` (forward hook at the site, forward stopped
    right after it, padding and special tokens dropped); ``bare``: the model with its blocks cut to
    0..layer, run plainly, the floor for any harvester that has to compute those layers; ``full``:
    the whole model with ``output_hidden_states=True``, what a harvest without the early stop costs.
    """
    specials = list(exclude_special_ids)

    def run_harvest() -> None:
        for chunk in harvest(model, site, batches, exclude_special_ids=specials, progress=False):
            chunk.acts_ND.sum()

    @torch.inference_mode()
    def run_bare() -> None:
        with truncated(model, site.layer):
            for b in batches:
                model(input_ids=b.input_ids_SL, attention_mask=b.attention_mask_SL)

    @torch.inference_mode()
    def run_full() -> None:
        for b in batches:
            model(input_ids=b.input_ids_SL, attention_mask=b.attention_mask_SL, output_hidden_states=True)

    return [Timed("harvest", run_harvest), Timed("bare", run_bare), Timed("full", run_full)]


def n_tokens(batches: Iterable[TokenBatch]) -> int:
    """Real (unpadded) tokens in ``batches``."""
    return sum(int(b.attention_mask_SL.sum()) for b in batches)


def summary(rows: list[Timed], tokens: int) -> list[dict[str, Any]]:
    """One dict per row: name, median and min milliseconds, tokens/s (``tokens`` per call), and the
    analytic FLOPs per token where known."""
    return [{"name": r.name, "median_ms": 1e3 * r.median, "min_ms": 1e3 * min(r.times),
             "tokens_per_s": tokens / r.median, "flops_per_token": r.flops_per_token} for r in rows]
