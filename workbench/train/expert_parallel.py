"""A Switch SAE across ranks: its experts sharded (expert parallel), or the whole SAE replicated with
its loss over the global batch (data parallel).

Expert parallel, with E experts of width W = d_sae / E on N ranks: rank r owns experts
r*E/N .. (r+1)*E/N - 1, i.e. the columns r*F/N .. (r+1)*F/N - 1 of W_enc_DF and the same rows of
W_dec_FD (:func:`shard_switch`). The router (W_router_DE, b_router_D) and b_dec_D are replicated.
One forward (:func:`expert_parallel_forward`) on rank r's tokens x_r:

    p, i* = route(x_r)                         replicated router, every token routed where it lives
    sort x_r by i*; destination rank = i* // (E/N)
    all_to_all counts (tokens per expert), then the rows          -> owner
    owner: vals, ids = ReLU(TopK_k(W_enc_{i*}^T (x - b_dec)))     the grouped per-expert matmuls of
           y = W_dec_{i*}^T vals                                   SwitchSAE._expert_topk, no gate, no b_dec
    reverse all_to_all of (y, vals) and the global ids            -> sender
    sender: x_hat = p_{i*} y + b_dec,  z = p_{i*} vals

which is SwitchSAE.forward's x_hat = W_dec^T (p_{i*} vals) + b_dec, since the decoder is linear in
the code. The backward runs the reverse all-to-all's backward (an all-to-all of dL/dy to the owners),
so each expert's gradient already sums over the tokens of every rank.

Losses follow :mod:`workbench.train.distributed`'s convention
(:func:`workbench.saes.switch.switch_losses` under ``batch_group``): every rank's "mse" and "load_balance" are the global batch's MSE = sum ||x - x_hat||^2 / (B D) and
alpha * E * sum_i f_i P_i with f_i, P_i over all B tokens, and rank r back-propagates their sum / N.

Gradient convention: after ``backward`` on rank r's ``sum(losses.values()) / N``,

* replicated parameters (:func:`replicated_parameters`: W_router, b_router, b_dec) are all-reduce
  **summed** (:func:`reduce_replicated_grads_`): each rank holds the part of their gradient its own
  tokens (and, for b_dec, the tokens its experts encoded) contribute;
* expert parameters (:func:`expert_parameters`: the shard's W_enc, W_dec) are **not** reduced: they
  live on one rank only and their gradient is already complete.

Clipping must use the norm of the whole gradient
(:func:`workbench.train.distributed.global_grad_norm`); the decoder's unit-norm projection and Adam
are per row and per element, so each rank applies them to its shard as one process would.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from ..saes.base import (
    BaseSAE,
    Code,
    SAEOutput,
    count_ids,
    sparse_decode,
    sparse_encode,
)
from ..saes.batch import batch_group
from ..saes.switch import SwitchConfig, SwitchSAE, switch_losses, switch_metrics
from .distributed import (
    DistContext,
    Sharding,
    all_reduce_grads_,
    current_context,
)


class SwitchExpertShard(SwitchSAE):
    """Rank ``rank``'s part of a Switch SAE of config ``full_cfg`` split over ``world_size`` ranks:
    the experts it owns (``W_enc`` (D, F/N), ``W_dec`` (F/N, D), ``b_enc`` (F/N,)) and the whole
    router and b_dec. Its ``cfg`` is that of its local experts (d_sae F/N, n_experts E/N), which is
    what :meth:`SwitchSAE._expert_topk` needs; ``W_router`` keeps all E columns, so
    :meth:`SwitchSAE.route` routes over every expert. ``forward`` is the expert-parallel forward in
    the current process group; save the SAE with :func:`gather_switch`, never a shard."""

    def __init__(self, full_cfg: SwitchConfig, rank: int, world_size: int):
        local_cfg = dataclasses.replace(full_cfg, d_sae=full_cfg.d_sae // world_size,
                                        n_experts=full_cfg.n_experts // world_size)
        super().__init__(local_cfg)
        self.full_cfg = full_cfg
        self.rank = rank
        self.world_size = world_size
        self.W_router = nn.Parameter(torch.zeros(full_cfg.d_in, full_cfg.n_experts))

    @property
    def latent_offset(self) -> int:
        """Global id of this shard's first latent, r * F / N."""
        return self.rank * self.cfg.d_sae

    def forward(self, x_BD: Tensor, *, dead_mask: Tensor | None = None) -> SAEOutput:
        """:func:`expert_parallel_forward` in the initialised process group (``dead_mask`` is unused,
        as in SwitchSAE)."""
        return expert_parallel_forward(self, x_BD, current_context())

    @torch.no_grad()
    def encode_code(self, x_BD: Tensor) -> Code:
        """The code of this rank's tokens (a collective: every rank must call it)."""
        return self.forward(x_BD).code

    def summarize_metrics(self, totals: dict[str, Tensor], n_tokens: int) -> dict[str, float | list[float]]:
        f_E = totals["expert_tokens"].double() / n_tokens
        p_E = totals["router_prob"].double() / n_tokens
        return {"expert_load": f_E.tolist(), "load_balance": (self.full_cfg.n_experts * (f_E * p_E).sum()).item(),
                "router_entropy": totals["router_entropy"].item() / n_tokens}

    def saelens_tensors(self) -> dict[str, Tensor]:
        raise ValueError(f"this is rank {self.rank}'s shard of a Switch SAE ({self.world_size} ranks); "
                         f"save gather_switch(shard, ctx) on rank 0 instead")


