"""N ranks equal one process: the torch.distributed mechanics of workbench.train.distributed and
workbench.train.expert_parallel, the Trainer under ``train.parallel`` (data and expert), its
checkpoints and resume, and ``torchrun -m workbench train`` end to end, against the single-process
computation on the concatenated batch.

Each world size starts its processes once (gloo on the CPU, ``torch.multiprocessing.start_processes``,
a free port on 127.0.0.1); every rank runs all the checks of that world size and writes its tensors to a
safetensors file (the Trainer's histories to JSON, its runs into folders); the parent computes the
single-process references and asserts. The mechanics' global batch is 12 tokens per rank, the
Trainer's 16, concatenated in rank order; rank r's rows are ``shard_rows(batch, r, N)``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench import io
from workbench.cli import main
from workbench.configtools import read_config_file
from workbench.run import RunConfig, run
from workbench.saes import (
    GatedConfig,
    GatedSAE,
    SwitchConfig,
    SwitchSAE,
    TopKConfig,
    TopKSAE,
)
from workbench.saes.base import BaseSAE, UnitNormDecoder
from workbench.saes.topk import total_variance
from workbench.train import TrainConfig, Trainer
from workbench.train.checkpoint import latest_checkpoint
from workbench.train.distributed import (
    DistContext,
    all_reduce_grads_,
    clip_grad_norm_,
    free_port,
    global_mean_rows,
    global_total_variance,
    init_from_env,
    rank_batches,
    shard_rows,
    start_local_ranks,
    token_share,
)
from workbench.train.expert_parallel import (
    data_parallel_switch_forward,
    expert_parallel_forward,
    expert_parameters,
    gather_switch,
    reduce_replicated_grads_,
    replicated_parameters,
    shard_switch,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the references compute as the ranks do

D, K, TOKENS_PER_RANK = 16, 4, 12
STEPS, LR, MAX_NORM = 20, 1e-2, 0.5
TOL = {"atol": 1e-5, "rtol": 1e-4}
EP_CASES = {2: [(4, 64), (8, 128)], 4: [(8, 128)]}
"""world size -> (n_experts, d_sae) of the expert-parallel Switch SAEs checked at it."""


# --- what ranks and the parent both build ----------------------------------------------------------

def _batch(seed: int, n_rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, D, generator=gen) * torch.linspace(0.5, 2.0, D) + 0.3


def _global_batch(world_size: int, seed: int = 0) -> torch.Tensor:
    return _batch(seed, TOKENS_PER_RANK * world_size)


def _switch(n_experts: int, d_sae: int, world_size: int, *, gate: str = "softmax") -> SwitchSAE:
    sae = SwitchSAE(SwitchConfig(d_in=D, d_sae=d_sae, k=K, n_experts=n_experts, seed=3, gate=gate))
    sae.init_from_data_(_global_batch(world_size))
    with torch.no_grad():  # a router that routes decisively (the default init is near uniform)
        sae.W_router.mul_(8)
    return sae


def _topk() -> TopKSAE:
    return TopKSAE(TopKConfig(d_in=D, d_sae=64, k=K, seed=5))


def _gated() -> GatedSAE:
    sae = GatedSAE(GatedConfig(d_in=D, d_sae=64, seed=6))
    with torch.no_grad():
        sae.b_gate.fill_(0.05)
    return sae


def _grads(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.grad.{name}": p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _adam_steps(model, params, forward, reduce_and_clip, world_size: int, rank: int, n_splits: int) -> None:
    """STEPS training steps as the trainer takes them on the global batches of ``world_size`` ranks,
    of which this process reads part ``rank`` of ``n_splits``: loss backward, gradient reduce and
    clipping to MAX_NORM, decoder projection, Adam, renormalisation."""
    opt = torch.optim.Adam(params, lr=LR)
    decoder = UnitNormDecoder([model.W_dec])
    for step in range(STEPS):
        x_BD = shard_rows(_global_batch(world_size, seed=100 + step), rank, n_splits)
        opt.zero_grad()
        (sum(forward(x_BD).losses.values()) / n_splits).backward()
        reduce_and_clip()
        decoder.project_grads()
        opt.step()
        decoder.renormalise()


# --- the ranks -------------------------------------------------------------------------------------

def _checks(ctx: DistContext) -> dict[str, torch.Tensor]:
    rank, n = ctx.rank, ctx.world_size
    x_global = _global_batch(n)
    x_BD = shard_rows(x_global, rank, n)
    out: dict[str, torch.Tensor] = {}

    out["tv"] = global_total_variance(x_BD, ctx).detach()
    out["mean_rows"] = global_mean_rows(x_BD, ctx).detach()
    out["batches"] = torch.tensor(list(rank_batches(range(10), rank, n)))

    # global_sum inside a nonlinear loss: the FVU of a parameter-dependent residual e = w * x - 0.2,
    # normalised by e's own variance over the global batch (as TopK's AuxK normalises its residual).
    w_D = torch.linspace(0.5, 1.5, D).requires_grad_()
    e_BD = x_BD * w_D - 0.2
    loss = e_BD.pow(2).sum(-1).mean() * token_share(x_BD.shape[0], ctx) / global_total_variance(e_BD, ctx)
    loss.backward()
    all_reduce_grads_([w_D], ctx)
    out["nonlinear.loss"], out["nonlinear.grad"] = loss.detach(), w_D.grad

    # all_reduce_grads_: a gradient everywhere, one on some ranks only, none anywhere, a frozen one.
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True),
              torch.zeros(2, requires_grad=True), torch.zeros(2)]
    params[0].grad = torch.arange(3.0) * (rank + 1)
    if rank == n - 1:
        params[1].grad = torch.tensor([1.0, -2.0])
    all_reduce_grads_(params, ctx, op="sum")
    out["reduce.sum"] = params[0].grad.clone()
    out["reduce.partial"] = params[1].grad.clone()
    out["reduce.none_stays_none"] = torch.tensor(params[2].grad is None and params[3].grad is None)
    params[0].grad = torch.full((3,), float(rank))
    all_reduce_grads_(params[:1], ctx, op="mean")
    out["reduce.mean"] = params[0].grad.clone()

    if n == 2:
        # Data parallel, TopK: the FVU is a per-token mean over a global constant (the data's total
        # variance), so its share is the local FVU * (B_r / B) * (TV_r / TV).
        sae = _topk()
        res = sae(x_BD)
        scale = token_share(x_BD.shape[0], ctx) * total_variance(x_BD) / global_total_variance(x_BD, ctx)
        loss = res.losses["fvu"] * scale
        loss.backward()
        all_reduce_grads_(sae.parameters(), ctx)
        out.update({"topk.recon": res.recon_BD.detach(), "topk.loss": loss.detach(), **_grads(sae, "topk")})

        # Data parallel, Gated: every term is a per-token mean, share = local term * B_r / B.
        sae = _gated()
        res = sae(x_BD)
        loss = sum(res.losses.values()) * token_share(x_BD.shape[0], ctx)
        loss.backward()
        all_reduce_grads_(sae.parameters(), ctx)
        out.update({"gated.recon": res.recon_BD.detach(), "gated.loss": loss.detach(), **_grads(sae, "gated")})

        # Data parallel, Switch: the load balance over the global f_i and P_i (global_sum).
        sae = _switch(4, 64, n)
        res = data_parallel_switch_forward(sae, x_BD, ctx)
        (sum(res.losses.values()) / n).backward()
        all_reduce_grads_(sae.parameters(), ctx)
        out.update({"dp_switch.recon": res.recon_BD.detach(), **_grads(sae, "dp_switch"),
                    **{f"dp_switch.loss.{k}": v.detach() for k, v in res.losses.items()}})

        # Expert parallel with every token routed to expert 0: the other ranks receive nothing.
        sae = _switch(4, 64, n)
        with torch.no_grad():
            sae.W_router.zero_()
        out.update(_ep_one_step(sae, x_BD, ctx, "ep_empty"))

    for n_experts, d_sae in EP_CASES[n]:
        out.update(_ep_one_step(_switch(n_experts, d_sae, n), x_BD, ctx, f"ep{n_experts}"))
    out.update(_ep_one_step(_switch(EP_CASES[n][0][0], EP_CASES[n][0][1], n, gate="heaviside"), x_BD, ctx,
                            "ep_heaviside"))

    # STEPS steps of the sharded model; the whole SAE gathered to rank 0.
    n_experts, d_sae = EP_CASES[n][-1]
    shard = shard_switch(_switch(n_experts, d_sae, n), rank, n)
    experts, replicated = expert_parameters(shard), replicated_parameters(shard)

    def reduce_and_clip():
        reduce_replicated_grads_(shard, ctx)
        clip_grad_norm_(experts, replicated, MAX_NORM, ctx)

    _adam_steps(shard, experts + replicated, lambda x: expert_parallel_forward(shard, x, ctx), reduce_and_clip,
                n, rank, n)
    full = gather_switch(shard, ctx)
    assert (full is None) == (rank != 0)
    if full is not None:
        out.update({f"trained.{name}": p.detach().clone() for name, p in full.named_parameters()})
    return out


def _ep_one_step(sae: SwitchSAE, x_BD: torch.Tensor, ctx: DistContext, prefix: str) -> dict[str, torch.Tensor]:
    shard = shard_switch(sae, ctx.rank, ctx.world_size)
    res = expert_parallel_forward(shard, x_BD, ctx)
    (sum(res.losses.values()) / ctx.world_size).backward()
    reduce_replicated_grads_(shard, ctx)
    return {f"{prefix}.recon": res.recon_BD.detach(), f"{prefix}.code": res.code.dense().detach(),
            f"{prefix}.expert_tokens": res.metrics["expert_tokens"],
            **{f"{prefix}.loss.{k}": v.detach() for k, v in res.losses.items()}, **_grads(shard, prefix)}


# --- the Trainer on several ranks: what ranks and the parent both build -----------------------------

TRAIN_ROWS_PER_RANK, CHECKPOINT_EVERY, CRASH_AT = 16, 5, 12
EP_TRAINER_CASES = {2: ("ep_run4", 4, 64), 4: ("ep_run8", 8, 128)}
"""world size -> (label, n_experts, d_sae) of the Switch SAE the Trainer trains expert-parallel."""


def _train_batches(world_size: int) -> list[torch.Tensor]:
    return [_batch(1000 + i, TRAIN_ROWS_PER_RANK * world_size) for i in range(STEPS)]


class _Crashing:
    """The training batches, raising at batch CRASH_AT: a run killed two steps after a checkpoint."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __iter__(self):
        for i, x_BD in enumerate(self.batches):
            if i == CRASH_AT:
                raise RuntimeError("simulated crash")
            yield x_BD


