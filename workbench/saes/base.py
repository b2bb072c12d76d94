"""What every SAE architecture shares: the interface (:class:`BaseSAE`: what the trainer, the
evaluator, io and the feature browser call), the output types, the config base, the unit-norm decoder
step, geometric-median initialisation and the sparse encode/decode of the k-sparse architectures.

Shape suffixes: B batch, D model dim (d_in), F latents (d_sae), K active latents per token,
E experts.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configtools import check_fields


def count_ids(ids: Tensor, n: int) -> Tensor:
    """(n,) int64: how often each id 0..n-1 occurs in ``ids``. ``torch.bincount`` on a GPU first reads
    the largest id back to the host; this never does."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.long, device=ids.device))


class Code(NamedTuple):
    """The sparse code of a batch.

    Either k-sparse (``idx`` holds the active latent ids, ``acts`` their values, both (B, K)), or
    dense (``idx`` is None and ``acts`` is (B, F)). TopK and Switch SAEs give the first form, ReLU and
    Gated SAEs the second. Architectures whose number of active latents varies per token (BatchTopK)
    pad each row of the k-sparse form to the batch's longest with zero activations; a zero entry
    never counts as firing, whatever its id.
    """

    acts: Tensor
    idx: Tensor | None
    d_sae: int

    def dense(self) -> Tensor:
        """The code as a dense (B, F) tensor."""
        if self.idx is None:
            return self.acts
        out_BF = self.acts.new_zeros(self.acts.shape[0], self.d_sae)
        # A sum, not an assignment: a padding entry may repeat the id of a real one.
        return out_BF.scatter_add_(1, self.idx, self.acts)

    def l0(self) -> Tensor:
        """Number of latents that fired (value > 0) for each token, (B,)."""
        return (self.acts > 0).sum(-1)

    def fire_counts(self) -> Tensor:
        """Number of tokens on which each latent fired, (F,)."""
        fired = self.acts > 0
        if self.idx is None:
            return fired.sum(0)
        counts_F = torch.zeros(self.d_sae, dtype=torch.long, device=self.acts.device)
        # Weighted by fired rather than indexed by it: a boolean index would wait for the GPU.
        return counts_F.index_add_(0, self.idx.reshape(-1), fired.reshape(-1).long())


class SAEOutput(NamedTuple):
    """What ``forward`` returns.

    ``losses`` holds each loss term already multiplied by its coefficient, so the training loss is
    ``sum(losses.values())``; the names say what each term is (e.g. ``"mse"``, ``"auxk"``).
    ``metrics`` holds what else the architecture reports about the batch, as totals over its tokens
    (each a tensor that adds up across batches); :meth:`BaseSAE.summarize_metrics` turns totals over
    any number of tokens into the reported values. The trainer and the evaluator log whatever is
    there without knowing what it means.
    """

    recon_BD: Tensor
    code: Code
    losses: dict[str, Tensor]
    metrics: dict[str, Tensor]


class LatentGroups(NamedTuple):
    """Which group each latent belongs to, for SAEs whose dictionary has parts: a Switch SAE's
    experts, a Matryoshka SAE's nested prefixes."""

    kind: str
    """What a group is, as the browser names it ("expert", "level")."""
    group_F: Tensor
    """(F,) int64: the group of each latent, 0 to n_groups - 1."""

    @property
    def n_groups(self) -> int:
        return int(self.group_F.max()) + 1


WORKBENCH_ARCHITECTURE_KEY = "workbench_architecture"
"""cfg.json key naming our architecture where SAELens reads the folder as another (BatchTopK saved as
SAELens' "jumprelu")."""


@dataclass
class SAEConfig:
    """Sizes shared by every architecture. Subclasses add their own fields and set ``architecture``."""

    d_in: int
    """Width of the activations the SAE reads (the model's hidden size at the site)."""
    d_sae: int
    """Number of latents (dictionary size, M in the papers)."""
    seed: int = 0
    """Seed for the SAE's initial weights."""

    architecture: ClassVar[str] = ""
    saelens_architecture: ClassVar[str] = ""
    """The name SAELens reads this architecture's folders under ("" means the same as ours)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad field; subclasses extend this. Every field is first
        checked against its type hint (a NaN or Inf number included), so the checks after it, here
        and in the subclasses, compare numbers with numbers."""
        check_fields(self)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.architecture} SAE: {name}={value!r} must be a positive integer")

    def default_lr(self) -> float:
        """The learning rate the architecture's paper trains with (the Trainer's default)."""
        raise NotImplementedError(f"{type(self).__name__} must define default_lr()")

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def fields_from_saelens(cls, saved_cfg: dict) -> dict:
        """This config's fields from a saved cfg.json, ours or SAELens': those it names, as written.
        Subclasses fill in what SAELens computes with but does not write under our name."""
        return {name: saved_cfg[name] for name in cls.__dataclass_fields__ if name in saved_cfg}