def _refuse_non_switch(sae: object, what: str) -> None:
    if not isinstance(sae, SwitchSAE) or isinstance(sae, SwitchExpertShard):
        arch = sae.cfg.architecture if isinstance(sae, BaseSAE) else type(sae).__name__
        # A ValueError, as every refusal of a bad configuration here (the user picked the wrong SAE).
        raise ValueError(f"{what} shards the experts of a Switch SAE, not a {arch!r} SAE "  # noqa: TRY004
                         f"(or a shard); train it with train.parallel: data")


def check_shardable(sae: BaseSAE, world_size: int) -> None:
    """A one-line ValueError unless ``sae`` is a whole Switch SAE whose experts split evenly over
    ``world_size`` ranks."""
    _refuse_non_switch(sae, "expert parallelism")
    n_experts = sae.cfg.n_experts
    if n_experts % world_size:
        divisors = [n for n in range(1, n_experts + 1) if n_experts % n == 0]
        raise ValueError(f"n_experts={n_experts} is not divisible by the world size {world_size}; run on "
                         f"{divisors} ranks or pick n_experts a multiple of {world_size}")


def shard_switch(sae: SwitchSAE, rank: int, world_size: int) -> SwitchExpertShard:
    """Rank ``rank``'s shard of ``sae``: experts rank*E/N .. (rank+1)*E/N - 1 (their W_enc columns,
    W_dec rows and b_enc entries, copied), the router and b_dec replicated. Every rank shards the same
    SAE (same seed) so that the replicated parameters start equal. The data-dependent init touches
    the replicated b_dec and b_router only, so a shard's ``init_from_data_`` on the global batch
    equals the whole SAE's, then sharded."""
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an integer in 0..world_size-1 and world_size={world_size!r} >= 1")
    check_shardable(sae, world_size)
    shard = SwitchExpertShard(dataclasses.replace(sae.cfg), rank, world_size)
    shard.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    cols = slice(rank * shard.cfg.d_sae, (rank + 1) * shard.cfg.d_sae)
    with torch.no_grad():
        shard.W_enc.copy_(sae.W_enc[:, cols])
        shard.W_dec.copy_(sae.W_dec[cols])
        shard.b_enc.copy_(sae.b_enc[cols])
        for name in ("W_router", "b_router", "b_dec"):
            getattr(shard, name).copy_(getattr(sae, name))
    for name, param in sae.named_parameters():
        getattr(shard, name).requires_grad_(param.requires_grad)
    shard.metadata = dict(sae.metadata)
    shard.train(sae.training)
    return shard


