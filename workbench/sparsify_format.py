"""Folders written by EleutherAI's sparsify (``SparseCoder.save_to_disk``), read as TopK SAEs.

A sparsify folder holds ``cfg.json`` (``d_in``, ``k``, ``num_latents`` or ``expansion_factor``,
``activation``, ``skip_connection``, ``transcode``...) and ``sae.safetensors`` with
``encoder.weight`` (F, D), ``encoder.bias`` (F,), ``W_dec`` (F, D) and ``b_dec`` (D,); a trained run
keeps one such folder per hookpoint, named after it (``layers.8``), beside the run's ``config.json``
(which names the model). sparsify encodes ``TopK(ReLU(encoder(x - b_dec)))`` and decodes
``top_acts @ W_dec[top_indices] + b_dec``: our TopK SAE with a latent bias, W_enc = encoder.weight^T.
What it computes otherwise (a skip connection, a transcoder, GroupMax) is refused in one line.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from .saes.base import BaseSAE
from .saes.registry import build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"
"""sparsify's run-level config, one folder up: {"model": ..., "ctx_len": ..., "dataset": ...}."""
TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

_HOOKPOINT = re.compile(r"(?:[\w.]*\.)?(?:h|layers|layer)\.(\d+)(\.mlp|\.self_attn|\.attn)?")
"""A hookpoint that is a block of the layer list (GPT-2 ``h.8``, Llama ``layers.8``, BERT ``encoder.layer.8``),
or its MLP or attention: the block's output is our resid_post."""
_HOOKPOINT_SITES = {None: "resid_post", ".mlp": "mlp_out", ".self_attn": "attn_out", ".attn": "attn_out"}


def is_sparsify_folder(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / CFG_FILE).is_file()


def read_sparsify_config(folder: Path) -> dict[str, Any]:
    path = folder / CFG_FILE
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("d_in"), int):
        raise ValueError(f"{path} is not a sparsify config: it has no integer d_in")
    refusals = {"transcode": "a transcoder predicts another module's output; it is not an SAE of one site",
                "skip_connection": "its linear skip connection W_skip has no counterpart here"}
    for key, why in refusals.items():
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported ({why})")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: activation={cfg['activation']!r} is not supported; only sparsify's 'topk' is")
    return cfg


def load_sparsify(folder: Path) -> BaseSAE:
    """The sparsify SAE in ``folder`` as our TopK SAE, computing the same codes (in eval mode)."""
    cfg = read_sparsify_config(folder)
    d_in = cfg["d_in"]
    d_sae = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{folder / WEIGHTS_FILE} is corrupt or truncated ({e})") from None
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"{folder / WEIGHTS_FILE} lacks {missing} (sparsify saves them all unless the SAE was "
                         f"loaded with decoder=False)")
    if tuple(tensors["encoder.weight"].shape) != (d_sae, d_in):
        raise ValueError(f"{folder / WEIGHTS_FILE}: encoder.weight has shape {tuple(tensors['encoder.weight'].shape)}, "
                         f"but cfg.json implies ({d_sae}, {d_in})")
    try:
        sae = build_sae({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": cfg.get("k", 32),
                         "latent_bias": True})
    except ValueError as e:
        raise ValueError(f"{folder / CFG_FILE} does not describe a valid SAE: {e}") from None
    saelens_keyed = {"W_enc": tensors["encoder.weight"].t(), "b_enc": tensors["encoder.bias"],
                     "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    try:
        sae.load_saelens_tensors_({name: t.float() for name, t in saelens_keyed.items()})
    except ValueError as e:
        raise ValueError(f"{folder / WEIGHTS_FILE}: {e}") from None
    sae.metadata = sparsify_metadata(folder)
    return sae.eval()


def sparsify_metadata(folder: Path) -> dict[str, Any]:
    """Where a sparsify SAE reads: the model and context length from the run's config.json one
    folder up (when it is there), the site from the hookpoint the folder is named after."""
    run_cfg: dict[str, Any] = {}
    run_path = folder.parent / RUN_CONFIG_FILE
    if run_path.is_file():
        try:
            loaded = json.loads(run_path.read_text())
            run_cfg = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            run_cfg = {}
    match = _HOOKPOINT.fullmatch(folder.name)
    return {"format": "sparsify", "hookpoint": folder.name, "model": run_cfg.get("model"),
            "site": f"{_HOOKPOINT_SITES[match[2]]}.{match[1]}" if match else None,
            "context_length": run_cfg.get("ctx_len"), "dataset_path": run_cfg.get("dataset")}