def _dp_saes() -> dict[str, BaseSAE]:
    return {"topk": TopKSAE(TopKConfig(d_in=D, d_sae=64, k=K, seed=5)), "gated": _gated(),
            "switch": SwitchSAE(SwitchConfig(d_in=D, d_sae=64, k=K, n_experts=4, seed=3))}


def _ep_saes(world_size: int) -> dict[str, BaseSAE]:
    _, n_experts, d_sae = EP_TRAINER_CASES[world_size]
    return {"switch": SwitchSAE(SwitchConfig(d_in=D, d_sae=d_sae, k=K, n_experts=n_experts, seed=3))}


def _train_cfg(parallel: str, world_size: int, total_steps: int = STEPS, **fields) -> TrainConfig:
    # A latent silent for two batches is dead, so TopK's AuxK works within the run.
    return TrainConfig(total_steps=total_steps, lr=3e-3, warmup_steps=2, log_every=1, progress_bar=False,
                       grad_clip=MAX_NORM, dead_window_tokens=2 * TRAIN_ROWS_PER_RANK * world_size,
                       parallel=parallel, **fields)


def _weights(prefix: str, saes: dict[str, BaseSAE] | None, grads: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, sae in (saes or {}).items():
        for pname, p in sae.named_parameters():
            out[f"{prefix}.{name}.{pname}"] = p.detach().clone()
            if grads and p.grad is not None:
                out[f"{prefix}.grad.{name}.{pname}"] = p.grad.clone()
    return out


def _trainer_runs(ctx: DistContext, out_dir: Path) -> dict[str, torch.Tensor]:
    """The Trainer on this world size: data parallel (one step, and a run killed and resumed) at 2
    ranks; expert parallel (a run killed and resumed at 2 ranks, a plain run at 4)."""
    n, out = ctx.world_size, {}
    batches = _train_batches(n)

    def save_history(label: str, trainer: Trainer) -> None:
        (out_dir / f"{label}.history.rank{ctx.rank}.json").write_text(json.dumps(trainer.history))

    ep_label = EP_TRAINER_CASES[n][0]
    if n == 4:
        trainer = Trainer(_ep_saes(n), _train_cfg("expert", n), dist=ctx)
        trainer.fit(batches)
        save_history(ep_label, trainer)
        return _weights(ep_label, trainer.gathered_saes())

    try:  # a stream that differs between the ranks
        Trainer(_dp_saes(), _train_cfg("data", n), dist=ctx).fit([_batch(ctx.rank, TRAIN_ROWS_PER_RANK * n)])
        out["refused_different_streams"] = torch.tensor(False)
    except ValueError as e:
        out["refused_different_streams"] = torch.tensor("ranks read different first batches" in str(e))

    one = Trainer(_dp_saes(), _train_cfg("data", n, total_steps=1), dist=ctx)
    one.fit(batches)
    save_history("dp_one", one)
    out.update(_weights("dp_one", one.saes, grads=True))
    for label, parallel, make in (("dp", "data", _dp_saes), (ep_label, "expert", lambda: _ep_saes(n))):
        # Data parallel reads ahead in a thread, as on a GPU.
        cfg = _train_cfg(parallel, n, checkpoint_every=CHECKPOINT_EVERY, prefetch=parallel == "data")
        straight = Trainer(make(), cfg, run_dir=out_dir / label, dist=ctx)
        straight.fit(batches)
        save_history(label, straight)
        out.update(_weights(label, straight.gathered_saes()))

        killed = out_dir / f"{label}_killed"
        try:
            Trainer(make(), cfg, run_dir=killed, dist=ctx).fit(_Crashing(batches))
            raise AssertionError("the stream should have crashed")
        except RuntimeError:
            pass
        ctx.barrier()
        if ctx.is_writer:  # what the killed run left, for the parent to resume on one process
            shutil.copytree(killed, out_dir / f"{label}_left")
        ctx.barrier()
        resumed = Trainer.resume(killed, dist=ctx)
        assert resumed.step == 2 * CHECKPOINT_EVERY
        resumed.fit(batches)
        save_history(f"{label}_resumed", resumed)
        out.update(_weights(f"{label}_resumed", resumed.gathered_saes()))
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    ctx = init_from_env()
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world_size, "gloo")
        out = {**_checks(ctx), **_trainer_runs(ctx, Path(out_dir))}
        save_file({name: t.contiguous() for name, t in out.items()}, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        ctx.destroy()


def _spawn(world_size: int, tmp_path_factory) -> tuple[list[dict[str, torch.Tensor]], Path]:
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    start_local_ranks(_worker, world_size, (str(out_dir),),
                      preload=["safetensors.torch", "workbench.saes", "workbench.train.expert_parallel"])
    return [load_file(str(out_dir / f"rank{r}.safetensors")) for r in range(world_size)], out_dir


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """What the 2 ranks computed, and the folder of their runs."""
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


@pytest.fixture(scope="module")
def ranks2(world2):
    return world2[0]


@pytest.fixture(scope="module")
def ranks4(world4):
    return world4[0]


@pytest.fixture(params=[2, 4])
def ranks(request):
    return request.param, request.getfixturevalue(f"ranks{request.param}")


# --- the references and the assertions ------------------------------------------------------------

def _cat(ranks: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in ranks])


