"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435), trained directly on L0.

    pi = W_enc^T x + b_enc                  (x - b_dec with ``apply_b_dec_to_input``; the paper has no
                                             pre-encoder bias)
    f  = JumpReLU_theta(pi) = pi * H(pi - theta)      theta = exp(log_threshold) > 0, one per latent
    x_hat = W_dec^T f + b_dec

    L = ||x - x_hat||^2 + lambda_t * sum_i H(pi_i - theta_i)

H has no gradient, so theta learns through straight-through pseudo-derivatives with the rectangle
kernel K(u) = 1[-1/2 < u < 1/2] and bandwidth epsilon (the paper's Eqs. 11-12):

    d JumpReLU_theta(pi) / d theta := -(theta / epsilon) * K((pi - theta) / epsilon)
    d H(pi - theta) / d theta      := -(1 / epsilon) * K((pi - theta) / epsilon)

while pi gets the ordinary gradient H(pi - theta) through the JumpReLU and none through the L0 term.
lambda_t warms up linearly over ``l0_warmup_steps``.

theta and epsilon are in the units of the pre-activations. The paper's epsilon = theta_0 = 0.001 are
for activations normalised to E||x||^2 = 1; the workbench normalises to E||x||^2 = d, which makes
every pre-activation sqrt(d) times larger, so the defaults here are 0.001 * sqrt(d) (about 0.02 at
d = 384). The L2 term averaged over d (``l2_reduction="mean"``) on E||x||^2 = d activations has the
paper's scale (summed over d on E||x||^2 = 1), so the paper's lambda values carry over.

Saved as SAELens' "jumprelu": ``threshold`` = exp(log_threshold), and ``apply_b_dec_to_input`` as set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import (BaseSAE, Code, SAEConfig, SAEOutput, geometric_median, init_tied_weights,
                   warmup_scale)
from .batch import batch_means
from .relu import check_l2_reduction, l2_per_token


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pi * H(pi - theta), with the straight-through gradient for theta."""

    @staticmethod
    def forward(ctx: Any, pi_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pi_BF, theta_F)
        ctx.bandwidth = bandwidth
        return pi_BF * (pi_BF > theta_F)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[Tensor, Tensor, None]:
        pi_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pi = grad_BF * (pi_BF > theta_F)
        grad_theta = (-(theta_F / eps) * rectangle((pi_BF - theta_F) / eps) * grad_BF).sum(0)
        return grad_pi, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pi - theta), with the straight-through gradient for theta only."""

    @staticmethod
    def forward(ctx: Any, pi_BF: Tensor, theta_F: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pi_BF, theta_F)
        ctx.bandwidth = bandwidth
        return (pi_BF > theta_F).to(pi_BF.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BF: Tensor) -> tuple[None, Tensor, None]:
        pi_BF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * rectangle((pi_BF - theta_F) / eps) * grad_BF).sum(0)
        return None, grad_theta, None


@dataclass
class JumpReLUConfig(SAEConfig):
    """JumpReLU SAE: a learned threshold per latent, trained on reconstruction + lambda * L0."""

    l0_coefficient: float = 0.01
    """Weight lambda of the L0 penalty (on the scale set by ``l2_reduction``)."""
    l0_warmup_steps: int = 1000
    """Steps over which lambda grows linearly from 0; 0 disables warm-up."""
    bandwidth: float | None = None
    """Width epsilon of the rectangle kernel of the straight-through gradient, in pre-activation
    units; None means 0.001 * sqrt(d_in), the paper's 0.001 on activations normalised to E|x|^2 = d."""
    init_threshold: float | None = None
    """Initial theta of every latent; None means 0.001 * sqrt(d_in), as ``bandwidth``."""
    apply_b_dec_to_input: bool = False
    """Encode x - b_dec instead of x (a pre-encoder bias); the paper has none (SAELens' name)."""
    l2_reduction: str = "mean"
    """"mean": the L2 averaged over the d dimensions (the paper's scale on E|x|^2 = d activations);
    "sum": summed over them."""

    architecture = "jumprelu"

    def validate(self) -> None:
        super().validate()
        for name in ("bandwidth", "init_threshold"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number (pre-activation units), or None "
                                 f"for 0.001 * sqrt(d_in)")
        if self.l0_coefficient < 0:
            raise ValueError(f"l0_coefficient={self.l0_coefficient!r} must be a number >= 0")
        if self.l0_warmup_steps < 0:
            raise ValueError(f"l0_warmup_steps={self.l0_warmup_steps!r} must be an integer >= 0")
        check_l2_reduction(self.l2_reduction)

    @property
    def epsilon(self) -> float:
        return self.bandwidth if self.bandwidth is not None else 0.001 * math.sqrt(self.d_in)

    @property
    def theta_0(self) -> float:
        return self.init_threshold if self.init_threshold is not None else 0.001 * math.sqrt(self.d_in)

    def default_lr(self) -> float:
        return 7e-5  # Gemma Scope / dictionary_learning's JumpReLU rate


