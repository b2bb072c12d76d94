"""Crash-safe checkpoints of a training run::

    run_dir/checkpoints/step_00001000/saes/<name>/cfg.json, sae_weights.safetensors
                                     /trainer_state.pt
                                     /rank_0.pt, rank_1.pt, ...   (sharded runs only)
    run_dir/checkpoints/latest          name of the newest complete checkpoint ("step_00001000")
    run_dir/saes/<name>/                the final SAEs, written when training ends

On several ranks rank 0 writes the SAE folders (whole: a sharded SAE is gathered first, so a run
trained on N ranks loads anywhere with ``workbench.io.load``) and ``trainer_state.pt``. A run whose
SAEs are sharded over the ranks also has one ``rank_{r}.pt`` per rank, written by that rank: its
part of each SAE with the part's Adam state, schedule and firing counter, its generators and stream
position (:func:`split_rank_state`); ``trainer_state.pt`` then holds the rest, the same for every rank.
A data-parallel run has no rank files: its ranks' states are identical (same weights, same Adam
state, the same global batches read from the same stream under the same seed), and rank 0's is the
run's.

A checkpoint is written into a hidden ``.step_XXXXXXXX.tmp`` sibling, fsynced, renamed into place,
and only then is ``latest`` switched to it (itself by writing a temporary file and renaming), so a
crash at any moment leaves the previous checkpoint whole. Resuming deletes the leftover temporary; a
write that fails (a full disk: :class:`CheckpointError`, with the size a checkpoint needs) deletes its own.

``trainer_state.pt`` and the rank files hold only tensors and plain Python values (dicts, lists,
numbers, strings) and are read with ``torch.load(weights_only=True)``: loading a checkpoint never
unpickles objects.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import io as sae_io
from ..fsutil import fsync_path, write_text_atomic
from ..saes.base import BaseSAE
from .distributed import DistContext

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.pt"
SAES_DIR = "saes"
TMP_SUFFIX = ".tmp"
RANK_KEYS = ("saes", "rng", "stream")
"""The entries of a sharded run's trainer state that each rank writes to its own file."""


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (the disk is full); its message says what to do."""


_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXTS = ("No space left", "unexpected pos")
"""How a full disk shows through torch.save's zip writer and safetensors, which do not raise OSError."""


def _is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE_ERRNOS
    return any(text in str(exc) for text in _NO_SPACE_TEXTS)


def _nbytes(obj: Any) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def write_checkpoint(run_dir: str | Path, step: int, saes: dict[str, BaseSAE] | None, state: dict[str, Any] | None,
                     metadata: dict[str, Any] | None = None, *, ctx: DistContext | None = None,
                     rank_state: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/checkpoints/step_{step:08d}/`` atomically and point ``latest`` at it.

    On several ranks (``ctx``) every rank calls it: rank 0 writes ``saes`` and ``state`` (the other
    ranks may pass None), each rank its ``rank_state`` if it has one; it returns on every rank once
    the checkpoint is in place."""
    ctx = ctx if ctx is not None else DistContext()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}{TMP_SUFFIX}"
    if ctx.is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if ctx.is_writer:
            tmp.mkdir(parents=True)
        ctx.barrier()  # the folder exists before any rank writes into it
        if rank_state is not None:
            torch.save(rank_state, tmp / rank_file(ctx.rank))
            fsync_path(tmp / rank_file(ctx.rank))
        if ctx.is_writer:
            for name, sae in saes.items():
                sae_io.save(sae, tmp / SAES_DIR / name, metadata)
            torch.save(state, tmp / STATE_FILE)
        ctx.barrier()  # every rank's file is written
        if ctx.is_writer:
            _fsync_tree(tmp)
    except Exception as exc:
        if ctx.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if not _is_no_space(exc):
            raise
        parts = [state, rank_state, *(sae.state_dict() for sae in (saes or {}).values())]
        megabytes = sum(_nbytes(part) for part in parts) / 2**20
        size = f"{megabytes:,.0f}" if megabytes >= 10 else f"{megabytes:.2g}"
        raise CheckpointError(f"no space left on {root}: a checkpoint needs about {size} MB; free space or "
                              f"set checkpoint_every higher") from None
    if ctx.is_writer:
        if final.exists():
            # Left by a run that died before pointing `latest` at it; this run has since moved on.
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
    ctx.barrier()  # no rank goes on before the checkpoint is in place
    return final


def split_rank_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sharded run's trainer state cut in two: the entries every rank shares (for
    ``trainer_state.pt``, with the SAEs' names only) and this rank's own (:data:`RANK_KEYS`)."""
    shared = {key: value for key, value in state.items() if key not in RANK_KEYS}
    shared["saes"] = {name: {} for name in state["saes"]}
    return shared, {key: state[key] for key in RANK_KEYS}


def with_rank_state(folder: str | Path, state: dict[str, Any], rank: int) -> dict[str, Any]:
    """A sharded run's trainer state for ``rank``: ``state`` (from ``trainer_state.pt``) with the
    rank's own entries read from its ``rank_{rank}.pt``."""
    path = Path(folder) / rank_file(rank)
    try:
        own = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {folder} has no {path.name}; resume on the world size it was written "
                         f"with") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        own = None
    if not isinstance(own, dict) or set(own) != set(RANK_KEYS) or list(own["saes"]) != list(state["saes"]):
        raise ValueError(_damaged(Path(folder), path.name))
    return {**state, **own}


