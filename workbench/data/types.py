"""The records that flow from text to the activation cache.

S contexts, L tokens per context, N activation rows (non-padding tokens kept), D model width.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class TokenBatch(NamedTuple):
    """A batch of fixed-length token contexts."""

    input_ids_SL: Tensor
    """(S, L) long token ids."""
    attention_mask_SL: Tensor
    """(S, L) long, 1 for a real token and 0 for padding."""
    seq_S: Tensor
    """(S,) long: each context's index in the whole tokenised stream (0, 1, 2, ...)."""


class ActivationChunk(NamedTuple):
    """Activations harvested from one TokenBatch, one row per kept token."""

    acts_ND: Tensor
    """(N, D) float32 activations at the site."""
    token_ids_N: Tensor
    """(N,) long: the token at each row."""
    seq_N: Tensor
    """(N,) long: the context (``TokenBatch.seq_S`` value) each row comes from."""
    pos_N: Tensor
    """(N,) long: the row's position inside its context."""
    batch: TokenBatch
    """The contexts these rows were harvested from (so features can be shown in context)."""
