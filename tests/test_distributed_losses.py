"""Every architecture's training losses under ``workbench.saes.batch.batch_group``: N ranks, each with
its own rows of one global batch, compute the loss terms, the codes and (backpropagating V / N and
summing the gradients over ranks) the gradients one process computes on the whole batch.

Each world size starts its processes once (gloo on the CPU, as ``tests/test_distributed.py``: fork
where this process runs no other thread, else a forkserver; a free port on 127.0.0.1); every rank runs
every architecture and writes its tensors to a safetensors file; the parent computes the
single-process references and asserts. The ranks hold unequal numbers of rows (``ROWS``), so a term
that averaged each rank's own mean instead of the global one would fail.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from workbench.saes import (
    BatchTopKConfig,
    BatchTopKSAE,
    GatedConfig,
    GatedSAE,
    SwitchConfig,
    SwitchSAE,
    TopKConfig,
    TopKSAE,
)
from workbench.saes.base import BaseSAE
from workbench.saes.batch import (
    batch_all_gather,
    batch_all_gather_sizes,
    batch_count,
    batch_group,
    batch_mean,
    batch_means,
    batch_min_,
    batch_rank,
    batch_rows,
    batch_total_variance,
)
from workbench.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from workbench.saes.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from workbench.saes.relu import ReLUConfig, ReLUSAE
from workbench.saes.topk import total_variance
from workbench.train.distributed import start_local_ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the references compute as the ranks do

D, F, K = 16, 64, 4
ROWS = {2: [13, 11], 4: [7, 5, 6, 6]}
"""world size -> each rank's rows of the global batch of 24 tokens (in rank order)."""
TOL = {"rtol": 1e-4, "atol": 1e-6}
DEAD_F = torch.arange(F) % 3 == 0
"""The dead latents AuxK reconstructs from (a third of them)."""


# --- what ranks and the parent both build ----------------------------------------------------------

def _batch(seed: int = 0, n_rows: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, D, generator=gen) * torch.linspace(0.5, 2.0, D) + 0.3


def _wide_batch() -> torch.Tensor:
    """A batch in which token 20 (on the last rank) fires on more latents than BatchTopK's 4k
    candidates of a row, so its row is widened to every latent."""
    x = _batch(1)
    x[20] *= 30
    return x


def _integer_batch() -> torch.Tensor:
    """Integer inputs: with an integer encoder the pre-activations tie, also at the batch's cut."""
    gen = torch.Generator().manual_seed(2)
    return torch.randint(-2, 3, (24, D), generator=gen).float()


def _topk(**kw) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=F, k=K, seed=5, **kw))
    sae.init_from_data_(_batch())
    if sae.cfg.latent_bias:
        with torch.no_grad():
            sae.b_enc.copy_(torch.randn(F, generator=torch.Generator().manual_seed(9)) * 0.3)
    return sae


def _switch() -> SwitchSAE:
    sae = SwitchSAE(SwitchConfig(d_in=D, d_sae=F, k=K, n_experts=4, seed=3))
    sae.init_from_data_(_batch())
    with torch.no_grad():  # a router that routes decisively (the default init is near uniform)
        sae.W_router.mul_(8)
    return sae


def _gated() -> GatedSAE:
    sae = GatedSAE(GatedConfig(d_in=D, d_sae=F, seed=6))
    sae.init_from_data_(_batch())
    with torch.no_grad():
        sae.b_gate.fill_(0.05)
    return sae


def _relu() -> ReLUSAE:
    sae = ReLUSAE(ReLUConfig(d_in=D, d_sae=F, seed=7))
    sae.init_from_data_(_batch())
    return sae


def _jumprelu() -> JumpReLUSAE:
    # A bandwidth wide enough that the thresholds get straight-through gradient from many tokens.
    sae = JumpReLUSAE(JumpReLUConfig(d_in=D, d_sae=F, seed=8, bandwidth=0.5, init_threshold=0.2))
    sae.init_from_data_(_batch())
    return sae


def _batchtopk() -> BatchTopKSAE:
    sae = BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=K, seed=10))
    sae.init_from_data_(_batch())
    return sae


def _batchtopk_ties() -> BatchTopKSAE:
    sae = BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=K, seed=11, auxk_coef=0.0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-1, 2, (D, F), generator=torch.Generator().manual_seed(3)).float())
    return sae


def _matryoshka() -> MatryoshkaSAE:
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=F, k=K, seed=12, matryoshka_widths=[8, 16, 32, 64]))
    sae.init_from_data_(_batch())
    return sae


