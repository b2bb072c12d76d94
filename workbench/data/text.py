"""Text in, fixed-length token contexts out: the first step of every harvest.

:func:`load_texts` turns any text source a researcher has at hand (a list of strings, a ``datasets``
dataset, a local file or folder, a hub dataset name) into one stream of strings, and
:func:`tokenize_contexts` cuts that stream into batches of contexts (:class:`TokenBatch`) that the
harvester runs the model on.

How the contexts are built:

* Texts are tokenised without special tokens and concatenated in order, with nothing between them,
  then cut into contexts: contexts run across document boundaries, so short documents (most
  docstrings) cost no padding.
* Each context is wrapped in the special tokens the tokenizer itself adds to one sequence, so the model
  sees a well-formed input: a BERT-style encoder gets ``[CLS] + (context_length - 2) tokens + [SEP]``.
  Tokenizers with a BOS token (causal LMs) start every context with it when ``prepend_bos``.
* The last context, cut short by the end of the text or by ``max_tokens``, is kept and padded after
  its closing special tokens, with its padding marked 0 in ``attention_mask``: a small held-out split
  then loses none of its text and ``max_tokens`` is met exactly. Every other context is all real.
  Text that does not fill even one context raises instead: that is almost always the wrong source,
  split or column, and a lone padded context would make a harvest too small to notice.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from workbench.data.types import TokenBatch

FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""Local file suffixes that :func:`load_texts` reads, and the ``datasets`` builder that reads each."""

_FILE_LAYOUT = '.txt: one text per line; .jsonl: one {"text": ...} object per line'
_BLANK_PROBE_BYTES = 1 << 16
"""A file this small is read whole to tell whether it holds anything but whitespace."""
_TEXTS_PER_TOKENIZER_CALL = 64
"""Texts tokenised per call: one call per text would spend its time in Python overhead."""
_ROWS_PER_READ = 1000
"""Dataset rows read at a time; reading row by row builds a Python dict per row."""


TextSource = (
    list[str] | tuple[str, ...] | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | str | os.PathLike
)
"""What :func:`load_texts` accepts."""


def load_texts(
    source: TextSource,
    *,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = True,
    data_files: str | Sequence[str] | None = None,
) -> Iterable[str]:
    """The non-empty texts of ``source``, in order, as a one-pass iterator (streams are read lazily).

    ``source`` is one of:

    * a list or tuple of strings;
    * a ``datasets`` ``Dataset`` / ``IterableDataset`` (or a ``DatasetDict``, of which ``split`` is read);
    * a local file (``.txt``: one text per line; ``.json``/``.jsonl``/``.parquet``/``.csv``: one per
      row); it is read as ``split`` whatever that is;
    * a local folder written by ``Dataset.save_to_disk``, or a folder of such files, for instance a
      snapshot of a hub dataset downloaded where there is network (read like the hub repo it mirrors);
    * a hub dataset name such as ``"Skylion007/openwebtext"``, streamed by ``datasets.load_dataset``.

    ``data_files`` selects files inside a folder or hub dataset (``datasets.load_dataset``'s argument).
    ``streaming`` reads files and hub datasets lazily instead of converting them to Arrow first.
    Missing or empty files, unreadable suffixes, an unreachable hub and a missing ``text_column`` raise
    here, when the source is opened (a streamed file whose columns are unknown until read: at its first
    row); values that are neither strings nor None raise when they are reached.
    """
    if isinstance(source, (list, tuple)):
        return _nonempty_strings(source, "source")
    if isinstance(source, (str, os.PathLike)):
        source = _open_dataset(source, split=split, streaming=streaming, data_files=data_files)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise ValueError(f"split={split!r} is not in the dataset; its splits are {list(source)}")
        source = source[split]
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return _column_texts(source, text_column)
    raise TypeError(
        f"source is a {type(source).__name__}; pass a list of strings, a datasets.Dataset, a local path or a hub name"
    )


def _open_dataset(
    source: str | os.PathLike, *, split: str, streaming: bool, data_files: str | Sequence[str] | None
) -> datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict:
    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"cannot read {str(path)!r}: load_texts reads {', '.join(FILE_BUILDERS)} files")
        empty = ValueError(f"text file {str(path)!r} is empty; give a file with text in it ({_FILE_LAYOUT})")
        if _is_blank(path):
            raise empty
        try:
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming)
        except StopIteration:  # datasets' json reader, streaming a file with no rows
            raise empty from None
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), split=split, streaming=streaming, data_files=data_files)
    name = str(source)
    if path.suffix.lower() in FILE_BUILDERS or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no file or folder at {name!r}; check the path")
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, data_files=data_files)
    except ConnectionError:
        raise ConnectionError(
            f"{name!r} is not a local file or folder and the Hugging Face hub is unreachable; on a machine "
            f"with network run `hf download {name} --repo-type dataset --local-dir DIR`, then pass the folder DIR"
        ) from None


def _is_blank(path: Path) -> bool:
    """Whether the file is empty or (if small) holds only whitespace."""
    if path.stat().st_size > _BLANK_PROBE_BYTES:
        return False
    return not path.read_bytes().strip()


def _column_texts(dataset: datasets.Dataset | datasets.IterableDataset, text_column: str) -> Iterator[str]:
    # A streamed text/json file knows its columns only once read: then the first batch is checked.
    columns = dataset.column_names
    if columns is not None:
        if text_column not in columns:
            raise ValueError(f"text_column={text_column!r} is not a column of the dataset; its columns are {columns}")
        dataset = dataset.select_columns([text_column])
    return _read_column(dataset, text_column)


