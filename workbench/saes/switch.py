"""Switch SAE (Mudide et al. 2024): a router sends each token to one of E TopK expert SAEs.

    p = softmax(W_router^T (x - b_router))            router probabilities, (B, E)
    i* = argmax p                                      each token's expert
    z = p_{i*} * ReLU(TopK_k(W_enc_{i*}^T (x - b_pre))) the expert's latents, scaled by its probability
    x_hat = W_dec_{i*}^T z + b_pre                      b_pre is shared by all experts

Loss: per-dimension MSE + alpha * E * sum_i f_i P_i (f_i: fraction of tokens sent to expert i,
P_i: mean router probability of i). The paper's code writes the loss as sum_d MSE + alpha * d * L_lb,
which is d times this, so alpha transfers unchanged.

Under :func:`workbench.saes.batch.batch_group` (data parallel) both terms are over the global batch:
the MSE over every rank's elements, f_i and P_i over every rank's tokens.

Each token is computed by its own expert only: tokens are grouped by expert and each expert runs one
(n_e, D) x (D, M/E) matmul. The paper's code computes all M latents and masks; ours does not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import (BaseSAE, Code, LatentGroups, RowWeight, SAEConfig, SAEOutput, check_k, count_ids,
                   encoder_decoder_rows, geometric_median, init_tied_weights, latent_major, sparse_decode,
                   sparse_encode, topk_lr)
from .batch import batch_sum, batch_sum_, in_group

GATES = ("softmax", "heaviside")


@dataclass
class SwitchConfig(SAEConfig):
    """Switch SAE: E expert TopK SAEs of width d_sae / E behind a top-1 router."""

    k: int = 32
    """Active latents per token, all inside the token's expert (the L0)."""
    n_experts: int = 8
    """Number of experts E; d_sae must be divisible by it."""
    lb_alpha: float = 3.0
    """Weight alpha of the load-balancing loss (3 in the paper's runs)."""
    gate: str = "softmax"
    """How the router scales the expert's latents: "softmax" (by p_{i*}, trains the router through the
    reconstruction) or "heaviside" (scale 1; the router learns from the load-balancing loss only)."""

    architecture = "switch"

    def validate(self) -> None:
        super().validate()
        if self.n_experts <= 0:
            raise ValueError(f"n_experts={self.n_experts!r} must be a positive integer")
        if self.d_sae % self.n_experts:
            raise ValueError(
                f"d_sae={self.d_sae} is not divisible by n_experts={self.n_experts}; "
                f"each expert needs the same width (try d_sae={self.d_sae // self.n_experts * self.n_experts})")
        check_k(self.k, self.expert_width, "expert width d_sae/n_experts")
        if self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} must be one of {GATES}")
        if self.lb_alpha < 0:
            raise ValueError(f"lb_alpha={self.lb_alpha} must be >= 0")

    @property
    def expert_width(self) -> int:
        return self.d_sae // self.n_experts

    def default_lr(self) -> float:
        return topk_lr(self.d_sae)


