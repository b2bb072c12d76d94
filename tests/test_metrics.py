import math

import pytest
import torch

from workbench.eval.metrics import (FiringStats, cosine_similarity, evaluate, explained_variance, fvu, l0,
                                    mse, mse_of_latents, relative_reconstruction_bias)
from workbench.saes import Code, SwitchConfig, SwitchSAE, TopKConfig, TopKSAE, build_sae, make_config

# Two tokens, two dims. err = x - recon = [[0, 1], [1, 0]].
X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
RECON = torch.tensor([[1.0, 1.0], [2.0, 4.0]])


def test_mse_is_mean_over_elements():
    assert mse(X, RECON) == pytest.approx(2 / 4)


def test_fvu_normalises_by_total_variance():
    # x - mean_x = [[-1, -1], [1, 1]]: total sum of squares 4; squared error 2.
    assert fvu(X, RECON) == pytest.approx(2 / 4)


def test_explained_variance_ignores_mean_error():
    # Per-dim population variances: err [0, 1] and [1, 0] -> 1/4 each; x [1, 3] and [2, 4] -> 1 each.
    assert explained_variance(X, RECON) == pytest.approx(1 - 0.5 / 2)


def test_cosine_similarity_is_mean_over_tokens():
    # token 0: (1,2).(1,1) = 3, norms sqrt5 * sqrt2; token 1: (3,4).(2,4) = 22, norms 5 * sqrt20.
    expected = (3 / math.sqrt(10) + 22 / (5 * math.sqrt(20))) / 2
    assert cosine_similarity(X, RECON) == pytest.approx(expected)


def test_relative_reconstruction_bias():
    # sum ||x_hat||^2 = 2 + 20, sum x . x_hat = 3 + 22.
    assert relative_reconstruction_bias(X, RECON) == pytest.approx(22 / 25)
    assert relative_reconstruction_bias(X, 0.5 * X) == pytest.approx(0.5)
    assert relative_reconstruction_bias(X, X) == pytest.approx(1.0)


def test_l0_dense_and_sparse_codes():
    dense = Code(torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.1, -1.0]]), None, 3)
    assert l0(dense) == pytest.approx((1 + 2) / 2)
    sparse = Code(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), torch.tensor([[0, 2], [1, 2]]), 3)
    assert l0(sparse) == pytest.approx((1 + 2) / 2)


def _switch_with_router(logits_E):
    """A Switch SAE whose router gives every token the probabilities softmax(logits_E): tokens are
    fed as x = 0 and b_router = -e_0, so the router reads e_0 and W_router's first row is the logits."""
    E = len(logits_E)
    sae = SwitchSAE(SwitchConfig(d_in=4, d_sae=8 * E, k=2, n_experts=E))
    with torch.no_grad():
        sae.W_router.zero_()
        sae.W_router[0] = torch.tensor(logits_E)
        sae.b_router.zero_()
        sae.b_router[0] = -1.0
    return sae.eval()


@pytest.mark.parametrize("logits, load, lb, entropy", [
    # Uniform probabilities (ties go to expert 0): f = [1, 0], P = [1/2, 1/2], E sum f P = 1.
    ([0.0, 0.0], [1.0, 0.0], 1.0, math.log(2)),
    # p = [3/4, 1/4] on every token: f = [1, 0], E sum f P = 2 * 3/4.
    ([math.log(3), 0.0], [1.0, 0.0], 1.5, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
    # Uniform over four experts: the entropy is ln 4.
    ([0.0] * 4, [1.0, 0.0, 0.0, 0.0], 1.0, math.log(4)),
])
def test_switch_reports_expert_load_load_balance_and_router_entropy(logits, load, lb, entropy):
    sae = _switch_with_router(logits)
    out = sae(torch.zeros(6, 4))
    metrics = sae.summarize_metrics(out.metrics, 6)
    assert metrics["expert_load"] == pytest.approx(load)
    assert metrics["load_balance"] == pytest.approx(lb)
    assert metrics["router_entropy"] == pytest.approx(entropy)


def test_metric_totals_add_up_across_batches():
    sae = SwitchSAE(SwitchConfig(d_in=8, d_sae=32, k=2, n_experts=4)).eval()
    x_BD = _data(seed=3, n_batches=1, batch=40)[0]
    whole = sae.summarize_metrics(sae(x_BD).metrics, 40)
    parts = [sae(x_BD[:15]).metrics, sae(x_BD[15:]).metrics]
    summed = sae.summarize_metrics({name: parts[0][name] + parts[1][name] for name in parts[0]}, 40)
    assert summed.keys() == whole.keys() == {"expert_load", "load_balance", "router_entropy"}
    for name in whole:
        assert summed[name] == pytest.approx(whole[name], rel=1e-6)


def _dense(rows):
    return Code(torch.tensor(rows, dtype=torch.float32), None, 3)


def test_firing_stats_window():
    stats = FiringStats(3, window_tokens=4)
    unbounded = FiringStats(3, window_tokens=None)
    assert stats.dead_fraction() == 0.0

    codes = [
        _dense([[1, 0, 0], [0, 0, 0]]),                                  # latent 0 fires
        Code(torch.tensor([[0.5], [0.0]]), torch.tensor([[1], [2]]), 3),  # latent 1 fires; 2 picked at 0
        _dense([[0, 0, 0], [0, 0, 0]]),
        _dense([[0, 0, 2], [0, 0, 0]]),                                  # latent 2 fires
    ]
    # tokens since fired after each update, and the window min(4, tokens seen):
    # [0,2,2] w=2 -> dead {1,2}; [2,0,4] w=4 -> {2}; [4,2,6] w=4 -> {0,2}; [6,4,0] w=4 -> {0,1}
    expected_dead = [[False, True, True], [False, False, True], [True, False, True], [True, True, False]]
    # without a window, dead = never fired: {1,2}, {2}, {2}, {}
    expected_never = [[False, True, True], [False, False, True], [False, False, True], [False, False, False]]
    for code, dead, never in zip(codes, expected_dead, expected_never):
        stats.update(code)
        unbounded.update(code)
        assert stats.dead_mask().tolist() == dead
        assert unbounded.dead_mask().tolist() == never
    assert stats.dead_fraction() == pytest.approx(2 / 3)
    assert unbounded.dead_fraction() == 0.0
    assert stats.tokens_seen == 8
    assert stats.firing_frequency().tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 8])