def _total(ranks: list[dict], key: str) -> torch.Tensor:
    return sum(r[key] for r in ranks)


def test_global_statistics_equal_one_process(ranks):
    n, res = ranks
    x_BD = _global_batch(n)
    for r in res:
        torch.testing.assert_close(r["tv"], total_variance(x_BD), **TOL)
        torch.testing.assert_close(r["mean_rows"], x_BD.mean(0), **TOL)
    assert sorted(_cat(res, "batches").tolist()) == list(range(10))
    assert res[1]["batches"].tolist() == list(range(1, 10, n))


def test_global_sum_gives_the_gradient_of_the_global_loss(ranks):
    """Each rank's share, the differentiable all-reduce's backward and the summed gradients give the
    single-process gradient, through a statistic of the whole batch that depends on the parameter."""
    n, res = ranks
    x_BD = _global_batch(n)
    w_D = torch.linspace(0.5, 1.5, D).requires_grad_()
    e_BD = x_BD * w_D - 0.2
    loss = e_BD.pow(2).sum(-1).mean() / total_variance(e_BD)
    loss.backward()
    torch.testing.assert_close(_total(res, "nonlinear.loss"), loss.detach(), **TOL)
    for r in res:
        torch.testing.assert_close(r["nonlinear.grad"], w_D.grad, **TOL)
    assert w_D.grad.abs().max() > 1e-3


