"""SAE evaluation metrics over a batch of tokens, streaming firing statistics, and :func:`evaluate`.

Shape suffixes: B tokens, D model dim (d_in), F latents (d_sae). Unless a docstring says
otherwise a function reduces over the tokens of the batch it is given and returns a Python float.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..saes.base import BaseSAE, Code, sparse_decode


def mse(x_BD: Tensor, recon_BD: Tensor) -> float:
    """mean_{b,d} (x - x_hat)^2, averaged over every element.

    The papers' MSE sums over d and averages over tokens, E_b ||x - x_hat||^2: d times this value.
    """
    return (x_BD - recon_BD).pow(2).mean().item()


def fvu(x_BD: Tensor, recon_BD: Tensor) -> float:
    """Fraction of variance unexplained (normalised MSE): sum_b ||x - x_hat||^2 / sum_b ||x - mean_b x||^2."""
    return ((x_BD - recon_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()).item()


def explained_variance(x_BD: Tensor, recon_BD: Tensor) -> float:
    """1 - sum_d Var_b(x - x_hat) / sum_d Var_b(x), dictionary_learning's "frac_variance_explained".

    Unlike 1 - FVU it subtracts the mean error first, so a constant offset in x_hat is not penalised.
    """
    err_BD = x_BD - recon_BD
    return (1 - err_BD.var(0, correction=0).sum() / x_BD.var(0, correction=0).sum()).item()


def l0(code: Code) -> float:
    """Mean over tokens of the number of latents with a positive activation."""
    return code.l0().float().mean().item()


def cosine_similarity(x_BD: Tensor, recon_BD: Tensor) -> float:
    """mean_b cos(x_b, x_hat_b)."""
    return F.cosine_similarity(x_BD, recon_BD, dim=-1).mean().item()


def relative_reconstruction_bias(x_BD: Tensor, recon_BD: Tensor) -> float:
    """gamma = E_b ||x_hat||^2 / E_b [x . x_hat] (Rajamanoharan et al. 2024, Eq. 10).

    gamma is the inverse of the scale that best fits x_hat to x: gamma < 1 means the SAE shrinks its
    reconstructions (as an L1 penalty does), gamma = 1 means no shrinkage.
    """
    return (recon_BD.pow(2).sum() / (x_BD * recon_BD).sum()).item()


class FiringStats:
    """Per-latent firing statistics streamed over batches, O(F) per :meth:`update`: the one firing
    counter of the workbench (the Trainer keeps one per SAE; :func:`evaluate` one per evaluation).

    A latent is dead when it has not fired on any of the last min(window_tokens, tokens_seen)
    tokens: once a full window has streamed past, "not in the last ``window_tokens`` tokens";
    before that, "not on any token seen so far", so a short evaluation still reports the latents
    that never fired instead of reporting none. (The dead mask that drives a dead-latent loss in
    training, :meth:`silent_for`, counts nothing as dead before a whole window has passed.) Firing
    is tracked at batch resolution: a latent that fires anywhere in a batch counts as having fired
    at the batch's last token.

    Firing frequencies are over every token seen, not only the window.
    """

    def __init__(self, d_sae: int, window_tokens: int | None = 10_000_000, device: str | torch.device = "cpu"):
        """``window_tokens=None`` makes the window every token seen (dead = never fired)."""
        if window_tokens is not None and window_tokens <= 0:
            raise ValueError(f"window_tokens={window_tokens} must be positive, or None for all tokens seen")
        self.d_sae = d_sae
        self.window_tokens = window_tokens
        self.tokens_seen = 0
        self.tokens_since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.fire_counts_F = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, code: Code) -> None:
        """Add one batch: its ``fire_counts()`` and its B tokens (no device sync)."""
        self.check_width(code)
        self.add_counts(code.fire_counts(), code.acts.shape[0])

    def check_width(self, code: Code) -> None:
        if code.d_sae != self.d_sae:
            raise ValueError(f"code has d_sae={code.d_sae} but these FiringStats track {self.d_sae} latents")

    def add_counts(self, counts_F: Tensor, n_tokens: int) -> None:
        """Add a batch of ``n_tokens`` tokens on which latent f fired ``counts_F[f]`` times."""
        if self.fire_counts_F.device != counts_F.device:  # follow the SAE's device (once)
            self.fire_counts_F = self.fire_counts_F.to(counts_F.device)
            self.tokens_since_fired_F = self.tokens_since_fired_F.to(counts_F.device)
        self.fire_counts_F += counts_F
        self.tokens_since_fired_F.add_(n_tokens).masked_fill_(counts_F > 0, 0)
        self.tokens_seen += n_tokens

    def silent_for(self, n_tokens: int) -> Tensor:
        """(F,) bool: latents that have not fired on the last ``n_tokens`` tokens (none before that
        many have been seen)."""
        return self.tokens_since_fired_F >= n_tokens

    def dead_mask(self) -> Tensor:
        """(F,) bool: latents that have not fired in the last min(window_tokens, tokens_seen) tokens;
        all False before any token is seen."""
        if self.tokens_seen == 0:
            return torch.zeros_like(self.tokens_since_fired_F, dtype=torch.bool)
        window = self.tokens_seen if self.window_tokens is None else min(self.window_tokens, self.tokens_seen)
        return self.silent_for(window)

    def dead_fraction(self) -> float:
        """Fraction of latents that are dead (see the class docstring); 0.0 before any token is seen."""
        return self.dead_mask().float().mean().item()

    def firing_frequency(self) -> Tensor:
        """(F,) fraction of the tokens seen on which each latent fired."""
        return self.fire_counts_F.float() / max(self.tokens_seen, 1)

    def dense_fraction(self, threshold: float = 0.1) -> float:
        """Fraction of latents that fire on more than ``threshold`` of the tokens seen."""
        return (self.firing_frequency() > threshold).float().mean().item()

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"tokens_seen": self.tokens_seen, "tokens_since_fired": self.tokens_since_fired_F,
                "fire_counts": self.fire_counts_F}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.tokens_since_fired_F.copy_(state["tokens_since_fired"])
        self.fire_counts_F.copy_(state["fire_counts"])


class _Totals:
    """Float64 running sums keyed by name, so that metrics built from them are exact over all
    batches (sums of x and x^2 rather than means of per-batch ratios)."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}

    def add(self, **batch_sums: Tensor) -> None:
        for name, value in batch_sums.items():
            value = value.double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def __getitem__(self, name: str) -> Tensor:
        return self.sums[name]


