"""Saved SAE folders: exact round trips, SAELens keys and shapes, clear errors for bad folders."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench import io
from workbench.saes import build_sae, make_config

CONFIGS = {
    "relu": dict(d_in=12, d_sae=40),
    "topk": dict(d_in=12, d_sae=40, k=5, latent_bias=True),
    "gated": dict(d_in=12, d_sae=40, l1_coefficient=0.1),
    "switch": dict(d_in=12, d_sae=40, k=3, n_experts=4, gate="heaviside"),
}
SAELENS_KEYS = {
    "relu": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
    "gated": {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"},
    "switch": {"W_enc", "W_dec", "b_enc", "b_dec", "W_router", "b_router"},
}


def _trained_like(arch):
    sae = build_sae(make_config(arch, **CONFIGS[arch]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return sae


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_round_trip_rebuilds_the_exact_module(arch, tmp_path):
    sae = _trained_like(arch)
    io.save(sae, tmp_path / "sae", metadata={"site": "resid_post.3"})
    loaded = io.load(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[name]), name
    x = torch.randn(7, 12)
    assert torch.equal(sae.eval()(x).recon_BD, loaded(x).recon_BD)
    assert io.read_config(tmp_path / "sae")["metadata"] == {
        "site": "resid_post.3", "hook_name": "blocks.3.hook_resid_post", "sae_lens_version": "6.0.0",
        "sae_lens_training_version": None, "workbench_version": "0.1.0"}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_folder_uses_saelens_names_and_shapes(arch, tmp_path):
    io.save(_trained_like(arch), tmp_path)
    tensors = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert set(tensors) == SAELENS_KEYS[arch]
    assert tensors["W_enc"].shape == (12, 40) and tensors["W_dec"].shape == (40, 12)
    assert tensors["b_dec"].shape == (12,)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
    assert (cfg["d_in"], cfg["d_sae"]) == (12, 40)
    if arch == "switch":
        assert tensors["W_router"].shape == (12, 4) and tensors["b_router"].shape == (12,)


def test_weights_are_safetensors_not_pickle(tmp_path):
    io.save(_trained_like("topk"), tmp_path)
    raw = (tmp_path / "sae_weights.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])  # a JSON header: safetensors, never a pickle stream
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SAE folder at"):
        io.load(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="is not an SAE folder: it has no cfg.json"):
        io.load(tmp_path)


def test_truncated_weights(tmp_path):
    io.save(_trained_like("gated"), tmp_path)
    path = tmp_path / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is corrupt or truncated"):
        io.load(tmp_path)


def test_damaged_config(tmp_path):
    io.save(_trained_like("relu"), tmp_path)
    (tmp_path / "cfg.json").write_text('{"architecture": "standard", "d_in": 12,')
    with pytest.raises(ValueError, match="is not valid JSON"):
        io.load(tmp_path)


def test_foreign_architecture(tmp_path):
    io.save(_trained_like("relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "transcoder"}))
    with pytest.raises(ValueError, match="architecture 'transcoder' is not one this workbench can load"):
        io.load(tmp_path)


def test_weights_of_another_architecture(tmp_path):
    io.save(_trained_like("topk"), tmp_path)
    gated = {k: v for k, v in load_file(str(tmp_path / "sae_weights.safetensors")).items() if k != "b_enc"}
    save_file({**gated, "b_gate": torch.zeros(40)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"does not match a topk SAE: missing \['b_enc'\], unexpected \['b_gate'\]"):
        io.load(tmp_path)


def test_shape_mismatch(tmp_path):
    io.save(_trained_like("topk"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 80}))
    with pytest.raises(ValueError, match=r"W_enc has shape \(12, 40\), but cfg.json implies \(12, 80\)"):
        io.load(tmp_path)


def test_config_with_invalid_values(tmp_path):
    io.save(_trained_like("switch"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "n_experts": 3}))
    with pytest.raises(ValueError, match="does not describe a valid SAE: d_sae=40 is not divisible by n_experts=3"):
        io.load(tmp_path)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_folded_scale_reads_raw_activations(arch, tmp_path):
    sae = _trained_like(arch).eval()
    scale = 0.37
    x_raw = torch.randn(9, 12) * 5
    trained_view = sae(scale * x_raw)
    io.save(sae, tmp_path, input_scale=scale)
    loaded = io.load(tmp_path)
    raw_view = loaded(x_raw)
    torch.testing.assert_close(raw_view.code.dense(), trained_view.code.dense(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(raw_view.recon_BD, trained_view.recon_BD / scale, atol=1e-4, rtol=1e-5)
    assert io.read_config(tmp_path)["metadata"]["folded_input_scale"] == scale
