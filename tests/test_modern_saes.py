"""BatchTopK, JumpReLU and Matryoshka BatchTopK against their papers' formulas, written out densely
here: forward, every loss term, the gradients (JumpReLU's straight-through ones), BatchTopK's
threshold, the SAELens "jumprelu" folders they are saved as, and bad configs."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench import io
from workbench.saes import (BatchTopKConfig, BatchTopKSAE, JumpReLUConfig, JumpReLUSAE, MatryoshkaConfig,
                            MatryoshkaSAE, build_sae, make_config)
from workbench.saes import topk as topk_module

D, F, B = 16, 64, 40
ATOL = RTOL = 1e-5


def _data(n=B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 2 + 0.3


def _perturb_(sae, seed=1, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return sae


def _grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


# --- BatchTopK ----------------------------------------------------------------------------------

def _batchtopk_reference(sae, x_BD, dead_F, k_aux):
    """Bussmann et al.: ReLU(pre), keep the k*B largest entries of the whole batch; FVU; AuxK as Gao
    et al. (top-k_aux of the dead latents' pre-activations per token, decoded without b_pre)."""
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc
    vals_N, flat_N = pre_BF.relu().flatten().topk(sae.cfg.k * x_BD.shape[0])
    z_BF = torch.zeros(pre_BF.numel()).scatter(0, flat_N, vals_N).view_as(pre_BF)
    recon_BD = z_BF @ sae.W_dec + sae.b_dec
    fvu = (x_BD - recon_BD).pow(2).sum(-1).mean() / (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
    e_BD = (x_BD - recon_BD).detach()
    aux_vals, aux_idx = pre_BF.masked_fill(~dead_F, -math.inf).topk(k_aux, dim=-1)
    e_hat_BD = torch.zeros_like(pre_BF).scatter(1, aux_idx, aux_vals.relu()) @ sae.W_dec
    auxk = (e_BD - e_hat_BD).pow(2).sum(-1).mean() / (e_BD - e_BD.mean(0)).pow(2).sum(-1).mean() / 32
    return recon_BD, z_BF, {"fvu": fvu, "auxk": auxk}


@pytest.mark.parametrize("chunk_rows", [None, 7])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_batchtopk_matches_the_dense_reference(k, chunk_rows, monkeypatch):
    """Outputs, both loss terms and every gradient; also with the encoder run in chunks of 7 rows
    (each chunk's own top k*B candidates, then the batch's)."""
    if chunk_rows is not None:
        monkeypatch.setattr(topk_module, "_CHUNK_ELEMENTS", chunk_rows * F)
    sae = _perturb_(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=k, k_aux=5))).train()
    x_BD = _data()
    dead_F = torch.arange(F) % 4 == 0
    out = sae(x_BD, dead_mask=dead_F)
    sum(out.losses.values()).backward()
    grads = _grads(sae)
    sae.zero_grad(set_to_none=True)
    recon_ref, z_ref, losses_ref = _batchtopk_reference(sae, x_BD, dead_F, k_aux=5)
    sum(losses_ref.values()).backward()
    _close(out.recon_BD, recon_ref, "recon")
    _close(out.code.dense(), z_ref, "code")
    for name in ("fvu", "auxk"):
        _close(out.losses[name], losses_ref[name], name)
    assert set(grads) == {"W_enc", "W_dec", "b_dec"}
    for name, grad in grads.items():
        _close(grad, dict(sae.named_parameters())[name].grad, f"grad {name}")


def test_batchtopk_finds_every_kept_entry_of_a_token_that_needs_more_than_4k():
    """Each token offers 4k candidates; one far louder than the rest takes more than that, and the
    selection must still equal the dense one (its row is searched again whole)."""
    sae = _perturb_(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=2))).train()
    x_BD = _data()
    x_BD[5] *= 50
    dead_F = torch.zeros(F, dtype=torch.bool)
    out = sae(x_BD, dead_mask=dead_F)
    _, z_ref, losses_ref = _batchtopk_reference(sae, x_BD, dead_F, k_aux=1)
    assert int(out.code.l0()[5]) > 4 * 2
    _close(out.code.dense(), z_ref, "code")
    _close(out.losses["fvu"], losses_ref["fvu"], "fvu")


