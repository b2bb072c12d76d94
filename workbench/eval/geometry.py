"""Geometry of an SAE's dictionary: how close its latents' directions are to each other, and a 2-D
map of them.

- :func:`nearest_neighbours`: each latent's nearest other latent of the same SAE and their cosine
  (:func:`nearest_neighbour_cosine` keeps the cosine). The mean cosine of a decoder is the paper's
  F7b ("average max similarity"), the fraction above 0.9 its F7c ("duplicates"; Mudide et al.
  2024), and for a Switch SAE ``index // expert_width`` says whether a latent's nearest neighbour
  is in its own expert. Computed in tiles: a 196k-latent decoder needs one tile of memory, not the
  F x F matrix.
- :func:`tsne_embedding`: a seeded subsample of rows (encoder or decoder) embedded in 2-D with
  scikit-learn's t-SNE, returning which rows were kept so that they can be coloured (e.g. by expert,
  ``rows // expert_width``) as in the paper's F8.

Cosines between experts of a Switch SAE (F7a) and cross-expert duplicates are in
:mod:`workbench.eval.router`.

Shape suffixes: F rows (latents), D model dim, R and C rows and columns of a tile, N kept rows.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

_TILE = 2048  # rows and columns of one cosine tile: 16 MiB of float32


def unit_rows(W_FD: Tensor) -> Tensor:
    """``W_FD`` detached, in float32, each row scaled to unit norm (a zero row stays zero, so its
    cosine with anything is 0). Saved SAEs' decoder rows have norm 1/scale; cosines ignore it."""
    W_FD = W_FD.detach().float()
    return W_FD / W_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Neighbours(NamedTuple):
    """Each row's nearest other row by cosine similarity."""

    cosine: Tensor
    """(F,) float32: the highest cosine similarity with any *other* row."""
    index: Tensor
    """(F,) int64: which row that is (the lowest index among ties)."""


@torch.no_grad()
def nearest_neighbours(W_FD: Tensor, tile: int = _TILE) -> Neighbours:
    """For each row of ``W_FD`` (a decoder, or the encoder's columns as rows), its nearest other row
    by cosine similarity and that cosine. A row's cosine with itself is left out; a zero row has
    cosine 0 with every row. Memory is one (tile, tile) block of the cosine matrix."""
    if W_FD.ndim != 2 or W_FD.shape[0] < 2:
        raise ValueError(f"nearest_neighbours needs a (rows, dim) matrix with at least 2 rows; "
                         f"got shape {tuple(W_FD.shape)}")
    unit_FD = unit_rows(W_FD)
    n = unit_FD.shape[0]
    best_F = unit_FD.new_full((n,), -math.inf)
    index_F = torch.zeros(n, dtype=torch.long, device=unit_FD.device)
    for r0 in range(0, n, tile):
        rows_RD = unit_FD[r0:r0 + tile]
        for c0 in range(0, n, tile):
            cos_RC = rows_RD @ unit_FD[c0:c0 + tile].T
            if r0 == c0:  # rows and columns step alike: this tile holds the rows' own cosines
                cos_RC.fill_diagonal_(-math.inf)
            tile_best_R, tile_index_R = cos_RC.max(1)
            better_R = tile_best_R > best_F[r0:r0 + tile]  # strict: an earlier column wins a tie
            best_F[r0:r0 + tile] = torch.where(better_R, tile_best_R, best_F[r0:r0 + tile])
            index_F[r0:r0 + tile] = torch.where(better_R, tile_index_R + c0, index_F[r0:r0 + tile])
    return Neighbours(best_F, index_F)


def nearest_neighbour_cosine(W_FD: Tensor, tile: int = _TILE) -> Tensor:
    """(F,) float32: each row's highest cosine with any other row (:func:`nearest_neighbours`)."""
    return nearest_neighbours(W_FD, tile).cosine


class Embedding(NamedTuple):
    """A 2-D map of some rows of a matrix."""

    xy_N2: np.ndarray
    """(N, 2) float t-SNE coordinates of the kept rows."""
    rows_N: np.ndarray
    """(N,) int64: which rows of the matrix were kept (sorted), e.g. ``rows_N // expert_width`` is
    each point's expert."""


def tsne_embedding(W_FD: Tensor, n_points: int | None = None, *, seed: int = 0, perplexity: float = 50.0,
                   learning_rate: float = 100.0) -> Embedding:
    """t-SNE of ``n_points`` rows of ``W_FD`` drawn without replacement with ``seed`` (all rows if
    None or at least F), as the paper's F8: raw rows, Euclidean distance, perplexity 50, learning rate
    100. The perplexity is lowered to (N - 1) / 3 when there are too few points for it."""
    n_rows = W_FD.shape[0]
    if W_FD.ndim != 2 or n_rows < 4:
        raise ValueError(f"tsne_embedding needs a (rows, dim) matrix with at least 4 rows; got shape "
                         f"{tuple(W_FD.shape)}")
    if n_points is not None and n_points < 4:
        raise ValueError(f"n_points={n_points} is too few for t-SNE; use at least 4")
    if n_points is None or n_points >= n_rows:
        rows_N = np.arange(n_rows)
    else:
        rows_N = np.sort(np.random.default_rng(seed).choice(n_rows, n_points, replace=False))
    X_ND = W_FD.detach().float().cpu().numpy()[rows_N]
    from sklearn.manifold import TSNE  # seconds to import; only t-SNE needs it

    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(rows_N) - 1) / 3),
                learning_rate=learning_rate, init="pca", random_state=seed)
    return Embedding(tsne.fit_transform(X_ND), rows_N.astype(np.int64))
