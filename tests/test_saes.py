"""Architecture behaviour: the formulas of each paper, the shared decoder step, bad configs."""
import math

import pytest
import torch

from workbench.saes import (GatedConfig, GatedSAE, ReLUConfig, ReLUSAE, SwitchConfig, SwitchSAE, TopKConfig,
                            TopKSAE, UnitNormDecoder, build_sae, make_config)
from workbench.saes.base import Code, geometric_median


def _data(n=64, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * 2 + 0.5


def _perturb_(sae, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


# --- Gated -------------------------------------------------------------------------------------

def test_gated_equals_jumprelu_with_documented_threshold():
    sae = _perturb_(GatedSAE(GatedConfig(d_in=16, d_sae=48)))
    x = _data()
    f = sae.encode(x)
    pi_mag = (x - sae.b_dec) @ sae.W_enc * sae.r_mag.exp() + sae.b_mag
    theta = sae.b_mag - sae.r_mag.exp() * sae.b_gate
    jump = pi_mag * (pi_mag > theta)
    # The magnitude path is ReLU'd, so the gate equals ReLU(JumpReLU_theta(pi_mag)).
    torch.testing.assert_close(f, jump.relu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.jumprelu_threshold(), theta)
    assert 0 < (f > 0).float().mean() < 1  # the test exercises both sides of the threshold


def test_gated_loss_terms_follow_eq8():
    sae = _perturb_(GatedSAE(GatedConfig(d_in=16, d_sae=48, l1_coefficient=0.3, l2_reduction="sum")))
    x = _data()
    out = sae(x)
    pi_gate = (x - sae.b_dec) @ sae.W_enc + sae.b_gate
    recon_aux = pi_gate.relu() @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.losses["l2"], (x - out.recon_BD).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.losses["l1"], 0.3 * pi_gate.relu().sum(-1).mean())
    torch.testing.assert_close(out.losses["aux"], (x - recon_aux).pow(2).sum(-1).mean())


def test_gated_aux_loss_does_not_train_the_decoder():
    sae = _perturb_(GatedSAE(GatedConfig(d_in=16, d_sae=48)))
    sae(_data()).losses["aux"].backward()
    assert sae.W_dec.grad is None or torch.count_nonzero(sae.W_dec.grad) == 0
    assert torch.count_nonzero(sae.W_enc.grad) > 0  # ... but does train the gate
    assert torch.count_nonzero(sae.b_gate.grad) > 0


def test_l2_reduction_mean_is_sum_over_d():
    x = _data(d=16)
    for cls, cfg_cls in [(GatedSAE, GatedConfig), (ReLUSAE, ReLUConfig)]:
        summed = _perturb_(cls(cfg_cls(d_in=16, d_sae=32, l2_reduction="sum")))(x).losses["l2"]
        meaned = _perturb_(cls(cfg_cls(d_in=16, d_sae=32, l2_reduction="mean")))(x).losses["l2"]
        torch.testing.assert_close(summed, 16 * meaned)


# --- ReLU --------------------------------------------------------------------------------------

def test_relu_l1_warms_up_linearly():
    sae = _perturb_(ReLUSAE(ReLUConfig(d_in=16, d_sae=32, l1_coefficient=2.0, l1_warmup_steps=10)))
    x = _data()
    l1_full = 2.0 * sae.encode(x).sum(-1).mean()
    sae.on_step(0)
    torch.testing.assert_close(sae(x).losses["l1"], l1_full / 10)
    sae.on_step(4)
    torch.testing.assert_close(sae(x).losses["l1"], l1_full / 2)
    sae.on_step(500)
    torch.testing.assert_close(sae(x).losses["l1"], l1_full)


# --- TopK --------------------------------------------------------------------------------------

def test_topk_init_and_code():
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=5))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    x = _data()
    sae.init_from_data_(x)
    torch.testing.assert_close(sae.b_dec, geometric_median(x))
    code = sae.encode_code(x)
    assert code.acts.shape == code.idx.shape == (64, 5)
    assert (code.l0() <= 5).all()
    dense = sae.encode(x)
    pre = ((x - sae.b_dec) @ sae.W_enc)
    kth = pre.topk(5, dim=-1).values[:, -1:]
    torch.testing.assert_close(dense, torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre)))


def test_topk_auxk_only_with_dead_latents_and_only_on_them():
    x = _data(n=128)
    sae = _perturb_(TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4))).train()
    assert sae(x).losses["auxk"].item() == 0.0  # no dead mask: nothing is dead
    assert sae(x, dead_mask=torch.zeros(64, dtype=torch.bool)).losses["auxk"].item() == 0.0

    sae = _perturb_(TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4, k_aux=6))).train()
    dead = sae.encode_code(x).fire_counts() == 0  # the latents that did not fire on x
    assert 0 < dead.sum() < 64
    out = sae(x, dead_mask=dead)
    assert out.losses["auxk"].item() > 0
    sae.zero_grad()
    out.losses["auxk"].backward()
    touched = sae.W_enc.grad.abs().sum(0) > 0
    assert touched.any() and not (touched & ~dead).any()
    assert "auxk" not in sae.eval()(x, dead_mask=dead).losses  # evaluation has no AuxK


