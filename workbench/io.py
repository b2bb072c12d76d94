"""Save and load SAEs as SAELens-style folders: ``cfg.json`` + ``sae_weights.safetensors``.

Keys and shapes follow SAELens: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec``,
plus whatever else an architecture holds; each architecture says how it is written
(``saelens_config``, ``saelens_tensors``) and read back (``load_saelens_tensors_``), so this module
names none of them. Weights are safetensors only: nothing here ever unpickles.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .saes.base import BaseSAE
from .saes.registry import ARCHITECTURES, architecture_of, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def fold_input_scale(sae: BaseSAE, scale: float) -> BaseSAE:
    """A copy of ``sae`` that works on raw activations x when ``sae`` was trained on scale * x
    (see :meth:`~workbench.saes.base.BaseSAE.fold_input_scale_`)."""
    return copy.deepcopy(sae).fold_input_scale_(scale)


def save(sae: BaseSAE, path: str | Path, metadata: dict[str, Any] | None = None,
         input_scale: float | None = None) -> Path:
    """Write ``sae`` to the folder ``path`` (created if needed). ``metadata`` (e.g. the model and
    site the SAE was trained on) is stored in cfg.json under ``"metadata"``. If the SAE was trained
    on normalised activations ``input_scale * x``, pass that scale: it is folded into the weights
    (:func:`fold_input_scale`) so the saved SAE reads raw activations."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if input_scale is not None:
        sae = fold_input_scale(sae, input_scale)
        metadata = {**(metadata or {}), "folded_input_scale": input_scale}
    cfg = {
        **sae.saelens_config(),
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "workbench_version": __version__,
        "metadata": metadata or {},
    }
    save_file(sae.saelens_tensors(), str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed cfg.json of an SAE folder, with our architecture name."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no SAE folder at {folder}")
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{folder} is not an SAE folder: it has no {CFG_FILE} "
                         f"(expected {CFG_FILE} + {WEIGHTS_FILE}, as written by workbench.io.save)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} holds a {type(cfg).__name__}, not a config object")
    arch = architecture_of(cfg)
    if arch is None:
        raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is not one this workbench "
                         f"can load ({sorted(ARCHITECTURES)}, or SAELens' names for them)")
    cfg["architecture"] = arch
    return cfg


def load(path: str | Path) -> BaseSAE:
    """Rebuild the exact module saved in ``path`` (in eval mode)."""
    folder = Path(path)
    cfg = read_config(folder)
    cls_cfg = ARCHITECTURES[cfg["architecture"]][0]
    fields = {k: v for k, v in cfg.items() if k in cls_cfg.__dataclass_fields__}
    try:
        sae = build_sae({"architecture": cfg["architecture"], **fields})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CFG_FILE} does not describe a valid SAE: {e}") from None

    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"{folder} is not an SAE folder: it has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is corrupt or truncated ({e}); save the SAE again") from None

    try:
        sae.load_saelens_tensors_(tensors)
    except ValueError as e:
        raise ValueError(f"{weights_path}: {e}") from None
    return sae.eval()