@torch.no_grad()
def evaluate(sae: BaseSAE, batches: Iterable[Tensor],
             window_tokens: int | None = None) -> dict[str, float | list[float]]:
    """Run ``sae`` in eval mode over (B, D) batches and return every metric over all their tokens.

    Keys: "mse", "fvu", "explained_variance", "l0", "cosine", "gamma", "dead_fraction",
    "dense_fraction" (latents firing on more than 10% of tokens), and whatever metrics the
    architecture reports (:meth:`~workbench.saes.base.BaseSAE.summarize_metrics` of its totals over
    all tokens). Each is the function of the same name above applied to all tokens at once;
    "dead_fraction" counts latents that never fired, or with ``window_tokens`` set, follows
    :class:`FiringStats`. The SAE's training mode is restored afterwards; batches are moved to the
    SAE's device.
    """
    was_training = sae.training
    sae.eval()
    try:
        device = next(sae.parameters()).device
        firing = FiringStats(sae.cfg.d_sae, window_tokens)
        totals = _Totals()
        sae_totals = _Totals()
        n_tokens = 0
        for x_BD in batches:
            x_BD = x_BD.to(device)
            out = sae(x_BD)
            x64_BD, recon64_BD = x_BD.double(), out.recon_BD.double()
            err_BD = x64_BD - recon64_BD
            totals.add(x_D=x64_BD.sum(0), x2_D=x64_BD.pow(2).sum(0), err_D=err_BD.sum(0),
                       err2_D=err_BD.pow(2).sum(0), l0=out.code.l0().sum(),
                       cosine=F.cosine_similarity(x_BD, out.recon_BD, dim=-1).sum(),
                       recon2=recon64_BD.pow(2).sum(), dot=(x64_BD * recon64_BD).sum())
            sae_totals.add(**out.metrics)
            firing.update(out.code)
            n_tokens += x_BD.shape[0]
    finally:
        sae.train(was_training)
    if n_tokens == 0:
        raise ValueError("evaluate got no tokens: batches yielded nothing")

    total_ss = (totals["x2_D"] - totals["x_D"].pow(2) / n_tokens).sum()
    residual_ss = (totals["err2_D"] - totals["err_D"].pow(2) / n_tokens).sum()
    metrics: dict[str, float | list[float]] = {
        "mse": (totals["err2_D"].sum() / (n_tokens * sae.cfg.d_in)).item(),
        "fvu": (totals["err2_D"].sum() / total_ss).item(),
        "explained_variance": (1 - residual_ss / total_ss).item(),
        "l0": totals["l0"].item() / n_tokens,
        "cosine": totals["cosine"].item() / n_tokens,
        "gamma": (totals["recon2"] / totals["dot"]).item(),
        "dead_fraction": firing.dead_fraction(),
        "dense_fraction": firing.dense_fraction(),
    }
    return metrics | sae.summarize_metrics(sae_totals.sums, n_tokens)


@torch.no_grad()
def mse_of_latents(sae: BaseSAE, batches: Iterable[Tensor], keep_F: Tensor) -> float:
    """MSE per element (as :func:`evaluate`'s "mse") of reconstructions from only the latents that
    ``keep_F`` ((F,) bool) marks, the others set to 0, over every token of ``batches``, in eval mode:
    how well one part of a dictionary reconstructs alone (a Matryoshka prefix, an SAE's most
    frequent latents). Every architecture decodes as sum_f z_f W_dec[f] + b_dec."""
    if keep_F.shape != (sae.cfg.d_sae,) or keep_F.dtype != torch.bool:
        raise ValueError(f"keep_F must be a bool tensor of shape ({sae.cfg.d_sae},), one entry per latent; "
                         f"got {keep_F.dtype} {tuple(keep_F.shape)}")
    was_training = sae.training
    sae.eval()
    try:
        device = sae.W_dec.device
        keep_F = keep_F.to(device)
        sq_err, n_elements = torch.zeros((), dtype=torch.float64), 0
        for x_BD in batches:
            x_BD = x_BD.to(device)
            code = sae.encode_code(x_BD)
            if code.idx is None:
                recon_BD = sae.decode(code.acts * keep_F)
            else:
                recon_BD = sparse_decode(code.acts * keep_F[code.idx], code.idx, sae.W_dec) + sae.b_dec
            sq_err += (x_BD.double() - recon_BD.double()).pow(2).sum().cpu()
            n_elements += x_BD.numel()
    finally:
        sae.train(was_training)
    if n_elements == 0:
        raise ValueError("mse_of_latents got no tokens: batches yielded nothing")
    return (sq_err / n_elements).item()