def save_final_saes(run_dir: str | Path, saes: dict[str, BaseSAE], metadata: dict[str, Any],
                    input_scale: float | None = None) -> None:
    """The trained SAEs as ``run_dir/saes/<name>/``, loadable with ``workbench.io.load``, with
    ``input_scale`` (the activation normalisation they were trained under) folded in."""
    for name, sae in saes.items():
        sae_io.save(sae, Path(run_dir) / SAES_DIR / name, metadata, input_scale=input_scale)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``latest`` points to; if the pointer is missing or dangling (a crash between the
    rename and the pointer update), the complete checkpoint with the highest step; None if none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if (folder / STATE_FILE).is_file():
            return folder
    complete = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.removeprefix("step_")), default=None)


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete the temporaries of checkpoint writes that never finished; returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    leftovers = list(root.glob(f".*{TMP_SUFFIX}"))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return leftovers


def load_checkpoint(folder: str | Path) -> tuple[dict[str, BaseSAE], dict[str, Any]]:
    """The SAEs (architecture and weights from their folders) and the trainer state of a checkpoint.

    The state's per-SAE ``module`` entries are the modules' whole state dicts (BatchTopK's
    ``threshold`` buffer included), and the trainer's own per-SAE state (optimiser, schedule, firing
    counter); ``Trainer.load_state_dict`` applies them.
    """
    folder = Path(folder)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        # Not torch's own message: it advises weights_only=False, which would unpickle arbitrary code.
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("saes"), dict):
        raise ValueError(_damaged(folder, STATE_FILE))
    saes = {name: sae_io.load(folder / SAES_DIR / name) for name in state["saes"]}
    return saes, state


def _damaged(folder: Path, file: str) -> str:
    """What to do about a checkpoint whose trainer state cannot be read: go back to an earlier one."""
    earlier = max((p for p in folder.parent.glob("step_*") if p.name < folder.name and (p / STATE_FILE).is_file()),
                  key=lambda p: p.name, default=None)  # zero-padded steps: names sort like steps
    problem = f"checkpoint {folder} is damaged: its {file} is truncated or not a trainer state"
    if earlier is not None:
        return (f"{problem}; delete {folder} and resume again to continue from {earlier.name}, the newest "
                f"earlier checkpoint")
    return (f"{problem}, and the run has no earlier checkpoint; delete {folder.parent} and train again "
            f"without resuming")


def rng_state() -> dict[str, Any]:
    """torch (CPU), python ``random`` and numpy generator states as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))


def _fsync_tree(folder: Path) -> None:
    """fsync every file, then every directory bottom-up, so the rename publishes durable data."""
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for filename in filenames:
            fsync_path(Path(dirpath) / filename)
        fsync_path(Path(dirpath))
