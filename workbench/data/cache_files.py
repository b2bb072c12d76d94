"""The files of an activation cache folder: their names, the dtypes they are stored in, and the cheap
checks that a file is whole. Shared by the reader (:mod:`.store`) and the writer (:mod:`.cache_writer`),
which is why it sits below both; the folder layout is described in :mod:`.store`."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..fsutil import write_text_atomic

FORMAT = 1
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"

# How each cache dtype is stored. numpy has no bfloat16, so its raw bits go into uint16: the top half
# of the float32 with the same sign, exponent and leading 7 mantissa bits.
ACTS_STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(np.uint16)}
# Per-row index arrays of a shard, and the contexts table, with the dtypes they are stored in.
INDEX_DTYPES = {"token_ids": np.int32, "seq": np.int64, "pos": np.int32}
CONTEXT_DTYPES = {"input_ids": np.int32, "mask": np.uint8, "seq": np.int64}
INDEX_BYTES_PER_ROW = sum(np.dtype(dtype).itemsize for dtype in INDEX_DTYPES.values())


class CacheError(RuntimeError):
    """A cache folder that cannot be used as asked: unfinished, made for another key, damaged, or
    one that did not fit on its disk."""


def shard_file(field: str, shard: int) -> str:
    return f"{field}_{shard:05d}.npy"


def context_file(field: str) -> str:
    return f"contexts_{field}.npy"


def check_file(folder: Path, name: str, shape: tuple[int, ...], dtype: Any) -> int:
    """The data offset of a whole .npy file with this shape and dtype; a CacheError otherwise."""
    problem, offset = file_problem(folder / name, shape, dtype)
    if problem is not None:
        raise CacheError(f"cache folder {folder} is damaged: {problem}; delete the folder and harvest again")
    return offset


def file_problem(path: Path, shape: tuple[int, ...], dtype: Any) -> tuple[str | None, int]:
    """(what is wrong with the .npy file at path, or None; its data offset), from its header and
    size alone: cheap enough to check every shard of a large cache."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, fortran, found_dtype = read_header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path.name} is missing", 0
    except (OSError, ValueError) as exc:
        return f"{path.name} is not a readable .npy file ({exc})", 0
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype) or fortran:
        return (f"{path.name} holds {found_shape} {found_dtype}, expected {tuple(shape)} "
                f"{np.dtype(dtype)}"), offset
    expected = offset + math.prod(shape) * np.dtype(dtype).itemsize
    if size != expected:
        return f"{path.name} is {size} bytes, expected {expected}", offset
    return None, offset


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
