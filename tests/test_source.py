"""Held-out text that is held out: every kind of text source, split by document when it has one split.

The reference is written out here independently: a document is held out when the first 8 bytes of its
BLAKE2b digest, as a fraction of 2^64, fall below held_out_fraction.
"""
import hashlib
import json

import datasets
import pytest

from workbench.data.embedded import cpython_texts
from workbench.data.fingerprint import model_fingerprint, text_fingerprint
from workbench.data.source import TextSplit, is_held_out
from workbench.data.text import load_texts
from workbench.runconfig import ModelDataConfig

DOCS = [t for t in cpython_texts("eval")[:300]]
FRACTION = 0.2


def reference_held_out(doc: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") < fraction * 2**64


def _write_source(kind, folder):
    """A text source of this kind holding DOCS, and the texts load_texts reads from it."""
    if kind == "txt":
        path = folder / "docs.txt"
        lines = [d.replace("\n", " ") for d in DOCS]
        path.write_text("\n".join(lines) + "\n")
        return str(path), lines
    rows = [{"text": d} for d in DOCS]
    if kind == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        path = folder / "docs.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = folder / "docs.csv"
        datasets.Dataset.from_list(rows).to_csv(str(path))
    elif kind == "saved_dataset":
        path = folder / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "data_folder":  # a hub dataset's snapshot: a folder of data files, one "train" split
        path = folder / "snapshot"
        (path / "data").mkdir(parents=True)
        (path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), DOCS


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "csv", "saved_dataset", "data_folder"])
def test_one_split_sources_hold_out_documents_by_hash(tmp_path, kind):
    source, docs = _write_source(kind, tmp_path)
    # The default eval_split ("eval") names no split of a local file: the file is split by document.
    eval_split = "eval" if kind in ("txt", "jsonl", "parquet", "csv") else "train"
    cfg = ModelDataConfig(text=source, eval_split=eval_split, held_out_fraction=FRACTION)
    split = TextSplit(cfg, tmp_path / "cache")
    assert split.one_split
    held, trained = list(split.texts(held_out=True)), list(split.texts(held_out=False))
    assert set(held).isdisjoint(trained)
    assert held == [d for d in docs if reference_held_out(d, FRACTION)]
    assert trained == [d for d in docs if not reference_held_out(d, FRACTION)]
    assert 0.1 < len(held) / len(docs) < 0.3
    assert "held out" in split.name(True) and "trained on" in split.name(False)


def test_cpython_with_eval_split_equal_to_train_split_is_split_by_document(tmp_path):
    split = TextSplit(ModelDataConfig(text="cpython", eval_split="train", held_out_fraction=0.05), tmp_path)
    train_docs = cpython_texts("train")
    held = list(split.texts(held_out=True))
    assert held == [d for d in train_docs if reference_held_out(d, 0.05)]
    assert set(held).isdisjoint(split.texts(held_out=False))


def test_named_splits_are_read_as_they_are(tmp_path):
    split = TextSplit(ModelDataConfig(text="cpython"), tmp_path)
    assert not split.one_split
    assert list(split.texts(held_out=True)) == cpython_texts("eval")
    assert split.name(True) == "eval" and split.name(False) == "train"
    assert split.text_id == "cpython"  # the default's cache keys are what they were


def test_copies_of_a_document_land_on_the_same_side():
    doc = DOCS[0]
    assert all(is_held_out(doc, f) == reference_held_out(doc, f) for f in (0.01, 0.05, 0.3, 0.5))


def test_text_is_keyed_by_its_bytes_not_its_path(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"text": "one"}\n')
    b = tmp_path / "elsewhere" / "a.jsonl"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    assert text_fingerprint(a, tmp_path / "cache") == text_fingerprint(b, tmp_path / "cache")
    assert text_fingerprint(a) == hashlib.sha256(a.read_bytes()).hexdigest()[:12]
    a.write_text('{"text": "two"}\n')  # same size, new content
    assert text_fingerprint(a, tmp_path / "cache") != text_fingerprint(b, tmp_path / "cache")
    assert list(load_texts(str(a))) == ["two"]


def test_folder_digest_covers_every_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text('{"text": "x"}\n')
    before = text_fingerprint(tmp_path)
    (tmp_path / "data" / "y.jsonl").write_text('{"text": "y"}\n')
    assert text_fingerprint(tmp_path) != before


def test_model_folder_key_changes_when_a_file_is_written_again(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = model_fingerprint(tmp_path)
    assert model_fingerprint(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"weights, retrained")
    assert model_fingerprint(tmp_path) != before