class BaseSAE(nn.Module, abc.ABC):
    """The interface every architecture implements; the trainer, the evaluator, io, the feature
    index and the widgets use nothing else.

    Parameters follow SAELens names and shapes: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in),
    ``b_enc`` (d_sae,), ``b_dec`` (d_in,). Decoder rows are kept at unit norm by
    :class:`UnitNormDecoder` during training. An SAE holds no training-only state: what a run
    tracks (e.g. which latents are dead) is the trainer's and comes in through ``forward``.
    """

    cfg: SAEConfig

    def __init__(self, cfg: SAEConfig):
        cfg.validate()
        super().__init__()
        self.cfg = cfg
        self.metadata: dict = {}
        """What the SAE's folder says about where it was trained (cfg.json's "metadata"), when it was
        loaded from one; :func:`workbench.io.save` writes it back unless given other metadata."""

    # --- what each architecture defines -------------------------------------------------------

    @abc.abstractmethod
    def encode_code(self, x_BD: Tensor) -> Code:
        """The latents of a batch, without gradient, as in evaluation and inference."""

    @abc.abstractmethod
    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        """Reconstruction, code, weighted loss terms and metric totals of a batch.

        ``dead_mask`` (F,) bool marks the latents the trainer counts as dead (not fired for
        ``TrainConfig.dead_window_tokens`` tokens), for architectures with a dead-latent loss.
        """

    @abc.abstractmethod
    def flops_per_token(self, training: bool = False) -> int:
        """Matmul FLOPs per token of a forward pass, or of a whole training step."""

    def default_lr(self) -> float:
        """The learning rate the Trainer uses for this SAE unless told otherwise."""
        return self.cfg.default_lr()

    # --- what an architecture may extend ----------------------------------------------------------

    def summarize_metrics(self, totals: dict[str, Tensor], n_tokens: int) -> dict[str, float | list[float]]:
        """The reported values of metric ``totals`` summed over ``n_tokens`` tokens: by default
        each total divided by the tokens (a mean per token)."""
        return {name: (total / n_tokens).tolist() for name, total in totals.items()}

    def latent_groups(self) -> LatentGroups | None:
        """Which expert or prefix each latent belongs to; None for a flat dictionary."""
        return None

    def row_sparse_weights(self) -> list[RowWeight]:
        """The dictionary weights whose training gradient reaches only the rows of the latents that
        fired in the batch (the k-sparse architectures' encoder and decoder), so that an optimiser can
        step those rows alone (``TrainConfig.optimizer="sparse_adam"``). Empty (the default) for an
        architecture whose every latent gets gradient from every token."""
        return []

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> BaseSAE:
        """Make the SAE, trained on ``scale * x``, read raw activations x; returns self.

        The input reaches every architecture only as ``x @ W_enc`` after an input-side bias
        (b_dec, or none), and leaves through ``W_dec`` and ``b_dec``; so with s = scale:
        W_enc <- s W_enc, W_dec <- W_dec / s, b_dec <- b_dec / s. The latents are unchanged;
        decoder rows now have norm 1/s. Architectures with more input-side weights extend this.
        """
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        return self

    def on_step(self, step: int) -> None:
        """Called by the Trainer before each step (for coefficient warm-ups). Default: nothing."""

    @torch.no_grad()
    def init_from_data_(self, x_BD: Tensor) -> None:
        """Data-dependent initialisation from the first training batch. Default: nothing."""

    def saelens_config(self) -> dict:
        """The cfg.json fields that say how the saved SAE computes, in SAELens' terms."""
        return {**self.cfg.to_dict(), "architecture": self.cfg.saelens_architecture or self.cfg.architecture,
                "apply_b_dec_to_input": True}

    def saelens_tensors(self) -> dict[str, Tensor]:
        """The tensors a saved SAE holds, by SAELens key: its parameters, on the CPU."""
        return {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}

    @torch.no_grad()
    def load_saelens_tensors_(self, tensors: dict[str, Tensor], saved_cfg: dict | None = None) -> None:
        """Set the parameters from tensors keyed as :meth:`saelens_tensors` gives them; a ValueError
        names the missing, unexpected or misshapen keys. Architectures that save more than their
        parameters set the rest after calling this.

        ``saved_cfg`` is the folder's cfg.json: with ``apply_b_dec_to_input: false`` (SAELens then
        encodes x, not x - b_dec) and a config without that field, b_dec is folded into the encoder
        (:meth:`fold_uncentred_input_`). Subclasses honour the fields that concern only them."""
        expected = self.saelens_tensors()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"the weights file does not match a {self.cfg.architecture} SAE: missing {missing}, "
                             f"unexpected {extra}")
        for name, ref in expected.items():
            if tensors[name].shape != ref.shape:
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, but cfg.json implies "
                                 f"{tuple(ref.shape)}")
        for name, param in self.named_parameters():
            if name in tensors:  # a parameter saved under another key is the subclass's to set
                param.copy_(tensors[name])
        honoured_by_cfg = "apply_b_dec_to_input" in self.cfg.__dataclass_fields__
        if (saved_cfg or {}).get("apply_b_dec_to_input") is False and not honoured_by_cfg:
            self.fold_uncentred_input_()

    @torch.no_grad()
    def fold_uncentred_input_(self) -> BaseSAE:
        """Make the SAE, whose encoder read x + (its biases), read x - b_dec as every architecture
        here does; returns self. W_enc^T x + b_enc = W_enc^T (x - b_dec) + (b_enc + W_enc^T b_dec),
        so b_enc <- b_enc + b_dec @ W_enc. Architectures with other encoder biases override this."""
        self.b_enc.add_(self.b_dec @ self.W_enc)
        return self

    def encode(self, x_BD: Tensor) -> Tensor:
        """Dense (B, F) latent activations."""
        return self.encode_code(x_BD).dense()

    def decode(self, latents_BF: Tensor) -> Tensor:
        """Reconstruction from dense latents: latents @ W_dec + b_dec."""
        return latents_BF @ self.W_dec + self.b_dec

    def check_input(self, x_BD: Tensor) -> None:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.cfg.d_in:
            raise ValueError(
                f"{self.cfg.architecture} SAE has d_in={self.cfg.d_in} but got activations of shape "
                f"{tuple(x_BD.shape)}; pass a (batch, {self.cfg.d_in}) tensor"
            )


