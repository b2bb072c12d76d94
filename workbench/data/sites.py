"""Where in a transformer activations are read and written: named sites and forward hooks.

A site is a named point of the residual stream or one of its writers, as researchers name them:

- ``resid_pre.L``: the residual stream entering block L (the block's first positional input).
- ``resid_post.L``: the residual stream leaving block L (the block's output). For post-LN models
  (BERT, MiniLM) this is the block output after its final LayerNorm, the same value as
  ``output_hidden_states[L + 1]``. For pre-LN models (GPT-2, Pythia, Llama) the same holds for every
  block but the last, whose ``output_hidden_states`` entry has the final norm applied; ``resid_post``
  of the last block is the raw block output, before that norm.
- ``attn_out.L``: what the attention sublayer writes, before it is added to the residual. For BERT this
  is ``attention.output.dense`` (before BERT's residual add and LayerNorm).
- ``mlp_out.L``: what the MLP writes, before it is added to the residual. For BERT this is
  ``output.dense`` (before the residual add and LayerNorm).

Gemma 2/3 normalise each sublayer's output before adding it to the residual; their ``attn_out`` and
``mlp_out`` are the attention and MLP outputs before that norm.

Any dotted module path (``model.get_submodule``) is a site too; its value is the module's output.

Models are recognised by their layer list (``transformer.h``, ``gpt_neox.layers``, ``model.layers``,
``encoder.layer``, with or without a task head around them), and each block's attention and MLP by the
first submodule name in :data:`ATTN_OUT_PATHS` / :data:`MLP_OUT_PATHS` that exists, so a new family
with the usual names works without code here.

Shape suffixes: S contexts, L tokens per context, D model width.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

LAYER_LIST_NAMES = ("h", "layers", "layer")
"""Last path component of the ModuleList holding the blocks: GPT-2 ``transformer.h``, GPT-NeoX
``gpt_neox.layers``, Llama/Gemma/Qwen ``model.layers``, BERT ``encoder.layer``."""

ATTN_OUT_PATHS = ("attention.output.dense", "self_attn", "attn", "attention")
"""Attention writer inside a block, first match wins. BERT's ``attention`` already adds the residual
and applies LayerNorm, so its ``attention.output.dense`` is checked before GPT-NeoX's ``attention``."""

MLP_OUT_PATHS = ("mlp", "output.dense")
"""MLP writer inside a block, first match wins (``output.dense`` is BERT's second MLP matrix)."""

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")

_NAMED_SITE = re.compile(rf"^({'|'.join(SITE_KINDS)})\.(-?\d+)$")


@dataclass(frozen=True)
class Site:
    """A resolved site: which module to hook and whether its input or output is the value."""

    name: str
    """Canonical name (``"resid_post.3"``), or the raw module path the user gave."""
    module_path: str
    """Dotted path of the hooked module inside the model, e.g. ``"encoder.layer.3"``."""
    kind: str
    """``"output"``: the module's output; ``"input"``: its first positional input (resid_pre)."""
    layer: int | None
    """Block index the site belongs to, None for a module path outside the blocks."""

    def module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.module_path)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of the model's transformer blocks, or None for a model without one."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and path.rsplit(".", 1)[-1] in LAYER_LIST_NAMES:
            return path, module
    return None


def _first_submodule(block: nn.Module, candidates: tuple[str, ...]) -> str | None:
    for rel_path in candidates:
        try:
            block.get_submodule(rel_path)
        except AttributeError:
            continue
        return rel_path
    return None


def valid_sites(model: nn.Module) -> list[str]:
    """Every named site of this model, grouped by kind: resid_pre.0, resid_pre.1, ..., mlp_out.N."""
    found = block_list(model)
    if found is None:
        return []
    _, blocks = found
    sites = []
    for kind in SITE_KINDS:
        for layer, block in enumerate(blocks):
            if kind == "attn_out" and _first_submodule(block, ATTN_OUT_PATHS) is None:
                continue
            if kind == "mlp_out" and _first_submodule(block, MLP_OUT_PATHS) is None:
                continue
            sites.append(f"{kind}.{layer}")
    return sites