def test_all_reduce_grads_sums_and_keeps_missing_gradients_consistent(ranks):
    n, res = ranks
    for r in res:
        torch.testing.assert_close(r["reduce.sum"], torch.arange(3.0) * sum(range(1, n + 1)))
        torch.testing.assert_close(r["reduce.partial"], torch.tensor([1.0, -2.0]))
        assert r["reduce.none_stays_none"].item()
        torch.testing.assert_close(r["reduce.mean"], torch.full((3,), sum(range(n)) / n))


def _assert_grads(res: list[dict], prefix: str, ref: torch.nn.Module) -> None:
    names = [name for name, p in ref.named_parameters() if p.grad is not None]
    for r in res:
        assert sorted(k.split(".")[-1] for k in r if k.startswith(f"{prefix}.grad.")) == sorted(names)
        for name in names:
            torch.testing.assert_close(r[f"{prefix}.grad.{name}"], getattr(ref, name).grad, **TOL, msg=name)


def test_data_parallel_topk_and_gated_equal_one_process(ranks2):
    x_BD = _global_batch(2)
    topk = _topk()
    ref = topk(x_BD)
    ref.losses["fvu"].backward()
    torch.testing.assert_close(_cat(ranks2, "topk.recon"), ref.recon_BD.detach(), **TOL)
    torch.testing.assert_close(_total(ranks2, "topk.loss"), ref.losses["fvu"].detach(), **TOL)
    _assert_grads(ranks2, "topk", topk)

    gated = _gated()
    ref = gated(x_BD)
    loss = sum(ref.losses.values())
    loss.backward()
    torch.testing.assert_close(_cat(ranks2, "gated.recon"), ref.recon_BD.detach(), **TOL)
    torch.testing.assert_close(_total(ranks2, "gated.loss"), loss.detach(), **TOL)
    _assert_grads(ranks2, "gated", gated)


