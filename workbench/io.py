"""Save and load SAEs as SAELens-style folders: ``cfg.json`` + ``sae_weights.safetensors``.

Keys and shapes follow SAELens: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec``;
Gated has ``b_gate``, ``b_mag``, ``r_mag`` instead of ``b_enc``; Switch adds ``W_router`` (d_in, E) and
``b_router`` (d_in,) and says ``"architecture": "switch"``. Our ReLU SAE is SAELens' "standard".
Weights are safetensors only: nothing here ever unpickles.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .saes.base import BaseSAE
from .saes.registry import ARCHITECTURES, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# SAELens names our "relu" architecture "standard"; everything else keeps its name.
_TO_SAELENS = {"relu": "standard"}
_FROM_SAELENS = {v: k for k, v in _TO_SAELENS.items()}


def sae_tensors(sae: BaseSAE) -> dict[str, torch.Tensor]:
    """The tensors a saved SAE holds: its parameters (training-only buffers are left out)."""
    return {name: p.detach().contiguous().cpu() for name, p in sae.named_parameters()}


@torch.no_grad()
def fold_input_scale(sae: BaseSAE, scale: float) -> BaseSAE:
    """A copy of ``sae`` that works on raw activations x when ``sae`` was trained on scale * x.

    Every architecture reads x only through (x - b) @ W for its input-side biases b (b_dec, and
    b_router for Switch) and writes it through W_dec and b_dec, so with s = scale:
    W_enc <- s W_enc, W_router <- s W_router, b_dec <- b_dec / s, b_router <- b_router / s,
    W_dec <- W_dec / s. The latents are unchanged; decoder rows now have norm 1/s.
    """
    folded = copy.deepcopy(sae)
    params = dict(folded.named_parameters())
    for name in ("W_enc", "W_router"):
        if name in params:
            params[name].mul_(scale)
    for name in ("W_dec", "b_dec", "b_router"):
        if name in params:
            params[name].div_(scale)
    return folded


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
    fields = sae.cfg.to_dict()
    cfg = {
        **fields,
        "architecture": _TO_SAELENS.get(fields["architecture"], fields["architecture"]),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "workbench_version": __version__,
        "metadata": metadata or {},
    }
    save_file(sae_tensors(sae), str(folder / WEIGHTS_FILE))
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
    arch = _FROM_SAELENS.get(cfg.get("architecture"), cfg.get("architecture"))
    if arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is not one this workbench "
                         f"can load ({sorted(ARCHITECTURES)} or SAELens 'standard')")
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

    expected = sae_tensors(sae)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{weights_path} does not match a {cfg['architecture']} SAE: "
                         f"missing {missing}, unexpected {extra}")
    for name, ref in expected.items():
        if tensors[name].shape != ref.shape:
            raise ValueError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"but cfg.json implies {tuple(ref.shape)}")
    params = dict(sae.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return sae.eval()