@torch.no_grad()
def gather_switch(shard: SwitchExpertShard, ctx: DistContext) -> SwitchSAE | None:
    """The whole Switch SAE on rank 0, on the CPU (None on the other ranks): the shards' W_enc columns,
    W_dec rows and b_enc gathered in rank order, the router and b_dec from rank 0. A collective: every
    rank calls it. Rank 0 receives one shard at a time and moves it to the CPU, so its device never
    holds more than one other shard. The result is an ordinary SwitchSAE that
    :func:`workbench.io.save` writes."""
    _refuse_non_switch_shard(shard, "gather_switch")
    if (shard.rank, shard.world_size) != (ctx.rank, ctx.world_size):
        raise ValueError(f"the shard is rank {shard.rank} of {shard.world_size} but this process is rank {ctx.rank} "
                         f"of {ctx.world_size}; gather with the context the shard was made for")
    pieces = {name: _gather_to_cpu(getattr(shard, name).detach().contiguous(), ctx)
              for name in ("W_enc", "W_dec", "b_enc")}
    if not ctx.is_writer:
        return None
    full = SwitchSAE(dataclasses.replace(shard.full_cfg)).to(dtype=shard.W_enc.dtype)
    full.W_enc.copy_(torch.cat(pieces["W_enc"], 1))
    full.W_dec.copy_(torch.cat(pieces["W_dec"], 0))
    full.b_enc.copy_(torch.cat(pieces["b_enc"], 0))
    for name in ("W_router", "b_router", "b_dec"):
        getattr(full, name).copy_(getattr(shard, name))
    for name, param in shard.named_parameters():
        getattr(full, name).requires_grad_(param.requires_grad)
    full.metadata = dict(shard.metadata)
    full.train(shard.training)
    return full


def _gather_to_cpu(local: Tensor, ctx: DistContext) -> list[Tensor] | None:
    """Every rank's ``local`` (one shape) on rank 0's CPU in rank order, received one rank at a time;
    None on the other ranks."""
    if not ctx.distributed:
        return [local.cpu()]
    if not ctx.is_writer:
        dist.send(local, group=ctx.group, group_dst=0)
        return None
    pieces, buffer = [local.cpu()], torch.empty_like(local)
    for src in range(1, ctx.world_size):
        dist.recv(buffer, group=ctx.group, group_src=src)
        pieces.append(buffer.to("cpu", copy=True))  # a copy also when the buffer is on the CPU
    return pieces


def _refuse_non_switch_shard(shard: object, what: str) -> None:
    if not isinstance(shard, SwitchExpertShard):
        arch = shard.cfg.architecture if isinstance(shard, BaseSAE) else type(shard).__name__
        raise ValueError(f"{what} takes a shard made by shard_switch, not a whole {arch!r} SAE; "  # noqa: TRY004
                         f"shard it with shard_switch(sae, ctx.rank, ctx.world_size) (a data-parallel replica "
                         f"needs neither: rank 0 saves it as it is)")


def replicated_parameters(shard: SwitchExpertShard) -> list[Tensor]:
    """The parameters every rank holds whole (router and b_dec): all-reduce-sum their gradients."""
    return [p for p in (shard.W_router, shard.b_router, shard.b_dec) if p.requires_grad]


def expert_parameters(shard: SwitchExpertShard) -> list[Tensor]:
    """The parameters sharded by expert (W_enc, W_dec): their gradients are complete; never reduce them."""
    return [p for p in (shard.W_enc, shard.W_dec, shard.b_enc) if p.requires_grad]


def reduce_replicated_grads_(shard: SwitchExpertShard, ctx: DistContext) -> None:
    """Sum the replicated parameters' gradients over ranks (one flattened all-reduce)."""
    all_reduce_grads_(replicated_parameters(shard), ctx, op="sum")


# --- the forward ---------------------------------------------------------------------------------

def _all_to_all(t: Tensor, out_counts: list[int], in_counts: list[int], ctx: DistContext,
                differentiable: bool) -> Tensor:
    """Rows ``in_counts[j]`` of ``t`` (in order) go to rank j; rank j's rows for us arrive in rank
    order, ``out_counts[j]`` of them. Differentiable: the backward sends the gradient the reverse way."""
    if not ctx.distributed:
        return t
    out = t.new_empty((sum(out_counts), *t.shape[1:]))
    t = t.contiguous()
    if differentiable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # see distributed.global_sum
            return dist_fn.all_to_all_single(out, t, out_counts, in_counts, group=ctx.group)
    dist.all_to_all_single(out, t, out_counts, in_counts, group=ctx.group)
    return out