def _read_column(dataset: datasets.Dataset | datasets.IterableDataset, text_column: str) -> Iterator[str]:
    for batch in dataset.iter(batch_size=_ROWS_PER_READ):
        if text_column not in batch:
            raise ValueError(f"text_column={text_column!r} is not a column of the dataset; its columns are {[*batch]}")
        yield from _nonempty_strings(batch[text_column], f"text_column={text_column!r}")


def _nonempty_strings(texts: Iterable[str | None], what: str) -> Iterator[str]:
    for text in texts:
        if isinstance(text, str):
            if text:
                yield text
        elif text is not None:
            raise TypeError(f"{what} holds a {type(text).__name__} ({text!r:.40}), not a string; give text")


def context_specials(tokenizer: PreTrainedTokenizerBase, *, prepend_bos: bool = True) -> tuple[list[int], list[int]]:
    """The token ids that open and close every context: (prefix, suffix).

    They are the ones the tokenizer itself puts around a single sequence (``[CLS]`` and ``[SEP]`` for
    BERT, nothing for GPT-2, ``<s>`` for Llama), except that the BOS token, for tokenizers that have
    one, is there exactly when ``prepend_bos``.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    prefix, suffix = list(full[:start]), list(full[start + len(plain) :])
    bos = tokenizer.bos_token_id
    if bos is not None:
        prefix = ([bos] if prepend_bos else []) + [t for t in prefix if t != bos]
    return prefix, suffix


def tokenize_contexts(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    context_length: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
    prepend_bos: bool = True,
    progress: bool = True,
) -> Iterator[TokenBatch]:
    """Cut the tokenised, concatenated ``texts`` into batches of ``context_length``-token contexts.

    Every context but the last holds ``context_length`` real tokens: the special tokens of
    :func:`context_specials` around a run of text tokens (see the module docstring). ``seq_S`` numbers
    the contexts 0, 1, 2, ... across all batches; every batch has ``batch_size`` contexts but the last.

    ``max_tokens`` caps the real (unpadded, special tokens included) positions, i.e. the activation
    rows a harvest yields: exactly ``max_tokens`` of them unless the text runs out first (or the last
    context would have room for its special tokens only, then it is left out).

    ``prepend_bos`` starts each context with the tokenizer's BOS token, when it has one. It is on by
    default because a causal LM treats its first position unlike any other (an attention sink with
    outsized activations); a fixed BOS there keeps that position off the text, where it can be dropped.
    """
    if isinstance(texts, str):
        raise TypeError("texts is a single string; pass an iterable of texts, e.g. [text] or load_texts(...)")
    prefix, suffix = context_specials(tokenizer, prepend_bos=prepend_bos)
    n_special = len(prefix) + len(suffix)
    if context_length <= n_special:
        raise ValueError(
            f"context_length={context_length} leaves no room for text besides its {n_special} special tokens; "
            f"use context_length >= {n_special + 1}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if max_tokens is not None and max_tokens <= n_special:
        raise ValueError(f"max_tokens={max_tokens} leaves no room for text; use max_tokens > {n_special}")
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    bodies = _context_bodies(
        _token_ids(texts, tokenizer), context_length=context_length, n_special=n_special, max_tokens=max_tokens
    )
    return _batches(bodies, prefix, suffix, pad_id, context_length, batch_size, max_tokens, progress)


def _token_ids(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """Each text's token ids, without special tokens (and so without too-long-sequence warnings)."""
    texts = iter(texts)
    while chunk := list(islice(texts, _TEXTS_PER_TOKENIZER_CALL)):
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def _context_bodies(
    token_ids: Iterator[list[int]], *, context_length: int, n_special: int, max_tokens: int | None
) -> Iterator[list[int]]:
    """The text tokens of each context, in order: all full but possibly the last."""
    full = context_length - n_special
    remaining = max_tokens if max_tokens is not None else float("inf")
    want = min(full, remaining - n_special)
    buffer: list[int] = []
    n_bodies = 0
    for ids in token_ids:
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= want > 0:
            yield buffer[start : start + want]
            n_bodies += 1
            start += want
            remaining -= want + n_special
            want = min(full, remaining - n_special)
        del buffer[:start]
        if want <= 0:
            return
    if n_bodies == 0 and not buffer:
        raise ValueError("the text source yielded no text; check the source, its split and text_column")
    if n_bodies == 0:
        besides = f" besides its {n_special} special tokens" if n_special else ""
        raise ValueError(
            f"got {len(buffer)} tokens but one context needs {want}{besides}; lower context_length or give more text"
        )
    if buffer:
        yield buffer


def _batches(
    bodies: Iterator[list[int]],
    prefix: list[int],
    suffix: list[int],
    pad_id: int,
    context_length: int,
    batch_size: int,
    max_tokens: int | None,
    progress: bool,
) -> Iterator[TokenBatch]:
    n_contexts = 0
    with tqdm(total=max_tokens, unit="tok", desc="tokenizing", disable=not progress) as bar:
        while rows := list(islice(bodies, batch_size)):
            input_ids_SL = torch.full((len(rows), context_length), pad_id, dtype=torch.long)
            attention_mask_SL = torch.zeros((len(rows), context_length), dtype=torch.long)
            for s, body in enumerate(rows):
                context = prefix + body + suffix
                input_ids_SL[s, : len(context)] = torch.tensor(context)
                attention_mask_SL[s, : len(context)] = 1
            seq_S = torch.arange(n_contexts, n_contexts + len(rows))
            n_contexts += len(rows)
            bar.update(int(attention_mask_SL.sum()))
            yield TokenBatch(input_ids_SL, attention_mask_SL, seq_S)
