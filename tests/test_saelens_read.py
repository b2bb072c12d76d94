"""Folders written by SAELens (6.x) load with SAELens' own codes and reconstructions.

Each folder is built by hand as SAELens writes it (cfg.json with SAELens' keys, sae_weights.safetensors
with SAELens' tensor names), with seeded random weights and a clearly non-zero b_enc. The reference is
SAELens' computation written out below in plain torch, from SAELens' source (saes/sae.py
``process_sae_in``, topk_sae.py, standard_sae.py, gated_sae.py, jumprelu_sae.py, batchtopk_sae.py),
never through the workbench: every case compares all active latent ids of every token, and values and
reconstructions to 1e-5.
"""
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from workbench import io

D, F, K = 16, 64, 6
METADATA = {"sae_lens_version": "6.54.0", "sae_lens_training_version": "6.54.0", "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_post", "context_size": 128, "prepend_bos": True,
            "dataset_path": "monology/pile-uncopyrighted"}


def _weights(arch, seed=0, decoder_norms=False):
    """Trained-like SAELens tensors: non-zero biases everywhere; decoder rows of norm 0.2 to 3 when
    ``decoder_norms`` (SAELens' TopK trains with rescale_acts_by_decoder_norm and unnormalised rows)."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, D, generator=gen)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    if decoder_norms:
        W_dec = W_dec * (0.2 + 2.8 * torch.rand(F, 1, generator=gen))
    tensors = {"W_enc": torch.randn(D, F, generator=gen) * 0.5, "W_dec": W_dec,
               "b_dec": torch.randn(D, generator=gen)}
    if arch == "gated":
        tensors.update(b_gate=torch.randn(F, generator=gen) * 0.5, b_mag=torch.randn(F, generator=gen) * 0.5,
                       r_mag=torch.randn(F, generator=gen) * 0.3)
    else:
        tensors["b_enc"] = torch.randn(F, generator=gen) * 0.5 + 0.3
    if arch == "jumprelu":
        theta = torch.rand(F, generator=gen) * 1.5
        theta[:8] = torch.tensor([0.0, -0.3, 0.0, -1.0, 0.0, -0.01, 0.0, -2.0])  # SAELens uses relu(theta)
        tensors["threshold"] = theta
    if arch == "batchtopk":
        tensors["topk_threshold"] = torch.tensor(0.4, dtype=torch.float64)
    return tensors


def _write(folder, arch, tensors, **fields):
    """A folder as SAELens 6 writes it: no workbench keys."""
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": METADATA, **fields}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _saelens_reference(arch, cfg, W, x_BD, scaling_factor=None):
    """SAELens' feature activations (dense) and reconstruction of raw activations ``x_BD``."""
    W = {name: t.double() for name, t in W.items()}
    x = x_BD.double() * (scaling_factor or 1.0)  # the trainer's ActivationScaler
    sae_in = x - W["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    norms_F = W["W_dec"].norm(dim=-1)
    if arch == "standard":
        z = torch.relu(sae_in @ W["W_enc"] + W["b_enc"])
    elif arch == "topk":
        pre = sae_in @ W["W_enc"] + W["b_enc"]
        if rescale:
            pre = pre * norms_F
        vals, idx = pre.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif arch == "jumprelu":
        pre = sae_in @ W["W_enc"] + W["b_enc"]
        z = pre.relu() * (pre > W["threshold"].relu())
    elif arch == "batchtopk":  # as SAELens exports it for inference: a JumpReLU at topk_threshold
        pre = sae_in @ W["W_enc"] + W["b_enc"]
        if rescale:
            pre = pre * norms_F
        z = pre.relu() * (pre > W["topk_threshold"].relu())
    elif arch == "gated":
        gate = (sae_in @ W["W_enc"] + W["b_gate"] > 0).double()
        z = gate * torch.relu(sae_in @ (W["W_enc"] * W["r_mag"].exp()) + W["b_mag"])
    else:
        raise AssertionError(arch)
    acts = z / norms_F if rescale else z
    recon = acts @ W["W_dec"] + W["b_dec"]
    if scaling_factor is not None:
        recon = recon / scaling_factor
    return z.float(), recon.float()


def _assert_same_as_saelens(folder, arch, cfg, W, scaling_factor=None):
    sae = io.load(folder)
    x_BD = torch.randn(200, D, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    z_ref, recon_ref = _saelens_reference(arch, cfg, W, x_BD, scaling_factor)
    out = sae(x_BD)
    z = out.code.dense()
    same_ids = ((z > 0) == (z_ref > 0)).all(-1)
    assert bool(same_ids.all()), f"{int((~same_ids).sum())} of {len(x_BD)} tokens get other active latents"
    assert int((z_ref > 0).sum()) > len(x_BD)  # the comparison is not of empty codes
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon_BD, recon_ref, atol=1e-5, rtol=1e-5)
    return sae


def test_topk_applies_b_enc(tmp_path):
    W = _weights("topk")
    cfg = {"k": K}
    sae = _assert_same_as_saelens(_write(tmp_path, "topk", W, **cfg), "topk", cfg, W)
    assert sae.cfg.latent_bias


def test_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    W = _weights("topk", decoder_norms=True)
    cfg = {"k": K, "rescale_acts_by_decoder_norm": True}
    sae = _assert_same_as_saelens(_write(tmp_path, "topk", W, **cfg), "topk", cfg, W)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(F))


