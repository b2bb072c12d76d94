"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547): nested dictionaries in one.

The latents are ordered, and every prefix of widths m_1 < m_2 < ... < m_L = d_sae must reconstruct
the input on its own:

    z = BatchTopK code of x, exactly as :mod:`workbench.saes.batchtopk` (one selection for all levels)
    x_hat_m = sum_{f < m} z_f W_dec[f] + b_pre                    the reconstruction of prefix m
    L = sum_m ||x - x_hat_m||^2 / Var(x)  + 1/32 * AuxK

so the first latents learn the general features any small dictionary needs and later ones refine
them, instead of absorbing them. The losses are "fvu" (the full width, as TopK) and "prefix_fvu" (the
sum over the inner prefixes); the metric "prefix_mse" gives each prefix's MSE per element, smallest
first. As in the paper's code, the inner prefixes truncate the one BatchTopK code; SAELens' version
instead selects k * B again inside each prefix.

Under :func:`workbench.saes.batch.batch_group` the selection and every loss term are over the global
batch of every rank; the metric "prefix_mse" stays a total over the local tokens.

``latent_groups()`` says which level each latent belongs to (level i: latents m_{i-1} to m_i - 1), so
the feature browser can list one level at a time. Saved like BatchTopK (SAELens "jumprelu").
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import LatentGroups, SAEOutput, sparse_decode
from .batch import batch_count, batch_mean, batch_total_variance, in_group
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .topk import total_variance

PREFIX_FRACTIONS = (16, 8, 4, 2, 1)
"""The default prefixes: d_sae / 16, / 8, / 4, / 2 and all of it."""


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE: every prefix of the dictionary trained to reconstruct on its own."""

    matryoshka_widths: list[int] | None = None
    """Widths of the nested prefixes, increasing, each dividing d_sae, the last d_sae (SAELens'
    name); None means d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae."""

    architecture = "matryoshka_batchtopk"

    def __post_init__(self) -> None:
        if isinstance(self.matryoshka_widths, tuple):
            self.matryoshka_widths = list(self.matryoshka_widths)

    def validate(self) -> None:
        super().validate()
        widths = self.widths
        if any(w <= 0 for w in widths):
            raise ValueError(f"matryoshka_widths={widths} must be positive integers")
        if any(b <= a for a, b in itertools.pairwise(widths)):
            raise ValueError(f"matryoshka_widths={widths} must be strictly increasing")
        if widths[-1] != self.d_sae:
            raise ValueError(f"matryoshka_widths={widths} must end with d_sae={self.d_sae}, the whole dictionary")
        bad = [w for w in widths if self.d_sae % w]
        if bad:
            raise ValueError(f"matryoshka_widths={widths}: {bad} do not divide d_sae={self.d_sae}; use divisors "
                             f"such as {[self.d_sae // f for f in PREFIX_FRACTIONS if self.d_sae % f == 0]}")
        if widths[0] < self.k:
            raise ValueError(f"the smallest prefix ({widths[0]} latents) is narrower than k={self.k}; widen it "
                             f"or lower k")

    @property
    def widths(self) -> list[int]:
        if self.matryoshka_widths is not None:
            return list(self.matryoshka_widths)
        if self.d_sae % PREFIX_FRACTIONS[0]:
            raise ValueError(f"d_sae={self.d_sae} is not divisible by {PREFIX_FRACTIONS[0]}, so the default "
                             f"prefixes d_sae/16 ... d_sae do not exist; set matryoshka_widths")
        return [self.d_sae // f for f in PREFIX_FRACTIONS]


class MatryoshkaSAE(BatchTopKSAE):
    cfg: MatryoshkaConfig

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        out = super().forward(x_BD, dead_mask=dead_mask)
        acts_BK, idx_BK = out.code.acts, out.code.idx
        sq_err_LB = []
        for width in self.cfg.widths[:-1]:
            recon_BD = sparse_decode(acts_BK * (idx_BK < width), idx_BK, self.W_dec) + self.b_dec
            sq_err_LB.append((x_BD - recon_BD).pow(2).sum(-1))
        inner_LB = torch.stack(sq_err_LB)
        if in_group():  # each prefix's mean over the tokens of every rank, over their total variance
            n_rows = batch_count(x_BD.shape[0], x_BD.device)
            prefix_fvu = batch_mean(inner_LB.T, n_rows).sum() / batch_total_variance(x_BD, n_rows)
        else:
            prefix_fvu = inner_LB.mean(-1).sum() / total_variance(x_BD)
        losses = {**out.losses, "prefix_fvu": prefix_fvu}
        full_B = (x_BD - out.recon_BD).pow(2).sum(-1)
        prefix_mse_L = torch.cat([inner_LB, full_B[None]]).detach().sum(-1) / self.cfg.d_in
        return SAEOutput(out.recon_BD, out.code, losses, {**out.metrics, "prefix_mse": prefix_mse_L})

    def latent_groups(self) -> LatentGroups:
        """Level i holds latents m_{i-1} to m_i - 1 (level 0: the smallest prefix)."""
        bounds = torch.tensor(self.cfg.widths)
        return LatentGroups("level", torch.bucketize(torch.arange(self.cfg.d_sae), bounds, right=True))

    def flops_per_token(self, training: bool = False) -> int:
        """BatchTopK's, plus one more k-sparse decode (2*k*d) per inner prefix, whose backward adds
        the decoder-weight and latent gradients (2*k*d each)."""
        extra = (len(self.cfg.widths) - 1) * 2 * self.cfg.k * self.cfg.d_in
        return super().flops_per_token(training) + (3 * extra if training else extra)
