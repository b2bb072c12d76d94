"""Whole runs on real model activations, through the same code path a hub model takes.

A tiny GPT-2 and its tokenizer are saved to a local folder and loaded with from_pretrained, and the
text is a local JSON-lines file: exactly what `gpt2` + a hub dataset do, minus the network.
"""
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workbench import io
from workbench.data.embedded import cpython_texts
from workbench.data.store import ActivationStore
from workbench.eval.features import FeatureIndex
from workbench.run import RunConfig, index_run, run

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
    monkeypatch.setattr("workbench.data.source.harvest", no_harvest)
    run(_config(tmp_path / "b", tiny_gpt2, text_file, cache), progress=False)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == folders


def _contexts(store):
    ids_CL, _ = store.context(store.context_seq)
    return {row.tobytes() for row in ids_CL}


def test_held_out_text_never_overlaps_training_text(tmp_path, tiny_gpt2, text_file):
    run(_config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache", cache_dtype="bfloat16"), progress=False)
    stores = _stores(tmp_path / "cache")
    assert _contexts(stores[1024]).isdisjoint(_contexts(stores[4096]))
    assert "held out" in stores[1024].key.text and "trained on" in stores[4096].key.text
    # The training cache in the dtype asked for; the small held-out store stays float32.
    assert (stores[4096].key.dtype, stores[1024].key.dtype) == ("bfloat16", "float32")

    # Indexing opens the held-out store only: with the training cache evicted, nothing is harvested again.
    shutil.rmtree(stores[4096].folder)
    folders = index_run(tmp_path / "run", ["topk"], progress=False)
    assert FeatureIndex.load(folders["topk"]).info["n_tokens"] == 1024
    assert list(_stores(tmp_path / "cache")) == [1024]


def test_a_local_file_with_the_default_eval_split_is_split_by_document(tmp_path, tiny_gpt2, text_file):
    """Before: a local file was read whole for both splits, so the held-out rows were the first training
    rows, bit for bit."""
    cfg = _config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache")
    cfg.data.model.eval_split = "eval"
    run(cfg, progress=False)
    stores = _stores(tmp_path / "cache")
    held_out, train = stores[1024], stores[4096]
    assert _contexts(held_out).isdisjoint(_contexts(train))
    assert not torch.equal(held_out.read_rows(0, 64), train.read_rows(0, 64))
    meta = io.read_config(tmp_path / "run" / "saes" / "topk")["metadata"]
    assert meta["held_out_text"].startswith("train[documents held out")


def test_editing_the_text_is_a_new_harvest_and_moving_it_is_not(tmp_path, tiny_gpt2, monkeypatch):
    """Before: the cache was keyed by the text's path, so an edited file reused the old activations."""
    cache = tmp_path / "cache"
    text = tmp_path / "a" / "prose.jsonl"
    text.parent.mkdir()
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run(_config(tmp_path / "r1", tiny_gpt2, text, cache), progress=False)
    first = {p.name for p in cache.iterdir() if p.is_dir()}

    moved = tmp_path / "b" / "prose.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(text.read_bytes())
    with monkeypatch.context() as m:
        m.setattr("workbench.data.source.harvest", _no_harvest)
        run(_config(tmp_path / "r2", tiny_gpt2, moved, cache), progress=False)

    text.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in TEXTS))
    run(_config(tmp_path / "r3", tiny_gpt2, text, cache), progress=False)
    folders = {p.name for p in cache.iterdir() if p.is_dir()}
    assert first < folders and len(folders) == 4  # a new training and a new held-out store


def _no_harvest(*args, **kwargs):
    raise AssertionError("the cached activations should have been reused")


def test_named_splits_holding_the_same_documents_are_refused(tmp_path, tiny_gpt2):
    folder = tmp_path / "dataset"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = _config(tmp_path / "run", tiny_gpt2, folder, tmp_path / "cache")
    cfg.data.model.eval_split = "validation"
    with pytest.raises(ValueError, match=r"held-out text is also training text.*'validation' and train_split 'train'"):
        run(cfg, progress=False)


def test_unknown_site_lists_the_valid_ones(tmp_path, tiny_gpt2, text_file):
    with pytest.raises(ValueError, match=r"unknown site 'resid_post\.9'.*has 2 layers|layer 9"):
        run(_config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache", site="resid_post.9"), progress=False)


def test_text_shorter_than_one_context(tmp_path, tiny_gpt2):
    short = tmp_path / "short"
    short.mkdir()
    for split in ("train", "validation"):
        (short / f"{split}.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    cfg = _config(tmp_path / "run", tiny_gpt2, short, tmp_path / "cache")
    cfg.data.model.eval_split = "validation"
    with pytest.raises(ValueError, match="one context needs"):
        run(cfg, progress=False)


def test_a_one_document_file_says_it_cannot_be_split(tmp_path, tiny_gpt2):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": " ".join(TEXTS[:20])}) + "\n")
    with pytest.raises(ValueError, match=r"none of the 1 documents of .* fell on the (held-out|training) side"):
        run(_config(tmp_path / "run", tiny_gpt2, one, tmp_path / "cache"), progress=False)


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


def test_resume_with_a_changed_config_shows_the_difference(tmp_path, tiny_gpt2, text_file):
    """Before: --resume after editing saes: trained the checkpoint's SAEs but wrote a config.json
    describing the edited ones."""
    cfg = _config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache")
    cfg.train.checkpoint_every = 10
    run(cfg, progress=False)
    edited = _config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "other-cache")  # where: allowed
    edited.saes["topk"]["k"] = 8
    edited.train.lr = 1e-3
    with pytest.raises(ValueError, match=r"config differs .*saes\.topk\.k: 4 -> 8; train\.lr: 0\.003 -> 0\.001"):
        run(edited, resume=True, progress=False)


def test_run_dir_that_is_a_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    """Before: it failed only after all the training."""
    target = tmp_path / "results.txt"
    target.write_text("notes")
    monkeypatch.setattr("workbench.data.source.load_model", _no_harvest)
    cfg = RunConfig.from_dict({"run_dir": str(target), "train": {"total_steps": 5},
                               "saes": {"topk": {"architecture": "topk", "d_sae": 64, "k": 4}}})
    with pytest.raises(ValueError, match=r"run_dir=.*results\.txt' is a file, not a folder"):
        run(cfg, progress=False)


def test_streamed_training_writes_no_training_cache(tmp_path, tiny_gpt2, text_file):
    cfg = _config(tmp_path / "run", tiny_gpt2, text_file, tmp_path / "cache", stream_buffer_tokens=1024)
    cfg.data.model.cache = False
    results = run(cfg, progress=False)
    assert list(_stores(tmp_path / "cache")) == [1024]  # only the held-out store is on disk
    assert results["topk"]["l0"] <= 4 and 0 < results["topk"]["fvu"] < 1.5
    meta = io.read_config(tmp_path / "run" / "saes" / "topk")["metadata"]
    assert meta["folded_input_scale"] == pytest.approx(_stores(tmp_path / "cache")[1024].norm_scale())