def test_standard_without_b_dec_on_the_input(tmp_path):
    W = _weights("standard")
    cfg = {"apply_b_dec_to_input": False}
    _assert_same_as_saelens(_write(tmp_path, "standard", W, **cfg), "standard", cfg, W)


def test_topk_without_b_dec_on_the_input_and_rescaled(tmp_path):
    W = _weights("topk", seed=3, decoder_norms=True)
    cfg = {"k": K, "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}
    _assert_same_as_saelens(_write(tmp_path, "topk", W, **cfg), "topk", cfg, W)


def test_gated_without_b_dec_on_the_input(tmp_path):
    W = _weights("gated", seed=4)
    cfg = {"apply_b_dec_to_input": False}
    _assert_same_as_saelens(_write(tmp_path, "gated", W, **cfg), "gated", cfg, W)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_jumprelu_with_saelens_thresholds(apply_b_dec, tmp_path):
    W = _weights("jumprelu", seed=5)
    cfg = {"apply_b_dec_to_input": apply_b_dec}
    _assert_same_as_saelens(_write(tmp_path, "jumprelu", W, **cfg), "jumprelu", cfg, W)


def test_jumprelu_checkpoint_with_log_threshold(tmp_path):
    W = _weights("jumprelu", seed=5)
    W["threshold"] = W["threshold"].abs() + 0.05
    saved = {**{n: t for n, t in W.items() if n != "threshold"}, "log_threshold": W["threshold"].log()}
    cfg = {"apply_b_dec_to_input": False}
    _assert_same_as_saelens(_write(tmp_path, "jumprelu", saved, **cfg), "jumprelu", cfg,
                            {**saved, "threshold": saved["log_threshold"].exp()})


def test_batchtopk_training_checkpoint(tmp_path):
    W = _weights("batchtopk", seed=6, decoder_norms=True)
    cfg = {"k": 6.0, "topk_threshold_lr": 0.01, "rescale_acts_by_decoder_norm": True}
    sae = _assert_same_as_saelens(_write(tmp_path, "batchtopk", W, **cfg), "batchtopk", cfg, W)
    assert type(sae).__name__ == "BatchTopKSAE" and sae.cfg.k == 6


def test_expected_average_only_in_folds_the_scaler_beside_it(tmp_path):
    W = _weights("topk", seed=8)
    cfg = {"k": K, "normalize_activations": "expected_average_only_in"}
    folder = _write(tmp_path, "topk", W, **cfg)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37, "has_whitening": False}))
    _assert_same_as_saelens(folder, "topk", cfg, W, scaling_factor=0.37)


def test_expected_average_only_in_without_its_scale_is_refused(tmp_path):
    folder = _write(tmp_path, "topk", _weights("topk"), k=K, normalize_activations="expected_average_only_in")
    with pytest.raises(ValueError, match=r"normalize_activations='expected_average_only_in'.*activation_scaler\.json"):
        io.load(folder)


@pytest.mark.parametrize("value", ["layer_norm", "constant_norm_rescale"])
def test_per_token_normalisation_is_refused(value, tmp_path):
    folder = _write(tmp_path, "standard", _weights("standard"), normalize_activations=value)
    with pytest.raises(ValueError, match=f"normalize_activations={value!r}"):
        io.load(folder)


def test_reshape_activations_is_refused(tmp_path):
    folder = _write(tmp_path, "standard", _weights("standard"), reshape_activations="hook_z")
    with pytest.raises(ValueError, match="reshape_activations='hook_z'"):
        io.load(folder)


def test_unknown_architecture_lists_the_known_ones(tmp_path):
    folder = _write(tmp_path, "jumprelu_transcoder", _weights("jumprelu"))
    with pytest.raises(ValueError, match="'jumprelu_transcoder'") as err:
        io.load(folder)
    message = str(err.value)
    assert "\n" not in message
    for name in ("standard", "topk", "gated", "jumprelu", "batchtopk"):
        assert f"'{name}'" in message


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_as_float32_with_a_warning(dtype, tmp_path):
    W = {name: t.to(dtype) for name, t in _weights("topk", seed=9).items()}
    cfg = {"k": K}
    folder = _write(tmp_path, "topk", W, dtype=str(dtype).removeprefix("torch."), **cfg)
    with pytest.warns(UserWarning, match=f"{str(dtype).removeprefix('torch.')}.*float32") as record:
        sae = _assert_same_as_saelens(folder, "topk", cfg, {n: t.float() for n, t in W.items()})
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert all(p.dtype == torch.float32 for p in sae.parameters())


def test_float32_folder_loads_without_a_warning(tmp_path):
    folder = _write(tmp_path, "topk", _weights("topk"), k=K)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.load(folder)


def test_saelens_5_activation_function_is_refused(tmp_path):
    folder = _write(tmp_path, "standard", _weights("topk"), activation_fn_str="topk", activation_fn_kwargs={"k": K})
    with pytest.raises(ValueError, match="activation_fn_str='topk' is a SAELens 5 folder"):
        io.load(folder)


def test_switch_reading_x_itself_is_refused(tmp_path):
    """A Switch folder with apply_b_dec_to_input false (its experts read x, not x - b_dec) would load
    computing on x - b_dec: b_dec cannot be folded into experts without an encoder bias."""
    from workbench.saes import build_sae, make_config
    folder = io.save(build_sae(make_config("switch", d_in=D, d_sae=F, k=2, n_experts=4)), tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: apply_b_dec_to_input=false is not supported "
                                         r"for a Switch SAE"):
        io.load(folder)
