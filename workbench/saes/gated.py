"""Gated SAE (Rajamanoharan et al. 2024), Eq. 8 with tied weights.

    pi_gate = W_gate^T (x - b_dec) + b_gate               (W_gate is stored as W_enc)
    f_gate  = 1[pi_gate > 0]
    f_mag   = ReLU(exp(r_mag) * (W_gate^T (x - b_dec)) + b_mag)
    f       = f_gate * f_mag,          x_hat = W_dec^T f + b_dec

    L = ||x - x_hat||^2 + lambda * ||ReLU(pi_gate)||_1 + ||x - (sg(W_dec)^T ReLU(pi_gate) + sg(b_dec))||^2

The Heaviside passes no gradient: the gate learns through the L1 and the auxiliary reconstruction
through a stop-gradient copy of the decoder. With tied weights the encoder is a JumpReLU on the
magnitude path with threshold theta = b_mag - exp(r_mag) * b_gate (:meth:`GatedSAE.jumprelu_threshold`).

Two switches turn on the paper's Fig. 8 ablations (both off by default): ``learn_r_mag=False`` keeps
r_mag at 0, so W_mag = W_gate and the paths differ only by their biases; ``freeze_aux_decoder=False``
lets the auxiliary reconstruction train W_dec and b_dec too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import BaseSAE, Code, SAEConfig, SAEOutput, geometric_median, init_tied_weights
from .batch import batch_means
from .relu import check_encoder_init_scale, check_l2_reduction, l2_per_token


@dataclass
class GatedConfig(SAEConfig):
    """Gated SAE with tied gate and magnitude paths."""

    l1_coefficient: float = 0.02
    """Weight lambda of the L1 on ReLU(pi_gate) (on the scale set by ``l2_reduction``)."""
    l2_reduction: str = "mean"
    """"mean": both L2 terms averaged over the d dimensions, as in the paper, so its lambda values
    transfer; "sum": summed over them, as in dictionary_learning."""
    encoder_init_scale: float = 0.1
    """W_gate starts as this times W_dec^T; see ReLUConfig.encoder_init_scale (at 1 the SAE starts on
    a dense plateau: 0.47 of the synthetic features after 600 steps, against 0.82 at 0.1)."""
    learn_r_mag: bool = True
    """Learn the per-latent magnitude scale r_mag (W_mag = exp(r_mag) * W_gate). False is the Fig. 8
    ablation "no r_mag": r_mag stays at its initial zeros (still saved, for SAELens' Gated format), so
    the magnitude path is W_gate itself and differs from the gate only by its bias."""
    freeze_aux_decoder: bool = True
    """Decode the auxiliary loss's ReLU(pi_gate) with a stop-gradient copy of W_dec and b_dec (Eq. 8).
    False is the Fig. 8 ablation "unfrozen decoder": that loss trains the decoder as well."""

    architecture = "gated"

    def validate(self) -> None:
        super().validate()
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient={self.l1_coefficient} must be >= 0")
        check_l2_reduction(self.l2_reduction)
        check_encoder_init_scale(self.encoder_init_scale)

    def default_lr(self) -> float:
        return 3e-4  # the paper's learning rate for all Gated runs (App. D)


class GatedSAE(BaseSAE):
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        W_enc_DF, W_dec_FD = init_tied_weights(cfg)
        self.W_enc = nn.Parameter(W_enc_DF * cfg.encoder_init_scale)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=cfg.learn_r_mag)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x_BD))

    def _paths(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, f) for a batch."""
        proj_BF = (x_BD - self.b_dec) @ self.W_enc
        pi_gate_BF = proj_BF + self.b_gate
        f_mag_BF = torch.relu(proj_BF * self.r_mag.exp() + self.b_mag)
        return pi_gate_BF, (pi_gate_BF > 0).to(f_mag_BF.dtype) * f_mag_BF

    def jumprelu_threshold(self) -> Tensor:
        """theta = b_mag - exp(r_mag) * b_gate: the encoder is f = pi_mag * 1[pi_mag > theta]."""
        return self.b_mag - self.r_mag.exp() * self.b_gate

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        return Code(self._paths(x_BD)[1], None, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        self.check_input(x_BD)
        pi_gate_BF, f_BF = self._paths(x_BD)
        recon_BD = self.decode(f_BF)
        gate_act_BF = torch.relu(pi_gate_BF)
        if self.cfg.freeze_aux_decoder:
            aux_recon_BD = gate_act_BF @ self.W_dec.detach() + self.b_dec.detach()
        else:
            aux_recon_BD = self.decode(gate_act_BF)
        reduction = self.cfg.l2_reduction
        # Means over the tokens of the whole batch (of every rank under batch_group).
        l2, l1, aux = batch_means(l2_per_token(x_BD, recon_BD, reduction), gate_act_BF.sum(-1),
                                  l2_per_token(x_BD, aux_recon_BD, reduction))
        losses = {"l2": l2, "l1": self.cfg.l1_coefficient * l1, "aux": aux}
        return SAEOutput(recon_BD, Code(f_BF, None, self.cfg.d_sae), losses, {})

    @torch.no_grad()
    def fold_uncentred_input_(self) -> GatedSAE:
        """Both paths absorb b_dec: b_gate += b_dec @ W_gate, b_mag += exp(r_mag) * (b_dec @ W_gate)."""
        proj_F = self.b_dec @ self.W_enc
        self.b_gate.add_(proj_F)
        self.b_mag.add_(proj_F * self.r_mag.exp())
        return self

    def flops_per_token(self, training: bool = False) -> int:
        """Forward: shared encoder 2*d*M + decoder 2*d*M. A training step runs the decoder twice
        (the auxiliary reconstruction) and backpropagates, 3x that: 3 * 6*d*M."""
        dm = self.cfg.d_in * self.cfg.d_sae
        return 3 * 6 * dm if training else 4 * dm