def test_batchtopk_l0_is_k_on_average_and_varies_per_token():
    sae = _perturb_(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=5))).train()
    x_BD = _data(n=64)
    x_BD[:8] *= 4  # louder tokens take more of the batch's budget
    l0_B = sae(x_BD).code.l0()
    assert l0_B.float().mean().item() == 5.0
    assert l0_B[:8].float().mean() > l0_B[8:].float().mean() and l0_B.max() > 5 and l0_B.min() < 5


def test_batchtopk_threshold_is_the_running_mean_of_the_smallest_kept_activation():
    sae = _perturb_(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=4, threshold_momentum=0.9))).train()
    assert float(sae.threshold) == 0.0

    def smallest_kept(x_BD):
        pre = (x_BD - sae.b_dec) @ sae.W_enc
        return pre.relu().flatten().topk(4 * x_BD.shape[0]).values.min().item()

    x1, x2 = _data(seed=1), _data(seed=2)
    m1 = smallest_kept(x1)
    sae(x1)
    assert float(sae.threshold) == pytest.approx(m1)  # the first batch sets it
    m2 = smallest_kept(x2)
    sae(x2)
    assert float(sae.threshold) == pytest.approx(0.9 * m1 + 0.1 * m2)
    sae.eval()(x1)
    assert float(sae.threshold) == pytest.approx(0.9 * m1 + 0.1 * m2)  # evaluation does not move it


def test_batchtopk_encodes_each_token_alone_with_its_threshold_at_inference():
    sae = _perturb_(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=4)))
    with torch.no_grad():
        sae.threshold.fill_(0.8)
    sae.eval()
    x_BD = _data()
    pre = (x_BD - sae.b_dec) @ sae.W_enc
    expected = pre.relu() * (pre > 0.8)
    _close(sae.encode(x_BD), expected, "thresholded code")
    _close(sae(x_BD).code.dense(), expected, "eval forward")
    _close(sae.encode(x_BD[3:4]), expected[3:4], "one token alone")  # no dependence on the batch
    assert 0 < (expected > 0).sum(-1).float().mean() < F


