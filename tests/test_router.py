"""Router analysis of a Switch SAE: every number equals a brute-force computation over the whole
cache at once (dense routing, dense encoding, the full decoder cosine matrix), on a small SAE with a
planted duplicate feature and planted dead latents; the non-Switch error; the exact save/load round
trip. A fake cache of ~3k rows and the real MiniLM tokenizer: about a second."""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from workbench.data.embedded import default_model_path
from workbench.data.store import ActivationStore, CacheKey
from workbench.data.types import ActivationChunk, TokenBatch
from workbench.eval import router
from workbench.eval.features import readable_tokens
from workbench.eval.router import (ENTROPY_BINS, RouterAnalysis, analyze_router, duplicate_features,
                                   inter_expert_similarity)
from workbench.io import fold_input_scale
from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE

D, F, E, K = 16, 64, 4, 3
W = F // E
L, N_CONTEXTS = 16, 200
WORDS = ["the", "cat", "route", "expert", "##ing", "##s", "model", "token", "of", "and", "sparse",
         "##ed", "feature", "layer", "python", "code", "##ly", "data", "train", "loss", "a", "is"]
DUPLICATE = (3, 50)  # latent 50 (expert 3) gets a copy of latent 3's decoder row (expert 0)
DEAD = (5, 40)  # latents whose encoder column is zeroed: their pre-activation is always 0


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer) -> ActivationStore:
    """Contexts of L real tokens drawn from WORDS with Zipf-like frequencies; each row is its token's
    embedding plus noise, so experts see different tokens."""
    vocab_ids = np.array(tokenizer.convert_tokens_to_ids(WORDS))
    embed_VD = np.random.default_rng(0).standard_normal((len(WORDS), D)).astype(np.float32) * 2
    weights = 1 / np.arange(1, len(WORDS) + 1)

    def produce(start: int):
        for s in range(start, N_CONTEXTS):
            gen = np.random.default_rng([1, s])
            word_L = gen.choice(len(WORDS), L, p=weights / weights.sum())
            acts_LD = embed_VD[word_L] + gen.standard_normal((L, D)).astype(np.float32)
            ids_1L = torch.tensor(vocab_ids[word_L])[None]
            yield ActivationChunk(torch.tensor(acts_LD), ids_1L[0], torch.full((L,), s), torch.arange(L),
                                  TokenBatch(ids_1L, torch.ones(1, L, dtype=torch.long), torch.tensor([s])))

    key = CacheKey(model="fake-lm", site="blocks.0", text="fake:eval", n_tokens=L * N_CONTEXTS, context_length=L)
    return ActivationStore.get_or_create(tmp_path_factory.mktemp("cache"), key, produce, shard_rows=500,
                                         progress=False)


@pytest.fixture(scope="module")
def sae() -> SwitchSAE:
    sae = SwitchSAE(SwitchConfig(d_in=D, d_sae=F, n_experts=E, k=K, seed=0))
    with torch.no_grad():
        sae.W_router.mul_(4)  # a sharper router than the initial one, so routing is uneven
        sae.W_enc[:, list(DEAD)] = 0
        a, b = DUPLICATE
        sae.W_dec[b] = sae.W_dec[a] + 0.2 * sae.W_dec[b]
    return sae


@pytest.fixture(scope="module")
def analysis(sae, store, tokenizer) -> RouterAnalysis:
    # 700-row chunks cross the 500-row shards, and the last chunk is short.
    return analyze_router(sae, store, tokenizer, batch_size=700, progress=False)


@pytest.fixture(scope="module")
def dense(sae, store) -> dict:
    """Everything routed and encoded at once."""
    x_ND = store.read_rows(0, store.n_rows)
    with torch.no_grad():
        probs_NE = torch.softmax((x_ND - sae.b_router) @ sae.W_router, dim=-1)
        acts_NF = sae.encode(x_ND)
    unit_FD = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    return {"probs_NE": probs_NE, "expert_N": probs_NE.argmax(-1), "acts_NF": acts_NF,
            "cos_FF": unit_FD @ unit_FD.T}


