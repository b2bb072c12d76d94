"""Whole runs on real model activations, through the same code path a hub model takes.

A tiny GPT-2 and its tokenizer are saved to a local folder and loaded with from_pretrained, and the
text is a local JSON-lines file: exactly what `gpt2` + a hub dataset do, minus the network.
"""
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workbench import io
from workbench.data.embedded import cpython_texts
from workbench.data.store import ActivationStore
from workbench.run import RunConfig, run

TEXTS = cpython_texts("train")[:400]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>")
    wrapped.save_pretrained(folder)
    torch.manual_seed(0)
    eos = wrapped.eos_token_id
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(wrapped), n_positions=64,
                               bos_token_id=eos, eos_token_id=eos)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "prose.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _config(run_dir, model, text, cache, **model_fields):
    return RunConfig.from_dict({
        "run_dir": str(run_dir),
        "train": {"total_steps": 30, "lr": 3e-3, "progress_bar": False, "log_every": 10},
        "data": {"source": "model", "batch_size": 256, "eval_tokens": 1024,
                 "model": {"name": str(model), "site": "resid_post.0", "text": str(text), "eval_split": "train",
                           "n_tokens": 4096, "context_length": 32, "downstream_contexts": 16,
                           "cache_dir": str(cache), **model_fields}},
        "saes": {"topk": {"architecture": "topk", "d_sae": 128, "k": 4},
                 "switch": {"architecture": "switch", "d_sae": 128, "k": 4, "n_experts": 4}},
    })


def _stores(cache):
    """The run's activation stores by token budget (training 4096, held-out 1024)."""
    folders = [p for p in cache.iterdir() if p.is_dir()]
    return {store.key.n_tokens: store for store in map(ActivationStore.open, folders)}


def test_causal_lm_run_scores_loss_recovered_and_saves_raw_scale_saes(tmp_path, tiny_gpt2, text_file):
    results = run(_config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache"), progress=False)
    for name in ("topk", "switch"):
        m = results[name]
        assert m["kind"] == "causal_lm"
        assert m["ce_zero"] != m["ce_clean"] and abs(m["loss_recovered"]) < 10
        assert m["l0"] <= 4 and 0 < m["fvu"] < 2
    folder = tmp_path / "run" / "saes" / "topk"
    meta = io.read_config(folder)["metadata"]
    assert meta["model"] == str(tiny_gpt2) and meta["site"] == "resid_post.0"
    assert meta["trained_steps"] == 30
    # Trained on E|x|^2 = d; the saved SAE reads raw activations and reconstructs them as well.
    scale = meta["folded_input_scale"]
    assert scale != 1.0
    raw = _stores(tmp_path / "cache")[4096].read_rows(0, 512)
    sae = io.load(folder)
    fvu_raw = ((sae(raw).recon_BD - raw).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum()).item()
    assert fvu_raw == pytest.approx(results["topk"]["fvu"], abs=0.15)


def test_second_run_reuses_the_cached_harvest(tmp_path, tiny_gpt2, text_file, monkeypatch):
    cache = tmp_path / "cache"
    run(_config(tmp_path / "a", tiny_gpt2, text_file, cache), progress=False)
    folders = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 2  # training and held-out stores

    def no_harvest(*args, **kwargs):
        raise AssertionError("the cached activations should have been reused")
    monkeypatch.setattr("workbench.run.harvest", no_harvest)
    run(_config(tmp_path / "b", tiny_gpt2, text_file, cache), progress=False)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == folders


def test_held_out_text_never_overlaps_training_text(tmp_path, tiny_gpt2, text_file):
    run(_config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache"), progress=False)
    stores = _stores(tmp_path / "cache")
    assert stores[1024].seq.min() >= stores[4096].n_contexts  # held-out contexts start after training's


def test_unknown_site_lists_the_valid_ones(tmp_path, tiny_gpt2, text_file):
    with pytest.raises(ValueError, match=r"unknown site 'resid_post\.9'.*has 2 layers|layer 9"):
        run(_config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache", site="resid_post.9"), progress=False)


def test_text_shorter_than_one_context(tmp_path, tiny_gpt2):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short"}) + "\n")
    with pytest.raises(ValueError, match="one context needs"):
        run(_config(tmp_path / "run", tiny_gpt2, short, tmp_path / "cache"), progress=False)


def test_empty_text_source(tmp_path, tiny_gpt2):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="yielded no text"):
        run(_config(tmp_path / "run", tiny_gpt2, empty, tmp_path / "cache"), progress=False)


def test_the_offline_default_runs_on_minilm(tmp_path):
    cfg = RunConfig.from_dict({
        "run_dir": str(tmp_path / "run"),
        "train": {"total_steps": 10, "lr": 1e-3, "progress_bar": False},
        "data": {"batch_size": 256, "eval_tokens": 512,
                 "model": {"n_tokens": 2048, "downstream_contexts": 4, "cache_dir": str(tmp_path / "cache")}},
        "saes": {"topk": {"architecture": "topk", "d_sae": 768, "k": 16}},
    })
    m = run(cfg, progress=False)["topk"]
    assert m["kind"] == "encoder" and m["fidelity"] > 0 and m["l0"] <= 16
    sae = io.load(tmp_path / "run" / "saes" / "topk")
    assert sae.cfg.d_in == 384
    assert io.read_config(tmp_path / "run" / "saes" / "topk")["metadata"]["site"] == "resid_post.2"


def test_sae_width_must_match_the_site(tmp_path, tiny_gpt2, text_file):
    cfg = _config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache")
    cfg.saes = {"bad": {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 4}}
    with pytest.raises(ValueError, match="saes.bad.d_in=64 but the data has d=32"):
        run(cfg, progress=False)
