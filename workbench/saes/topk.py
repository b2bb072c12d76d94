"""TopK SAE (Gao et al. 2024): z = ReLU(TopK(W_enc^T (x - b_pre) [+ b_enc])), x_hat = W_dec^T z + b_pre.

Training loss: normalised MSE (FVU over the batch) + 1/32 * AuxK, where AuxK reconstructs the
residual from the top-k_aux pre-activations of dead latents (the trainer's ``dead_mask``: no fire in
``TrainConfig.dead_window_tokens`` tokens), decoded without b_pre and normalised by the residual's
variance, as in the OpenAI reference code. Under :func:`workbench.saes.batch.batch_group` both are over
the global batch (:func:`workbench.saes.batch.batch_fvu`); every rank must pass the same ``dead_mask``.

Only the k active latents of a token (and its k_aux dead ones) get encoder and decoder gradient:
the encoder backward is an index_add over those rows and the decoder is an embedding_bag.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import (BaseSAE, Code, RowWeight, SAEConfig, SAEOutput, check_k, encoder_decoder_rows,
                   geometric_median, init_tied_weights, latent_major, sparse_decode, sparse_encode, topk_into, topk_lr)
from .batch import batch_fvu

_CHUNK_ELEMENTS = 6 * 2**20
"""Pre-activations per encoder chunk on the CPU (24 MiB in float32: below glibc's 32 MiB mmap
ceiling, so the chunk buffer is reused from the heap instead of being faulted in afresh)."""


@dataclass
class TopKConfig(SAEConfig):
    """TopK SAE with the AuxK dead-latent loss."""

    k: int = 32
    """Active latents per token (the L0)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; None means d_in // 2 (Gao et al. App. B.1). A latent is
    dead when it has not fired for ``train.dead_window_tokens`` tokens (10M by default)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss; 0 turns it off."""
    latent_bias: bool = False
    """Learn a per-latent bias b_enc before the TopK (the OpenAI reference code's variant)."""

    architecture = "topk"

    def validate(self) -> None:
        super().validate()
        check_k(self.k, self.d_sae, "number of latents d_sae")
        if self.k_aux is not None and self.k_aux <= 0:
            raise ValueError(f"k_aux={self.k_aux!r} must be a positive integer or None")
        if self.auxk_coef < 0:
            raise ValueError(f"auxk_coef={self.auxk_coef!r} must be a number >= 0 (0 turns AuxK off)")

    @classmethod
    def fields_from_saelens(cls, saved_cfg: dict) -> dict:
        """SAELens always adds b_enc and never writes ``latent_bias``: a folder without it has a latent
        bias. SAELens' BatchTopK writes k as a float (6.0)."""
        fields = super().fields_from_saelens(saved_cfg)
        fields.setdefault("latent_bias", True)
        k = fields.get("k")
        if isinstance(k, float) and k.is_integer():
            fields["k"] = int(k)
        return fields

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
        self.W_enc = nn.Parameter(latent_major(W_enc_DF))
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=cfg.latent_bias)

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        self.b_dec.copy_(geometric_median(x_BD))

    def _pre_act_chunks(self, x_BD: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """(rows, their pre-activations W_enc^T (x - b_pre) [+ b_enc]) chunk by chunk, without
        gradient. On the CPU a chunk holds about ``_CHUNK_ELEMENTS`` pre-activations, so each is
        selected from while it is still in cache and the (B, F) pre-activations never exist at once
        (a fresh allocation that size costs as much in page faults as the topk itself)."""
        n_rows = x_BD.shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // self.cfg.d_sae) if x_BD.device.type == "cpu" else n_rows
        xc_BD = x_BD - self.b_dec
        for start in range(0, n_rows, chunk):
            pre_CF = xc_BD[start:start + chunk] @ self.W_enc
            if self.cfg.latent_bias:
                pre_CF += self.b_enc
            yield slice(start, start + chunk), pre_CF

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        vals_BK, idx_BK = self._select(x_BD)
        return Code(vals_BK.relu(), idx_BK, self.cfg.d_sae)

    @torch.no_grad()
    def _select(self, x_BD: Tensor, aux: DeadTopK | None = None) -> tuple[Tensor, Tensor]:
        """Top-k pre-activations (values, latent ids) of each token; ``aux`` picks the dead
        latents' top-k_aux from the same chunks."""
        k = self.cfg.k
        vals_BK = x_BD.new_empty(x_BD.shape[0], k)
        idx_BK = torch.empty(x_BD.shape[0], k, dtype=torch.long, device=x_BD.device)
        for rows, pre_CF in self._pre_act_chunks(x_BD):
            topk_into(pre_CF, k, vals_BK[rows], idx_BK[rows])
            if aux is not None:
                aux.add(rows, pre_CF)
        return vals_BK, idx_BK

    def _auxk(self, x_BD: Tensor, dead_mask: Tensor | None) -> DeadTopK | None:
        """The AuxK selection for this batch: only in training, with AuxK on and dead latents. On a
        GPU, where asking whether any latent is dead would wait for the device, it always runs; with
        none dead its loss is multiplied by 0."""
        if not (self.training and self.cfg.auxk_coef > 0 and dead_mask is not None):
            return None
        if _sizes_on_host(x_BD) and not dead_mask.any():
            return None
        return DeadTopK(x_BD, dead_mask, self.cfg.k_aux_eff)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        self.check_input(x_BD)
        aux = self._auxk(x_BD, dead_mask)
        vals_BK, idx_BK = self._select(x_BD, aux)
        return self._sparse_output(x_BD, vals_BK, idx_BK, aux)

    def _sparse_output(self, x_BD: Tensor, vals_BK: Tensor, idx_BK: Tensor, aux: DeadTopK | None) -> SAEOutput:
        """Reconstruction and losses (FVU, AuxK in training) from the selected pre-activations."""
        b_enc = self.b_enc if self.cfg.latent_bias else None
        acts_BK = sparse_encode(x_BD, self.b_dec, self.W_enc, b_enc, vals_BK.relu(), idx_BK)
        recon_BD = sparse_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

        err_BD = x_BD - recon_BD
        losses = {"fvu": batch_fvu(x_BD, err_BD)}  # over the whole batch under batch_group
        if self.training and self.cfg.auxk_coef > 0:
            losses["auxk"] = x_BD.new_zeros(()) if aux is None else self._auxk_loss(x_BD, aux, err_BD.detach(), b_enc)
        return SAEOutput(recon_BD, Code(acts_BK, idx_BK, self.cfg.d_sae), losses, {})

    def _auxk_loss(self, x_BD: Tensor, aux: DeadTopK, err_BD: Tensor, b_enc: Tensor | None) -> Tensor:
        """AuxK: reconstruct the residual from the dead latents' top-k_aux pre-activations, decoded
        without b_pre, normalised by the residual's variance."""
        aux_acts_BK = sparse_encode(x_BD, self.b_dec, self.W_enc, b_enc, aux.vals_BK.relu(), aux.idx_BK)
        aux_recon_BD = sparse_decode(aux_acts_BK, aux.idx_BK, self.W_dec)
        aux_loss = batch_fvu(err_BD, err_BD - aux_recon_BD)  # the residual's variance over the whole batch
        aux_loss = self.cfg.auxk_coef * torch.nan_to_num(aux_loss, nan=0.0, posinf=0.0)
        return aux_loss if aux.exact else aux_loss * aux.any_dead

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Without ``latent_bias`` the encoder has no bias: b_enc is written as the zeros it acts as,
        so that SAELens, which always adds b_enc, computes the same."""
        tensors = super().saelens_tensors()
        if not self.cfg.latent_bias:
            tensors["b_enc"] = torch.zeros_like(tensors["b_enc"])
        return tensors

    @torch.no_grad()
    def load_saelens_tensors_(self, tensors: dict[str, Tensor], saved_cfg: dict | None = None) -> None:
        """Also SAELens' ``rescale_acts_by_decoder_norm: true``, folded into the weights: SAELens
        multiplies the pre-activations by the decoder row norms n before the TopK and divides the
        codes by n before decoding, which is this SAE with W_enc, b_enc times n and W_dec rows
        divided by n (SAELens' own ``_fold_norm_topk``), the codes unchanged."""
        b_enc = tensors.get("b_enc")
        if not self.cfg.latent_bias and b_enc is not None and bool(b_enc.any()):
            raise ValueError(f"b_enc is non-zero but this {self.cfg.architecture} SAE has latent_bias=false, "
                             f"so it would ignore it; set latent_bias: true in cfg.json")
        super().load_saelens_tensors_(tensors, saved_cfg)
        if (saved_cfg or {}).get("rescale_acts_by_decoder_norm"):
            norms_F = self.W_dec.norm(dim=-1).clamp_min(1e-8)
            self.W_enc.mul_(norms_F)
            self.b_enc.mul_(norms_F)
            self.W_dec.div_(norms_F[:, None])

    @torch.no_grad()
    def fold_uncentred_input_(self) -> TopKSAE:
        if not self.cfg.latent_bias:
            raise ValueError(f"apply_b_dec_to_input: false needs a latent bias to fold b_dec into, but this "
                             f"{self.cfg.architecture} SAE has latent_bias=false; set latent_bias: true in cfg.json")
        return super().fold_uncentred_input_()

    def row_sparse_weights(self) -> list[RowWeight]:
        """The encoder and the decoder: only the k selected latents of a token (and its AuxK latents) get their rows' gradient."""
        return encoder_decoder_rows(self)

    def flops_per_token(self, training: bool = False) -> int:
        """Forward: dense encoder 2*d*M + sparse decoder 2*k*d. A training step adds the sparse
        backward: encoder-weight, decoder-weight and latent gradients, 2*k*d each (AuxK excluded)."""
        d, m, k = self.cfg.d_in, self.cfg.d_sae, self.cfg.k
        forward = 2 * d * m + 2 * k * d
        return forward + 3 * 2 * k * d if training else forward


class DeadTopK:
    """The top-k_aux pre-activations among the dead latents of each token, filled in chunk by chunk
    from the same pre-activations as the main selection (after it: the chunk is overwritten).

    On the CPU k_aux is capped at the number of dead latents (``exact``). On a GPU, where counting
    them would wait for the device, it is not: with fewer dead latents than k_aux, the rest of the
    selection are alive latents at -inf, which ReLU makes 0 (no code, no gradient)."""

    def __init__(self, x_BD: Tensor, dead_F: Tensor, k_aux: int):
        self.exact = _sizes_on_host(x_BD)
        self.k_aux = min(k_aux, int(dead_F.sum()) if self.exact else dead_F.shape[0])
        self.any_dead = dead_F.any()
        self.alive_F = ~dead_F
        self.vals_BK = x_BD.new_empty(x_BD.shape[0], self.k_aux)
        self.idx_BK = torch.empty(x_BD.shape[0], self.k_aux, dtype=torch.long, device=x_BD.device)

    def add(self, rows: slice, pre_CF: Tensor) -> None:
        topk_into(pre_CF.masked_fill_(self.alive_F, float("-inf")), self.k_aux, self.vals_BK[rows], self.idx_BK[rows])


def _sizes_on_host(x_BD: Tensor) -> bool:
    """Whether a step may read a count back to decide a size (on the CPU it costs nothing; on a GPU
    it waits for the device)."""
    return x_BD.device.type == "cpu"


def total_variance(x_BD: Tensor) -> Tensor:
    """E_b ||x_b - mean_b x||^2, the denominator of the FVU (clamped away from 0)."""
    return (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