CASES: dict[str, tuple[Callable[[], BaseSAE], Callable[[], torch.Tensor], bool]] = {
    "topk": (_topk, _batch, True),
    "topk_latent_bias": (lambda: _topk(latent_bias=True), _batch, True),
    "switch": (_switch, _batch, False),
    "gated": (_gated, _batch, False),
    "relu": (_relu, _batch, False),
    "jumprelu": (_jumprelu, _batch, False),
    "batchtopk": (_batchtopk, _batch, True),
    "batchtopk_wide": (_batchtopk, _wide_batch, True),
    "batchtopk_ties": (_batchtopk_ties, _integer_batch, False),
    "matryoshka": (_matryoshka, _batch, True),
}
"""name -> (the SAE, the global batch, whether AuxK gets the dead latents DEAD_F)."""


def _rows(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    start = sum(ROWS[world_size][:rank])
    return x[start:start + ROWS[world_size][rank]]


def _step(sae: BaseSAE, x_BD: torch.Tensor, dead: bool):
    sae.train()
    return sae(x_BD, dead_mask=DEAD_F.clone() if dead else None)


# --- the ranks -------------------------------------------------------------------------------------

def _checks(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with batch_group(None, world_size):
        # The helpers themselves, with unequal rows (rank 0 holds none).
        t = torch.arange(2 * rank * 3, dtype=torch.float32).reshape(2 * rank, 3) + 100 * rank
        gathered, sizes = batch_all_gather_sizes(t)
        out["gather"], out["gather.sizes"] = gathered, torch.tensor(sizes)
        out["gather.long"] = batch_all_gather(torch.full((rank + 1,), rank, dtype=torch.long))
        out["rank"] = torch.tensor(batch_rank())
        out["rows"] = torch.tensor([batch_rows(rank + 1), int(batch_count(rank + 1))])
        out["min"] = batch_min_(torch.tensor([float(rank), -float(rank)]))
        x_BD = _rows(_batch(), rank, world_size)
        out["mean"] = batch_mean(x_BD)
        out["means"] = torch.stack(batch_means(x_BD[:, 0], x_BD.pow(2).sum(-1)))
        out["total_variance"] = batch_total_variance(x_BD)

    for name, (make, data, dead) in CASES.items():
        sae = make()
        x_BD = _rows(data(), rank, world_size)
        with batch_group(None, world_size):
            res = _step(sae, x_BD, dead)
        # The trainer's convention: each rank backpropagates V / N (outside the block: the
        # differentiable all-reduces keep their group), then the gradients are summed over ranks.
        (sum(res.losses.values()) / world_size).backward()
        for param in sae.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
        out.update({f"{name}.loss.{term}": v.detach() for term, v in res.losses.items()})
        out.update({f"{name}.grad.{p}": v.grad for p, v in sae.named_parameters() if v.grad is not None})
        out.update({f"{name}.buffer.{b}": v.clone() for b, v in sae.named_buffers()})
        out[f"{name}.code"] = res.code.dense().detach()
        out[f"{name}.recon"] = res.recon_BD.detach()
        if isinstance(sae, BatchTopKSAE):  # a second batch: theta's moving average over global statistics
            with batch_group(None, world_size), torch.no_grad():
                _step(sae, _rows(data() * 0.8 + 0.1, rank, world_size), dead)
            out[f"{name}.threshold2"] = sae.threshold.clone()
    return out


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        out = {name: t.contiguous() for name, t in _checks(rank, world_size).items()}
        save_file(out, str(Path(out_dir) / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp(f"losses_world{world_size}")
    start_local_ranks(_worker, world_size, (str(out_dir),), preload=["safetensors.torch", "workbench.saes"])
    return [load_file(str(out_dir / f"rank{r}.safetensors")) for r in range(world_size)]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return _spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return _spawn(4, tmp_path_factory)


@pytest.fixture(params=[2, 4])
def ranks(request):
    return request.param, request.getfixturevalue(f"ranks{request.param}")


# --- the references and the assertions ------------------------------------------------------------

def test_batch_helpers_across_ranks(ranks):
    n, res = ranks
    whole = torch.cat([torch.arange(2 * r * 3, dtype=torch.float32).reshape(2 * r, 3) + 100 * r for r in range(n)])
    x_BD = _batch()
    for rank, r in enumerate(res):
        torch.testing.assert_close(r["gather"], whole, rtol=0, atol=0)
        assert r["gather.sizes"].tolist() == [2 * q for q in range(n)]
        assert r["gather.long"].tolist() == [q for q in range(n) for _ in range(q + 1)]
        assert int(r["rank"]) == rank
        assert r["rows"].tolist() == [n * (n + 1) // 2] * 2
        assert r["min"].tolist() == [0.0, -(n - 1.0)]
        torch.testing.assert_close(r["mean"], x_BD.mean(0), **TOL)
        torch.testing.assert_close(r["means"], torch.stack([x_BD[:, 0].mean(), x_BD.pow(2).sum(-1).mean()]), **TOL)
        torch.testing.assert_close(r["total_variance"], total_variance(x_BD), **TOL)


def test_batch_helpers_outside_a_group_are_local():
    x_BD = _batch()
    assert batch_all_gather(x_BD) is x_BD
    assert batch_all_gather_sizes(x_BD)[1] == [24]
    assert batch_rank() == 0 and batch_rows(5) == 5 and int(batch_count(5)) == 5
    assert torch.equal(batch_total_variance(x_BD), total_variance(x_BD))
    assert torch.equal(batch_means(x_BD[:, 0])[0], x_BD[:, 0].mean())
    with batch_group(None, 1):  # a world of one is no group
        assert batch_all_gather(x_BD) is x_BD


def _reference(name: str):
    make, data, dead = CASES[name]
    sae = make()
    out = _step(sae, data(), dead)
    sum(out.losses.values()).backward()
    return sae, out


@pytest.mark.parametrize("name", [n for n in CASES if n != "batchtopk_ties"])
def test_losses_codes_and_gradients_equal_one_process(ranks, name):
    res = ranks[1]
    sae, ref = _reference(name)
    assert {k.split(".")[-1] for k in res[0] if k.startswith(f"{name}.loss.")} == set(ref.losses)
    for rank, r in enumerate(res):
        for term, value in ref.losses.items():
            torch.testing.assert_close(r[f"{name}.loss.{term}"], value.detach(), **TOL, msg=f"rank {rank}: {term}")
        names = [p for p, v in sae.named_parameters() if v.grad is not None]
        assert sorted(k.split(".")[-1] for k in r if k.startswith(f"{name}.grad.")) == sorted(names)
        for p in names:
            torch.testing.assert_close(r[f"{name}.grad.{p}"], getattr(sae, p).grad, **TOL,
                                       msg=f"rank {rank}: gradient of {p}")
        for b, value in sae.named_buffers():
            torch.testing.assert_close(r[f"{name}.buffer.{b}"], value, **TOL, msg=f"rank {rank}: buffer {b}")
    code, ref_code = torch.cat([r[f"{name}.code"] for r in res]), ref.code.dense().detach()
    assert torch.equal(code != 0, ref_code != 0), "the same latents fire for every token"
    torch.testing.assert_close(code, ref_code, **TOL)
    torch.testing.assert_close(torch.cat([r[f"{name}.recon"] for r in res]), ref.recon_BD.detach(), **TOL)
    # The checks mean something: AuxK is on, and every parameter that learns gets gradient.
    if CASES[name][2]:
        assert ref.losses["auxk"] > 0
    for p in names:
        assert getattr(sae, p).grad.abs().max() > 0, p


@pytest.mark.parametrize("name", ["batchtopk", "batchtopk_wide", "batchtopk_ties", "matryoshka"])
def test_batchtopk_threshold_stays_replicated_and_equals_one_process(ranks, name):
    res = ranks[1]
    sae, _ = _reference(name)
    _, data, dead = CASES[name]
    with torch.no_grad():
        _step(sae, data() * 0.8 + 0.1, dead)
    assert sae.threshold > 0
    for r in res:
        torch.testing.assert_close(r[f"{name}.threshold2"], sae.threshold, rtol=1e-6, atol=0)
        assert torch.equal(r[f"{name}.threshold2"], res[0][f"{name}.threshold2"])


def test_batchtopk_widens_rows_across_ranks(ranks):
    """Token 20 keeps more latents than the 4k candidates each row offers: its rank searched it whole."""
    res = ranks[1]
    code = torch.cat([r["batchtopk_wide.code"] for r in res])
    l0_B = (code != 0).sum(-1)
    assert l0_B[20] > 4 * K
    assert l0_B.sum() <= K * 24


def test_batchtopk_ties_at_the_cut_keep_exactly_k_per_token_on_average(ranks):
    """With integer pre-activations many tie at the cut: the ranks keep exactly k * B of them, every
    one above the cut, and the same values one process keeps (which of equal values fire may differ)."""
    res = ranks[1]
    sae, ref = _reference("batchtopk_ties")
    x_BD = _integer_batch()
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc
    kept = torch.cat([r["batchtopk_ties.code"] for r in res])
    cut = kept[kept != 0].min()
    assert cut > 0 and (pre_BF == cut).sum() > (kept == cut).sum(), "the test needs ties at the cut"
    assert int((kept != 0).sum()) == K * 24
    assert torch.equal(kept != 0, (kept != 0) & (pre_BF >= cut))
    assert torch.equal((pre_BF > cut), (kept > cut))
    ref_vals = ref.code.dense().detach()
    assert torch.equal(kept[kept != 0].sort().values, ref_vals[ref_vals != 0].sort().values)
    for r in res:  # one value for the global batch, replicated (not one process's: other latents fire)
        assert torch.equal(r["batchtopk_ties.loss.fvu"], res[0]["batchtopk_ties.loss.fvu"])
