"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv 2412.06410): TopK over the whole batch.

    pre = W_enc^T (x - b_pre) [+ b_enc]                  as TopK
    training:  z = ReLU(pre) on the k * B largest pre-activations of the batch (B tokens), 0 elsewhere
    inference: z = ReLU(pre) * 1[pre > theta]            one global threshold theta: a JumpReLU
    x_hat = W_dec^T z + b_pre

The mean L0 over a training batch is k, but one token may use many latents and another few. So that
a token's code does not depend on the batch it came in, the SAE keeps a running threshold theta: an
exponential moving average of the smallest activation kept in each training batch (SAELens and
dictionary_learning do the same; the first batch sets theta). In eval mode (evaluation, the feature
index, the prompt runner, a loaded SAE) it encodes with theta, so its L0 is k on average over tokens
like those it was trained on, not exactly.

Loss, AuxK, dead latents and the sparse backward are TopK's (:mod:`workbench.saes.topk`). Each row
of the code is padded to the batch's largest L0 with zero activations.

Under :func:`workbench.saes.batch.batch_group` (data parallel) the training batch is the union of every
rank's rows: the k * B largest pre-activations are selected over all of them (each rank keeps its own
rows' share, which varies) and theta's update takes the smallest kept activation over all ranks, so
the threshold buffer stays the same on every rank.

Saved as SAELens saves its own BatchTopK SAEs: architecture "jumprelu" with ``threshold`` = theta for
every latent (SAELens then computes exactly the inference encoding above); cfg.json also says
``"workbench_architecture": "batchtopk"`` so that this workbench reads it back as BatchTopK.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import WORKBENCH_ARCHITECTURE_KEY, Code, SAEOutput, pad_rows, topk_into
from .batch import batch_all_gather_sizes, batch_min_, batch_rank, batch_sum_, in_group
from .topk import DeadTopK, TopKConfig, TopKSAE


CANDIDATES_PER_K = 4
"""Each token offers its top 4k pre-activations to the batch's selection (see ``_select_batch``)."""


@dataclass
class BatchTopKConfig(TopKConfig):
    """BatchTopK SAE: the k * batch largest activations of a training batch, a JumpReLU at inference."""

    threshold_momentum: float = 0.99
    """theta <- momentum * theta + (1 - momentum) * (smallest activation kept in the batch); SAELens'
    topk_threshold_lr is 1 - momentum."""

    architecture = "batchtopk"
    saelens_architecture = "jumprelu"

    def validate(self) -> None:
        super().validate()
        m = self.threshold_momentum
        if not 0 <= m < 1:
            raise ValueError(f"threshold_momentum={m!r} must be in [0, 1), e.g. 0.99")


