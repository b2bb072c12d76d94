"""ReLU/L1 baseline SAE: z = ReLU(W_enc^T (x - b_dec) + b_enc), x_hat = W_dec^T z + b_dec.

Loss: L2 reconstruction + lambda_t * ||z||_1, with decoder rows held at unit norm (so the L1 needs no
decoder-norm weighting) and lambda_t warmed up linearly from 0 over ``l1_warmup_steps``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import (BaseSAE, Code, SAEConfig, SAEOutput, geometric_median, init_tied_weights,
                   warmup_scale)
from .batch import batch_means

L2_REDUCTIONS = ("mean", "sum")


def l2_per_token(x_BD: Tensor, recon_BD: Tensor, reduction: str) -> Tensor:
    """Each token's squared error, summed or averaged over the d dimensions, (B,)."""
    err_B = (x_BD - recon_BD).pow(2).sum(-1)
    if reduction == "mean":
        err_B = err_B / x_BD.shape[1]
    return err_B


def l2_loss(x_BD: Tensor, recon_BD: Tensor, reduction: str) -> Tensor:
    """Squared error averaged over the local tokens, and summed or averaged over the d dimensions
    (the architectures' losses take the mean over the whole batch with ``batch_means``)."""
    return l2_per_token(x_BD, recon_BD, reduction).mean()


def check_encoder_init_scale(value: float) -> None:
    if not value > 0:
        raise ValueError(f"encoder_init_scale={value} must be > 0 (1 is the tied init W_enc = W_dec^T)")


def check_l2_reduction(value: str) -> None:
    if value not in L2_REDUCTIONS:
        raise ValueError(f"l2_reduction={value!r} must be one of {L2_REDUCTIONS}")


@dataclass
class ReLUConfig(SAEConfig):
    """ReLU SAE trained with an L1 penalty (the baseline of the Gated, TopK and Switch papers)."""

    l1_coefficient: float = 0.02
    """Weight lambda of the L1 penalty on the latents (on the scale set by ``l2_reduction``)."""
    l1_warmup_steps: int = 1000
    """Steps over which lambda grows linearly from 0 to ``l1_coefficient``; 0 disables warm-up."""
    l2_reduction: str = "mean"
    """"mean": L2 averaged over the d dimensions (as the Gated paper); "sum": summed over them."""
    encoder_init_scale: float = 0.1
    """W_enc starts as this times W_dec^T (whose rows are unit norm), as in Anthropic's April-2024
    recipe (decoder norm 0.1, encoder its transpose). At 1, Gao et al.'s tied init for TopK, an L1
    SAE's first reconstruction is about F/(2d) times too large with every latent firing, and it sits
    on that dense plateau: on the synthetic ground truth it recovers 0.54 of the features after 600
    steps where 0.1 recovers 0.91, and on MiniLM it ends at a higher L0 and FVU (notebook 08)."""

    architecture = "relu"
    saelens_architecture = "standard"

    def validate(self) -> None:
        super().validate()
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient={self.l1_coefficient} must be >= 0")
        if self.l1_warmup_steps < 0:
            raise ValueError(f"l1_warmup_steps={self.l1_warmup_steps} must be >= 0")
        check_l2_reduction(self.l2_reduction)
        check_encoder_init_scale(self.encoder_init_scale)

    def default_lr(self) -> float:
        return 5e-5  # Anthropic's April-2024 baseline, used by the Switch paper's ReLU runs

    @classmethod
    def fields_from_saelens(cls, saved_cfg: dict) -> dict:
        """A SAELens 5 "standard" folder may name another activation (activation_fn_str "topk"):
        refused, rather than read as the ReLU it is not."""
        for key in ("activation_fn_str", "activation_fn"):
            if saved_cfg.get(key, "relu") != "relu":
                raise ValueError(f"{key}={saved_cfg[key]!r} is a SAELens 5 folder; load it with SAELens 6 "
                                 f"(SAE.load_from_disk) and save_model it again to get a SAELens 6 cfg.json")
        return super().fields_from_saelens(saved_cfg)


class ReLUSAE(BaseSAE):
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        W_enc_DF, W_dec_FD = init_tied_weights(cfg)
        self.W_enc = nn.Parameter(W_enc_DF * cfg.encoder_init_scale)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.l1_scale = 1.0

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x_BD))

    def on_step(self, step: int) -> None:
        self.l1_scale = warmup_scale(step, self.cfg.l1_warmup_steps)

    def _latents(self, x_BD: Tensor) -> Tensor:
        return torch.relu((x_BD - self.b_dec) @ self.W_enc + self.b_enc)

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        return Code(self._latents(x_BD), None, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        self.check_input(x_BD)
        z_BF = self._latents(x_BD)
        recon_BD = self.decode(z_BF)
        # Means over the tokens of the whole batch (of every rank under batch_group).
        l2, l1 = batch_means(l2_per_token(x_BD, recon_BD, self.cfg.l2_reduction), z_BF.sum(-1))
        losses = {"l2": l2, "l1": self.cfg.l1_coefficient * self.l1_scale * l1}
        return SAEOutput(recon_BD, Code(z_BF, None, self.cfg.d_sae), losses, {})

    def flops_per_token(self, training: bool = False) -> int:
        """Forward: dense encoder 2*d*M + dense decoder 2*d*M; a training step is 3x the forward
        (the backward of a dense matmul costs twice its forward)."""
        forward = 4 * self.cfg.d_in * self.cfg.d_sae
        return 3 * forward if training else forward