def _describe_sites(model: nn.Module) -> str:
    """The named sites compactly ("resid_pre.0-5, resid_post.0-5, ...") plus a module path example."""
    found = block_list(model)
    if found is None:
        return "a module path such as one of " + ", ".join(
            repr(p) for p, _ in list(model.named_modules())[1:4])
    path, blocks = found
    layers_by_kind: dict[str, list[int]] = {}
    for name in valid_sites(model):
        kind, layer = name.split(".")
        layers_by_kind.setdefault(kind, []).append(int(layer))
    groups = [f"{kind}.{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{kind}.{layers[0]}"
              for kind, layers in layers_by_kind.items()]
    example = next((f"{path}.{len(blocks) - 1}.{name}" for name, _ in blocks[-1].named_children()),
                   f"{path}.{len(blocks) - 1}")
    return ", ".join(groups) + f" or a module path such as {example!r}"


def resolve_site(model: nn.Module, site: str) -> Site:
    """The :class:`Site` for a named site (``"resid_post.3"``) or a raw module path.

    Raises ValueError listing this model's valid sites for an unknown name, and naming the number of
    layers for an out-of-range layer.
    """
    match = _NAMED_SITE.match(site)
    if match is None:
        try:
            model.get_submodule(site)
        except AttributeError:
            raise ValueError(
                f"unknown site {site!r} for {type(model).__name__}; use one of {_describe_sites(model)}"
            ) from None
        return Site(name=site, module_path=site, kind="output", layer=_layer_of_path(model, site))

    kind, layer = match.group(1), int(match.group(2))
    found = block_list(model)
    if found is None:
        raise ValueError(
            f"site {site!r}: found no list of transformer blocks in {type(model).__name__} (looked for a "
            f"ModuleList named one of {LAYER_LIST_NAMES}); pass a module path instead, e.g. "
            f"{_describe_sites(model)}"
        )
    blocks_path, blocks = found
    if not 0 <= layer < len(blocks):
        raise ValueError(
            f"site {site!r}: layer {layer} is out of range, {type(model).__name__} has {len(blocks)} "
            f"layers (0-{len(blocks) - 1})"
        )
    block_path = f"{blocks_path}.{layer}"
    if kind == "resid_pre":
        return Site(name=site, module_path=block_path, kind="input", layer=layer)
    if kind == "resid_post":
        return Site(name=site, module_path=block_path, kind="output", layer=layer)
    candidates = ATTN_OUT_PATHS if kind == "attn_out" else MLP_OUT_PATHS
    rel_path = _first_submodule(blocks[layer], candidates)
    if rel_path is None:
        raise ValueError(
            f"site {site!r}: block {block_path} has none of the submodules {candidates}; pass the "
            f"module path of its {kind.split('_')[0]} output instead, e.g. {_describe_sites(model)}"
        )
    return Site(name=site, module_path=f"{block_path}.{rel_path}", kind="output", layer=layer)


def _layer_of_path(model: nn.Module, module_path: str) -> int | None:
    """Block index of a module path inside the layer list ("encoder.layer.3.output" -> 3)."""
    found = block_list(model)
    if found is None:
        return None
    prefix = found[0] + "."
    if not module_path.startswith(prefix):
        return None
    return int(module_path[len(prefix):].split(".")[0])


def _hidden_of(site: Site, value: object) -> Tensor:
    """The hidden-state tensor inside a module's output (a tensor, or a tuple whose first element is)."""
    hidden = value[0] if isinstance(value, tuple) else value
    if not isinstance(hidden, Tensor):
        raise TypeError(
            f"site {site.name!r}: module {site.module_path} gives a {type(hidden).__name__}, not a "
            f"tensor; pick a submodule whose {site.kind} is a hidden-state tensor"
        )
    return hidden


@contextmanager
def hook_site(model: nn.Module, site: Site, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Call ``fn`` on the site's hidden state (S, L, D) in every forward pass inside the block.

    If ``fn`` returns a tensor, it replaces the value flowing on (a tuple output keeps its other
    elements, e.g. attention weights). Transformers 5 blocks return a plain tensor and attention
    modules a tuple; both are handled. The hook is removed on exit, even when ``fn`` raises, which is
    how :func:`workbench.data.harvest.harvest` stops a forward pass early.
    """
    module = site.module(model)
    if site.kind == "input":
        def pre_hook(_module, args, kwargs):
            hidden = _hidden_of(site, args[0] if args else kwargs.get("hidden_states"))
            new = fn(hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(_module, _args, output):
            new = fn(_hidden_of(site, output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
