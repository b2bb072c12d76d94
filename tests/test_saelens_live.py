"""Live round trips with the real SAELens (the ``saelens`` extra), both ways.

Workbench folders load with ``sae_lens.SAE.load_from_disk`` (Switch through ``workbench.saelens_plugin``)
and compute exactly our codes and reconstructions; folders SAELens writes survive io.load -> io.save with
all their metadata and SAELens' codes.
"""
import importlib
import json
import sys

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="the saelens extra is not installed: pip install -e '.[saelens]'")

from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes.sae import SAEMetadata

import workbench.saelens_plugin as plugin
from workbench import io
from workbench.saes import ARCHITECTURES, build_sae, make_config

D, F = 16, 64
METADATA = {"model": "gpt2", "site": "resid_post.8", "context_length": 128}
CONFIGS = {
    "relu": dict(d_in=D, d_sae=F),
    "topk": dict(d_in=D, d_sae=F, k=5, latent_bias=True),
    "gated": dict(d_in=D, d_sae=F),
    "switch": dict(d_in=D, d_sae=F, k=3, n_experts=4),
    "switch-heaviside": dict(d_in=D, d_sae=F, k=3, n_experts=4, gate="heaviside"),
    "batchtopk": dict(d_in=D, d_sae=F, k=5),
    "jumprelu": dict(d_in=D, d_sae=F),
    "jumprelu-b_dec": dict(d_in=D, d_sae=F, apply_b_dec_to_input=True),
    "matryoshka_batchtopk": dict(d_in=D, d_sae=F, k=4),
}


def _trained_like(case):
    """Seeded noise on every trained parameter (frozen ones, such as a TopK SAE's unused b_enc, stay as
    training leaves them) and a positive BatchTopK threshold."""
    sae = build_sae(make_config(case.split("-")[0], **CONFIGS[case]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        for b in sae.buffers():
            b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) * 0.5 + 0.2)
    return sae.eval()


def _x(*lead):
    return torch.randn(*lead, D, generator=torch.Generator().manual_seed(7)) * 2 + 0.5


def _assert_same_codes(z, z_ref, recon, recon_ref):
    same_ids = ((z > 0) == (z_ref > 0)).all(-1)
    assert bool(same_ids.all()), f"{int((~same_ids).sum())} of {len(z)} tokens get other active latents"
    assert int((z_ref > 0).sum()) > len(z_ref)  # the comparison is not of empty codes
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon, recon_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_workbench_folder_loads_in_saelens_with_our_codes(case, tmp_path):
    arch = case.split("-")[0]
    sae = _trained_like(case)
    io.save(sae, tmp_path, metadata=METADATA)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == (ARCHITECTURES[arch][0].saelens_architecture or arch)

    x = _x(300)
    out = sae(x)
    with torch.no_grad():
        z = theirs.encode(x)
        recon = theirs.decode(z)
    _assert_same_codes(z, out.code.dense(), recon, out.recon_BD)

    meta = theirs.cfg.metadata
    assert (meta.model_name, meta.hook_name, meta.context_size) == ("gpt2", "blocks.8.hook_resid_post", 128)
    assert (meta["model"], meta["site"], meta["context_length"]) == ("gpt2", "resid_post.8", 128)


def test_every_architecture_is_covered():
    assert {case.split("-")[0] for case in CONFIGS} == set(ARCHITECTURES)


def test_switch_in_saelens_is_differentiable_and_takes_any_leading_dims(tmp_path):
    sae = _trained_like("switch")
    io.save(sae, tmp_path, metadata=METADATA)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert isinstance(theirs, plugin.SwitchSAE)
    x_BSD = _x(6, 50)
    with torch.no_grad():
        z_ref = theirs.encode(x_BSD.reshape(-1, D))
    z = theirs.encode(x_BSD)  # with gradients: our forward's code
    assert z.shape == (6, 50, F) and z.requires_grad
    torch.testing.assert_close(z.reshape(-1, F), z_ref, atol=0, rtol=0)
    theirs(x_BSD).pow(2).sum().backward()
    for name in ("W_enc", "W_dec", "b_dec", "W_router", "b_router"):
        grad = getattr(theirs, name).grad
        assert grad is not None and bool(grad.abs().sum() > 0), name


def test_saelens_writes_switch_folders_the_workbench_reads(tmp_path):
    sae = _trained_like("switch-heaviside")
    io.save(sae, tmp_path / "ours", metadata=METADATA)
    sae_lens.SAE.load_from_disk(tmp_path / "ours").save_model(tmp_path / "theirs")
    back = io.load(tmp_path / "theirs")
    assert back.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert torch.equal(p, dict(back.named_parameters())[name]), name
    assert back.metadata["site"] == "resid_post.8"


def test_switch_folds_an_input_scale_into_the_router_too(tmp_path):
    sae = _trained_like("switch")
    io.save(sae, tmp_path, metadata=METADATA)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    theirs.fold_activation_norm_scaling_factor(0.37)
    x = _x(200)
    out = sae(0.37 * x)
    with torch.no_grad():
        z = theirs.encode(x)
        recon = theirs.decode(z)
    _assert_same_codes(z, out.code.dense(), recon * 0.37, out.recon_BD)
    with pytest.raises(NotImplementedError, match="TopK"):
        theirs.fold_W_dec_norm()


