"""workbench.perf: the dense references compute what our SAEs compute, their FLOP counts match
torch's own counter, the rows are the benchmark's, and the round-robin timing and ratios behave.
Nothing here asserts a speed: that is the benchmarks' job."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from workbench.data.sites import block_list, resolve_site
from workbench.data.types import TokenBatch
from workbench.perf import (DenseMaskedSwitch, DenseTopK, Timed, benchmark_batch, harvest_rows, measure, n_tokens,
                            paired_ratio, sae_rows, step_row, summary, truncated)
from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

D, M, K, B = 16, 128, 4, 32


def _topk() -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=M, k=K))
    sae.init_from_data_(benchmark_batch(D, B))
    return sae


def _switch(n_experts: int = 4) -> SwitchSAE:
    sae = SwitchSAE(SwitchConfig(d_in=D, d_sae=M, k=K, n_experts=n_experts))
    sae.init_from_data_(benchmark_batch(D, B))
    return sae


def test_dense_topk_reconstructs_like_topk_sae():
    sae, x_BD = _topk(), benchmark_batch(D, B)
    dense = DenseTopK(sae)
    out, ref = dense(x_BD), sae(x_BD)
    torch.testing.assert_close(out.recon_BD, ref.recon_BD, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.losses["fvu"], ref.losses["fvu"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n_experts", [2, 4, 16])
def test_dense_masked_switch_matches_switch_sae(n_experts):
    sae, x_BD = _switch(n_experts), benchmark_batch(D, B)
    dense = DenseMaskedSwitch(sae)
    out, ref = dense(x_BD), sae(x_BD)
    assert out.recon_BD.shape == (B, D)
    torch.testing.assert_close(out.recon_BD, ref.recon_BD, atol=1e-5, rtol=1e-5)
    for name in ("mse", "load_balance"):
        torch.testing.assert_close(out.losses[name], ref.losses[name], atol=1e-6, rtol=1e-5)


def test_dense_masked_switch_gradients_match_switch_sae():
    """The reference trains the same parameters the same way: equal gradients, not just outputs."""
    sae, x_BD = _switch(4), benchmark_batch(D, B)
    dense = DenseMaskedSwitch(sae)
    sum(sae(x_BD).losses.values()).backward()
    sum(dense(x_BD).losses.values()).backward()
    for name in ("W_enc", "W_dec", "b_dec", "W_router", "b_router"):
        torch.testing.assert_close(getattr(dense, name).grad, getattr(sae, name).grad, atol=1e-5, rtol=1e-4)


def test_dense_references_refuse_what_they_do_not_model():
    with pytest.raises(ValueError, match="latent_bias"):
        DenseTopK(TopKSAE(TopKConfig(d_in=D, d_sae=M, k=K, latent_bias=True)))
    with pytest.raises(ValueError, match="gate"):
        DenseMaskedSwitch(SwitchSAE(SwitchConfig(d_in=D, d_sae=M, k=K, n_experts=4, gate="heaviside")))


@pytest.mark.parametrize("make", [lambda: DenseTopK(_topk()), lambda: DenseMaskedSwitch(_switch(4))])
def test_dense_flops_match_torch_flop_counter(make):
    model, x_BD = make(), benchmark_batch(D, B)
    with FlopCounterMode(display=False) as forward:
        model(x_BD)
    with FlopCounterMode(display=False) as step:
        sum(model(x_BD).losses.values()).backward()
    assert forward.get_total_flops() == B * model.flops_per_token(training=False)
    assert step.get_total_flops() == B * model.flops_per_token(training=True)


def test_sae_rows_are_the_benchmark_rows():
    rows = sae_rows(D, M, K, B, experts=[4, 16], dense_experts=[16])
    assert [r.name for r in rows] == ["topk", "enc matmul", "enc matmul chunked", "topk dense",
                                      "switch E=4", "switch E=16", "switch dense E=16"]
    by = {r.name: r for r in rows}
    assert by["enc matmul"].run().shape == (B, M)
    assert by["enc matmul"].flops_per_token is None
    assert by["topk"].flops_per_token == _topk().flops_per_token(training=True)
    assert by["switch dense E=16"].flops_per_token == 2 * D * 16 + 4 * D * M + 4 * D * 16 + 8 * D * M

    minimal = sae_rows(D, M, K, B, experts=[4], dense_experts=[], matmul=False, topk_dense=False)
    assert [r.name for r in minimal] == ["topk", "switch E=4"]
    with pytest.raises(ValueError, match="not divisible by 3 experts"):
        sae_rows(D, M, K, B, experts=[3])


def test_a_step_row_trains_its_model_and_keeps_the_decoder_unit_norm():
    switch, x_BD = _switch(4), benchmark_batch(D, B)
    before = switch.W_dec.detach().clone()
    row = step_row("switch", switch, x_BD, lr=1e-3)
    assert row.flops_per_token == switch.flops_per_token(training=True)
    row.run()
    assert not torch.equal(before, switch.W_dec)
    torch.testing.assert_close(switch.W_dec.norm(dim=-1), torch.ones(M), atol=1e-5, rtol=0)


def test_benchmark_batch_is_seeded():
    assert torch.equal(benchmark_batch(D, B, seed=1), benchmark_batch(D, B, seed=1))
    assert not torch.equal(benchmark_batch(D, B, seed=1), benchmark_batch(D, B, seed=2))


def test_measure_rotates_the_order_and_times_every_round():
    calls = []
    rows = [Timed(name, lambda name=name: calls.append(name)) for name in "abc"]
    measure(rows, rounds=4, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(r.times) == 4 and min(r.times) >= 0 for r in rows)
    with pytest.raises(ValueError, match="rounds=0"):
        measure(rows, rounds=0)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    slow = Timed("slow", lambda: None, times=[4.0, 100.0, 6.0])
    fast = Timed("fast", lambda: None, times=[1.0, 50.0, 2.0])
    # per-round ratios 4, 2, 3: the slow spell of round 2 does not drag the ratio (means would give 2.08)
    assert paired_ratio(slow, fast) == 3.0
    assert paired_ratio(Timed("s", None, times=[10.0, 1.0]), Timed("f", None, times=[1.0, 1.0])) == 5.5
    with pytest.raises(ValueError, match="same number of timed rounds"):
        paired_ratio(slow, Timed("f", None, times=[1.0]))
    with pytest.raises(ValueError, match="not been timed"):
        Timed("x", None).median


def test_summary_rows():
    rows = [Timed("a", None, flops_per_token=10, times=[0.5, 0.25, 1.0])]
    (s,) = summary(rows, tokens=100)
    assert s == {"name": "a", "median_ms": 500.0, "min_ms": 250.0, "tokens_per_s": 200.0, "flops_per_token": 10}


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_truncated_keeps_the_first_blocks_and_restores_them():
    model = _tiny_gpt2()
    blocks = block_list(model)[1]
    ids_SL = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids_SL, output_hidden_states=True).hidden_states
        with truncated(model, 1):
            assert len(block_list(model)[1]) == 2
            assert block_list(model)[1][1] is blocks[1]
            cut = model(input_ids=ids_SL, output_hidden_states=True).hidden_states
    assert block_list(model)[1] is blocks
    assert len(cut) == 3 and len(full) == 4
    torch.testing.assert_close(cut[1], full[1])  # the blocks it ran compute what they did before
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        with truncated(torch.nn.Linear(2, 2), 0):
            pass


def test_harvest_rows_run_each_way():
    model = _tiny_gpt2()
    ids_SL = torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    mask_SL = torch.ones_like(ids_SL)
    mask_SL[2, 4:] = 0
    batches = [TokenBatch(ids_SL, mask_SL, torch.tensor([0, 1, 2]))]
    assert n_tokens(batches) == 24
    site = resolve_site(model, "resid_post.0")
    rows = harvest_rows(model, site, batches)
    assert [r.name for r in rows] == ["harvest", "bare", "full"]
    measure(rows, rounds=1, warmup=0)
    assert all(len(r.times) == 1 for r in rows)
    assert len(block_list(model)[1]) == 3  # the bare way gave the blocks back