def topk_into(pre_CF: Tensor, k: int, vals_CK: Tensor, idx_CK: Tensor) -> None:
    """``torch.topk`` of each row into the given buffers (views of the batch's), also when autocast
    made the pre-activations bfloat16 and the buffers are float32 (then through a copy)."""
    if pre_CF.dtype == vals_CK.dtype:
        torch.topk(pre_CF, k, dim=-1, sorted=False, out=(vals_CK, idx_CK))
    else:
        vals, idx = torch.topk(pre_CF, k, dim=-1, sorted=False)
        vals_CK.copy_(vals)
        idx_CK.copy_(idx)


def init_tied_weights(cfg: SAEConfig) -> tuple[Tensor, Tensor]:
    """Random unit-norm decoder rows and the encoder set to their transpose (Gao et al. A.1).

    Returns (W_enc (D, F), W_dec (F, D)), drawn from a generator seeded with ``cfg.seed`` so that
    two SAEs built from the same config are identical.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
    W_dec_FD /= W_dec_FD.norm(dim=-1, keepdim=True)
    return W_dec_FD.t().contiguous(), W_dec_FD


def latent_major(W_DF: Tensor) -> Tensor:
    """The same (D, F) values stored latent by latent (the transpose of a contiguous (F, D)), so that
    one latent's encoder weights are one contiguous row: a row-sparse step gathers and writes them
    as it does the decoder's. Matmuls read either layout at the same speed; saved files are
    unchanged (they are written contiguous)."""
    return W_DF.t().contiguous().t()


class RowWeight(NamedTuple):
    """A dictionary weight trained row by row (see :meth:`BaseSAE.row_sparse_weights`)."""

    name: str
    """The parameter's name (``"W_enc"``, ``"W_dec"``)."""
    param: nn.Parameter
    """The parameter itself, in its saved shape."""
    rows_FD: Tensor
    """The same storage seen as (F, D), one row per latent (``W_enc.t()``, ``W_dec``)."""
    unit_norm: bool
    """Whether its rows are kept at unit norm (the decoder)."""