def test_invalid_switch_config_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="d_sae=40 is not divisible by n_experts=3"):
        plugin.SwitchSAEConfig(d_in=12, d_sae=40, n_experts=3)


SAELENS_METADATA = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "context_size": 128,
                    "prepend_bos": False, "dataset_path": "monology/pile-uncopyrighted",
                    "neuronpedia_id": "gpt2-small/3-res-test", "our_lab_run": {"id": 17, "tags": ["a", "b"]}}
SAELENS_SAES = {
    "standard": lambda meta: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=F, metadata=meta)),
    "standard-uncentred": lambda meta: sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False, metadata=meta)),
    "topk": lambda meta: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=F, k=6, metadata=meta)),
    "topk-rescaled": lambda meta: sae_lens.TopKSAE(
        sae_lens.TopKSAEConfig(d_in=D, d_sae=F, k=6, rescale_acts_by_decoder_norm=True, metadata=meta)),
    "gated": lambda meta: sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D, d_sae=F, metadata=meta)),
    "jumprelu": lambda meta: sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=F, metadata=meta)),
    "jumprelu-uncentred": lambda meta: sae_lens.JumpReLUSAE(
        sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False, metadata=meta)),
}


@pytest.mark.parametrize("case", sorted(SAELENS_SAES))
def test_saelens_folder_survives_workbench_load_and_save(case, tmp_path):
    original = SAELENS_SAES[case](SAEMetadata(**SAELENS_METADATA))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if name == "W_dec":  # rows of norm 0.2 to 3, as SAELens' TopK trains them
                W = torch.randn(p.shape, generator=gen)
                p.copy_(W / W.norm(dim=-1, keepdim=True) * (0.2 + 2.8 * torch.rand(F, 1, generator=gen)))
            elif name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen))
            elif name == "r_mag":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.2 * (p.ndim == 1))
    original.save_model(tmp_path / "saelens")
    ours = io.load(tmp_path / "saelens")
    io.save(ours, tmp_path / "workbench")
    again = sae_lens.SAE.load_from_disk(tmp_path / "workbench")

    assert type(again) is type(original)
    before, after = original.cfg.metadata.to_dict(), again.cfg.metadata.to_dict()
    lost = {k: v for k, v in before.items() if after.get(k, object()) != v}
    assert not lost, f"metadata lost or changed by io.load -> io.save: {lost} (now {after})"
    saved = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    resaved = json.loads((tmp_path / "workbench" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "k", "dtype", "normalize_activations", "reshape_activations"):
        assert resaved.get(key) == saved.get(key), key

    x = _x(300)
    with torch.no_grad():
        z_ref = original.encode(x)
        recon_ref = original.decode(z_ref)
        z = again.encode(x)
        _assert_same_codes(z, z_ref, again.decode(z), recon_ref)
    out = ours(x)
    _assert_same_codes(out.code.dense(), z_ref, out.recon_BD, recon_ref)


def test_registering_twice_is_harmless(tmp_path):
    io.save(_trained_like("switch"), tmp_path, metadata=METADATA)
    theirs_before = {name: entry for name, entry in SAE_CLASS_REGISTRY.items() if name != "switch"}
    reloaded = importlib.reload(plugin)
    assert reloaded.REGISTERED == {"switch": reloaded.SwitchSAE}
    assert reloaded.register() == {"switch": reloaded.SwitchSAE}
    assert SAE_CLASS_REGISTRY["switch"] == (reloaded.SwitchSAE, reloaded.SwitchSAEConfig)
    assert {name: entry for name, entry in SAE_CLASS_REGISTRY.items() if name != "switch"} == theirs_before
    assert type(sae_lens.SAE.load_from_disk(tmp_path)) is reloaded.SwitchSAE


def test_a_name_someone_else_registered_is_left_alone(monkeypatch):
    entry = (sae_lens.TopKSAE, sae_lens.TopKSAEConfig)
    monkeypatch.setitem(SAE_CLASS_REGISTRY, "switch", entry)
    assert plugin.register() == {}
    assert SAE_CLASS_REGISTRY["switch"] == entry


def test_without_sae_lens_the_import_error_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "sae_lens" or n.startswith("sae_lens.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "workbench.saelens_plugin")
    with pytest.raises(ImportError) as err:
        importlib.import_module("workbench.saelens_plugin")
    assert str(err.value) == "workbench.saelens_plugin needs sae-lens: pip install 'sae-workbench[saelens]'"


def test_without_the_plugin_saelens_refuses_switch_and_with_it_loads(tmp_path, monkeypatch):
    folder = io.save(_trained_like("switch"), tmp_path, metadata=METADATA)
    monkeypatch.delitem(SAE_CLASS_REGISTRY, "switch")  # as before `import workbench.saelens_plugin`
    with pytest.raises(KeyError, match="switch"):
        sae_lens.SAE.load_from_disk(folder)
    monkeypatch.undo()
    assert type(sae_lens.SAE.load_from_disk(folder)) is plugin.SwitchSAE