class BatchTopKSAE(TopKSAE):
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # Model state, not training state: inference encodes with it, and it is saved with the SAE.
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        vals_BK, idx_BK = self._select_above_threshold(x_BD)
        return Code(vals_BK, idx_BK, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        self.check_input(x_BD)
        aux = self._auxk(x_BD, dead_mask)
        if self.training:
            vals_BK, idx_BK = self._select_batch(x_BD, aux)
            self._update_threshold(vals_BK)
        else:
            vals_BK, idx_BK = self._select_above_threshold(x_BD)
        return self._sparse_output(x_BD, vals_BK, idx_BK, aux)

    @torch.no_grad()
    def _select_batch(self, x_BD: Tensor, aux: DeadTopK | None) -> tuple[Tensor, Tensor]:
        """The k * B largest pre-activations of the batch, as per-token rows padded with zeros.

        Exact, without a top-(k * B) over all B * F entries (slow for large k * B): each row offers
        its top ``CANDIDATES_PER_K * k`` pre-activations as candidates and the batch keeps the k * B
        largest of those. A row whose every candidate was kept may hold more above the cut; such rows
        (rare: a token using over 4k latents) are searched again whole. Under ``batch_group`` the batch
        is every rank's rows (:meth:`_select_global`)."""
        n_rows, d_sae = x_BD.shape[0], self.cfg.d_sae
        cap = min(d_sae, CANDIDATES_PER_K * self.cfg.k)
        vals_BC = x_BD.new_empty(n_rows, cap)
        idx_BC = torch.empty(n_rows, cap, dtype=torch.long, device=x_BD.device)
        for rows, pre_CF in self._pre_act_chunks(x_BD):
            topk_into(pre_CF, cap, vals_BC[rows], idx_BC[rows])
            if aux is not None:
                aux.add(rows, pre_CF)
        if in_group():
            return self._select_global(x_BD, vals_BC, idx_BC)
        n_keep = self.cfg.k * n_rows
        if cap < d_sae:
            cut = vals_BC.flatten().topk(n_keep, sorted=False).values.min()
            vals_BC, idx_BC = self._widen_full_rows(x_BD, vals_BC, idx_BC, cut)
        vals_N, pick_N = vals_BC.flatten().topk(n_keep, sorted=False)
        return pad_rows(pick_N.div(vals_BC.shape[1], rounding_mode="floor"), idx_BC.flatten()[pick_N],
                        vals_N.relu(), n_rows)

    @torch.no_grad()
    def _widen_full_rows(self, x_BD: Tensor, vals_BC: Tensor, idx_BC: Tensor, cut: Tensor) -> tuple[Tensor, Tensor]:
        """The candidates with every row whose candidates are all at or above ``cut`` widened to every
        latent (the other rows padded with -inf, never kept)."""
        d_sae, cap = self.cfg.d_sae, vals_BC.shape[1]
        full_B = (vals_BC.min(-1).values >= cut).nonzero().flatten()
        if len(full_B):
            pre_RF = (x_BD[full_B] - self.b_dec) @ self.W_enc
            if self.cfg.latent_bias:
                pre_RF += self.b_enc
            vals_BC = F.pad(vals_BC, (0, d_sae - cap), value=-torch.inf)
            idx_BC = F.pad(idx_BC, (0, d_sae - cap))
            vals_BC[full_B], idx_BC[full_B] = pre_RF.to(vals_BC.dtype), torch.arange(d_sae, device=x_BD.device)
        return vals_BC, idx_BC

    @torch.no_grad()
    def _select_global(self, x_BD: Tensor, vals_BC: Tensor, idx_BC: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's rows of the k * B largest pre-activations of the whole batch of every rank, from
        this rank's candidates (``_select_batch``), as one process selects on the concatenated batch:

        1. every rank's candidate values are gathered; the cut, their (k * B)-th largest, is the same on
           every rank; rows whose candidates all reach it are widened as on one process, so every
           entry of the global top k * B is now an entry at or above the cut;
        2. one all-reduce counts those entries over the ranks. Exactly k * B (the usual case): they are
           the selection. More (ties at the cut, or widened rows with more above it): their values are
           gathered and the final cut is the (k * B)-th largest of them; every entry above it is kept
           and, of the entries equal to it, as many as k * B needs, in rank order, then row by row
           (one process breaks such ties in torch.topk's order instead: the code then differs from
           it only in which of equal pre-activations fire, never in how many)."""
        n_rows, cap = vals_BC.shape
        all_vals, sizes = batch_all_gather_sizes(vals_BC.flatten())
        n_keep = self.cfg.k * (sum(sizes) // cap)
        cut = all_vals.topk(n_keep, sorted=False).values.min()
        if cap < self.cfg.d_sae:
            vals_BC, idx_BC = self._widen_full_rows(x_BD, vals_BC, idx_BC, cut)
        keep_BC = vals_BC >= cut
        if int(batch_sum_(keep_BC.sum().reshape(1))) > n_keep:
            kept_N = vals_BC[keep_BC]  # row-major order
            all_kept, sizes = batch_all_gather_sizes(kept_N)
            cut = all_kept.topk(n_keep, sorted=False).values.min()
            n_ties = n_keep - int((all_kept > cut).sum())
            ties_before = int((all_kept[:sum(sizes[:batch_rank()])] == cut).sum())
            tie_BC = vals_BC == cut
            tie_order_BC = tie_BC.flatten().cumsum(0).view(tie_BC.shape) + ties_before  # 1-based, global
            keep_BC = (vals_BC > cut) | (tie_BC & (tie_order_BC <= n_ties))
        row_N, slot_N = keep_BC.nonzero(as_tuple=True)
        return pad_rows(row_N, idx_BC[row_N, slot_N], vals_BC[row_N, slot_N].relu(), n_rows)

    @torch.no_grad()
    def _select_above_threshold(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's pre-activations above theta (as ReLU(pre) * 1[pre > theta]), padded rows."""
        theta = self.threshold.to(x_BD.dtype)
        parts = []
        for _, pre_CF in self._pre_act_chunks(x_BD):
            n_above = int((pre_CF > theta).sum(-1).max()) if pre_CF.numel() else 0
            vals_CK, idx_CK = pre_CF.topk(max(n_above, 1), dim=-1, sorted=False)
            parts.append((vals_CK.masked_fill_(vals_CK <= theta, 0), idx_CK))
        width = max(v.shape[1] for v, _ in parts)
        vals_BK = torch.cat([F.pad(v, (0, width - v.shape[1])) for v, _ in parts])
        idx_BK = torch.cat([F.pad(i, (0, width - i.shape[1])) for _, i in parts])
        return vals_BK, idx_BK

    @torch.no_grad()
    def _update_threshold(self, vals_BK: Tensor) -> None:
        """theta <- EMA of the batch's smallest kept activation (the first batch sets it); without a
        device sync, and unchanged if the batch kept no positive activation."""
        if in_group():  # the smallest kept over every rank's rows (one may hold none), so theta stays replicated
            kept = torch.where(vals_BK > 0, vals_BK, torch.inf).flatten().to(self.threshold.dtype)
            smallest = batch_min_(torch.cat([kept, kept.new_full((1,), torch.inf)]).amin(0, keepdim=True))[0]
        else:
            smallest = torch.where(vals_BK > 0, vals_BK, torch.inf).min().to(self.threshold.dtype)
        m = self.cfg.threshold_momentum
        updated = torch.where(self.threshold > 0, m * self.threshold + (1 - m) * smallest, smallest)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.threshold))

    def summarize_metrics(self, totals: dict[str, Tensor], n_tokens: int) -> dict[str, float | list[float]]:
        """Also the current inference ``threshold`` theta."""
        return {**super().summarize_metrics(totals, n_tokens), "threshold": float(self.threshold)}

    def saelens_config(self) -> dict:
        return {**super().saelens_config(), WORKBENCH_ARCHITECTURE_KEY: self.cfg.architecture}

    def saelens_tensors(self) -> dict[str, Tensor]:
        theta_F = torch.full((self.cfg.d_sae,), float(self.threshold), dtype=torch.float32)
        return {**super().saelens_tensors(), "threshold": theta_F}

    @torch.no_grad()
    def load_saelens_tensors_(self, tensors: dict[str, Tensor], saved_cfg: dict | None = None) -> None:
        """Also SAELens' BatchTopK training checkpoints, whose one threshold is the scalar
        ``topk_threshold``: read as the JumpReLU SAELens exports from it (every latent's threshold
        that value, in the weights' dtype)."""
        if "topk_threshold" in tensors and "threshold" not in tensors:
            tensors = dict(tensors)
            theta = tensors.pop("topk_threshold")
            tensors["threshold"] = torch.full((self.cfg.d_sae,), float(theta), dtype=tensors["b_enc"].dtype)
        super().load_saelens_tensors_(tensors, saved_cfg)
        theta_F = tensors["threshold"]
        if not bool((theta_F == theta_F[0]).all()):
            raise ValueError(f"a {self.cfg.architecture} SAE has one threshold for every latent, but these "
                             f"thresholds differ between latents; load the folder as architecture 'jumprelu'")
        self.threshold.fill_(float(theta_F[0]))