def test_topk_auxk_follows_gao_et_al():
    """AuxK = 1/32 * ||e - e_hat||^2 / ||e - mean e||^2, e_hat decoded (without b_pre) from the
    top-k_aux pre-activations among the dead latents, written out densely."""
    x = _data(n=32)
    sae = _perturb_(TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4, k_aux=3))).train()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead)
    pre = (x - sae.b_dec) @ sae.W_enc
    e = (x - out.recon_BD).detach()
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(3, dim=-1)
    e_hat = torch.zeros(32, 64).scatter(1, idx, vals.relu()) @ sae.W_dec
    expected = (e - e_hat).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean() / 32
    torch.testing.assert_close(out.losses["auxk"], expected)


def test_topk_sae_holds_no_training_state():
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)).train()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae(_data(n=10), dead_mask=torch.ones(64, dtype=torch.bool))
    assert sae.state_dict().keys() == before.keys() == {"W_enc", "W_dec", "b_dec", "b_enc"}
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


# --- Switch ------------------------------------------------------------------------------------

def test_switch_routes_each_token_to_its_argmax_expert_only():
    cfg = SwitchConfig(d_in=16, d_sae=64, k=3, n_experts=4)
    sae = _perturb_(SwitchSAE(cfg))
    x = _data()
    out = sae(x)
    probs, expert = sae.route(x)
    torch.testing.assert_close(probs, torch.softmax((x - sae.b_router) @ sae.W_router, dim=-1))
    assert torch.equal(expert, probs.argmax(-1))
    assert torch.equal(out.code.idx // cfg.expert_width, expert[:, None].expand(-1, 3))
    # softmax gate: latents are scaled by the chosen expert's probability
    heaviside = SwitchSAE(SwitchConfig(d_in=16, d_sae=64, k=3, n_experts=4, gate="heaviside"))
    heaviside.load_state_dict(sae.state_dict())
    p_chosen = probs.gather(1, expert[:, None])
    torch.testing.assert_close(out.code.acts, heaviside(x).code.acts * p_chosen)


def test_switch_load_balance_is_alpha_at_uniform_routing():
    sae = SwitchSAE(SwitchConfig(d_in=16, d_sae=64, k=3, n_experts=4, lb_alpha=3.0))
    with torch.no_grad():
        sae.W_router.zero_()  # every expert equally likely: P_i = 1/4
    # argmax of a tie is expert 0 for every token: f = (1, 0, 0, 0), N * sum f_i P_i = 4 * 1/4 = 1
    torch.testing.assert_close(sae(_data()).losses["load_balance"], torch.tensor(3.0))


# --- Shared ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["relu", "topk", "gated", "switch"])
def test_unit_norm_decoder_step_keeps_rows_on_the_sphere(arch):
    extra = {"k": 4} if arch in ("topk", "switch") else {}
    sae = build_sae(make_config(arch, d_in=16, d_sae=64, **extra))
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    norm = UnitNormDecoder([sae.W_dec])
    for step in range(3):
        loss = sum(sae(_data(seed=step)).losses.values())
        opt.zero_grad()
        loss.backward()
        norm.project_grads()
        radial = (sae.W_dec.grad * sae.W_dec).sum(-1).abs()
        assert (radial <= 1e-5 * (1 + sae.W_dec.grad.norm(dim=-1))).all()  # no radial component left
        opt.step()
        norm.renormalise()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_geometric_median_ignores_an_outlier():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, -1.0], [100.0, 0.0]])
    median = geometric_median(points)
    assert abs(median[0].item() - 1.0) < 0.2 and abs(median[1].item()) < 1e-4
    assert points.mean(0)[0] > 15  # the mean is dragged away; the median is not


def test_code_dense_and_counts():
    code = Code(torch.tensor([[2.0, 0.0], [1.0, 3.0]]), torch.tensor([[3, 1], [3, 0]]), 4)
    assert torch.equal(code.dense(), torch.tensor([[0.0, 0.0, 0.0, 2.0], [3.0, 0.0, 0.0, 1.0]]))
    assert torch.equal(code.fire_counts(), torch.tensor([1, 0, 0, 2]))
    assert torch.equal(code.l0(), torch.tensor([1, 2]))


