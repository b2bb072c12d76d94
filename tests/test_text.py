import json

import datasets
import pytest
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workbench.data.embedded import default_model_path
from workbench.data.text import context_specials, load_texts, tokenize_contexts
from workbench.data.types import TokenBatch

TEXTS = [topics[name] for name in ("assert", "break", "if", "while", "pass", "for")]
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE whose BOS, EOS and padding are all <|endoftext|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, pad_token=EOT)


def text_ids(tokenizer, texts):
    return [i for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] for i in ids]


def unwrap(batches: list[TokenBatch], prefix: list[int], suffix: list[int], context_length: int) -> list[int]:
    """The text tokens of the contexts, in order, after checking each context's shape, mask and specials."""
    tokens = []
    for batch in batches:
        assert batch.input_ids_SL.shape[1] == context_length
        assert batch.input_ids_SL.dtype == batch.attention_mask_SL.dtype == batch.seq_S.dtype == torch.long
        for ids, mask in zip(batch.input_ids_SL.tolist(), batch.attention_mask_SL.tolist()):
            n_real = sum(mask)
            assert mask == [1] * n_real + [0] * (context_length - n_real)
            real = ids[:n_real]
            assert real[: len(prefix)] == prefix and real[n_real - len(suffix) :] == suffix
            tokens += real[len(prefix) : n_real - len(suffix)]
    return tokens


# --- load_texts ---------------------------------------------------------------------------------------


def test_list_source_skips_empty_texts():
    assert list(load_texts(["a cat", "", "a dog"])) == ["a cat", "a dog"]
    with pytest.raises(TypeError, match="holds a int"):
        list(load_texts(["a cat", 3]))


def test_dataset_source_and_missing_column():
    ds = datasets.Dataset.from_dict({"body": ["one", "", "two", None], "id": [1, 2, 3, 4]})
    assert list(load_texts(ds, text_column="body")) == ["one", "two"]
    with pytest.raises(ValueError, match=r"text_column='text' is not a column.*\['body', 'id'\]"):
        load_texts(ds)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix):
    texts = ["The first line of prose.", "A second one, with a comma.", "And a third."]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text(texts[0] + "\n\n" + "\n".join(texts[1:]) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    else:
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(path))
    assert list(load_texts(path)) == texts
    assert list(load_texts(str(path), split="eval", streaming=False)) == texts


def test_streamed_file_missing_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "hello", "n": 1}) + "\n")
    with pytest.raises(ValueError, match=r"text_column='text' is not a column.*'body'"):
        list(load_texts(path))


def test_folder_of_files_reads_them_in_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "from b"}) + "\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n")
    assert list(load_texts(tmp_path)) == ["from a", "from b"]
    assert list(load_texts(tmp_path, data_files="b.jsonl")) == ["from b"]