def test_batchtopk_is_saved_as_saelens_jumprelu_and_read_back(tmp_path):
    sae = _perturb_(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=4)))
    with torch.no_grad():
        sae.threshold.fill_(0.7)
    io.save(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and cfg["workbench_architecture"] == "batchtopk"
    assert cfg["apply_b_dec_to_input"] is True
    assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    assert torch.equal(tensors["threshold"], torch.full((F,), 0.7))
    # SAELens' JumpReLU inference on those tensors, written out: ReLU(pre) * 1[pre > threshold].
    x_BD = _data()
    pre = (x_BD - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    saelens_BD = (pre.relu() * (pre > tensors["threshold"])) @ tensors["W_dec"] + tensors["b_dec"]
    loaded = io.load(tmp_path)
    assert isinstance(loaded, BatchTopKSAE) and float(loaded.threshold) == pytest.approx(0.7)
    with torch.no_grad():
        _close(loaded(x_BD).recon_BD, saelens_BD, "SAELens jumprelu forward")
        _close(sae.eval()(x_BD).recon_BD, saelens_BD, "our inference")


def test_batchtopk_refuses_per_latent_thresholds(tmp_path):
    io.save(BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=F, k=4)), tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({**tensors, "threshold": torch.linspace(0.1, 1, F)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="thresholds differ between latents; load the folder as architecture"):
        io.load(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["workbench_architecture"]  # as SAELens would write it: then it is a JumpReLU SAE
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert isinstance(io.load(tmp_path), JumpReLUSAE)


# --- Matryoshka ----------------------------------------------------------------------------------

def test_matryoshka_loss_sums_every_prefix_reconstruction():
    """L = sum over prefixes m of ||x - (z[:, :m] W_dec[:m] + b_pre)||^2 / Var(x), z the BatchTopK
    code; the full width is "fvu", the inner prefixes "prefix_fvu"; gradients of the whole sum."""
    widths = [8, 16, 32, 64]
    sae = _perturb_(MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=F, k=4, matryoshka_widths=widths))).train()
    x_BD = _data()
    out = sae(x_BD)
    sum(out.losses.values()).backward()
    grads = _grads(sae)
    sae.zero_grad(set_to_none=True)

    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc
    vals_N, flat_N = pre_BF.relu().flatten().topk(4 * B)
    z_BF = torch.zeros(pre_BF.numel()).scatter(0, flat_N, vals_N).view_as(pre_BF)
    var = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
    sq_err = [(x_BD - (z_BF[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1) for m in widths]
    fvus = [e.mean() / var for e in sq_err]
    (sum(fvus)).backward()

    _close(out.losses["fvu"], fvus[-1], "full-width fvu")
    _close(out.losses["prefix_fvu"], sum(fvus[:-1]), "prefix fvu")
    assert set(out.losses) == {"fvu", "prefix_fvu", "auxk"} and out.losses["auxk"] == 0  # no dead latents
    for name, grad in grads.items():
        _close(grad, dict(sae.named_parameters())[name].grad, f"grad {name}")
    prefix_mse = sae.summarize_metrics(out.metrics, B)["prefix_mse"]
    assert prefix_mse == pytest.approx([(e.sum() / (B * D)).item() for e in sq_err], rel=1e-5)


def test_matryoshka_latent_groups_are_prefix_levels():
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=D, d_sae=F, k=2))
    assert sae.cfg.widths == [4, 8, 16, 32, 64]  # d_sae/16 ... d_sae
    groups = sae.latent_groups()
    assert groups.kind == "level"
    assert groups.group_F.tolist() == [0] * 4 + [1] * 4 + [2] * 8 + [3] * 16 + [4] * 32


# --- JumpReLU ------------------------------------------------------------------------------------

def _jumprelu(apply_b_dec=False, eps=0.05, lam=0.3):
    sae = JumpReLUSAE(JumpReLUConfig(d_in=D, d_sae=F, bandwidth=eps, init_threshold=0.5, l0_coefficient=lam,
                                     l0_warmup_steps=0, apply_b_dec_to_input=apply_b_dec))
    _perturb_(sae, scale=0.3)
    with torch.no_grad():
        sae.W_enc.mul_(4)  # pre-activations of a few units, so the threshold splits them
    return sae.train()


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_jumprelu_forward_and_loss_terms(apply_b_dec):
    sae = _jumprelu(apply_b_dec)
    x_BD = _data()
    out = sae(x_BD)
    pi = (x_BD - sae.b_dec if apply_b_dec else x_BD) @ sae.W_enc + sae.b_enc
    theta = sae.log_threshold.exp()
    f = pi * (pi > theta)
    _close(out.code.dense(), f, "code")
    _close(sae.encode(x_BD), f, "encode")
    _close(out.recon_BD, f @ sae.W_dec + sae.b_dec, "recon")
    _close(out.losses["l2"], (x_BD - out.recon_BD).pow(2).mean(), "l2 (mean over d)")
    _close(out.losses["l0"], 0.3 * (pi > theta).float().sum(-1).mean(), "lambda * L0")
    assert 0 < (f > 0).float().mean() < 1


def test_jumprelu_straight_through_gradients():
    """With g = dL/df: dL/dtheta = sum_b -(theta/eps) K((pi - theta)/eps) g - (lambda/B) sum_b (1/eps) K(...),
    dL/dlog(theta) = theta * dL/dtheta; the pre-activations get H(pi - theta) g and nothing from L0."""
    eps, lam = 0.05, 0.3
    sae = _jumprelu(eps=eps, lam=lam)
    x_BD = _data()
    g_BF = torch.randn(B, F, generator=torch.Generator().manual_seed(5))
    out = sae(x_BD)
    ((out.code.acts * g_BF).sum() + out.losses["l0"]).backward()

    with torch.no_grad():
        pi = x_BD @ sae.W_enc + sae.b_enc
        theta = sae.log_threshold.exp()
        kernel = ((pi - theta) / eps).abs().lt(0.5).float()
        d_theta = (-(theta / eps) * kernel * g_BF).sum(0) - lam / B * (kernel / eps).sum(0)
        d_b_enc = ((pi > theta).float() * g_BF).sum(0)
    assert kernel.sum() > 0  # some pre-activations fall inside the kernel
    _close(sae.log_threshold.grad, theta * d_theta, "log_threshold")
    _close(sae.b_enc.grad, d_b_enc, "b_enc")
    _close(sae.W_enc.grad, x_BD.t() @ ((pi > theta).float() * g_BF), "W_enc")


def test_jumprelu_l0_penalty_warms_up():
    sae = JumpReLUSAE(JumpReLUConfig(d_in=D, d_sae=F, l0_coefficient=2.0, l0_warmup_steps=10)).train()
    x_BD = _data()
    sae.on_step(4)
    half = sae(x_BD).losses["l0"]
    sae.on_step(50)
    _close(half, sae(x_BD).losses["l0"] / 2, "l0 at half warm-up")


def test_jumprelu_defaults_scale_with_the_activations():
    cfg = JumpReLUConfig(d_in=384, d_sae=1024)
    assert cfg.epsilon == pytest.approx(0.001 * math.sqrt(384)) and cfg.theta_0 == cfg.epsilon
    assert torch.allclose(JumpReLUSAE(cfg).threshold, torch.full((1024,), cfg.theta_0))


def test_jumprelu_saelens_folder_round_trip(tmp_path):
    sae = _jumprelu(apply_b_dec=False).eval()
    io.save(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    assert "workbench_architecture" not in cfg and "log_threshold" not in tensors
    _close(tensors["threshold"], sae.threshold.detach(), "threshold")
    loaded = io.load(tmp_path)
    x_BD = _data()
    with torch.no_grad():
        _close(loaded(x_BD).recon_BD, sae(x_BD).recon_BD, "round trip")
    save_file({**tensors, "threshold": torch.zeros(F)}, str(tmp_path / "sae_weights.safetensors"))
    relu_like = io.load(tmp_path)  # SAELens encodes with relu(threshold): a threshold of 0 is a plain ReLU
    _close(relu_like.encode(x_BD), (x_BD @ tensors["W_enc"] + tensors["b_enc"]).relu(), "threshold 0")


# --- Configs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, fields, message", [
    ("batchtopk", dict(k=64), "k=64 must be smaller than the number of latents"),
    ("batchtopk", dict(k=4, threshold_momentum=1.0), "threshold_momentum=1.0 must be in [0, 1)"),
    ("matryoshka_batchtopk", dict(k=4, matryoshka_widths=[16, 8, 64]), "must be strictly increasing"),
    ("matryoshka_batchtopk", dict(k=4, matryoshka_widths=[8, 24, 64]), "[24] do not divide d_sae=64"),
    ("matryoshka_batchtopk", dict(k=4, matryoshka_widths=[8, 32]), "must end with d_sae=64"),
    ("matryoshka_batchtopk", dict(k=16, matryoshka_widths=[8, 64]), "smallest prefix (8 latents) is narrower than k=16"),
    ("matryoshka_batchtopk", dict(d_sae=72, k=4), "d_sae=72 is not divisible by 16"),
    ("jumprelu", dict(bandwidth=0.0), "bandwidth=0.0 must be a positive number"),
    ("jumprelu", dict(init_threshold=-1), "init_threshold=-1 must be a positive number"),
    ("jumprelu", dict(l0_coefficient=-0.1), "l0_coefficient=-0.1 must be a number >= 0"),
    ("jumprelu", dict(l2_reduction="max"), "l2_reduction='max'"),
])
def test_bad_configs_are_one_line_errors(arch, fields, message):
    with pytest.raises(ValueError) as err:
        build_sae(make_config(arch, **{"d_in": D, "d_sae": F, **fields}))
    assert message in str(err.value) and "\n" not in str(err.value)