def _assert_switch_step(res: list[dict], prefix: str, sae: SwitchSAE, x_BD: torch.Tensor, *, sharded: bool) -> None:
    """Forward rows, codes, every loss term and every gradient of the ranks against ``sae`` on the
    whole batch; with ``sharded`` the expert gradients are compared slice by slice."""
    ref = sae(x_BD)
    sum(ref.losses.values()).backward()
    torch.testing.assert_close(_cat(res, f"{prefix}.recon"), ref.recon_BD.detach(), **TOL)
    assert set(ref.losses) == {"mse", "load_balance"}
    for term, value in ref.losses.items():
        for r in res:  # every rank reports the global batch's loss
            torch.testing.assert_close(r[f"{prefix}.loss.{term}"], value.detach(), **TOL, msg=term)
    if not sharded:
        _assert_grads(res, prefix, sae)
        return
    code = _cat(res, f"{prefix}.code")
    ref_code = ref.code.dense().detach()
    assert torch.equal(code > 0, ref_code > 0), "the same latents fire for every token"
    torch.testing.assert_close(code, ref_code, **TOL)
    expert_tokens = torch.bincount(sae.route(x_BD)[1], minlength=sae.cfg.n_experts)
    torch.testing.assert_close(_total(res, f"{prefix}.expert_tokens"), expert_tokens)
    n, width = len(res), sae.cfg.d_sae // len(res)
    for rank, r in enumerate(res):
        rows = slice(rank * width, (rank + 1) * width)
        torch.testing.assert_close(r[f"{prefix}.grad.W_enc"], sae.W_enc.grad[:, rows], **TOL)
        torch.testing.assert_close(r[f"{prefix}.grad.W_dec"], sae.W_dec.grad[rows], **TOL)
        for name in ("W_router", "b_router", "b_dec"):
            torch.testing.assert_close(r[f"{prefix}.grad.{name}"], getattr(sae, name).grad, **TOL, msg=name)
        assert f"{prefix}.grad.b_enc" not in r  # frozen, as in SwitchSAE
    assert n * width == sae.cfg.d_sae


def test_data_parallel_switch_equals_one_process(ranks2):
    _assert_switch_step(ranks2, "dp_switch", _switch(4, 64, 2), _global_batch(2), sharded=False)


def test_expert_parallel_switch_equals_one_process(ranks):
    n, res = ranks
    for n_experts, d_sae in EP_CASES[n]:
        _assert_switch_step(res, f"ep{n_experts}", _switch(n_experts, d_sae, n), _global_batch(n), sharded=True)
    n_experts, d_sae = EP_CASES[n][0]
    _assert_switch_step(res, "ep_heaviside", _switch(n_experts, d_sae, n, gate="heaviside"), _global_batch(n),
                        sharded=True)


def test_expert_parallel_with_a_rank_that_receives_no_tokens(ranks2):
    sae = _switch(4, 64, 2)
    with torch.no_grad():
        sae.W_router.zero_()
    _assert_switch_step(ranks2, "ep_empty", sae, _global_batch(2), sharded=True)
    assert _total(ranks2, "ep_empty.expert_tokens").tolist() == [24, 0, 0, 0]


def test_expert_parallel_training_steps_equal_one_process(ranks):
    n, res = ranks
    n_experts, d_sae = EP_CASES[n][-1]
    sae = _switch(n_experts, d_sae, n)
    params = [p for p in sae.parameters() if p.requires_grad]
    _adam_steps(sae, params, sae, lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM), n, 0, 1)
    moved = (sae.W_enc - _switch(n_experts, d_sae, n).W_enc).abs().max()
    assert moved > 1e-2, "the steps must move the weights for the comparison to mean something"
    assert not any(k.startswith("trained.") for k in res[1])
    for name, param in sae.named_parameters():
        torch.testing.assert_close(res[0][f"trained.{name}"], param.detach(), **TOL, msg=lambda m, name=name: f"{name}: {m}")