def test_save_to_disk_folders(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "one"))
    assert list(load_texts(tmp_path / "one")) == ["alpha", "beta"]
    datasets.DatasetDict({"train": ds, "eval": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert list(load_texts(tmp_path / "dict", split="eval")) == ["beta"]
    with pytest.raises(ValueError, match=r"split='test' is not in the dataset; its splits are \['train', 'eval'\]"):
        load_texts(tmp_path / "dict", split="test")


def test_hub_name_offline_gives_one_line_error():
    with pytest.raises(ConnectionError) as info:
        load_texts("Skylion007/openwebtext")
    message = str(info.value)
    assert "\n" not in message
    assert "'Skylion007/openwebtext' is not a local file or folder and the Hugging Face hub is unreachable" in message
    assert "--local-dir DIR`, then pass the folder DIR" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_local_path_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or folder at './nowhere/corpus.jsonl'"):
        load_texts("./nowhere/corpus.jsonl")
    (tmp_path / "notes.md").write_text("# hi\n")
    with pytest.raises(ValueError, match=r"notes.md'.*reads \.txt, \.json, \.jsonl, \.parquet, \.csv files"):
        load_texts(tmp_path / "notes.md")


# --- tokenize_contexts ------------------------------------------------------------------------------


def test_bert_contexts_are_cls_text_sep_and_keep_every_token(bert_tokenizer):
    cls, sep, pad = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id, bert_tokenizer.pad_token_id
    assert context_specials(bert_tokenizer) == ([cls], [sep])
    batches = list(tokenize_contexts(TEXTS, bert_tokenizer, context_length=64, batch_size=5, progress=False))
    assert unwrap(batches, [cls], [sep], 64) == text_ids(bert_tokenizer, TEXTS)
    seq = torch.cat([b.seq_S for b in batches])
    assert seq.tolist() == list(range(len(seq)))
    assert [len(b.seq_S) for b in batches[:-1]] == [5] * (len(batches) - 1)
    mask_SL = torch.cat([b.attention_mask_SL for b in batches])
    ids_SL = torch.cat([b.input_ids_SL for b in batches])
    assert mask_SL[:-1].all()  # only the last context may be padded
    n_last = int(mask_SL[-1].sum())
    assert 2 < n_last < 64, "the test texts should leave a partial last context"
    assert ids_SL[-1, n_last - 1] == sep and (ids_SL[-1, n_last:] == pad).all()


def test_causal_contexts_start_with_bos(bpe_tokenizer):
    bos = bpe_tokenizer.bos_token_id
    assert context_specials(bpe_tokenizer) == ([bos], [])
    batches = list(tokenize_contexts(TEXTS, bpe_tokenizer, context_length=32, progress=False))
    assert unwrap(batches, [bos], [], 32) == text_ids(bpe_tokenizer, TEXTS)
    assert all((b.input_ids_SL[:, 0] == bos).all() for b in batches)

    plain = list(tokenize_contexts(TEXTS, bpe_tokenizer, context_length=32, prepend_bos=False, progress=False))
    assert context_specials(bpe_tokenizer, prepend_bos=False) == ([], [])
    assert unwrap(plain, [], [], 32) == text_ids(bpe_tokenizer, TEXTS)
    assert plain[0].input_ids_SL[0].tolist() == text_ids(bpe_tokenizer, TEXTS)[:32]


@pytest.mark.parametrize("max_tokens", [64 * 3, 64 * 3 + 20, 64 * 3 + 2, 40])
def test_max_tokens_counts_real_positions(bert_tokenizer, max_tokens):
    batches = list(
        tokenize_contexts(TEXTS, bert_tokenizer, context_length=64, batch_size=2, max_tokens=max_tokens, progress=False)
    )
    n_real = sum(int(b.attention_mask_SL.sum()) for b in batches)
    # A remainder of 2 positions would hold [CLS] and [SEP] only, so that context is left out.
    assert n_real == (64 * 3 if max_tokens == 64 * 3 + 2 else max_tokens)
    body = unwrap(batches, [101], [102], 64)
    assert body == text_ids(bert_tokenizer, TEXTS)[: len(body)]


def test_no_text_and_too_little_text(bert_tokenizer):
    with pytest.raises(ValueError, match="the text source yielded no text"):
        next(tokenize_contexts(["", ""], bert_tokenizer, progress=False))
    short = "the cat sat on the mat"
    n = len(text_ids(bert_tokenizer, [short]))
    with pytest.raises(ValueError, match=f"got {n} tokens but one context needs 126 besides its 2 special tokens; "
                       "lower context_length or give more text"):
        next(tokenize_contexts(load_texts([short]), bert_tokenizer, progress=False))


def test_bad_arguments(bert_tokenizer):
    with pytest.raises(TypeError, match="texts is a single string"):
        tokenize_contexts("just one text", bert_tokenizer)
    with pytest.raises(ValueError, match="context_length=2 leaves no room for text besides its 2 special tokens"):
        tokenize_contexts(TEXTS, bert_tokenizer, context_length=2)
