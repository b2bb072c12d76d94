"""TopK SAE (Gao et al. 2024): z = ReLU(TopK(W_enc^T (x - b_pre) [+ b_enc])), x_hat = W_dec^T z + b_pre.

Training loss: normalised MSE (FVU over the batch) + 1/32 * AuxK, where AuxK reconstructs the
residual from the top-k_aux pre-activations of dead latents (no fire in ``dead_tokens`` tokens),
decoded without b_pre and normalised by the residual's variance, as in the OpenAI reference code.

Only the k active latents of a token (and its k_aux dead ones) get encoder and decoder gradient:
the encoder backward is an index_add over those rows and the decoder is an embedding_bag.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import (BaseSAE, Code, SAEConfig, SAEOutput, check_k, geometric_median, init_tied_weights,
                   sparse_decode, sparse_encode, topk_lr)

_CHUNK_ELEMENTS = 6 * 2**20
"""Pre-activations per encoder chunk on the CPU (24 MiB in float32: below glibc's 32 MiB mmap
ceiling, so the chunk buffer is reused from the heap instead of being faulted in afresh)."""


@dataclass
class TopKConfig(SAEConfig):
    """TopK SAE with the AuxK dead-latent loss."""

    k: int = 32
    """Active latents per token (the L0)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; None means d_in // 2 (Gao et al. App. B.1)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss; 0 turns it off."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead."""
    latent_bias: bool = False
    """Learn a per-latent bias b_enc before the TopK (the OpenAI reference code's variant)."""

    architecture = "topk"

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae, "number of latents d_sae")
        if self.k_aux is not None and self.k_aux <= 0:
            raise ValueError(f"k_aux={self.k_aux} must be a positive integer or None")
        if self.dead_tokens <= 0:
            raise ValueError(f"dead_tokens={self.dead_tokens} must be positive")

    @property
    def k_aux_eff(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)

    def default_lr(self) -> float:
        return topk_lr(self.d_sae)


class TopKSAE(BaseSAE):
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        W_enc_DF, W_dec_FD = init_tied_weights(cfg)
        self.W_enc = nn.Parameter(W_enc_DF)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=cfg.latent_bias)
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x_BD))

    def _pre_acts(self, x_BD: Tensor) -> Tensor:
        pre_BF = (x_BD - self.b_dec) @ self.W_enc
        if self.cfg.latent_bias:
            pre_BF += self.b_enc
        return pre_BF

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        vals_BK, idx_BK = self._pre_acts(x_BD).topk(self.cfg.k, dim=-1, sorted=False)
        return Code(vals_BK.relu(), idx_BK, self.cfg.d_sae)

    def dead_mask(self) -> Tensor:
        """(F,) bool: latents that have not fired in the last ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def _select(self, x_BD: Tensor, dead_F: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Top-k pre-activations (values, latent ids) of each token and, when ``dead_F`` is given, the
        top-k_aux among the dead latents. On the CPU the rows go through the encoder matmul in chunks
        of about ``_CHUNK_ELEMENTS`` pre-activations, each selected while it is still in cache, so
        the (B, F) pre-activations never exist at once (a fresh allocation that size costs as much
        in page faults as the topk itself)."""
        n_rows, k = x_BD.shape[0], self.cfg.k
        chunk = max(1, _CHUNK_ELEMENTS // self.cfg.d_sae) if x_BD.device.type == "cpu" else n_rows
        xc_BD = x_BD - self.b_dec
        vals_BK = x_BD.new_empty(n_rows, k)
        idx_BK = torch.empty(n_rows, k, dtype=torch.long, device=x_BD.device)
        aux_vals_BK = aux_idx_BK = None
        if dead_F is not None:
            k_aux = min(self.cfg.k_aux_eff, int(dead_F.sum()))
            aux_vals_BK = x_BD.new_empty(n_rows, k_aux)
            aux_idx_BK = torch.empty(n_rows, k_aux, dtype=torch.long, device=x_BD.device)
            alive_F = ~dead_F
        for start in range(0, n_rows, chunk):
            rows = slice(start, start + chunk)
            pre_CF = xc_BD[rows] @ self.W_enc
            if self.cfg.latent_bias:
                pre_CF += self.b_enc
            torch.topk(pre_CF, k, dim=-1, sorted=False, out=(vals_BK[rows], idx_BK[rows]))
            if dead_F is not None:
                torch.topk(pre_CF.masked_fill_(alive_F, float("-inf")), k_aux, dim=-1, sorted=False,
                           out=(aux_vals_BK[rows], aux_idx_BK[rows]))
        return vals_BK, idx_BK, aux_vals_BK, aux_idx_BK

    def forward(self, x_BD: Tensor) -> SAEOutput:
        self.check_input(x_BD)
        b_enc = self.b_enc if self.cfg.latent_bias else None
        dead_F = None
        if self.training and self.cfg.auxk_coef > 0:
            dead_F = self.dead_mask()
            if not dead_F.any():
                dead_F = None
        vals_BK, idx_BK, aux_vals_BK, aux_idx_BK = self._select(x_BD, dead_F)
        acts_BK = sparse_encode(x_BD, self.b_dec, self.W_enc, b_enc, vals_BK.relu(), idx_BK)
        recon_BD = sparse_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

        err_BD = x_BD - recon_BD
        total_var = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
        losses = {"fvu": err_BD.pow(2).sum(-1).mean() / total_var.clamp_min(1e-12)}
        code = Code(acts_BK, idx_BK, self.cfg.d_sae)
        if self.training:
            if self.cfg.auxk_coef > 0:
                if dead_F is None:
                    losses["auxk"] = x_BD.new_zeros(())
                else:
                    losses["auxk"] = self._auxk_loss(x_BD, aux_vals_BK, aux_idx_BK, err_BD.detach(), b_enc)
            self._update_fire_stats(code, x_BD.shape[0])
        return SAEOutput(recon_BD, code, losses)

    def _auxk_loss(self, x_BD: Tensor, aux_vals_BK: Tensor, aux_idx_BK: Tensor, err_BD: Tensor,
                   b_enc: Tensor | None) -> Tensor:
        """AuxK from the top-k_aux dead-latent pre-activations picked by :meth:`_select`."""
        aux_acts_BK = sparse_encode(x_BD, self.b_dec, self.W_enc, b_enc, aux_vals_BK.relu(), aux_idx_BK)
        aux_recon_BD = sparse_decode(aux_acts_BK, aux_idx_BK, self.W_dec)
        err_var = (err_BD - err_BD.mean(0)).pow(2).sum(-1).mean()
        aux = (err_BD - aux_recon_BD).pow(2).sum(-1).mean() / err_var.clamp_min(1e-12)
        return self.cfg.auxk_coef * torch.nan_to_num(aux, nan=0.0, posinf=0.0)

    @torch.no_grad()
    def _update_fire_stats(self, code: Code, n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[code.fire_counts() > 0] = 0

    def flops_per_token(self, training: bool = False) -> int:
        """Forward: dense encoder 2*d*M + sparse decoder 2*k*d. A training step adds the sparse
        backward: encoder-weight, decoder-weight and latent gradients, 2*k*d each (AuxK excluded)."""
        d, m, k = self.cfg.d_in, self.cfg.d_sae, self.cfg.k
        forward = 2 * d * m + 2 * k * d
        return forward + 3 * 2 * k * d if training else forward
