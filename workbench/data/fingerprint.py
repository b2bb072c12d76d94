"""What a local text or model folder holds, as a short digest: activation caches are keyed by
content, not by path, so editing a text file (or retraining a model into the same folder) is a new
harvest, and moving a folder is not.

* A text file is keyed by the sha256 of its bytes, read once in 1 MiB pieces; the digest is remembered
  in ``<cache root>/file_digests.json`` under the file's path, size and modification time, so a large
  corpus is read once, not on every run. A folder of text is keyed by the digests of all its files.
* A model folder is keyed by a manifest of its files (name, size, modification time): hashing
  gigabytes of weights on every run would cost more than the harvest it protects, and a model saved
  again is written anew, which changes the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..fsutil import write_text_atomic

DIGEST_FILE = "file_digests.json"
_PIECE = 1 << 20


def text_fingerprint(path: str | os.PathLike, memo_root: str | os.PathLike | None = None) -> str:
    """12 hex digits that change whenever the bytes of the file, or of any file in the folder, do.
    ``memo_root`` is where the per-file digests are remembered (the activation cache's root)."""
    path = Path(path)
    memo = _Memo(Path(memo_root) / DIGEST_FILE if memo_root is not None else None)
    if path.is_file():
        digest = memo.digest(path)
    else:
        h = hashlib.sha256()
        for file in _files(path):
            h.update(f"{file.relative_to(path).as_posix()}\0{memo.digest(file)}\0".encode())
        digest = h.hexdigest()
    memo.save()
    return digest[:12]


def model_fingerprint(path: str | os.PathLike) -> str:
    """12 hex digits of the manifest (relative name, size, mtime) of every file in a model folder."""
    path = Path(path)
    h = hashlib.sha256()
    for file in _files(path):
        stat = file.stat()
        h.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()[:12]


def _files(folder: Path) -> list[Path]:
    """Every file under folder, in a fixed order, leaving out hidden files and folders (.git,
    .cache: the hub client's bookkeeping changes without the data changing)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / name for name in sorted(filenames) if not name.startswith(".")]
    return found


class _Memo:
    """sha256 digests of files by (resolved path, size, mtime_ns), kept in a JSON file."""

    def __init__(self, file: Path | None):
        self.file = file
        self.entries: dict[str, list] = {}
        self.changed = False
        if file is not None and file.is_file():
            try:
                loaded = json.loads(file.read_text())
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    def digest(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        entry = self.entries.get(key)
        if isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return entry[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(_PIECE):
                h.update(piece)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.file, json.dumps(self.entries))
        except OSError:  # a read-only cache: the digests are just computed again next time
            pass
