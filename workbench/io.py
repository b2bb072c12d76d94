"""Save and load SAEs as SAELens 6 folders: ``cfg.json`` + ``sae_weights.safetensors``.

Keys and shapes follow SAELens: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec``,
plus whatever else an architecture holds; each architecture says how it is written
(``saelens_config``, ``saelens_tensors``) and read back (``load_saelens_tensors_``), so this module
names none of them. Weights are safetensors only: nothing here ever unpickles.

Written: cfg.json's ``metadata`` carries SAELens' names (``model_name``, ``hook_name``,
``context_size``, ...) beside ours ("model", "site", ...) and the ``sae_lens_version`` of the format,
so SAELens keeps all of it (:func:`saelens_metadata`).

Read: a folder written by SAELens loads with SAELens' own codes: every cfg.json field that changes
what SAELens computes is honoured (``apply_b_dec_to_input``, ``rescale_acts_by_decoder_norm`` and
``normalize_activations: expected_average_only_in`` folded into the weights, ``dtype`` converted to
float32 with a warning) or refused with a one-line error (``reshape_activations``, per-token
``normalize_activations``, SAELens 5 activation functions). sparsify folders load as the k-sparse SAEs they are
(:mod:`workbench.sparsify_format`); a hub id loads from the hub or its local cache (:func:`resolve`);
:func:`read_metadata` says where any of them reads, under our keys.
"""
from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .data.embedded import looks_like_path
from .saes.base import BaseSAE
from .saes.registry import ARCHITECTURES, architecture_of, build_sae
from .sparsify_format import is_sparsify_folder, load_sparsify, sparsify_metadata

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
"""Where SAELens' trainer keeps the input scale of ``normalize_activations: expected_average_only_in``
(beside cfg.json in its checkpoints; the final SAE has it folded in and says "none")."""
HALF_DTYPES = ("bfloat16", "float16")
SAELENS_FORMAT_VERSION = "6.0.0"
"""The SAELens cfg.json format the folders written here follow (the ``sae_lens_version`` they carry)."""


def fold_input_scale(sae: BaseSAE, scale: float) -> BaseSAE:
    """A copy of ``sae`` that works on raw activations x when ``sae`` was trained on scale * x
    (see :meth:`~workbench.saes.base.BaseSAE.fold_input_scale_`)."""
    return copy.deepcopy(sae).fold_input_scale_(scale)


def save(sae: BaseSAE, path: str | Path, metadata: dict[str, Any] | None = None,
         input_scale: float | None = None) -> Path:
    """Write ``sae`` to the folder ``path`` (created if needed), as SAELens 6 writes an SAE.

    ``metadata`` (e.g. the model and site the SAE was trained on, under our keys "model", "site",
    "context_length", "text") is stored in cfg.json under ``"metadata"``, with SAELens' names for
    them beside ours (:func:`saelens_metadata`), so SAELens keeps it all. Without ``metadata``, the
    SAE's own (``sae.metadata``: what it was loaded with) is written. If the SAE was trained on
    normalised activations ``input_scale * x``, pass that scale: it is folded into the weights
    (:func:`fold_input_scale`) so the saved SAE reads raw activations."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = dict(sae.metadata if metadata is None else metadata)
    if input_scale is not None:
        sae = fold_input_scale(sae, input_scale)
        metadata["folded_input_scale"] = input_scale
    cfg = {
        **sae.saelens_config(),
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": saelens_metadata(metadata),
    }
    save_file(sae.saelens_tensors(), str(folder / WEIGHTS_FILE))
    (folder / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def saelens_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` with SAELens 6's names added for what ours say: ``model_name`` (from "model"),
    ``hook_name`` (TransformerLens' name of "site", where it has one), ``context_size`` (from
    "context_length"), ``dataset_path`` (from "text"), ``prepend_bos``; and the format versions,
    without which SAELens reads the folder as pre-6 and drops the whole metadata object. SAELens'
    own values, where the metadata already has them, are kept as they are."""
    derived: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None}
    if "model" in metadata:
        derived["model_name"] = metadata["model"]
    hook = hook_name_of_site(metadata.get("site"))
    if hook is not None:
        derived["hook_name"] = hook
    for ours, theirs in (("context_length", "context_size"), ("text", "dataset_path"), ("prepend_bos", "prepend_bos")):
        if ours in metadata:
            derived[theirs] = metadata[ours]
    return {**derived, **metadata, "workbench_version": __version__}