def expert_parallel_forward(shard: SwitchExpertShard, x_BD: Tensor, ctx: DistContext) -> SAEOutput:
    """Expert-parallel SwitchSAE forward of this rank's tokens x_BD (a collective: every rank calls
    it, with any number of tokens each).

    Returns ``recon_BD`` and the ``code`` (p_{i*}-scaled values, *global* latent ids) of the local
    tokens, exactly as SwitchSAE.forward on the concatenated batch gives them for these rows;
    ``losses`` {"mse", "load_balance"} over the global batch, the same on every rank
    (:func:`workbench.saes.switch.switch_losses`; back-propagate their sum divided by the world
    size); ``metrics`` totals over the local tokens (sum them over ranks, with the token count, before
    ``summarize_metrics``).
    """
    _refuse_non_switch_shard(shard, "expert_parallel_forward")
    shard.check_input(x_BD)
    if (shard.rank, shard.world_size) != (ctx.rank, ctx.world_size):
        raise ValueError(f"the shard is rank {shard.rank} of {shard.world_size} but this process is rank {ctx.rank} "
                         f"of {ctx.world_size}; shard with shard_switch(sae, ctx.rank, ctx.world_size)")
    n_tokens, d_in = x_BD.shape
    n_ranks, n_local = ctx.world_size, shard.cfg.n_experts
    n_experts = n_ranks * n_local

    probs_BE, expert_B = shard.route(x_BD)
    # Tokens sorted by expert, hence by destination rank i* // (E/N), stable within each expert.
    order_B = expert_B.argsort(stable=True)
    sent_NL = count_ids(expert_B, n_experts).view(n_ranks, n_local)
    recv_NL = sent_NL.clone()
    if ctx.distributed:
        # recv_NL[j, e]: tokens rank j sends to our local expert e.
        dist.all_to_all_single(recv_NL.view(-1), sent_NL.reshape(-1).contiguous(), group=ctx.group)
    send_counts, recv_counts = sent_NL.sum(1).tolist(), recv_NL.sum(1).tolist()

    x_RD = _all_to_all(x_BD[order_B], recv_counts, send_counts, ctx, differentiable=True)
    # Each source's rows arrive sorted by expert: their local expert ids follow from the counts.
    local_expert_R = torch.arange(n_local, device=x_BD.device).repeat(n_ranks).repeat_interleave(recv_NL.reshape(-1))

    # The owner: SwitchSAE's own top-k inside the expert, then the decode without gate and b_dec.
    vals_RK, idx_RK = shard._expert_topk(x_RD, local_expert_R)
    acts_RK = sparse_encode(x_RD, shard.b_dec, shard.W_enc, None, vals_RK, idx_RK)
    dec_RD = sparse_decode(acts_RK, idx_RK, shard.W_dec)

    back_BX = _all_to_all(torch.cat([dec_RD, acts_RK], 1), send_counts, recv_counts, ctx, differentiable=True)
    idx_back_BK = _all_to_all((idx_RK + shard.latent_offset).to(torch.int32), send_counts, recv_counts, ctx,
                              differentiable=False)
    inverse_B = torch.empty_like(order_B)
    inverse_B[order_B] = torch.arange(n_tokens, device=order_B.device)
    dec_BD, vals_BK = back_BX[inverse_B].split([d_in, shard.cfg.k], dim=1)
    idx_BK = idx_back_BK[inverse_B].long()

    gate_B1 = shard._gate(probs_BE, expert_B)[:, None]
    recon_BD = dec_BD * gate_B1 + shard.b_dec
    acts_BK = vals_BK * gate_B1

    with batch_group(ctx.group, ctx.world_size):
        losses = switch_losses(shard.full_cfg, x_BD, recon_BD, probs_BE, expert_B)
    metrics = switch_metrics(probs_BE.detach(), expert_B, n_experts)
    return SAEOutput(recon_BD, Code(acts_BK, idx_BK, shard.full_cfg.d_sae), losses, metrics)


def data_parallel_switch_forward(sae: SwitchSAE, x_BD: Tensor, ctx: DistContext) -> SAEOutput:
    """A whole-SAE replica's forward on this rank's tokens with the loss over the global batch: the
    SAE's own forward inside :func:`~workbench.saes.batch.batch_group`, so the load balance uses the
    global f_i and P_i (what the trainer does under ``train.parallel: data``). Back-propagate the
    losses' sum divided by the world size and sum all gradients over ranks afterwards."""
    with batch_group(ctx.group, ctx.world_size):
        return sae(x_BD)


SHARDING = Sharding(check=check_shardable, shard=lambda sae, ctx: shard_switch(sae, ctx.rank, ctx.world_size),
                    gather=gather_switch, sharded_parameters=expert_parameters,
                    replicated_parameters=replicated_parameters)
"""``train.parallel: expert`` as the trainer uses it (:func:`workbench.train.distributed.sharding`)."""