class JumpReLUSAE(BaseSAE):
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        W_enc_DF, W_dec_FD = init_tied_weights(cfg)
        self.W_enc = nn.Parameter(W_enc_DF)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.theta_0)))
        self.l0_scale = 1.0

    @property
    def threshold(self) -> Tensor:
        """theta = exp(log_threshold), (F,)."""
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        """b_dec at the geometric median; without a pre-encoder bias, b_enc = -W_enc^T b_dec so that
        the encoder starts centred on the data as the other architectures do."""
        self.b_dec.copy_(geometric_median(x_BD))
        if not self.cfg.apply_b_dec_to_input:
            self.b_enc.copy_(-(self.b_dec @ self.W_enc))

    def on_step(self, step: int) -> None:
        self.l0_scale = warmup_scale(step, self.cfg.l0_warmup_steps)

    def _pre_acts(self, x_BD: Tensor) -> Tensor:
        x_in_BD = x_BD - self.b_dec if self.cfg.apply_b_dec_to_input else x_BD
        return x_in_BD @ self.W_enc + self.b_enc

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        pi_BF = self._pre_acts(x_BD)
        return Code(pi_BF * (pi_BF > self.threshold), None, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        self.check_input(x_BD)
        pi_BF = self._pre_acts(x_BD)
        theta_F = self.threshold
        f_BF = _JumpReLU.apply(pi_BF, theta_F, self.cfg.epsilon)
        recon_BD = self.decode(f_BF)
        # Means over the tokens of the whole batch (of every rank under batch_group).
        l2, l0 = batch_means(l2_per_token(x_BD, recon_BD, self.cfg.l2_reduction),
                             _Step.apply(pi_BF, theta_F, self.cfg.epsilon).sum(-1))
        losses = {"l2": l2, "l0": self.cfg.l0_coefficient * self.l0_scale * l0}
        return SAEOutput(recon_BD, Code(f_BF, None, self.cfg.d_sae), losses, {})

    def saelens_config(self) -> dict:
        return {**super().saelens_config(), "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input}

    def saelens_tensors(self) -> dict[str, Tensor]:
        tensors = super().saelens_tensors()
        tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    @torch.no_grad()
    def load_saelens_tensors_(self, tensors: dict[str, Tensor], saved_cfg: dict | None = None) -> None:
        """SAELens encodes with relu(threshold), so a threshold <= 0 is a plain ReLU; as log_threshold
        must be finite, it becomes the smallest normal float32 (1.2e-38), which differs from 0 only for
        pre-activations below it. Older SAELens checkpoints hold ``log_threshold`` instead, which SAELens
        reads as threshold = exp(log_threshold)."""
        if "log_threshold" in tensors and "threshold" not in tensors:
            tensors = {**tensors, "threshold": tensors["log_threshold"].exp()}
            del tensors["log_threshold"]
        super().load_saelens_tensors_(tensors, saved_cfg)
        theta_F = tensors["threshold"].float()
        self.log_threshold.copy_(theta_F.clamp_min(torch.finfo(torch.float32).tiny).log())

    def flops_per_token(self, training: bool = False) -> int:
        """Forward: dense encoder 2*d*M + dense decoder 2*d*M; a training step is 3x the forward."""
        forward = 4 * self.cfg.d_in * self.cfg.d_sae
        return 3 * forward if training else forward
