"""Any SAE ready to look inside: from a folder (ours, SAELens', sparsify's) or the hub, find the model
and site it reads (the caller's, else its metadata's), check its width against the site, and index it
on held-out text of that model, once, into the activation cache (:func:`prepare_sae`). The feature
browser (:meth:`workbench.ui.FeatureBrowser.from_sae`) and ``workbench browse --sae`` stand on it.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__, io
from ..data.embedded import DEFAULT_MODEL, load_model
from ..data.fingerprint import model_fingerprint, text_fingerprint
from ..data.harvest import harvest
from ..data.source import ActivationSource, TextSplit
from ..data.store import default_cache_root
from ..data.types import TokenBatch
from ..runconfig import ModelDataConfig
from ..saes.base import BaseSAE
from .features import FORMAT as INDEX_FORMAT
from .features import INFO_FILE, index_sae, unembedding
from .prompt import PromptRunner

DEFAULT_EVAL_TOKENS = 16_384
"""Held-out tokens :meth:`FeatureBrowser.from_sae` (and ``workbench browse --sae``) index an SAE on:
128 contexts of 128 tokens, harvested and indexed in about 20 s on 2 CPU cores for MiniLM; the same
held-out store as the notebooks' quick profile, so it is often in the activation cache already."""
INDEXES_DIR = "feature-indexes"
"""Where, under the activation cache root, :func:`prepare_sae` keeps the indexes of SAEs from
folders and the hub: ``<cache root>/feature-indexes/<digest of the index key>/``."""
INDEX_KEY_FILE = "index_key.json"
"""Beside the index: what it was built from (the SAE's file digests, the model, site, text, number
of tokens); an index whose key differs from the one asked for is rebuilt, never reused."""



_MODELS: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
_MAX_MODELS = 2


def shared_model(name: str) -> tuple[Any, Any]:
    """The model and tokenizer ``name``, loaded once per process (the last two used are kept): every
    browser, SAE and session shares them, as they are only read."""
    if name not in _MODELS:
        _keep_model(name, load_model(name))
    _MODELS.move_to_end(name)
    return _MODELS[name]


def _keep_model(name: str, model_and_tokenizer: tuple[Any, Any]) -> None:
    _MODELS[name] = model_and_tokenizer
    while len(_MODELS) > _MAX_MODELS:
        _MODELS.popitem(last=False)


@dataclass
class PreparedSAE:
    """An SAE ready to browse: loaded, and indexed on held-out activations of the model and site it
    reads (what :func:`prepare_sae` returns)."""

    where: str
    """The folder or hub id it came from, as given (with the subfolder)."""
    name: str
    """A short name: the subfolder's, else the folder's or hub repo's."""
    folder: Path
    """Its local folder (for a hub id, in the hub cache)."""
    sae: BaseSAE
    model: str
    site: str
    text: str
    eval_tokens: int
    index_dir: Path
    """The feature index (and, for an SAE that routes tokens, its routing analysis)."""

    def prompt_runner(self) -> PromptRunner:
        model, tokenizer = shared_model(self.model)
        return PromptRunner(model, tokenizer, self.site, self.sae)


