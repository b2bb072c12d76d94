"""Read a site's activations out of a transformers model, one ActivationChunk per TokenBatch.

The forward pass stops right after the hooked module (the hook raises :class:`StopForward`), so
harvesting layer 3 of a 24-layer model costs about 4 layers, not 24. Padding never becomes a row;
special tokens (BOS/CLS/SEP) can be left out too, since their activations are outliers that would
otherwise dominate an SAE's reconstruction loss.

Shape suffixes: S contexts, L tokens per context, N kept rows, D model width.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .sites import Site, hook_site, resolve_site
from .types import ActivationChunk, TokenBatch


class StopForward(Exception):
    """Raised by the harvest hook once the site's value is captured, to skip the rest of the model."""


def harvest(model: nn.Module, site: str | Site, token_batches: Iterable[TokenBatch], *,
            exclude_special_ids: Collection[int] = (), drop_outliers: float | None = None,
            progress: bool = True, total: int | None = None) -> Iterator[ActivationChunk]:
    """Yield the site's activations for each batch: one float32 CPU row per kept token.

    A token is kept where ``attention_mask == 1`` and its id is not in ``exclude_special_ids`` (pass
    ``tokenizer.all_special_ids`` to drop BOS/CLS/SEP). With ``drop_outliers=m``, rows whose norm is
    above m times the batch's median row norm are dropped too (dictionary_learning's
    ``max_activation_norm_multiple``). Every row carries its token id, context and position, and the
    chunk keeps its TokenBatch, so features can be shown in context.

    ``total`` (the number of batches, when known) sizes the progress bar. A bad site or
    ``drop_outliers`` raises here, at the call, not at the first batch.
    """
    if drop_outliers is not None and drop_outliers <= 0:
        raise ValueError(f"drop_outliers={drop_outliers} must be a positive multiple of the median norm "
                         "(e.g. 10) or None")
    site = resolve_site(model, site) if isinstance(site, str) else site
    return _harvest(model, site, token_batches, exclude_special_ids, drop_outliers, progress, total)


def _harvest(model: nn.Module, site: Site, token_batches: Iterable[TokenBatch], exclude_special_ids: Collection[int],
             drop_outliers: float | None, progress: bool, total: int | None) -> Iterator[ActivationChunk]:
    model.eval()
    device = next(model.parameters()).device
    exclude_ids = torch.tensor(sorted(exclude_special_ids), dtype=torch.long)
    for batch in tqdm(token_batches, total=total, disable=not progress, desc=f"harvest {site.name}"):
        hidden_SLD = _site_value(model, site, batch, device)
        keep_SL = batch.attention_mask_SL.bool() & ~torch.isin(batch.input_ids_SL, exclude_ids)
        acts_ND = hidden_SLD[keep_SL]
        S, L = keep_SL.shape
        token_ids_N = batch.input_ids_SL[keep_SL]
        seq_N = batch.seq_S[:, None].expand(S, L)[keep_SL]
        pos_N = torch.arange(L)[None, :].expand(S, L)[keep_SL]
        if drop_outliers is not None and len(acts_ND):
            norm_N = acts_ND.norm(dim=-1)
            inlier_N = norm_N <= drop_outliers * norm_N.median()
            acts_ND, token_ids_N, seq_N, pos_N = (t[inlier_N] for t in (acts_ND, token_ids_N, seq_N, pos_N))
        yield ActivationChunk(acts_ND.contiguous(), token_ids_N, seq_N, pos_N, batch)


def _site_value(model: nn.Module, site: Site, batch: TokenBatch, device: torch.device) -> Tensor:
    """The site's (S, L, D) float32 CPU value for one batch, from a forward pass cut at the site."""
    captured: list[Tensor] = []

    def capture(hidden_SLD: Tensor) -> None:
        captured.append(hidden_SLD)
        raise StopForward

    with torch.inference_mode(), hook_site(model, site, capture):
        try:
            model(input_ids=batch.input_ids_SL.to(device), attention_mask=batch.attention_mask_SL.to(device))
        except StopForward:
            pass
    if not captured:
        raise RuntimeError(
            f"site {site.name!r}: module {site.module_path} was never called in {type(model).__name__}'s "
            f"forward pass; pick a module on the path from input_ids to the output"
        )
    hidden_SLD = captured[0]
    if hidden_SLD.shape[:2] != batch.input_ids_SL.shape:
        raise ValueError(
            f"site {site.name!r} gives shape {tuple(hidden_SLD.shape)}, expected (contexts, tokens, width) "
            f"= {tuple(batch.input_ids_SL.shape)} + (D,); pick a site with one vector per token"
        )
    return hidden_SLD.to("cpu", torch.float32)
