"""Save and load SAEs as SAELens-style folders: ``cfg.json`` + ``sae_weights.safetensors``.

Keys and shapes follow SAELens: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec``,
plus whatever else an architecture holds; each architecture says how it is written
(``saelens_config``, ``saelens_tensors``) and read back (``load_saelens_tensors_``), so this module
names none of them. Weights are safetensors only: nothing here ever unpickles.

A folder written by SAELens loads with SAELens' own codes: every cfg.json field that changes what
SAELens computes is honoured (``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm`` and
``normalize_activations: expected_average_only_in`` folded into the weights, ``dtype`` converted to
float32 with a warning) or refused with a one-line error (``reshape_activations``, per-token
``normalize_activations``, SAELens 5 activation functions).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .saes.base import BaseSAE
from .saes.registry import ARCHITECTURES, architecture_of, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
"""Where SAELens' trainer keeps the input scale of ``normalize_activations: expected_average_only_in``
(beside cfg.json in its checkpoints; the final SAE has it folded in and says "none")."""
HALF_DTYPES = ("bfloat16", "float16")


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
        known = sorted(set(ARCHITECTURES) | {cls.saelens_architecture for cls, _ in ARCHITECTURES.values()} - {""})
        raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is not one this workbench "
                         f"can load; it loads {known} (SAELens' names and its own)")
    cfg["architecture"] = arch
    return cfg


def load(path: str | Path) -> BaseSAE:
    """Rebuild the exact module saved in ``path`` (in eval mode); a SAELens folder computes as in
    SAELens, on raw activations."""
    folder = Path(path)
    cfg = read_config(folder)
    check_saelens_fields(cfg, folder / CFG_FILE)
    input_scale = saelens_input_scale(cfg, folder)
    cls_cfg = ARCHITECTURES[cfg["architecture"]][0]
    try:
        sae = build_sae({"architecture": cfg["architecture"], **cls_cfg.fields_from_saelens(cfg)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CFG_FILE} does not describe a valid SAE: {e}") from None

    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ValueError(f"{folder} is not an SAE folder: it has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is corrupt or truncated ({e}); save the SAE again") from None
    warn_if_not_float32(cfg, tensors, weights_path)

    try:
        sae.load_saelens_tensors_(tensors, cfg)
    except ValueError as e:
        raise ValueError(f"{weights_path}: {e}") from None
    if input_scale is not None:
        sae.fold_input_scale_(input_scale)
    return sae.eval()


def check_saelens_fields(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Refuse, in one line naming the field, what SAELens computes and this workbench cannot."""
    reshape = cfg.get("reshape_activations", "none")
    if reshape != "none":
        raise ValueError(f"{cfg_path}: reshape_activations={reshape!r} (SAELens flattens attention heads' "
                         f"hook_z) is not supported; this workbench reads (batch, d_in) activations only")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} normalises each token in SAELens and is "
                         f"not supported here; only 'none' and 'expected_average_only_in' are")


def saelens_input_scale(cfg: dict[str, Any], folder: Path) -> float | None:
    """The scale s of ``normalize_activations: expected_average_only_in`` (the SAE reads s * x),
    from SAELens' activation_scaler.json beside cfg.json; None for "none"."""
    if cfg.get("normalize_activations", "none") != "expected_average_only_in":
        return None
    scaler_path = folder / SCALER_FILE
    fix = (f"write {{\"scaling_factor\": S}} to {scaler_path} (SAELens' pretrained SAEs list S as "
           f"norm_scaling_factor), or set it to 'none' if the SAE reads raw activations")
    if not scaler_path.is_file():
        raise ValueError(f"{folder / CFG_FILE}: normalize_activations='expected_average_only_in' scales the "
                         f"input by a factor this folder does not hold; {fix}")
    try:
        scaler = json.loads(scaler_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{scaler_path} is not valid JSON ({e}); {fix}") from None
    scale = scaler.get("scaling_factor") if isinstance(scaler, dict) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{scaler_path}: scaling_factor={scale!r} is not a positive number, but cfg.json says "
                         f"normalize_activations='expected_average_only_in'; {fix}")
    if scaler.get("has_whitening"):
        raise ValueError(f"{scaler_path}: has_whitening=true (SAELens whitens the input) is not supported here")
    return float(scale)


def warn_if_not_float32(cfg: dict[str, Any], tensors: dict[str, Any], weights_path: Path) -> None:
    """Weights load as float32, exactly from half precision; say so when SAELens would compute in
    another dtype, whose rounding its codes then carry and these do not."""
    declared = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    stored = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()} & set(HALF_DTYPES))
    if declared != "float32" or stored:
        warnings.warn(f"{weights_path}: weights stored as {stored or [declared]} with cfg.json dtype "
                      f"{declared!r} are loaded as float32; SAELens computes in {declared}, so its codes may "
                      f"differ from these by {declared} rounding", UserWarning, stacklevel=3)