def brute_duplicates(cos_FF: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    a_P, b_P = torch.triu_indices(F, F, offset=1)
    keep_P = (a_P // W != b_P // W) & (cos_FF[a_P, b_P] > threshold)
    pairs = zip(a_P[keep_P].tolist(), b_P[keep_P].tolist(), cos_FF[a_P, b_P][keep_P].tolist())
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def test_load_and_mean_probability_match_dense_routing(analysis, dense, store):
    counts_E = torch.bincount(dense["expert_N"], minlength=E)
    assert analysis.n_tokens == store.n_rows == L * N_CONTEXTS and analysis.n_experts == E
    assert torch.equal(analysis.expert_load, counts_E.double() / store.n_rows)
    assert analysis.expert_load.sum().item() == pytest.approx(1)
    assert (analysis.expert_load - 1 / E).abs().max() > 0.05  # uneven enough that the view has something to show
    assert torch.allclose(analysis.mean_prob, dense["probs_NE"].double().mean(0), atol=1e-12)
    expected_lb = E * (counts_E / store.n_rows * dense["probs_NE"].double().mean(0)).sum().item()
    assert analysis.load_balance == pytest.approx(expected_lb)


def test_entropy_histogram_counts_every_token(analysis, dense):
    entropy_N = torch.special.entr(dense["probs_NE"].double()).sum(-1).numpy()
    counts, edges = np.histogram(entropy_N, bins=np.linspace(0, math.log(E), ENTROPY_BINS + 1))
    assert np.array_equal(analysis.entropy_edges.numpy(), edges)
    assert analysis.entropy_counts.tolist() == counts.tolist()
    assert analysis.entropy_counts.sum() == analysis.n_tokens


def test_top_tokens_per_expert(analysis, dense, store, tokenizer):
    for e in range(E):
        ids = store.token_ids[(dense["expert_N"] == e).numpy()].tolist()
        top = sorted(Counter(ids).items(), key=lambda item: (-item[1], item[0]))[:10]
        assert analysis.top_tokens[e] == [(readable_tokens(tokenizer, [i])[0], n) for i, n in top]
    # As the feature index has them: a word with the space it follows, a continuation bare, no "##".
    shown = {tok for expert in analysis.top_tokens for tok, _ in expert}
    assert {" the", "ing"} <= shown and not any("##" in tok for tok in shown)
    assert shown <= {w[2:] if w.startswith("##") else " " + w for w in WORDS}


def test_dead_latents_per_expert(analysis, dense):
    dead_F = (dense["acts_NF"] > 0).sum(0) == 0
    assert dead_F[list(DEAD)].all()
    assert analysis.dead_per_expert.tolist() == dead_F.reshape(E, W).sum(1).tolist()


def test_similarity_matrix_is_the_mean_max_cosine(analysis, dense):
    cos_FF = dense["cos_FF"].clone().fill_diagonal_(-math.inf)
    expected_EE = torch.stack([torch.stack([cos_FF[i * W:(i + 1) * W, j * W:(j + 1) * W].max(1).values.mean()
                                            for j in range(E)]) for i in range(E)])
    assert analysis.similarity.shape == (E, E)
    assert torch.allclose(analysis.similarity, expected_EE, atol=1e-6)
    assert (analysis.similarity.diagonal() < 1).all()  # a row's own cosine of 1 is left out


def test_planted_duplicate_is_found_first(analysis, dense, sae):
    expected = brute_duplicates(dense["cos_FF"], 0.9)
    assert analysis.duplicates[0][:2] == DUPLICATE and analysis.duplicates[0][2] > 0.95
    assert [p[:2] for p in analysis.duplicates] == [p[:2] for p in expected]
    assert np.allclose([p[2] for p in analysis.duplicates], [p[2] for p in expected], atol=1e-6)
    assert analysis.n_duplicate_pairs == len(expected)
    assert analysis.n_duplicated_latents == len({x for a, b, _ in expected for x in (a, b)})
    none = duplicate_features(sae.W_dec, E, 1.01)
    assert none.pairs == [] and none.n_pairs == 0 and none.n_latents == 0


def test_tiles_smaller_than_an_expert_and_the_cap_give_the_same_answers(monkeypatch, sae, dense):
    W_dec_FD = sae.W_dec.detach() * 3  # any row norm: saved SAEs have rows of norm 1/scale
    whole_EE = inter_expert_similarity(W_dec_FD, E)
    everything = brute_duplicates(dense["cos_FF"], -1.0)
    monkeypatch.setattr(router, "_TILE", 5)  # 16-row experts cut into tiles of 5, 5, 5 and 1
    assert torch.allclose(inter_expert_similarity(W_dec_FD, E), whole_EE, atol=1e-6)
    capped = duplicate_features(W_dec_FD, E, -1.0, max_pairs=10)
    assert capped.n_pairs == len(everything) == F * (F - W) // 2 and capped.n_latents == F
    assert [p[:2] for p in capped.pairs] == [p[:2] for p in everything[:10]]


def test_folded_scale_reads_raw_activations_the_same(sae, store, tokenizer, analysis):
    """A saved SAE has its training scale folded in; analysing it on raw rows must agree with
    analysing the unfolded SAE on scaled rows."""
    scaled = analyze_router(sae, store, tokenizer, scale=0.5, progress=False)
    folded = analyze_router(fold_input_scale(sae, 0.5), store, tokenizer, progress=False)
    assert not torch.allclose(scaled.mean_prob, analysis.mean_prob, atol=1e-3)  # the scale matters
    assert torch.equal(folded.expert_load, scaled.expert_load)
    assert torch.allclose(folded.mean_prob, scaled.mean_prob, atol=1e-6)
    assert folded.top_tokens == scaled.top_tokens
    assert torch.equal(folded.dead_per_expert, scaled.dead_per_expert)
    assert torch.allclose(folded.similarity, scaled.similarity, atol=1e-6)


def test_non_switch_sae_and_wrong_width_are_refused(store, tokenizer):
    topk = TopKSAE(TopKConfig(d_in=D, d_sae=F, k=K))
    with pytest.raises(ValueError, match="^the router view needs a Switch SAE; this is a topk SAE$"):
        analyze_router(topk, store, tokenizer, progress=False)
    wide = SwitchSAE(SwitchConfig(d_in=2 * D, d_sae=F, n_experts=E, k=K))
    with pytest.raises(ValueError, match=f"d_in={2 * D} but the cache's activations have d={D}"):
        analyze_router(wide, store, tokenizer, progress=False)


def test_save_load_round_trip_is_exact(analysis, tmp_path):
    analysis.save(tmp_path / "features")
    assert sorted(os.listdir(tmp_path / "features")) == ["router.json", "router.safetensors"]
    assert json.loads((tmp_path / "features" / "router.json").read_text())["n_tokens"] == analysis.n_tokens
    back = RouterAnalysis.load(tmp_path / "features")
    for name, value in vars(analysis).items():
        got = getattr(back, name)
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value), name
        else:
            assert got == value, name
    with pytest.raises(FileNotFoundError, match="no router analysis in"):
        RouterAnalysis.load(tmp_path / "elsewhere")