class SwitchSAE(BaseSAE):
    cfg: SwitchConfig

    def __init__(self, cfg: SwitchConfig):
        super().__init__(cfg)
        W_enc_DF, W_dec_FD = init_tied_weights(cfg)
        self.W_enc = nn.Parameter(latent_major(W_enc_DF))
        self.W_dec = nn.Parameter(W_dec_FD)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        # Experts have no encoder bias; a frozen zero b_enc keeps the SAELens key set complete.
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=False)
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        bound = cfg.d_in ** -0.5  # nn.Linear's default init range
        self.W_router = nn.Parameter((torch.rand(cfg.d_in, cfg.n_experts, generator=gen) * 2 - 1) * bound)
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in))

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        median_D = geometric_median(x_BD)
        self.b_dec.copy_(median_D)
        self.b_router.copy_(median_D)

    def route(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Router probabilities (B, E) and each token's expert (B,)."""
        probs_BE = torch.softmax((x_BD - self.b_router) @ self.W_router, dim=-1)
        return probs_BE, probs_BE.argmax(-1)

    @torch.no_grad()
    def _expert_topk(self, x_BD: Tensor, expert_B: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k (values after ReLU, global latent ids) of each token inside its own expert only.

        Tokens are grouped by expert; each expert's (n_e, D) x (D, M/E) matmul writes its rows of one
        (B, M/E) buffer of pre-activations, and a single topk runs over all of them.
        """
        k, width = self.cfg.k, self.cfg.expert_width
        order_B = expert_B.argsort(stable=True)
        counts = count_ids(expert_B, self.cfg.n_experts).tolist()  # the step's one device sync
        xc_BD = torch.index_select(x_BD, 0, order_B).sub_(self.b_dec)
        # Under autocast the matmuls run in its dtype (bfloat16 on a GPU), not into a float32 buffer.
        autocast = torch.is_autocast_enabled(x_BD.device.type)
        dtype = torch.get_autocast_dtype(x_BD.device.type) if autocast else x_BD.dtype
        pre_BW = x_BD.new_empty(x_BD.shape[0], width, dtype=dtype)
        start = 0
        for e, n in enumerate(counts):
            if n:
                W_DW = self.W_enc[:, e * width:(e + 1) * width]
                if autocast:
                    pre_BW[start:start + n] = xc_BD[start:start + n] @ W_DW
                else:
                    torch.mm(xc_BD[start:start + n], W_DW, out=pre_BW[start:start + n])
            start += n
        vals_BK, idx_BK = pre_BW.topk(k, dim=-1, sorted=False)
        vals_BK = vals_BK.to(x_BD.dtype).relu_()
        idx_BK += (expert_B[order_B] * width)[:, None]
        # Back to the tokens' own order: row order_B[j] of the result is row j of the sorted batch.
        unsorted_vals, unsorted_idx = torch.empty_like(vals_BK), torch.empty_like(idx_BK)
        unsorted_vals[order_B] = vals_BK
        unsorted_idx[order_B] = idx_BK
        return unsorted_vals, unsorted_idx

    def _gate(self, probs_BE: Tensor, expert_B: Tensor) -> Tensor:
        if self.cfg.gate == "heaviside":
            return probs_BE.new_ones(probs_BE.shape[0])
        return probs_BE.gather(1, expert_B[:, None]).squeeze(1)

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        self.check_input(x_BD)
        probs_BE, expert_B = self.route(x_BD)
        vals_BK, idx_BK = self._expert_topk(x_BD, expert_B)
        return Code(vals_BK * self._gate(probs_BE, expert_B)[:, None], idx_BK, self.cfg.d_sae)

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        self.check_input(x_BD)
        probs_BE, expert_B = self.route(x_BD)
        vals_BK, idx_BK = self._expert_topk(x_BD, expert_B)
        acts_BK = sparse_encode(x_BD, self.b_dec, self.W_enc, None, vals_BK, idx_BK)
        acts_BK = acts_BK * self._gate(probs_BE, expert_B)[:, None]
        recon_BD = sparse_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

        losses = switch_losses(self.cfg, x_BD, recon_BD, probs_BE, expert_B)
        metrics = switch_metrics(probs_BE, expert_B, self.cfg.n_experts)
        return SAEOutput(recon_BD, Code(acts_BK, idx_BK, self.cfg.d_sae), losses, metrics)

    def summarize_metrics(self, totals: dict[str, Tensor], n_tokens: int) -> dict[str, float | list[float]]:
        """``expert_load`` f_i (the fraction of tokens routed to each expert), ``load_balance``
        E * sum_i f_i P_i without its alpha (1 when routing is uniform, up to E when one expert takes
        every token with probability 1) and ``router_entropy``, the mean over tokens of
        -sum_i p_i ln p_i in nats (ln E for a router uniform on every token, 0 for a certain one)."""
        f_E = totals["expert_tokens"].double() / n_tokens
        p_E = totals["router_prob"].double() / n_tokens
        return {"expert_load": f_E.tolist(), "load_balance": (self.cfg.n_experts * (f_E * p_E).sum()).item(),
                "router_entropy": totals["router_entropy"].item() / n_tokens}

    def latent_groups(self) -> LatentGroups:
        """Latent f belongs to expert f // (d_sae / n_experts)."""
        return LatentGroups("expert", torch.arange(self.cfg.d_sae) // self.cfg.expert_width)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> SwitchSAE:
        """As every SAE, plus the router, which reads (x - b_router) @ W_router."""
        super().fold_input_scale_(scale)
        self.W_router.mul_(scale)
        self.b_router.div_(scale)
        return self

    def fold_uncentred_input_(self) -> SwitchSAE:
        """Experts have no encoder bias to absorb b_dec (and the router reads x - b_router), so a folder
        whose experts read x itself (``apply_b_dec_to_input: false``) cannot be made to compute here."""
        raise ValueError("apply_b_dec_to_input=false is not supported for a Switch SAE: its experts have no "
                         "encoder bias to absorb b_dec; save it with apply_b_dec_to_input true")

    def row_sparse_weights(self) -> list[RowWeight]:
        """The encoder and the decoder: only the k latents each token selects inside its expert get
        their rows' gradient."""
        return encoder_decoder_rows(self)

    def flops_per_token(self, training: bool = False) -> int:
        """Forward: router 2*d*E + one expert's encoder 2*d*M/E + sparse decoder 2*k*d. A training
        step adds the router backward (2 * 2*d*E) and the sparse encoder-weight, decoder-weight and
        latent gradients (2*k*d each)."""
        d, e, k = self.cfg.d_in, self.cfg.n_experts, self.cfg.k
        forward = 2 * d * e + 2 * d * self.cfg.expert_width + 2 * k * d
        return forward + 2 * 2 * d * e + 3 * 2 * k * d if training else forward


def switch_losses(cfg: SwitchConfig, x_BD: Tensor, recon_BD: Tensor, probs_BE: Tensor,
                  expert_B: Tensor) -> dict[str, Tensor]:
    """The loss terms: per-dimension MSE and alpha times the load balance. Inside
    :func:`workbench.saes.batch.batch_group` both are over the whole batch of every rank (also the
    expert-parallel forward's, which passes the whole SAE's ``cfg``): the MSE over its B * D
    elements, f_i from the summed expert counts (no gradient) and P_i the mean router probability over
    the B tokens (differentiable); two all-reduces, the counts with the row count, then the squared
    error with sum_b p_b."""
    if not in_group():
        losses = {"mse": (x_BD - recon_BD).pow(2).mean()}
        if cfg.lb_alpha > 0:
            losses["load_balance"] = cfg.lb_alpha * load_balance_loss(probs_BE, expert_B)
        return losses
    n_experts = cfg.n_experts
    counts = batch_sum_(torch.cat([count_ids(expert_B, n_experts),
                                   torch.full((1,), x_BD.shape[0], dtype=torch.long, device=x_BD.device)]))
    n_rows = counts[-1]
    parts = [(x_BD - recon_BD).pow(2).sum()[None]]
    if cfg.lb_alpha > 0:
        parts.append(probs_BE.sum(0).to(parts[0].dtype))
    sums = batch_sum(torch.cat(parts))
    losses = {"mse": sums[0] / (n_rows * x_BD.shape[1])}
    if cfg.lb_alpha > 0:
        f_E = counts[:n_experts].to(probs_BE.dtype) / n_rows
        losses["load_balance"] = cfg.lb_alpha * n_experts * (f_E * sums[1:] / n_rows).sum()
    return losses


@torch.no_grad()
def switch_metrics(probs_BE: Tensor, expert_B: Tensor, n_experts: int) -> dict[str, Tensor]:
    """The metric totals over the local tokens: tokens per expert, summed router probabilities, and
    summed router entropy (:meth:`SwitchSAE.summarize_metrics` reports them)."""
    return {"expert_tokens": count_ids(expert_B, n_experts), "router_prob": probs_BE.sum(0),
            "router_entropy": torch.special.entr(probs_BE).sum()}


def load_balance_loss(probs_BE: Tensor, expert_B: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss N * sum_i f_i P_i; equals 1 when routing is uniform.
    f_i (the argmax counts) carries no gradient; the router learns through P_i. Over the local batch
    only (SwitchSAE.forward computes the global one itself under ``batch_group``)."""
    n_experts = probs_BE.shape[1]
    f_E = count_ids(expert_B, n_experts).to(probs_BE.dtype) / expert_B.shape[0]
    return n_experts * (f_E * probs_BE.mean(0)).sum()