def hook_name_of_site(site: Any) -> str | None:
    """TransformerLens' hook name of one of our named sites ("resid_post.8" ->
    "blocks.8.hook_resid_post"); None for a module path or a layer counted from the end."""
    match = _SITE.fullmatch(site) if isinstance(site, str) else None
    return f"blocks.{match[2]}.hook_{match[1]}" if match else None


def site_of_hook_name(hook_name: Any) -> str | None:
    """Our site of a TransformerLens hook name ("blocks.8.hook_resid_post" -> "resid_post.8"); None
    for hooks that are not a block's residual stream or attention/MLP output (hook_z, mlp.hook_post...)."""
    match = _HOOK.fullmatch(hook_name) if isinstance(hook_name, str) else None
    return f"{match[2]}.{match[1]}" if match else None


_SITE = re.compile(r"(resid_pre|resid_post|attn_out|mlp_out)\.(\d+)")
_HOOK = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)")


def sae_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a saved cfg.json says about where the SAE reads, under our keys whoever wrote it:
    the stored metadata, with "model", "site" and "context_length" filled in from SAELens' names
    (``model_name``, ``hook_name``, ``context_size``; SAELens 5 kept them at the top level) where
    ours are absent. "site" is None when the hook has no site here."""
    stored = cfg.get("metadata")
    metadata = dict(stored) if isinstance(stored, dict) else {}
    for key in ("model_name", "hook_name", "context_size"):
        if key not in metadata and key in cfg:
            metadata[key] = cfg[key]
    metadata.setdefault("model", metadata.get("model_name"))
    metadata.setdefault("site", site_of_hook_name(metadata.get("hook_name")))
    metadata.setdefault("context_length", metadata.get("context_size"))
    return metadata


def read_metadata(path: str | Path, subfolder: str | None = None) -> dict[str, Any]:
    """:func:`sae_metadata` of the SAE folder ``path`` (or hub id, :func:`resolve`), sparsify's included."""
    folder = resolve(path, subfolder)
    if _is_sparsify(folder):
        return sparsify_metadata(folder)
    return sae_metadata(read_config(folder))


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


def resolve(path: str | Path, subfolder: str | None = None) -> Path:
    """The local folder of an SAE: ``path`` itself (with ``subfolder`` joined), or, where no such
    folder exists and ``path`` is a hub id ("owner/repo"), the repo's snapshot fetched with
    ``huggingface_hub.snapshot_download`` (only ``subfolder``'s files; from the local cache when
    offline, ``HF_HUB_OFFLINE=1``)."""
    name = str(path)
    local = Path(name).expanduser()
    if isinstance(path, Path) or local.exists() or looks_like_path(name) or name.count("/") != 1:
        folder = local / subfolder if subfolder else local
        if not folder.exists():
            shown = f"{name}/{subfolder}" if subfolder else name  # as the user wrote it
            raise FileNotFoundError(f"no SAE folder at {shown}" + ("" if local.exists() else
                                    "; give an SAE folder, or a hub id 'owner/repo' (and the SAE's subfolder in it)"))
        return folder
    return _hub_snapshot(name, subfolder)


def _hub_snapshot(repo_id: str, subfolder: str | None) -> Path:
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=[f"{subfolder.strip('/')}/*"] if subfolder else None))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HFValidationError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and the Hugging Face hub did not provide it ({reason}); on a "
            f"machine with network run `hf download {repo_id}` (it fills the cache this reads offline), or "
            f"`hf download {repo_id} --local-dir DIR` and pass DIR") from None
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"hub repo {repo_id!r} has no folder {subfolder!r} in its cached snapshot; "
                                f"check --subfolder (its folders: {sorted(p.name for p in root.iterdir() if p.is_dir())})")
    return folder


def _is_sparsify(folder: Path) -> bool:
    """A sparsify folder, not ours or SAELens' (which may hold a stray sae.safetensors beside theirs)."""
    return is_sparsify_folder(folder) and not (folder / WEIGHTS_FILE).is_file()


def load(path: str | Path, subfolder: str | None = None) -> BaseSAE:
    """Rebuild the exact module saved in ``path`` (in eval mode): a folder written here or by
    SAELens (computing as SAELens does, on raw activations), or by sparsify; ``path`` may be a hub
    id, with the SAE in ``subfolder`` (:func:`resolve`)."""
    folder = resolve(path, subfolder)
    if _is_sparsify(folder):
        return load_sparsify(folder)
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
    sae.metadata = dict(cfg.get("metadata") or {})
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