def encoder_decoder_rows(sae: BaseSAE) -> list[RowWeight]:
    """``W_enc`` (as its (F, D) transpose) and ``W_dec`` as row-sparse weights, for the architectures
    whose gradients reach only the selected latents (:meth:`BaseSAE.row_sparse_weights`)."""
    return [RowWeight("W_enc", sae.W_enc, sae.W_enc.t(), False), RowWeight("W_dec", sae.W_dec, sae.W_dec, True)]


ROW_GRADS = "_workbench_row_grads"
"""The attribute under which a parameter collects its row-sparse gradients during one backward: a
list of (ids_T, rows_TD) pairs, one per sparse encode or decode that used it. Set by the trainer
before the forward (:func:`collect_row_grads`); while it is set, :func:`sparse_encode` and
:func:`sparse_decode` give that parameter no dense gradient at all."""


def collect_row_grads(param: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Start collecting ``param``'s row-sparse gradients for the next forward and backward; returns
    the list they are appended to (read it with :func:`merged_row_grads` after ``backward``)."""
    sink: list[tuple[Tensor, Tensor]] = []
    setattr(param, ROW_GRADS, sink)
    return sink


def stop_collecting_row_grads(param: Tensor) -> None:
    if hasattr(param, ROW_GRADS):
        delattr(param, ROW_GRADS)


def merged_row_grads(sink: list[tuple[Tensor, Tensor]], d: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """One (ids_T sorted and unique, rows_TD) from the pairs a backward appended (a latent used by
    both the main and the AuxK selection gets the sum of its rows)."""
    if not sink:
        return torch.empty(0, dtype=torch.long, device=like.device), like.new_empty(0, d)
    if len(sink) == 1:
        return sink[0]
    ids_N = torch.cat([ids for ids, _ in sink])
    rows_ND = torch.cat([rows for _, rows in sink])
    ids_T, inverse_N = torch.unique(ids_N, sorted=True, return_inverse=True)
    return ids_T, rows_ND.new_zeros(len(ids_T), d).index_add_(0, inverse_N, rows_ND)


class UnitNormDecoder:
    """Keeps the rows of decoder matrices at unit norm across optimiser steps.

    Call :meth:`project_grads` after ``backward`` and before ``optimizer.step()`` (removes the
    gradient component parallel to each row, so the step moves rows along the sphere), and
    :meth:`renormalise` after the step (pulls rows back onto it).
    """

    def __init__(self, weights: list[Tensor]):
        self.weights = weights

    @torch.no_grad()
    def project_grads(self) -> None:
        for W_FD in self.weights:
            if W_FD.grad is not None:
                parallel_F1 = (W_FD.grad * W_FD).sum(-1, keepdim=True)
                W_FD.grad.sub_(parallel_F1 * W_FD)

    @torch.no_grad()
    def renormalise(self) -> None:
        for W_FD in self.weights:
            W_FD.div_(W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def geometric_median(x_BD: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iteration, as in Gao et al. and the Switch SAE code (100 iterations, tol 1e-5)."""
    x_BD = x_BD.double()
    median_D = x_BD.mean(0)
    for _ in range(max_iter):
        dist_B = (x_BD - median_D).norm(dim=-1).clamp_min(1e-12)
        weights_B = 1.0 / dist_B
        new_D = (weights_B[:, None] * x_BD).sum(0) / weights_B.sum()
        shift = (new_D - median_D).norm()
        median_D = new_D
        if shift < tol:
            break
    return median_D.float()


def _latent_order(idx_BK: Tensor, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the B*K (token, latent) pairs by latent.

    Returns ``order_N`` (the pairs' flat positions sorted by latent id), ``token_N`` (the token of
    each sorted pair) and ``offsets_F`` (where each latent's run starts in the sorted list), the
    layout of an embedding_bag with one bag per latent.
    """
    idx_N = idx_BK.reshape(-1)
    order_N = idx_N.argsort()
    counts_F = count_ids(idx_N, d_sae)
    offsets_F = counts_F.cumsum(0).sub_(counts_F)
    return order_N, order_N.div(idx_BK.shape[1], rounding_mode="floor"), offsets_F


def _segment_sum(src_BD: Tensor, weight_N: Tensor, idx_BK: Tensor, d_sae: int) -> Tensor:
    """(F, D) tensor whose row f is sum over pairs (b, k) with idx[b, k] == f of weight[b, k] * src[b].

    An embedding_bag over the pairs sorted by latent: it gathers and sums rows of ``src`` per latent
    and never builds the (B*K, D) tensor of products that an index_add would need.
    """
    order_N, token_N, offsets_F = _latent_order(idx_BK, d_sae)
    return F.embedding_bag(token_N, src_BD, offsets_F, mode="sum",
                           per_sample_weights=weight_N.reshape(-1)[order_N])


def _touched_rows(src_BD: Tensor, weight_BK: Tensor, idx_BK: Tensor, fired_BK: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of :func:`_segment_sum` for the latents that fired only: ``ids_T`` (sorted, unique
    latent ids with at least one pair where ``fired_BK``), ``rows_TD`` (row t = sum over those
    pairs of weight * src[b]) and ``sums_T`` (the pairs' weights summed per latent). Its cost grows
    with the B*K pairs, never with the dictionary's width."""
    k = idx_BK.shape[1]
    pos_N = fired_BK.reshape(-1).nonzero().squeeze(1)
    if len(pos_N) == 0:  # nothing fired (an AuxK selection with no dead latent)
        return idx_BK.new_empty(0), src_BD.new_empty(0, src_BD.shape[1]), weight_BK.new_empty(0)
    ids_sorted_N, order_N = idx_BK.reshape(-1)[pos_N].sort(stable=True)
    ids_T, inverse_N, counts_T = torch.unique_consecutive(ids_sorted_N, return_inverse=True, return_counts=True)
    pos_N = pos_N[order_N]
    weight_N = weight_BK.reshape(-1)[pos_N]
    rows_TD = F.embedding_bag(pos_N.div(k, rounding_mode="floor"), src_BD, counts_T.cumsum(0).sub_(counts_T),
                              mode="sum", per_sample_weights=weight_N)
    sums_T = weight_N.new_zeros(len(ids_T)).index_add_(0, inverse_N, weight_N)
    return ids_T, rows_TD, sums_T


class _SparseEncode(torch.autograd.Function):
    """Given pre-activations already computed, pass gradient only to the selected latents.

    forward(x_BD, b_pre_D, W_enc_DF, b_enc_F, acts_BK, idx_BK) -> acts_BK
    The gradient of the selected pre-activations reaches W_enc's columns of the active latents only
    (a per-latent segment sum over the B*K pairs, never a dense (B, F) matmul), and b_pre's gradient
    is summed over the batch before touching W_enc (Gao et al. App. D).
    """

    @staticmethod
    def forward(ctx, x_BD, b_pre_D, W_enc_DF, b_enc_F, acts_BK, idx_BK):
        ctx.save_for_backward(x_BD, b_pre_D, W_enc_DF, idx_BK, acts_BK)
        ctx.has_b_enc = b_enc_F is not None
        ctx.row_grads = getattr(W_enc_DF, ROW_GRADS, None)
        return acts_BK.clone()

    @staticmethod
    def backward(ctx, grad_BK):
        x_BD, b_pre_D, W_enc_DF, idx_BK, acts_BK = ctx.saved_tensors
        # Gradient of ReLU(pre) at the kept entries: zero where the kept value was clamped to 0.
        fired_BK = acts_BK > 0
        grad_BK = grad_BK * fired_BK
        d_sae = W_enc_DF.shape[1]
        grad_W = grad_b_pre = grad_b_enc = None
        if ctx.row_grads is not None and ctx.needs_input_grad[2]:
            # Row-sparse: W_enc's gradient as the fired latents' rows only, and b_pre's from those
            # latents' encoder rows (never a pass over all F).
            ids_T, rows_TD, sums_T = _touched_rows(x_BD - b_pre_D, grad_BK, idx_BK, fired_BK)
            ctx.row_grads.append((ids_T, rows_TD))
            if ctx.needs_input_grad[1] and len(ids_T):  # -(sum_t sums_t W_enc[:, t]), rows not gathered
                grad_b_pre = -F.embedding_bag(ids_T[None], W_enc_DF.t(), mode="sum",
                                              per_sample_weights=sums_T[None])[0]
            if ctx.has_b_enc and ctx.needs_input_grad[3]:
                grad_b_enc = W_enc_DF.new_zeros(d_sae).index_copy_(0, ids_T, sums_T)
            return None, grad_b_pre, None, grad_b_enc, None, None
        if ctx.needs_input_grad[2]:
            grad_W = _segment_sum(x_BD - b_pre_D, grad_BK, idx_BK, d_sae).t()
        if ctx.needs_input_grad[1] or (ctx.has_b_enc and ctx.needs_input_grad[3]):
            grad_sum_F = W_enc_DF.new_zeros(d_sae).index_add_(0, idx_BK.reshape(-1), grad_BK.reshape(-1))
            if ctx.needs_input_grad[1]:
                grad_b_pre = -(W_enc_DF @ grad_sum_F)
            if ctx.has_b_enc and ctx.needs_input_grad[3]:
                grad_b_enc = grad_sum_F
        return None, grad_b_pre, grad_W, grad_b_enc, None, None


def sparse_encode(x_BD: Tensor, b_pre_D: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor | None,
                  acts_BK: Tensor, idx_BK: Tensor) -> Tensor:
    """Attach a sparse backward to values picked (top-k) from ReLU(W_enc^T (x - b_pre) + b_enc).

    ``acts_BK`` must have been computed without autograd from the same tensors.
    """
    return _SparseEncode.apply(x_BD, b_pre_D, W_enc_DF, b_enc_F, acts_BK, idx_BK)


class _DecoderWeightGrad(torch.autograd.Function):
    """Identity on the decoded batch; gives W_dec the gradient of embedding_bag(idx, W_dec, acts)
    as a per-latent segment sum (the decoded batch's own gradient passes through unchanged)."""

    @staticmethod
    def forward(ctx, out_BD, acts_BK, idx_BK, W_dec_FD):
        ctx.save_for_backward(acts_BK, idx_BK)
        ctx.d_sae = W_dec_FD.shape[0]
        ctx.row_grads = getattr(W_dec_FD, ROW_GRADS, None)
        # Returned as-is and marked dirty (not a view): the caller may modify the result in place.
        ctx.mark_dirty(out_BD)
        return out_BD

    @staticmethod
    def backward(ctx, grad_BD):
        acts_BK, idx_BK = ctx.saved_tensors
        grad_W = None
        if ctx.row_grads is not None and ctx.needs_input_grad[3]:
            ids_T, rows_TD, _ = _touched_rows(grad_BD.contiguous(), acts_BK, idx_BK, acts_BK != 0)
            ctx.row_grads.append((ids_T, rows_TD))
        elif ctx.needs_input_grad[3]:
            grad_W = _segment_sum(grad_BD.contiguous(), acts_BK, idx_BK, ctx.d_sae)
        return grad_BD, None, None, grad_W


def sparse_decode(acts_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
    """sum_k acts[b, k] * W_dec[idx[b, k]] as an embedding_bag: a gather, not a (B, F) matmul.

    The gradient of ``acts`` comes from embedding_bag's own backward; the gradient of ``W_dec`` is a
    segment sum per latent (:func:`_segment_sum`).
    """
    out_BD = F.embedding_bag(idx_BK, W_dec_FD.detach(), per_sample_weights=acts_BK, mode="sum")
    if W_dec_FD.requires_grad and torch.is_grad_enabled():
        out_BD = _DecoderWeightGrad.apply(out_BD, acts_BK.detach(), idx_BK, W_dec_FD)
    return out_BD


def pad_rows(row_N: Tensor, col_N: Tensor, val_N: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """A k-sparse code (values (B, K), latent ids (B, K)) from N (row, latent, value) entries, in any
    order; each row is padded to the longest with zero values (on latent 0)."""
    order_N = row_N.argsort(stable=True)
    row_N, col_N, val_N = row_N[order_N], col_N[order_N], val_N[order_N]
    counts_B = torch.bincount(row_N, minlength=n_rows)
    width = max(int(counts_B.max()), 1) if len(row_N) else 1
    slot_N = torch.arange(len(row_N), device=row_N.device) - (counts_B.cumsum(0) - counts_B)[row_N]
    vals_BK = val_N.new_zeros(n_rows, width)
    idx_BK = torch.zeros(n_rows, width, dtype=torch.long, device=row_N.device)
    vals_BK[row_N, slot_N] = val_N
    idx_BK[row_N, slot_N] = col_N
    return vals_BK, idx_BK


def warmup_scale(step: int, warmup_steps: int) -> float:
    """A penalty coefficient's linear warm-up: (step + 1) / warmup_steps for the 0-based optimiser
    step, 1 from then on (and always, with no warm-up)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def check_k(k: int, width: int, what: str) -> None:
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k={k!r} must be a positive integer")
    if k >= width:
        raise ValueError(f"k={k} must be smaller than the {what} ({width}); lower k or widen the SAE")


def topk_lr(d_sae: int) -> float:
    """Gao et al.'s learning-rate rule, 2e-4 / sqrt(M / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
