"""The activation cache: create and reuse, exact round trip, shards, truncation, crash and resume,
damaged folders, and the shuffled bounded-buffer batches. Fake producers, tiny sizes: a few seconds."""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import shutil
import threading
import time
import tracemalloc
import types
import warnings

import numpy as np
import pytest
import torch

from workbench.data import cache_writer
from workbench.data.store import (ActivationStore, CacheError, CacheKey, PARTIAL_SUFFIX,
                                  default_cache_root)
from workbench.data.types import ActivationChunk, TokenBatch

L, D = 8, 16
# Most tests harvest the whole fake text, shorter than the default key's budget.
pytestmark = pytest.mark.filterwarnings("ignore:the text ran out")


@pytest.fixture(autouse=True, scope="module")
def no_fsync():
    # fsync costs ~6 ms a file on this disk and the tests write hundreds of tiny files; what they
    # check is the protocol, not durability across a power cut.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


def make_key(n_tokens: int = 10_000, **changes) -> CacheKey:
    return dataclasses.replace(CacheKey(model="org/tiny-lm", site="blocks.1.hook_resid_post",
                                        text="fake:train", n_tokens=n_tokens, context_length=L), **changes)


class FakeProducer:
    """Contexts of L tokens; context s has a seeded number (0..L) of real tokens and one row per real
    token, drawn from a generator seeded by (seed, s) alone, so ``produce(start)`` yields the same
    rows for every context whatever ``start`` is. Column 0 of each row is its id ``s * L + pos``.

    ``calls`` records the start contexts asked for. ``fail_after_rows`` raises ``exc`` before the
    chunk that would pass that many rows; ``aligned`` starts at the chunk boundary before ``start``
    (a producer that can only restart at its own batch boundaries)."""

    def __init__(self, n_contexts: int = 120, per_chunk: int = 5, d: int = D, seed: int = 0,
                 fail_after_rows: int | None = None, exc: type[BaseException] = RuntimeError,
                 aligned: bool = False):
        self.n_contexts, self.per_chunk, self.d, self.seed = n_contexts, per_chunk, d, seed
        self.fail_after_rows, self.exc, self.aligned = fail_after_rows, exc, aligned
        self.calls: list[int] = []

    def context(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gen = np.random.default_rng([self.seed, s])
        n_real = int(gen.integers(0, L + 1))
        ids_L = gen.integers(1, 30_000, L)
        ids_L[n_real:] = 0
        mask_L = (np.arange(L) < n_real).astype(np.int64)
        acts_ND = (gen.standard_normal((n_real, self.d)) * 2 + 0.5).astype(np.float32)
        acts_ND[:, 0] = s * L + np.arange(n_real)
        return ids_L, mask_L, acts_ND

    def __call__(self, start: int):
        self.calls.append(start)
        first = start - start % self.per_chunk if self.aligned else start
        yielded = 0
        for begin in range(first, self.n_contexts, self.per_chunk):
            seq_S = np.arange(begin, min(begin + self.per_chunk, self.n_contexts))
            ids, masks, acts = zip(*(self.context(int(s)) for s in seq_S))
            n_real = [len(a) for a in acts]
            if self.fail_after_rows is not None and yielded + sum(n_real) > self.fail_after_rows:
                raise self.exc("the producer crashed")
            batch = TokenBatch(torch.tensor(np.stack(ids)), torch.tensor(np.stack(masks)),
                               torch.tensor(seq_S))
            yield ActivationChunk(
                acts_ND=torch.tensor(np.concatenate(acts)),
                token_ids_N=torch.tensor(np.concatenate([i[:n] for i, n in zip(ids, n_real)])),
                seq_N=torch.tensor(np.repeat(seq_S, n_real)),
                pos_N=torch.tensor(np.concatenate([np.arange(n) for n in n_real])),
                batch=batch)
            yielded += sum(n_real)

    def reference(self, n_rows: int | None = None) -> dict[str, np.ndarray]:
        """Every row of an uninterrupted harvest, in order (the first n_rows)."""
        parts = [(acts, ids[:len(acts)], np.full(len(acts), s), np.arange(len(acts)))
                 for s in range(self.n_contexts) for ids, _, acts in [self.context(s)]]
        acts, tok, seq, pos = (np.concatenate(p) for p in zip(*parts))
        return {"acts": acts[:n_rows], "token_ids": tok[:n_rows], "seq": seq[:n_rows], "pos": pos[:n_rows]}


def harvest(root, producer, key=None, shard_rows=64) -> ActivationStore:
    return ActivationStore.get_or_create(root, key or make_key(), producer, shard_rows=shard_rows,
                                         progress=False)


def assert_same_store(a: ActivationStore, b: ActivationStore) -> None:
    assert a.shard_rows == b.shard_rows and a.n_contexts == b.n_contexts
    assert torch.equal(a.read_rows(0, a.n_rows), b.read_rows(0, b.n_rows))
    for field in ("token_ids", "seq", "pos", "context_seq"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert all(np.array_equal(x, y) for x, y in zip(a.context(a.context_seq), b.context(b.context_seq)))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    """About 480 rows in shards of 64, from contexts of which some have no real tokens."""
    return harvest(tmp_path_factory.mktemp("cache"), FakeProducer())


# -------------------------------------------------------------------------------------------------
# Keys


def test_key_digest_is_stable_and_names_the_folder(monkeypatch, tmp_path):
    key = make_key()
    assert key.digest() == "fc27da936953"  # sha256 of the sorted JSON: the same on every machine
    assert key.folder_name() == "tiny-lm__blocks.1.hook_resid_post__fake_train__10k-L8__" + key.digest()
    assert make_key(options="exclude_special").digest() != key.digest()
    with pytest.raises(ValueError, match="n_tokens=0 must be a positive integer"):
        make_key(n_tokens=0)
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path
    monkeypatch.delenv("WORKBENCH_CACHE")
    assert default_cache_root() == default_cache_root().home() / ".cache" / "sae-workbench"


def test_a_float32_key_keeps_the_folder_it_had_before_keys_had_a_dtype():
    # Digest computed by the store before CacheKey had a dtype field: caches harvested then are found.
    key = CacheKey(model="sentence-transformers/all-MiniLM-L6-v2", site="resid_post.2", text="cpython:train",
                   n_tokens=60_000, context_length=128)
    assert key.dtype == "float32" and "dtype" not in key.to_dict()
    assert key.digest() == "e3cb66340c93"
    assert key.folder_name() == "all-MiniLM-L6-v2__resid_post.2__cpython_train__60k-L128__e3cb66340c93"
    assert dataclasses.replace(key, dtype="float32") == key

    half = dataclasses.replace(key, dtype="bfloat16")
    assert half.to_dict()["dtype"] == "bfloat16" and half.digest() != key.digest()
    assert half.folder_name() == ("all-MiniLM-L6-v2__resid_post.2__cpython_train__60k-L128-bfloat16__"
                                  + half.digest())
    assert dataclasses.replace(key, dtype="float16").digest() not in (key.digest(), half.digest())
    with pytest.raises(ValueError, match="CacheKey.dtype='int8' is not a cache dtype; use one of 'float32', "
                                         "'float16', 'bfloat16'"):
        dataclasses.replace(key, dtype="int8")


# -------------------------------------------------------------------------------------------------
# Create, reuse, round trip


def test_create_then_reuse_without_calling_the_producer(tmp_path):
    producer = FakeProducer()
    first = harvest(tmp_path, producer)
    assert producer.calls == [0]
    again = FakeProducer()
    second = harvest(tmp_path, again, shard_rows=1000)  # shard_rows only matters when harvesting
    assert again.calls == []
    assert second.folder == first.folder == tmp_path / make_key().folder_name()
    assert_same_store(first, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.folder.name, first.folder.name + ".lock"]


def test_round_trip_of_every_row(store):
    ref = FakeProducer().reference()
    assert store.n_rows == len(ref["seq"]) and store.d == D
    assert np.array_equal(store.read_rows(0, store.n_rows).numpy(), ref["acts"])
    assert np.array_equal(store.read_rows(100, 200).numpy(), ref["acts"][100:200])  # across shards
    for field in ("token_ids", "seq", "pos"):
        assert np.array_equal(getattr(store, field), ref[field]), field
    assert store.token_ids.dtype == np.int32 and store.seq.dtype == np.int64
    assert store.key == make_key() and store.meta["complete"] is True


def test_contexts_table(store):
    producer = FakeProducer()
    # Every context is kept, also those with no real tokens, so rows can be shown in context.
    assert np.array_equal(store.context_seq, np.arange(producer.n_contexts))
    assert store.n_contexts == producer.n_contexts
    for s in (0, 17, 63, producer.n_contexts - 1):
        ids_L, mask_L, _ = producer.context(s)
        got_ids, got_mask = store.context(s)
        assert np.array_equal(got_ids, ids_L) and np.array_equal(got_mask, mask_L.astype(bool))
    row = 123
    ids_L, mask_L = store.context(store.seq[row])
    assert ids_L[store.pos[row]] == store.token_ids[row] and mask_L[store.pos[row]]
    ids_KL, mask_KL = store.context(store.seq[:5])
    assert ids_KL.shape == mask_KL.shape == (5, L)
    with pytest.raises(KeyError, match="no context with seq"):
        store.context(10_000)


def test_shards_split_at_shard_rows(store):
    n = store.n_rows
    assert store.shard_rows == [64] * (n // 64) + ([n % 64] if n % 64 else [])
    meta = json.loads((store.folder / "meta.json").read_text())
    assert meta["n_shards"] == store.n_shards and meta["shard_rows"] == store.shard_rows
    assert meta["key"] == make_key().to_dict() and meta["dtype"] == "float32"
    for i, rows in enumerate(store.shard_rows):
        assert store.shard_acts(i).shape == (rows, D)
    names = {p.name for p in store.folder.iterdir()}
    assert "progress.json" not in names and not any(n.startswith("ctx_") for n in names)


def test_n_tokens_truncates_and_a_short_text_is_recorded(tmp_path):
    producer = FakeProducer()
    small = harvest(tmp_path, producer, make_key(n_tokens=150))
    ref = producer.reference(150)
    assert small.n_rows == 150 and small.shard_rows == [64, 64, 22]
    assert np.array_equal(small.read_rows(0, 150).numpy(), ref["acts"])
    assert small.context_seq[-1] == ref["seq"][-1]  # no contexts after the last row

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        big = harvest(tmp_path, FakeProducer(), make_key(n_tokens=100_000))
    assert [str(w.message) for w in caught if "ran out" in str(w.message)] == [
        f"the text ran out after {big.n_rows} of the 100000 tokens asked for; the cache "
        f"{big.folder.name} holds {big.n_rows} rows (meta.json n_rows)"]
    assert big.n_rows == len(FakeProducer().reference()["seq"])
    assert big.meta["text_ran_out"] is True


def test_bad_producers_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="produce yielded no activation rows"):
        harvest(tmp_path, lambda start: iter(()))
    assert list(tmp_path.glob("*.partial")) == []

    def wrong_width(start):
        yield from FakeProducer(n_contexts=10)(start)
        yield from FakeProducer(n_contexts=20, d=D + 1)(10)

    with pytest.raises(ValueError, match=f"has D={D + 1} but the harvest so far has D={D}"):
        harvest(tmp_path, wrong_width)

    def backwards(start):
        yield from FakeProducer(n_contexts=10)(start)
        yield from FakeProducer(n_contexts=10)(5)

    with pytest.raises(ValueError, match="produce must yield contexts in increasing seq order"):
        harvest(tmp_path, backwards, make_key(options="b"))


# -------------------------------------------------------------------------------------------------
# Interrupted harvests


@pytest.mark.parametrize("exc, aligned", [(RuntimeError, False), (KeyboardInterrupt, True)])
def test_interrupted_harvest_resumes_from_completed_shards(tmp_path, exc, aligned):
    key = make_key()
    with pytest.raises(exc, match="crashed"):
        harvest(tmp_path / "a", FakeProducer(fail_after_rows=160, exc=exc, aligned=aligned), key)
    partial = tmp_path / "a" / (key.folder_name() + PARTIAL_SUFFIX)
    assert partial.is_dir() and not (tmp_path / "a" / key.folder_name()).exists()
    progress = json.loads((partial / "progress.json").read_text())
    assert [s["rows"] for s in progress["shards"]] == [64, 64]  # the third shard was being filled
    with pytest.raises(CacheError, match="is an unfinished harvest .no complete meta.json.; rerun"):
        ActivationStore.open(partial)

    resumer = FakeProducer(aligned=aligned)
    resumed = harvest(tmp_path / "a", resumer, key)
    ref = FakeProducer().reference()
    assert resumer.calls == [int(ref["seq"][128])]  # the context of the first row not stored
    assert not partial.exists()
    assert_same_store(resumed, harvest(tmp_path / "b", FakeProducer(), key))


def test_resume_inside_contexts_longer_than_a_shard(tmp_path):
    # Shards of 3 rows end inside contexts of up to 8 rows, so the resumed producer's first context
    # is partly stored already; two interruptions in a row, and a token budget that cuts a context.
    key = make_key(n_tokens=90)
    for fail_after_rows in (20, 31):
        with pytest.raises(RuntimeError):
            harvest(tmp_path / "a", FakeProducer(n_contexts=40, per_chunk=1, fail_after_rows=fail_after_rows),
                    key, 3)
        progress = (tmp_path / "a" / (key.folder_name() + PARTIAL_SUFFIX) / "progress.json").read_text()
        assert json.loads(progress)["shards"][-1]["skip_rows"] > 0  # stopped inside a context
    resumed = harvest(tmp_path / "a", FakeProducer(n_contexts=40), key, 3)
    assert resumed.n_rows == 90
    assert_same_store(resumed, harvest(tmp_path / "b", FakeProducer(n_contexts=40), key, 3))


def test_an_inconsistent_partial_harvest_is_discarded_and_redone(tmp_path):
    key = make_key()
    with pytest.raises(RuntimeError):
        harvest(tmp_path / "a", FakeProducer(fail_after_rows=160), key)
    partial = tmp_path / "a" / (key.folder_name() + PARTIAL_SUFFIX)
    (partial / "acts_00001.npy").unlink()
    redo = FakeProducer()
    with pytest.warns(UserWarning, match=r"discarding the unfinished harvest .*\(acts_00001.npy is missing"):
        store = harvest(tmp_path / "a", redo, key)
    assert redo.calls == [0]
    assert_same_store(store, harvest(tmp_path / "b", FakeProducer(), key))


def test_a_producer_that_changed_its_rows_is_caught_on_resume(tmp_path):
    key = make_key()
    with pytest.raises(RuntimeError):
        harvest(tmp_path, FakeProducer(fail_after_rows=160), key)
    with pytest.raises(CacheError, match="produce must be deterministic"):
        harvest(tmp_path, FakeProducer(seed=1), key)


# -------------------------------------------------------------------------------------------------
# Opening errors


def test_open_errors(tmp_path, store):
    with pytest.raises(FileNotFoundError, match="no activation cache at"):
        ActivationStore.open(tmp_path / "nothing")
    other = dataclasses.replace(store.key, model="gpt2", site="blocks.8.hook_resid_post")
    with pytest.raises(CacheError, match="was made for model=org/tiny-lm site=blocks.1.hook_resid_post, "
                                         "not model=gpt2 site=blocks.8.hook_resid_post; use another"):
        ActivationStore.open(store.folder, expect=other)
    with pytest.raises(CacheError, match="was made for n_tokens=10000, not n_tokens=5"):
        ActivationStore.open(store.folder, expect=dataclasses.replace(store.key, n_tokens=5))


def test_a_damaged_store_errors_clearly(tmp_path):
    store = harvest(tmp_path, FakeProducer())
    shard = store.folder / "acts_00001.npy"
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(CacheError, match=r"is damaged: acts_00001.npy is \d+ bytes, expected \d+; delete"):
        ActivationStore.open(store.folder)
    shard.unlink()
    with pytest.raises(CacheError, match="is damaged: acts_00001.npy is missing"):
        harvest(tmp_path, FakeProducer())


# -------------------------------------------------------------------------------------------------
# Batches


def row_ids(batch_BD: torch.Tensor) -> np.ndarray:
    return batch_BD[:, 0].numpy().astype(np.int64)


def test_each_row_once_per_epoch_in_shuffled_order(store):
    batches = list(store.batches(32, seed=0, buffer_rows=128, epochs=2, drop_last=False))
    short = store.n_rows % 32  # each epoch ends with one short batch
    assert [len(b) for b in batches] == ([32] * (store.n_rows // 32) + [short]) * 2
    assert all(b.shape[1:] == (D,) and b.dtype == torch.float32 for b in batches)
    ids = np.concatenate([row_ids(b) for b in batches])
    stored = row_ids(store.read_rows(0, store.n_rows))
    first, second = ids[:store.n_rows], ids[store.n_rows:]
    assert np.array_equal(np.sort(first), np.sort(stored))
    assert np.array_equal(np.sort(second), np.sort(stored))
    assert not np.array_equal(first, stored) and not np.array_equal(first, second)
    # drop_last: whole batches only, n_rows // B of them per epoch
    full = list(store.batches(32, buffer_rows=128, epochs=2))
    assert len(full) == 2 * (store.n_rows // 32) and all(len(b) == 32 for b in full)


def test_batches_are_deterministic_under_their_seed(store):
    def take(seed, n=20):
        it = store.batches(16, seed=seed, buffer_rows=64, epochs=None)
        return [next(it) for _ in range(n)]  # 20 x 16 rows: into the second epoch

    a, b, c = take(0), take(0), take(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_the_buffer_is_bounded(store, monkeypatch):
    stored = row_ids(store.read_rows(0, store.n_rows))
    loaded = []  # storage indices of the rows batches() has read, in reading order
    read_into = store._read_into

    def recording_read_into(shard, start, stop, out):
        loaded.extend(range(store._row_starts[shard] + start, store._row_starts[shard] + stop))
        read_into(shard, start, stop, out)

    monkeypatch.setattr(store, "_read_into", recording_read_into)
    batches = store.batches(32, seed=3, buffer_rows=64)
    first = next(batches)
    # The first batch comes from the 64 rows loaded so far (16 blocks of 4 rows, from several
    # shards), not from the whole cache.
    assert len(loaded) == 64 and len(set(np.array(loaded) // 64)) > 1
    assert set(row_ids(first)) <= set(stored[loaded])
    in_buffer = []
    for _ in batches:
        in_buffer.append(len(loaded))
    assert sorted(loaded) == list(range(store.n_rows))  # each row read once, block by block
    assert len(set(in_buffer)) > 10  # read as the buffer empties, not all at once


def test_memory_stays_near_the_buffer_size(tmp_path):
    d, buffer_rows = 256, 512
    store = harvest(tmp_path, FakeProducer(n_contexts=1200, per_chunk=100, d=d), make_key(n_tokens=10**6),
                    shard_rows=1024)
    tracemalloc.start()
    n = sum(len(b) for b in store.batches(64, buffer_rows=buffer_rows))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == store.n_rows // 64 * 64
    buffer_bytes, cache_bytes = buffer_rows * d * 4, store.n_rows * d * 4
    # The buffer (+1/16), the batch being yielded and the one the caller holds: 0.75 MB for 5 MB.
    assert peak < 1.5 * buffer_bytes and cache_bytes > 8 * buffer_bytes


def test_scale_multiplies_the_batches(store):
    plain = next(store.batches(16, seed=2, buffer_rows=64))
    scaled = next(store.batches(16, seed=2, buffer_rows=64, scale=0.5))
    assert torch.allclose(scaled, 0.5 * plain)
    with pytest.raises(ValueError, match="buffer_rows=8 must be an integer >= batch_size=16"):
        store.batches(16, buffer_rows=8)


# -------------------------------------------------------------------------------------------------
# Samples and normalisation


def test_sample_is_seeded_and_distinct(store):
    x = store.sample(100, seed=4)
    assert x.shape == (100, D) and torch.equal(x, store.sample(100, seed=4))
    assert not torch.equal(x, store.sample(100, seed=5))
    ids = row_ids(x)
    assert len(set(ids)) == 100 and set(ids) <= set(row_ids(store.read_rows(0, store.n_rows)))
    assert not np.array_equal(ids, np.sort(ids))  # in the order drawn, not file order
    assert len(store.sample(10**6)) == store.n_rows


def test_norm_scale_makes_the_mean_squared_norm_d(tmp_path):
    store = harvest(tmp_path, FakeProducer())
    s = store.norm_scale(n_sample=300, seed=0)
    x = store.sample(300, seed=0)
    assert (s * x).pow(2).sum(dim=1).mean().item() == pytest.approx(D, rel=1e-5)
    assert ActivationStore.open(store.folder).meta["norm_scale"] == {"n_sample": 300, "seed": 0, "value": s}
    assert ActivationStore.open(store.folder).norm_scale(n_sample=300) == s


# -------------------------------------------------------------------------------------------------
# Half-precision caches

# Bytes each cached activation takes on disk, per cache dtype.
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rounded(acts_ND: np.ndarray, dtype: str) -> np.ndarray:
    """What a cache of this dtype should give back: torch's own rounding of the float32 values."""
    return torch.from_numpy(acts_ND).to(TORCH_DTYPE[dtype]).float().numpy()


@pytest.fixture(scope="module")
def stores_by_dtype(tmp_path_factory) -> dict[str, ActivationStore]:
    root = tmp_path_factory.mktemp("dtypes")  # one root: the dtype alone must keep them apart
    return {dtype: harvest(root, FakeProducer(), make_key(dtype=dtype)) for dtype in ITEMSIZE}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_reads_give_torchs_rounding_as_float32(stores_by_dtype, dtype):
    store = stores_by_dtype[dtype]
    expected_ND = rounded(FakeProducer().reference()["acts"], dtype)
    assert not np.array_equal(expected_ND, FakeProducer().reference()["acts"])  # rounding did happen
    got = store.read_rows(0, store.n_rows)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), expected_ND)
    assert np.array_equal(store.read_rows(100, 200).numpy(), expected_ND[100:200])  # across shards

    batches = list(store.batches(32, seed=0, buffer_rows=128, drop_last=False))
    assert all(b.dtype == torch.float32 for b in batches)
    assert np.array_equal(np.unique(torch.cat(batches).numpy(), axis=0), np.unique(expected_ND, axis=0))
    scaled = next(store.batches(32, seed=0, buffer_rows=128, scale=0.5))
    assert scaled.dtype == torch.float32 and torch.allclose(scaled, 0.5 * batches[0])

    sample = store.sample(100, seed=4)
    float32_sample = stores_by_dtype["float32"].sample(100, seed=4)  # the same rows, drawn unrounded
    assert sample.dtype == torch.float32
    assert np.array_equal(sample.numpy(), rounded(float32_sample.numpy(), dtype))
    for shard in (0, store.n_shards - 1):
        start = int(store._row_starts[shard])
        shard_ND = store.shard_acts(shard)
        assert shard_ND.dtype == np.float32
        assert np.array_equal(shard_ND, expected_ND[start:start + store.shard_rows[shard]])
        n = store.shard_rows[shard]
        rows_R = np.array([n - 1, 0, n // 2])  # what the feature index gathers
        assert np.array_equal(store.read_shard_rows(shard, rows_R), expected_ND[start + rows_R])
    x64 = torch.from_numpy(expected_ND).double()
    # The scale comes from the stored values, so it is the rounded rows' own: E||s·x||² = D.
    s = store.norm_scale(n_sample=10**6)
    assert (s * s * x64.pow(2).sum(1).mean()).item() == pytest.approx(D, rel=1e-9)


def test_bytes_on_disk_per_row(stores_by_dtype):
    for dtype, store in stores_by_dtype.items():
        meta = json.loads((store.folder / "meta.json").read_text())
        assert meta["dtype"] == dtype and store.dtype == dtype
        data_bytes = 0
        for i in range(store.n_shards):
            path = store.folder / f"acts_{i:05d}.npy"
            with open(path, "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                data_bytes += path.stat().st_size - f.tell()
        assert data_bytes / store.n_rows == D * ITEMSIZE[dtype], dtype


def test_a_key_with_another_dtype_is_another_folder(stores_by_dtype, tmp_path):
    folders = {store.folder for store in stores_by_dtype.values()}
    assert len(folders) == 3 and len({folder.parent for folder in folders}) == 1
    f32, bf16 = stores_by_dtype["float32"], stores_by_dtype["bfloat16"]
    with pytest.raises(CacheError, match="was made for dtype=bfloat16, not dtype=float32; use another"):
        ActivationStore.open(bf16.folder, expect=f32.key)
    # open checks the files against the dtype meta.json records
    damaged = tmp_path / "damaged"
    shutil.copytree(bf16.folder, damaged)
    shutil.copy(f32.folder / "acts_00000.npy", damaged / "acts_00000.npy")
    with pytest.raises(CacheError, match=rf"is damaged: acts_00000.npy holds \(64, {D}\) float32, expected "
                                         rf"\(64, {D}\) uint16; delete the folder"):
        ActivationStore.open(damaged)


def with_value(producer: FakeProducer, seq: int, value: float, col: int = 5):
    """The producer, with entry ``col`` of the first row of context ``seq`` set to ``value``."""
    def produce(start):
        for chunk in producer(start):
            hit = np.flatnonzero(chunk.seq_N.numpy() == seq)
            if len(hit):
                chunk.acts_ND[hit[0], col] = value
            yield chunk
    return produce


def first_row_of(seq: int) -> int:
    return int(np.searchsorted(FakeProducer().reference()["seq"], seq))


def test_float16_refuses_values_it_would_store_as_inf(tmp_path):
    seq = 42
    assert FakeProducer().context(seq)[2].shape[0] > 0  # context 42 has rows
    key = make_key(dtype="float16")
    with pytest.raises(ValueError, match="chunk 8 has 1 activations with |x| > 65504, the largest float16 "
                                         "value; harvest with cache_dtype bfloat16 or float32"):
        harvest(tmp_path, with_value(FakeProducer(), seq, -70_000.0), key)
    assert list(tmp_path.iterdir()) == [tmp_path / (key.folder_name() + ".lock")]  # no partial left

    edge = harvest(tmp_path, with_value(FakeProducer(), seq, 65504.0), key)  # float16's max is kept
    bf16 = harvest(tmp_path, with_value(FakeProducer(), seq, -70_000.0), make_key(dtype="bfloat16"))
    row = first_row_of(seq)
    assert edge.read_rows(row, row + 1)[0, 5].item() == 65504.0
    stored = bf16.read_rows(row, row + 1)[0, 5].item()
    assert stored == rounded(np.float32([-70_000.0]), "bfloat16")[0] == -70144.0


# -------------------------------------------------------------------------------------------------
# Extreme activations


def test_extreme_activations_are_counted_and_reported_once(tmp_path):
    seq = 42  # chunk 8: the bound comes from chunk 0, which the value cannot inflate
    producer = with_value(FakeProducer(), seq, 3e38)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = harvest(tmp_path, producer, make_key(n_tokens=400))
    first_chunk_ND = np.concatenate([FakeProducer().context(s)[2] for s in range(5)]).astype(np.float64)
    bound = 1e6 * math.sqrt(np.mean(first_chunk_ND ** 2))
    assert store.meta["n_extreme"] == 1 and store.meta["extreme_bound"] == pytest.approx(bound, rel=1e-12)
    row = first_row_of(seq)
    assert store.read_rows(row, row + 1)[0, 5].item() == np.float32(3e38)  # stored, finite
    reports = [str(w.message) for w in caught if "have |x| >" in str(w.message)]
    assert reports == [f"1 activations of {store.folder.name} have |x| > {bound:.3g} (1e+06 x the first "
                       f"chunk's RMS value), e.g. at context seq {seq}, pos 0; such values dominate an SAE's "
                       f"loss: set drop_outliers or check the site (meta.json n_extreme)"]

    clean = harvest(tmp_path, FakeProducer(), make_key(n_tokens=400, options="clean"))
    assert clean.meta["n_extreme"] == 0


def test_the_extreme_count_survives_a_resumed_harvest(tmp_path):
    key = make_key()
    seq = 12  # in the first shard, written before the crash
    assert first_row_of(seq) < 64
    with pytest.raises(RuntimeError, match="crashed"):
        harvest(tmp_path, with_value(FakeProducer(fail_after_rows=160), seq, 3e38), key)
    with pytest.warns(UserWarning, match=f"1 activations of .* e.g. at context seq {seq}, pos 0"):
        store = harvest(tmp_path, FakeProducer(), key)  # the resumed part holds no extreme value
    assert store.meta["n_extreme"] == 1


# -------------------------------------------------------------------------------------------------
# Full disk


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_removes_the_partial_harvest_and_says_what_it_needs(tmp_path, monkeypatch, code):
    write_npy = cache_writer._write_npy
    calls = []

    def fills_up(path, *args):
        calls.append(path.name)
        if len(calls) == 10:  # inside the second shard: the first one is on disk
            raise OSError(code, os.strerror(code), str(path))
        write_npy(path, *args)

    monkeypatch.setattr(cache_writer, "_write_npy", fills_up)
    key = make_key(n_tokens=100_000)  # 100,000 x (16 x 4 + 16) bytes
    with pytest.raises(CacheError) as caught:
        harvest(tmp_path, FakeProducer(), key)
    assert caught.match(rf"^no space left on {re.escape(str(tmp_path))}: this harvest needs about 8 MB \(100,000 rows of "
                        rf"{D} float32 values \+ 16 index bytes; [\d,]+ MB free\); free space or point "
                        rf"WORKBENCH_CACHE at a bigger disk$")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # one line, no chain
    assert calls[:7] == ["acts_00000.npy", "token_ids_00000.npy", "seq_00000.npy", "pos_00000.npy",
                         "ctx_input_ids_00000.npy", "ctx_mask_00000.npy", "ctx_seq_00000.npy"]
    assert list(tmp_path.iterdir()) == [tmp_path / (key.folder_name() + ".lock")]

    monkeypatch.setattr(cache_writer, "_write_npy", write_npy)
    again = FakeProducer()
    assert harvest(tmp_path, again, key).n_rows == len(FakeProducer().reference()["seq"])
    assert again.calls == [0]


def test_a_harvest_bigger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=0,
                                                                                 free=5_000_000))
    written = []
    write_npy = cache_writer._write_npy
    monkeypatch.setattr(cache_writer, "_write_npy",
                        lambda path, *args: (written.append(path), write_npy(path, *args)))
    key = make_key(n_tokens=100_000)
    with pytest.raises(CacheError, match=rf"^no space left on {re.escape(str(tmp_path))}: this harvest needs about 8 MB "
                                         rf"\(100,000 rows of {D} float32 values \+ 16 index bytes; "
                                         rf"5 MB free\); free space or point WORKBENCH_CACHE at a bigger "
                                         rf"disk$"):
        harvest(tmp_path, FakeProducer(), key)
    assert written == [] and list(tmp_path.iterdir()) == [tmp_path / (key.folder_name() + ".lock")]
    # In float16 the same harvest needs 100,000 x (16 x 2 + 16) bytes = 4.8 MB, and fits.
    assert harvest(tmp_path, FakeProducer(), make_key(n_tokens=100_000, dtype="float16")).dtype == "float16"


# -------------------------------------------------------------------------------------------------
# The lock


def test_concurrent_harvests_of_one_key_harvest_it_once(tmp_path):
    class SlowProducer(FakeProducer):
        def __call__(self, start):
            for chunk in super().__call__(start):
                time.sleep(0.005)  # long enough for the other thread to reach the lock
                yield chunk

    producers = [SlowProducer(), SlowProducer()]
    stores = [None, None]

    def run(i):
        stores[i] = harvest(tmp_path, producers[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(p.calls) for p in producers) == [0, 1]  # one harvested, the other waited and reused
    assert stores[0].folder == stores[1].folder
    assert_same_store(stores[0], stores[1])
