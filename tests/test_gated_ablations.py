"""The Gated SAE's Fig. 8 ablations: no r_mag (W_mag = W_gate) and an aux loss that trains the decoder."""
import pytest
import torch

from workbench import io
from workbench.saes import GatedConfig, GatedSAE, make_config
from workbench.train.trainer import TrainConfig, Trainer


def _sae(**fields):
    sae = GatedSAE(GatedConfig(d_in=8, d_sae=20, **fields))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


def _data(n=32, d=8, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def test_defaults_are_the_paper_model():
    cfg = GatedConfig(d_in=8, d_sae=20)
    assert cfg.learn_r_mag and cfg.freeze_aux_decoder
    assert GatedSAE(cfg).r_mag.requires_grad


def test_frozen_aux_decoder_gives_the_decoder_no_gradient():
    sae = _sae()
    sae(_data()).losses["aux"].backward()
    assert sae.W_dec.grad is None and sae.b_dec.grad is not None  # b_dec still reaches pi_gate
    assert torch.count_nonzero(sae.W_enc.grad) > 0


def test_unfrozen_aux_decoder_gradient_matches_the_hand_computation():
    x = _data()
    frozen, unfrozen = _sae(), _sae(freeze_aux_decoder=False)
    out_f, out_u = frozen(x), unfrozen(x)
    for term in ("l2", "l1", "aux"):  # same forward, only the gradient path differs
        torch.testing.assert_close(out_f.losses[term], out_u.losses[term])
    sum(out_f.losses.values()).backward()
    sum(out_u.losses.values()).backward()

    # aux = mean_b (1/D) ||x - (g W_dec + b_dec)||^2 with g = ReLU(pi_gate), so
    # d aux / d W_dec = -(2 / (B D)) g^T (x - aux_recon) and d aux / d b_dec gains -(2 / (B D)) sum_b (x - aux_recon).
    with torch.no_grad():
        g = ((x - unfrozen.b_dec) @ unfrozen.W_enc + unfrozen.b_gate).relu()
        resid = x - (g @ unfrozen.W_dec + unfrozen.b_dec)
        scale = -2 / (x.shape[0] * x.shape[1])
        grad_W_dec_aux = scale * g.t() @ resid
        grad_b_dec_aux = scale * resid.sum(0)
    assert grad_W_dec_aux.abs().max() > 1e-3  # the test looks at a gradient that is really there
    torch.testing.assert_close(unfrozen.W_dec.grad, frozen.W_dec.grad + grad_W_dec_aux)
    torch.testing.assert_close(unfrozen.b_dec.grad, frozen.b_dec.grad + grad_b_dec_aux)
    torch.testing.assert_close(unfrozen.W_enc.grad, frozen.W_enc.grad)


def test_without_r_mag_the_magnitude_path_is_the_gate_path_plus_a_bias():
    sae = _sae(learn_r_mag=False)
    assert not sae.r_mag.requires_grad and torch.count_nonzero(sae.r_mag) == 0
    x = _data()
    proj = (x - sae.b_dec) @ sae.W_enc
    expected = (proj + sae.b_gate > 0) * (proj + sae.b_mag).relu()
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae.jumprelu_threshold(), sae.b_mag - sae.b_gate)
    assert 0 < (expected > 0).float().mean() < 1


@pytest.mark.parametrize("learn_r_mag", [True, False])
def test_training_moves_r_mag_only_when_it_is_learnt(learn_r_mag, one_thread):
    sae = GatedSAE(GatedConfig(d_in=8, d_sae=20, learn_r_mag=learn_r_mag))
    W_enc_before = sae.W_enc.detach().clone()
    stream = [_data(seed=s) for s in range(5)]
    Trainer(sae, TrainConfig(total_steps=5, lr=1e-2, warmup_steps=0, progress_bar=False)).fit(stream)
    assert not torch.allclose(sae.W_enc, W_enc_before)
    assert (torch.count_nonzero(sae.r_mag) > 0) == learn_r_mag


def test_ablated_sae_saves_in_the_gated_format_and_loads_back(tmp_path):
    sae = _sae(learn_r_mag=False, freeze_aux_decoder=False)
    io.save(sae, tmp_path / "sae")
    loaded = io.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and not loaded.cfg.learn_r_mag and not loaded.cfg.freeze_aux_decoder
    assert not loaded.r_mag.requires_grad
    torch.testing.assert_close(loaded.r_mag, torch.zeros(20))  # saved as zeros for SAELens' key set
    torch.testing.assert_close(loaded.encode(_data()), sae.encode(_data()))


@pytest.mark.parametrize("field", ["learn_r_mag", "freeze_aux_decoder"])
def test_non_boolean_switches_are_refused(field):
    with pytest.raises(ValueError, match=f"{field}='no' must be true or false"):
        make_config("gated", d_in=8, d_sae=20, **{field: "no"})