def prepare_sae(sae: str | Path, *, subfolder: str | None = None, model: str | None = None,
                site: str | None = None, text: str | None = None, eval_tokens: int = DEFAULT_EVAL_TOKENS,
                index_dir: str | Path | None = None, progress: bool = True) -> PreparedSAE:
    """Resolve and load the SAE ``sae`` (a folder or hub id, see :func:`workbench.io.resolve`), find
    the model, site and text it reads (the arguments, else its metadata; see
    :meth:`FeatureBrowser.from_sae`) and make sure its feature index is in ``index_dir``.

    The index is built on the held-out side of the text only (the training store is never opened)
    unless ``index_dir`` already holds one built from the same SAE files and data (its
    :data:`INDEX_KEY_FILE` says so), which is then reused. Raises a one-line ValueError when the model
    or site is neither given nor recorded, and when the SAE's width does not match the site's."""
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens <= 0:
        raise ValueError(f"eval_tokens={eval_tokens!r} (--eval-tokens) must be a positive number of held-out tokens")
    where = str(sae) if subfolder is None else f"{sae} (subfolder {subfolder})"
    folder = io.resolve(sae, subfolder)
    metadata = io.read_metadata(folder)
    model, site = _where_it_reads(where, metadata, model, site)
    loaded = io.load(folder)
    data = _data_config(metadata, model, site, text)
    data.validate()
    cache_root = default_cache_root()
    key = _index_key(folder, data, eval_tokens, cache_root)
    if index_dir is None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        index_dir = cache_root / INDEXES_DIR / digest  # by content: a copy of the folder shares it
    index_dir = Path(index_dir)
    name = Path(str(subfolder or sae).rstrip("/")).name or folder.name
    prepared = PreparedSAE(where, name, folder, loaded, data.name, data.site, data.text, eval_tokens, index_dir)
    if _stored_key(index_dir) == key and (index_dir / INFO_FILE).is_file():
        return prepared

    source = ActivationSource(data, eval_tokens, progress)  # loads the model; harvests nothing yet
    _keep_model(data.name, (source.model, source.tokenizer))
    width = site_width(source.model, source.tokenizer, source.site)
    d_in = loaded.cfg.d_in
    if width != d_in:
        raise ValueError(f"{where}: the SAE reads d_in={d_in} but {data.name} at {data.site} gives {width}-wide "
                         f"activations; pass the --site (site=) it was trained on")
    print(f"Indexing {where} on {eval_tokens:,} held-out tokens of {data.text!r} through {data.name} at "
          f"{data.site} (once; saved under {index_dir})...", flush=True)
    (index_dir / INDEX_KEY_FILE).unlink(missing_ok=True)  # a half-rebuilt index must not pass as the old one
    device = next(source.model.parameters()).device
    loaded.to(device)
    index_sae(loaded, source.eval, source.tokenizer, index_dir, unembed_VD=unembedding(source.model),
              progress=progress)
    (index_dir / INDEX_KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
    return prepared


def site_width(model: Any, tokenizer: Any, site: Any) -> int:
    """The width of the activations ``model`` gives at ``site``, from a forward pass on two words."""
    enc = tokenizer("width probe", return_tensors="pt")
    batch = TokenBatch(enc["input_ids"], enc["attention_mask"], torch.zeros(1, dtype=torch.long))
    return int(next(iter(harvest(model, site, [batch], progress=False))).acts_ND.shape[1])


def _where_it_reads(where: str, metadata: dict[str, Any], model: str | None,
                    site: str | None) -> tuple[str, str]:
    """The model and site: the arguments, else the metadata's; a one-line error naming the flags to
    pass when neither says."""
    model = model or metadata.get("model")
    if site:
        site = io.site_of_hook_name(site) or site  # a TransformerLens hook name is accepted too
    else:
        site = metadata.get("site")
    hook = metadata.get("hook_name")
    if model and site:
        return model, site
    if not model and not site:
        said = "no hook_name" if hook is None else f"hook_name {hook!r}, which is no site here"
        raise ValueError(f"{where} does not say which model and site it reads (its metadata has no model_name "
                         f"and {said}); pass --model NAME --site SITE (model=, site=), e.g. --model "
                         f"{DEFAULT_MODEL} --site resid_post.2")
    if not model:
        raise ValueError(f"{where} does not say which model it reads (its metadata has no model_name); pass "
                         f"--model NAME (model=), e.g. --model {DEFAULT_MODEL}")
    if hook is not None:
        raise ValueError(f"{where} reads hook_name {hook!r}, which is no site here; pass --site SITE (site=): "
                         f"resid_pre.L, resid_post.L, attn_out.L, mlp_out.L or a module path of {model}")
    raise ValueError(f"{where} does not say where in {model} it reads (its metadata has no hook_name or site); "
                     f"pass --site SITE (site=), e.g. --site resid_post.2")


_ONE_SPLIT = re.compile(r"(.*)\[documents held out: blake2b < ([0-9.eE+-]+)\]")


def _data_config(metadata: dict[str, Any], model: str, site: str, text: str | None) -> ModelDataConfig:
    """The held-out data to index on: ``text`` (else the text the SAE was trained on here, else
    CPython's prose) through ``model`` at ``site``, in contexts as long as the SAE was trained on
    (else the default 128). For the text it was trained on, the split it held out is used."""
    fields: dict[str, Any] = {"name": model, "site": site, "text": text or metadata.get("text") or "cpython"}
    length = metadata.get("context_length")
    if isinstance(length, int) and not isinstance(length, bool) and length > 0:
        fields["context_length"] = length
    held_out, trained = metadata.get("held_out_text"), metadata.get("train_text")
    if fields["text"] == metadata.get("text") and isinstance(held_out, str):
        match = _ONE_SPLIT.fullmatch(held_out)
        if match:
            fields.update(train_split=match[1], eval_split=match[1], held_out_fraction=float(match[2]))
        else:
            fields["eval_split"] = held_out
            if isinstance(trained, str):
                fields["train_split"] = trained
    return ModelDataConfig(**fields)


def _index_key(folder: Path, data: ModelDataConfig, eval_tokens: int, cache_root: Path) -> dict[str, Any]:
    """What an index of the SAE in ``folder`` on ``data`` is built from: the digest of each of the
    folder's files, the model (a local folder by its manifest), site, text (a local file by its
    digest), its held-out side, the number of tokens and how they were read."""
    files = {p.name: text_fingerprint(p, cache_root) for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".")}
    path = Path(data.name).expanduser()
    model_id = (f"{path.resolve().name}@files:{model_fingerprint(path)}"
                if data.name != DEFAULT_MODEL and path.is_dir() else data.name)
    split = TextSplit(data, cache_root)
    return {"index_format": INDEX_FORMAT, "workbench": __version__, "sae_files": files, "model": model_id,
            "site": data.site, "text": split.text_id, "held_out": split.name(True), "eval_tokens": eval_tokens,
            "context_length": data.context_length, "exclude_special": data.exclude_special,
            "drop_outliers": data.drop_outliers}


def _stored_key(index_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((index_dir / INDEX_KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
