"""What names an activation cache: the :class:`CacheKey` of a harvest, and where caches live.

The key's digest alone decides which folder a harvest goes to, so it must never change for a key
that already has caches on disk: a field added later (``dtype``) is left out of the digested JSON
while it has its default value.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache_files import ACTS_STORAGE, is_int

CACHE_ENV = "WORKBENCH_CACHE"
DEFAULT_DTYPE = "float32"


def default_cache_root() -> Path:
    """Where harvests are cached: ``$WORKBENCH_CACHE`` if set, else ``~/.cache/sae-workbench``.

    One root for every notebook and run on a machine, so a harvest made once is reused by all of
    them; point ``WORKBENCH_CACHE`` at a bigger or shared disk for paper-sized harvests."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sae-workbench").expanduser()


@dataclass(frozen=True)
class CacheKey:
    """Everything that decides which rows a harvest writes. Harvests with equal keys are
    interchangeable, so the key names the cache folder, and any change to it is a new harvest."""

    model: str
    """Model name or path, e.g. "sentence-transformers/all-MiniLM-L6-v2"."""
    site: str
    """Where in the model the activations are read, e.g. "blocks.3.hook_resid_post"."""
    text: str
    """The text source: a description such as "cpython:train", or a dataset name/path and split."""
    n_tokens: int
    """Token budget asked for: the harvest stops after this many rows (fewer if the text runs out)."""
    context_length: int
    """Tokens per context (L)."""
    options: str = ""
    """Anything else that changes the rows, e.g. "exclude_special,drop_outliers=10"."""
    dtype: str = DEFAULT_DTYPE
    """How the activations are stored: "float32", or "float16" / "bfloat16" for half the disk. Reads
    always give float32; the stored values are the float32 ones rounded to nearest. float16 keeps 3
    more mantissa bits but overflows above 65504 (the harvest refuses such values); bfloat16 has
    float32's range."""

    def __post_init__(self) -> None:
        for name in ("model", "site", "text", "options"):
            value = getattr(self, name)
            if not isinstance(value, str) or (name != "options" and not value):
                raise ValueError(f"CacheKey.{name}={value!r} must be a non-empty string")
        for name in ("n_tokens", "context_length"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"CacheKey.{name}={value!r} must be a positive integer")
            object.__setattr__(self, name, int(value))  # a numpy integer would not go into JSON
        if not isinstance(self.dtype, str) or self.dtype not in ACTS_STORAGE:
            raise ValueError(f"CacheKey.dtype={self.dtype!r} is not a cache dtype; use one of "
                             f"{', '.join(map(repr, ACTS_STORAGE))}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, leaving out ``dtype`` when it is float32: so the keys (and digests, folder
        names and progress files) of caches harvested before the field existed stay what they were."""
        fields = dataclasses.asdict(self)
        if self.dtype == DEFAULT_DTYPE:
            del fields["dtype"]
        return fields

    def digest(self) -> str:
        """12 hex digits of the sha256 of the key's sorted JSON: the same on every run and machine,
        unlike ``hash()``, so a folder name found on disk can be recomputed from the key."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def folder_name(self) -> str:
        """A readable slug followed by the digest, which alone decides identity, e.g.
        ``all-MiniLM-L6-v2__blocks.3.hook_resid_post__cpython_train__500k-L128__1f0c9e0d2a7b``
        (``500k-L128-bfloat16`` for a half-precision cache)."""
        model = self.model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
        size = f"{_count(self.n_tokens)}-L{self.context_length}"
        if self.dtype != DEFAULT_DTYPE:
            size += f"-{self.dtype}"
        return "__".join([_slug(model), _slug(self.site), _slug(self.text), size, self.digest()])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("._")[:40] or "_"


def _count(n: int) -> str:
    """500000 -> "500k", 2000000 -> "2M"; other numbers as they are."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