# --- the Trainer: the references and the assertions ---------------------------------------------------

def _histories(out_dir: Path, label: str, world_size: int) -> list[list[dict]]:
    return [json.loads((out_dir / f"{label}.history.rank{r}.json").read_text()) for r in range(world_size)]


def _assert_rows_close(rows: list[dict], ref_rows: list[dict]) -> None:
    """Every number of every history row (loss terms, mse, l0, dead fraction, the SAEs' metrics)."""
    assert [(r["step"], r["sae"], r["tokens"]) for r in rows] == [(r["step"], r["sae"], r["tokens"]) for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        assert row.keys() == ref.keys()
        for key, value in ref.items():
            if isinstance(value, (int, float, list)):
                assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (row["step"], row["sae"], key)


def _assert_weights(res: dict, prefix: str, saes: dict[str, BaseSAE], grads: bool = False, exact: bool = False) -> None:
    for name, sae in saes.items():
        for pname, p in sae.named_parameters():
            pairs = [(f"{prefix}.{name}.{pname}", p)]
            if grads and p.grad is not None:
                pairs.append((f"{prefix}.grad.{name}.{pname}", p.grad))
            for key, ref in pairs:
                if exact:
                    assert torch.equal(res[key], ref), key
                else:
                    torch.testing.assert_close(res[key], ref.detach(), **TOL, msg=lambda m, key=key: f"{key}: {m}")


def test_trainer_data_parallel_step_equals_one_process(world2):
    """One step of TopK, Gated and Switch on 2 ranks at 16 rows each: every loss term, mse, l0,
    every gradient (clipped, projected) and every updated weight of one process at 32 rows."""
    res, out_dir = world2
    ref = Trainer(_dp_saes(), _train_cfg("data", 2, total_steps=1))  # one process: "data" has no effect
    ref.fit(_train_batches(2))
    for rows in _histories(out_dir, "dp_one", 2):
        _assert_rows_close(rows, ref.history)
    assert {"fvu", "auxk"} <= {k.removeprefix("loss/") for k in ref.history[0]}
    for r in res:
        _assert_weights(r, "dp_one", ref.saes, grads=True)


def test_ranks_that_read_different_streams_are_refused(ranks2):
    assert all(r["refused_different_streams"].item() for r in ranks2)


def test_trainer_data_parallel_run_equals_one_process(world2):
    """20 steps: the weights, every history row (AuxK at work once latents die) and the firing."""
    res, out_dir = world2
    ref = Trainer(_dp_saes(), _train_cfg("data", 2))
    ref.fit(_train_batches(2))
    assert any(row.get("loss/auxk", 0) > 0 for row in ref.history), "AuxK must be active for the test to mean much"
    assert ref.firing["topk"].dead_fraction() > 0
    for rows in _histories(out_dir, "dp", 2):
        _assert_rows_close(rows, ref.history)
    for r in res:
        _assert_weights(r, "dp", ref.saes)


@pytest.mark.parametrize("world_size", [2, 4])
def test_trainer_expert_parallel_run_equals_one_process(world_size, request):
    """Switch E=4 on 2 ranks, E=8 on 4: after 20 steps the weights gathered on rank 0 and every
    history row equal one process's."""
    res, out_dir = request.getfixturevalue(f"world{world_size}")
    label = EP_TRAINER_CASES[world_size][0]
    ref = Trainer(_ep_saes(world_size), _train_cfg("expert", world_size))
    ref.fit(_train_batches(world_size))
    for rows in _histories(out_dir, label, world_size):
        _assert_rows_close(rows, ref.history)
    _assert_weights(res[0], label, ref.saes)
    assert not any(key.startswith(f"{label}.") for key in res[1])  # gathered on rank 0 only


@pytest.mark.parametrize("label", ["dp", "ep_run4"])
def test_a_killed_run_resumed_on_2_ranks_is_bit_identical(world2, label):
    """Killed two steps after its step-10 checkpoint, resumed on 2 ranks: the same weights, bit for
    bit, and the same history as the run that was never interrupted."""
    res, out_dir = world2
    ranks = range(2) if label == "dp" else range(1)
    for r in ranks:
        keys = [key for key in res[r] if key.startswith(f"{label}.")]
        assert keys
        for key in keys:
            assert torch.equal(res[r][f"{label}_resumed{key.removeprefix(label)}"], res[r][key]), key
    straight, resumed = _histories(out_dir, label, 2), _histories(out_dir, f"{label}_resumed", 2)
    assert resumed == straight


def test_checkpoints_hold_whole_sae_folders_and_rank_files_for_shards(world2):
    """Rank 0 writes ordinary SAE folders (gathered when sharded); a sharded run adds one rank file
    per rank, a data-parallel one none."""
    res, out_dir = world2
    ep = latest_checkpoint(out_dir / "ep_run4")
    assert ep.name == "step_00000020" and sorted(p.name for p in ep.glob("rank_*")) == ["rank_0.pt", "rank_1.pt"]
    state = torch.load(ep / "trainer_state.pt", weights_only=True)
    assert state["saes"] == {"switch": {}} and state["parallel"] == {"strategy": "expert", "world_size": 2}
    for folder in (ep / "saes" / "switch", out_dir / "ep_run4" / "saes" / "switch"):
        whole = io.load(folder)
        assert whole.cfg.n_experts == 4 and whole.cfg.d_sae == 64
        for name, p in whole.named_parameters():
            assert torch.equal(p, res[0][f"ep_run4.switch.{name}"]), name
    dp = latest_checkpoint(out_dir / "dp")
    assert not list(dp.glob("rank_*"))
    for name in ("topk", "gated", "switch"):
        assert torch.equal(io.load(out_dir / "dp" / "saes" / name).W_dec, res[0][f"dp.{name}.W_dec"])


def test_resume_data_parallel_on_one_process_and_refuse_to_reshard(world2):
    """A data-parallel checkpoint continues on any number of ranks at the same global batch; a
    sharded one only on the world size it was written with."""
    res, out_dir = world2
    resumed = Trainer.resume(out_dir / "dp_left")
    assert resumed.step == 2 * CHECKPOINT_EVERY
    resumed.fit(_train_batches(2))
    for name, sae in resumed.saes.items():
        for pname, p in sae.named_parameters():
            torch.testing.assert_close(p.detach(), res[0][f"dp.{name}.{pname}"], **TOL)
    with pytest.raises(ValueError, match=r"parallel='expert' on 2 rank\(s\), this run has parallel=None on 1; .*"
                                         r"resume with parallel='expert' on 2 rank") as e:
        Trainer.resume(out_dir / "ep_run4_left")
    _one_line(e)


# --- torchrun -m workbench train ----------------------------------------------------------------------

CLI_CONFIG = """\
run_dir: {run_dir}
train: {{total_steps: 20, lr: 3e-3, log_every: 5, checkpoint_every: 10, progress_bar: false, parallel: {parallel}}}
data: {{source: synthetic, batch_size: 64, eval_tokens: 256, synthetic: {{d: 16, n_features: 48, mean_active: 3}}}}
saes:
{saes}
"""
CLI_SAES = {"data": "  topk: {architecture: topk, d_sae: 64, k: 3}\n  gated: {architecture: gated, d_sae: 64}",
            "expert": "  switch: {architecture: switch, d_sae: 64, k: 3, n_experts: 4}"}


def _torchrun(config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "workbench", "train", str(config)]
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("parallel", ["data", "expert"])
def test_torchrun_train_end_to_end_equals_one_process(tmp_path, parallel):
    """``torchrun --nproc-per-node 2 -m workbench train CONFIG`` on synthetic data: rank 0 prints the
    table once and writes the run; its SAE folders load with workbench.io.load and equal those of
    the same config trained in one process at the same global batch."""
    configs = {}
    for where in ("ranks", "one"):
        configs[where] = tmp_path / f"{where}.yaml"
        configs[where].write_text(CLI_CONFIG.format(run_dir=tmp_path / where, parallel=parallel,
                                                    saes=CLI_SAES[parallel]))
    done = _torchrun(configs["ranks"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SAE folders:") == 1 and "Traceback" not in done.stderr
    assert main(["train", str(configs["one"])]) == 0
    names = ["topk", "gated"] if parallel == "data" else ["switch"]
    for name in names:
        a, b = io.load(tmp_path / "ranks" / "saes" / name), io.load(tmp_path / "one" / "saes" / name)
        assert type(a) is type(b) and a.cfg == b.cfg
        for (pname, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=lambda m, key=f"{name}.{pname}": f"{key}: {m}")
    metrics = [json.loads((tmp_path / where / "metrics.json").read_text()) for where in ("ranks", "one")]
    assert metrics[0].keys() == metrics[1].keys() == set(names)
    for name in names:
        assert metrics[0][name]["mse"] == pytest.approx(metrics[1][name]["mse"], rel=1e-3)
    history = json.loads((tmp_path / "ranks" / "history.json").read_text())
    assert [row["tokens"] for row in history if row["sae"] == names[0]] == [320, 640, 960, 1280]


# --- refusals ---------------------------------------------------------------------------------------

def _one_line(excinfo) -> None:
    assert "\n" not in str(excinfo.value)


def test_refusals_say_how_to_fix_them():
    sae = _switch(4, 64, 2)
    with pytest.raises(ValueError, match=r"n_experts=4 is not divisible by the world size 3; run on \[1, 2, 4\]") as e:
        shard_switch(sae, 0, 3)
    _one_line(e)
    for other, arch in ((_topk(), "topk"), (_gated(), "gated")):
        with pytest.raises(ValueError, match=f"not a '{arch}' SAE .*train.parallel: data") as e:
            shard_switch(other, 0, 2)
        _one_line(e)
    with pytest.raises(ValueError, match="not a whole 'switch' SAE") as e:
        gather_switch(sae, DistContext())
    _one_line(e)
    with pytest.raises(ValueError, match="24 rows does not split evenly over 5 ranks; use a batch size divisible") as e:
        shard_rows(_global_batch(2), 0, 5)
    _one_line(e)
    shard = shard_switch(sae, 1, 2)
    with pytest.raises(ValueError, match="rank 1 of 2 but this process is rank 0 of 1") as e:
        expert_parallel_forward(shard, _global_batch(2), DistContext())
    _one_line(e)
    with pytest.raises(ValueError, match="save gather_switch"):
        shard.saelens_tensors()


def test_trainer_refuses_a_launch_it_does_not_fit_in_one_line(tmp_path):
    """Said when the Trainer is built, before any collective (so a context without a process group
    shows them), each with its fix."""
    two, three = DistContext(rank=0, world_size=2, backend="gloo"), DistContext(rank=0, world_size=3, backend="gloo")
    cases = [
        (_dp_saes(), _train_cfg(None, 2), two, "TrainConfig.parallel is None; set train.parallel to one of"),
        (_dp_saes(), _train_cfg("data", 2, optimizer="sparse_adam"), two,
         "optimizer='sparse_adam' is refused under torchrun .*use optimizer 'adam' under torchrun"),
        (_dp_saes(), _train_cfg("expert", 2), two,
         ("parallel='expert', SAE 'topk': expert parallelism shards the experts of a Switch SAE, not a 'topk' "
          "SAE .*train it with train.parallel: data")),
        (_ep_saes(2), _train_cfg("expert", 3), three,
         r"SAE 'switch': n_experts=4 is not divisible by the world size 3; run on \[1, 2, 4\] ranks"),
    ]
    for saes, cfg, ctx, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            Trainer(saes, cfg, dist=ctx)
        _one_line(e)
    with pytest.raises(ValueError, match=r"TrainConfig.parallel='model' must be None or one of \('data', 'expert'\)"):
        _train_cfg("model", 2)
    with pytest.raises(RuntimeError, match="under torchrun call fit"):
        Trainer(_dp_saes(), _train_cfg("data", 2), dist=two).start(_train_batches(2))
    config = tmp_path / "run.yaml"
    config.write_text(CLI_CONFIG.format(run_dir=tmp_path / "run", parallel="data", saes=CLI_SAES["data"]))
    with pytest.raises(ValueError, match="data.batch_size=64 does not split over 3 ranks .*use a multiple of 3, e.g. 63"):
        run(RunConfig.from_dict(read_config_file(config)), dist=three)
    # One process: train.parallel is accepted and changes nothing.
    a = Trainer(_ep_saes(2), _train_cfg("expert", 2, total_steps=3))
    b = Trainer(_ep_saes(2), _train_cfg(None, 2, total_steps=3))
    a.fit(_train_batches(2))
    b.fit(_train_batches(2))
    assert all(torch.equal(p, q) for p, q in zip(a.saes["switch"].parameters(), b.saes["switch"].parameters()))


def test_single_process_is_untouched(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.is_writer, ctx.distributed) == (0, 1, True, False)
    sae, x_BD = _switch(4, 64, 1), _global_batch(1)
    shard = shard_switch(sae, 0, 1)
    out, ref = expert_parallel_forward(shard, x_BD, ctx), sae(x_BD)
    torch.testing.assert_close(out.recon_BD, ref.recon_BD, **TOL)
    whole = gather_switch(shard, ctx)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), sae.parameters()))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="launch with torchrun"):
        init_from_env()