def test_flops_per_token_formulas():
    d, m, k = 384, 12288, 32
    topk = TopKSAE(TopKConfig(d_in=d, d_sae=m, k=k))
    assert topk.flops_per_token() == 2 * d * m + 2 * k * d
    assert topk.flops_per_token(training=True) == 2 * d * m + 8 * k * d
    switch = SwitchSAE(SwitchConfig(d_in=d, d_sae=m, k=k, n_experts=16))
    assert switch.flops_per_token() == 2 * d * 16 + 2 * d * (m // 16) + 2 * k * d
    assert switch.flops_per_token(training=True) == switch.flops_per_token() + 4 * d * 16 + 6 * k * d
    assert 10 < topk.flops_per_token() / switch.flops_per_token() < 16  # encoder cost shrinks ~E-fold
    relu = ReLUSAE(ReLUConfig(d_in=d, d_sae=m))
    assert relu.flops_per_token(training=True) == 3 * relu.flops_per_token() == 12 * d * m
    gated = GatedSAE(GatedConfig(d_in=d, d_sae=m))
    assert gated.flops_per_token() == 4 * d * m and gated.flops_per_token(training=True) == 18 * d * m
    batchtopk = build_sae(make_config("batchtopk", d_in=d, d_sae=m, k=k))  # k-sparse on average: as TopK
    assert batchtopk.flops_per_token(training=True) == topk.flops_per_token(training=True)
    matryoshka = build_sae(make_config("matryoshka_batchtopk", d_in=d, d_sae=m, k=k))  # + 4 prefix decodes
    assert matryoshka.flops_per_token() == topk.flops_per_token() + 4 * 2 * k * d
    assert matryoshka.flops_per_token(training=True) == topk.flops_per_token(training=True) + 3 * 4 * 2 * k * d
    jumprelu = build_sae(make_config("jumprelu", d_in=d, d_sae=m))
    assert jumprelu.flops_per_token(training=True) == 3 * jumprelu.flops_per_token() == 12 * d * m


def test_a_padded_code_counts_only_its_real_entries():
    """Rows of a BatchTopK code are padded with zero activations on latent 0, which may also be a
    real entry of the same row."""
    code = Code(torch.tensor([[2.0, 5.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[0, 3, 0], [2, 0, 0]]), 4)
    assert torch.equal(code.dense(), torch.tensor([[2.0, 0.0, 0.0, 5.0], [0.0, 0.0, 1.0, 0.0]]))
    assert torch.equal(code.fire_counts(), torch.tensor([1, 0, 1, 1]))
    assert torch.equal(code.l0(), torch.tensor([2, 1]))


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (TopKSAE(TopKConfig(d_in=8, d_sae=32, k=2, seed=s)) for s in (0, 0, 1))
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("arch, fields, message", [
    ("switch", dict(d_in=16, d_sae=64, k=16, n_experts=4), "k=16 must be smaller than the expert width"),
    ("switch", dict(d_in=16, d_sae=60, k=2, n_experts=8), "d_sae=60 is not divisible by n_experts=8"),
    ("switch", dict(d_in=16, d_sae=64, k=2, n_experts=0), "n_experts=0 must be a positive integer"),
    ("switch", dict(d_in=16, d_sae=64, k=2, n_experts=4, gate="sigmoid"), "gate='sigmoid'"),
    ("topk", dict(d_in=16, d_sae=64, k=64), "k=64 must be smaller than the number of latents"),
    ("topk", dict(d_in=16, d_sae=64, k=0), "k=0 must be a positive integer"),
    ("topk", dict(d_in=0, d_sae=64, k=4), "d_in=0 must be a positive integer"),
    ("relu", dict(d_in=16, d_sae=-3), "d_sae=-3 must be a positive integer"),
    ("gated", dict(d_in=16, d_sae=32, l2_reduction="max"), "l2_reduction='max'"),
    ("gated", dict(d_in=16, d_sae=32, width=3), "gated SAE has no field(s) ['width']"),
    ("transcoder", dict(d_in=16, d_sae=32), "unknown architecture 'transcoder'"),
])
def test_bad_configs_raise_clear_errors(arch, fields, message):
    with pytest.raises(ValueError) as err:
        build_sae(make_config(arch, **fields))
    assert message in str(err.value)


def test_wrong_input_width_is_a_clear_error():
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4))
    with pytest.raises(ValueError, match=r"d_in=16 but got activations of shape \(3, 12\)"):
        sae(torch.zeros(3, 12))


def test_lr_defaults():
    assert math.isclose(TopKConfig(d_in=8, d_sae=2**14, k=4).default_lr(), 2e-4)
    assert math.isclose(SwitchConfig(d_in=8, d_sae=4 * 2**14, k=4).default_lr(), 1e-4)
    assert GatedConfig(d_in=8, d_sae=16).default_lr() == 3e-4