def test_firing_stats_dense_fraction():
    stats = FiringStats(3)
    acts = torch.zeros(10, 3)
    acts[:, 0] = 1.0       # every token
    acts[0, 1] = 1.0       # exactly 10% of tokens: not more than the threshold
    acts[:2, 2] = 1.0      # 20%
    stats.update(Code(acts, None, 3))
    assert stats.firing_frequency().tolist() == pytest.approx([1.0, 0.1, 0.2])
    assert stats.dense_fraction(0.1) == pytest.approx(2 / 3)
    assert stats.dense_fraction(0.5) == pytest.approx(1 / 3)
    assert stats.dead_fraction() == 0.0


def test_firing_stats_rejects_wrong_width():
    with pytest.raises(ValueError, match="d_sae"):
        FiringStats(4).update(_dense([[1, 0, 0]]))


def _data(seed=0, n_batches=5, batch=16, d=8):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=gen) * 2 + 1 for _ in range(n_batches)]


def _one_shot(sae, x_BD):
    sae.eval()
    with torch.no_grad():
        out = sae(x_BD)
    counts_F = out.code.fire_counts()
    return out, {
        "mse": mse(x_BD, out.recon_BD),
        "fvu": fvu(x_BD, out.recon_BD),
        "explained_variance": explained_variance(x_BD, out.recon_BD),
        "l0": l0(out.code),
        "cosine": cosine_similarity(x_BD, out.recon_BD),
        "gamma": relative_reconstruction_bias(x_BD, out.recon_BD),
        "dead_fraction": (counts_F == 0).float().mean().item(),
        "dense_fraction": (counts_F / x_BD.shape[0] > 0.1).float().mean().item(),
    }


def test_evaluate_streaming_equals_one_shot_topk():
    torch.manual_seed(0)
    batches = _data()
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=4))
    sae.init_from_data_(batches[0])
    with torch.no_grad():
        sae.W_enc[:, :8] = 0  # pre-activation 0: these latents never fire
    sae.train()
    streamed = evaluate(sae, batches)
    assert sae.training
    _, expected = _one_shot(sae, torch.cat(batches))
    assert streamed.keys() == expected.keys()
    for name, value in expected.items():
        assert streamed[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert streamed["dead_fraction"] == pytest.approx(8 / 32)


def test_evaluate_streaming_equals_one_shot_switch():
    batches = _data(seed=1)
    sae = SwitchSAE(SwitchConfig(d_in=8, d_sae=32, k=2, n_experts=4))
    sae.init_from_data_(batches[0])
    streamed = evaluate(sae, batches)
    x_BD = torch.cat(batches)
    _, expected = _one_shot(sae, x_BD)
    probs_BE, expert_B = sae.route(x_BD)
    f_E = torch.bincount(expert_B, minlength=4).double() / len(expert_B)
    expected |= {"load_balance": (4 * f_E * probs_BE.double().mean(0)).sum().item(),
                 "router_entropy": -(probs_BE * probs_BE.log()).sum(-1).mean().item()}
    for name, value in expected.items():
        assert streamed[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert streamed["expert_load"] == pytest.approx(f_E.tolist())


def test_evaluate_window_and_empty_input():
    batches = _data()
    sae = TopKSAE(TopKConfig(d_in=8, d_sae=32, k=4))
    never = evaluate(sae, batches)["dead_fraction"]
    windowed = evaluate(sae, batches, window_tokens=16)["dead_fraction"]
    assert windowed >= never
    with pytest.raises(ValueError, match="no tokens"):
        evaluate(sae, [])


@pytest.mark.parametrize("arch", ["topk", "gated", "switch", "matryoshka_batchtopk"])
def test_mse_of_latents_against_a_dense_decode(arch):
    fields = {"k": 4, "n_experts": 4} if arch == "switch" else {"k": 4} if "topk" in arch else {}
    if arch == "matryoshka_batchtopk":
        fields["matryoshka_widths"] = [8, 16, 32]
    sae = build_sae(make_config(arch, d_in=8, d_sae=32, **fields))
    if arch == "matryoshka_batchtopk":
        sae.threshold.fill_(0.3)
    batches = _data(seed=4)
    keep_F = torch.arange(32) % 3 == 0
    with torch.no_grad():
        x_BD = torch.cat(batches)
        expected = mse(x_BD, (sae.encode(x_BD) * keep_F) @ sae.W_dec + sae.b_dec)
        everything = mse_of_latents(sae, batches, torch.ones(32, dtype=torch.bool))
    assert mse_of_latents(sae, batches, keep_F) == pytest.approx(expected, rel=1e-5)
    assert everything == pytest.approx(evaluate(sae, batches)["mse"], rel=1e-5)
    if arch == "matryoshka_batchtopk":  # its own per-prefix report is the same number
        assert mse_of_latents(sae, batches, torch.arange(32) < 8) == pytest.approx(
            evaluate(sae, batches)["prefix_mse"][0], rel=1e-5)
    with pytest.raises(ValueError, match=r"keep_F must be a bool tensor of shape \(32,\)"):
        mse_of_latents(sae, batches, torch.ones(31, dtype=torch.bool))
