"""Comparing SAEs: do two SAEs learn the same latents (the seed-stability matching of Paulo &
Belrose, 2501.16615), and which of two families has the better sparsity frontier.

The matching follows the authors' ``hungarian_aligmnent.py`` and notebook:

1. Unit-normalise the encoder rows and the decoder rows of both SAEs (a zero row gives cosine 0).
2. Cosine matrices C_enc = E1 E2^T and C_dec = D1 D2^T (F x F), filled in row blocks.
3. ``scipy.optimize.linear_sum_assignment(C, maximize=True)`` run SEPARATELY on C_enc and C_dec:
   two bijections pi_enc and pi_dec that need not agree.
4. Latent i is shared when C_dec[i, pi_dec(i)] > 0.7 AND C_enc[i, pi_enc(i)] > 0.7.

Robustness views: the "Equal" variant that also requires pi_enc(i) = pi_dec(i); the max-cosine
variant without a bijection (max_j C[i, j] in place of the matched cosine); a sweep of the threshold;
the matched encoder and decoder cosines of every latent, for the encoder-vs-decoder scatter.

:func:`interpolate_frontier` reads a family's frontier (e.g. loss recovered against L0 over a lambda
sweep) at chosen L0 values, so two families are compared at equal sparsity.

Encoder rows: every workbench SAE stores its encoder as ``W_enc`` (D, F), so latent i reads the
input along column i (for Gated SAEs that is the gate direction W_gate, which the magnitude path
shares up to a per-latent scale). Shape suffixes: F latents of the first SAE, G of the second,
D model dim, T thresholds, N points of a frontier, M places to read it at.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..saes.base import BaseSAE
from .geometry import unit_rows

SHARED_THRESHOLD = 0.7
"""The paper's cosine above which a matched latent counts as found again (on both sides)."""


class SeedMatch(NamedTuple):
    """How the latents of SAE a map onto those of SAE b (arrays indexed by a's latent i)."""

    enc_match_F: np.ndarray
    """pi_enc(i): b's latent assigned to i by the Hungarian matching of encoder rows."""
    dec_match_F: np.ndarray
    """pi_dec(i): b's latent assigned to i by the Hungarian matching of decoder rows."""
    enc_cos_F: np.ndarray
    """C_enc[i, pi_enc(i)]: cosine of i's encoder row with its matched one."""
    dec_cos_F: np.ndarray
    """C_dec[i, pi_dec(i)]: cosine of i's decoder row with its matched one."""
    enc_max_cos_F: np.ndarray
    """max_j C_enc[i, j]: the best encoder cosine without the one-to-one constraint."""
    dec_max_cos_F: np.ndarray
    """max_j C_dec[i, j]: the best decoder cosine without the one-to-one constraint."""

    @property
    def equal_F(self) -> np.ndarray:
        """(F,) bool: the encoder and decoder matchings pick the same latent of b."""
        return self.enc_match_F == self.dec_match_F

    def shared_F(self, threshold: float = SHARED_THRESHOLD) -> np.ndarray:
        """(F,) bool: matched cosine above ``threshold`` on the decoder AND on the encoder."""
        return (self.dec_cos_F > threshold) & (self.enc_cos_F > threshold)

    def fraction_shared(self, threshold: float = SHARED_THRESHOLD) -> float:
        """The paper's headline number: the fraction of latents that are shared."""
        return float(self.shared_F(threshold).mean())

    def fraction_equal(self) -> float:
        """Fraction of latents whose encoder and decoder matchings agree (no threshold)."""
        return float(self.equal_F.mean())

    def fraction_shared_equal(self, threshold: float = SHARED_THRESHOLD) -> float:
        """Fraction shared AND matched to the same latent of b by encoder and decoder ("Equal")."""
        return float((self.shared_F(threshold) & self.equal_F).mean())

    def fraction_shared_max_cos(self, threshold: float = SHARED_THRESHOLD) -> float:
        """Fraction whose best encoder AND best decoder cosines exceed ``threshold``, with no
        bijection (an upper bound on :meth:`fraction_shared`)."""
        return float(((self.dec_max_cos_F > threshold) & (self.enc_max_cos_F > threshold)).mean())


class ThresholdSweep(NamedTuple):
    """Fraction of latents shared at each threshold, by the three rules of :class:`SeedMatch`."""

    thresholds_T: np.ndarray
    hungarian_T: np.ndarray
    """:meth:`SeedMatch.fraction_shared`."""
    equal_T: np.ndarray
    """:meth:`SeedMatch.fraction_shared_equal`."""
    max_cos_T: np.ndarray
    """:meth:`SeedMatch.fraction_shared_max_cos`."""


def encoder_directions(sae: BaseSAE) -> Tensor:
    """(F, D): the direction each latent reads the input along (the columns of ``W_enc``)."""
    return sae.W_enc.detach().t()


def decoder_directions(sae: BaseSAE) -> Tensor:
    """(F, D): the direction each latent writes (the rows of ``W_dec``)."""
    return sae.W_dec.detach()


def cosine_matrix(a_FD: Tensor, b_GD: Tensor, block_rows: int = 4096) -> np.ndarray:
    """(F, G) float32 cosines of the rows of ``a`` with the rows of ``b``, computed ``block_rows``
    rows at a time on the tensors' device and gathered on the CPU (zero rows give 0, not NaN)."""
    if a_FD.ndim != 2 or b_GD.ndim != 2 or a_FD.shape[1] != b_GD.shape[1]:
        raise ValueError(f"cosine_matrix needs two (n, D) matrices with the same D; got shapes "
                         f"{tuple(a_FD.shape)} and {tuple(b_GD.shape)}")
    a_FD = unit_rows(a_FD)
    b_GD = unit_rows(b_GD.to(a_FD.device))
    out_FG = np.empty((a_FD.shape[0], b_GD.shape[0]), dtype=np.float32)
    for start in range(0, a_FD.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        out_FG[rows] = (a_FD[rows] @ b_GD.t()).cpu().numpy()
    return out_FG


def match_directions(enc_a_FD: Tensor, dec_a_FD: Tensor, enc_b_FD: Tensor, dec_b_FD: Tensor,
                     block_rows: int = 4096) -> SeedMatch:
    """Match two dictionaries given as encoder and decoder rows (see the module docstring)."""
    shapes = {tuple(t.shape) for t in (enc_a_FD, dec_a_FD, enc_b_FD, dec_b_FD)}
    if len(shapes) != 1:
        raise ValueError(f"the encoder and decoder rows of both SAEs must have one shape (F, D) so that a "
                         f"bijection exists; got {sorted(shapes)}")
    enc_match_F, enc_cos_F, enc_max_F = _hungarian(cosine_matrix(enc_a_FD, enc_b_FD, block_rows))
    dec_match_F, dec_cos_F, dec_max_F = _hungarian(cosine_matrix(dec_a_FD, dec_b_FD, block_rows))
    return SeedMatch(enc_match_F, dec_match_F, enc_cos_F, dec_cos_F, enc_max_F, dec_max_F)


def match_latents(sae_a: BaseSAE, sae_b: BaseSAE, block_rows: int = 4096) -> SeedMatch:
    """Match the latents of two SAEs of equal width (e.g. trained with different seeds)."""
    if sae_a.cfg.d_sae != sae_b.cfg.d_sae or sae_a.cfg.d_in != sae_b.cfg.d_in:
        raise ValueError(f"match_latents needs SAEs of the same shape; got d_in={sae_a.cfg.d_in}, "
                         f"d_sae={sae_a.cfg.d_sae} and d_in={sae_b.cfg.d_in}, d_sae={sae_b.cfg.d_sae}")
    return match_directions(encoder_directions(sae_a), decoder_directions(sae_a),
                            encoder_directions(sae_b), decoder_directions(sae_b), block_rows)


def threshold_sweep(match: SeedMatch, thresholds: Sequence[float] | np.ndarray | None = None) -> ThresholdSweep:
    """The fraction shared at each threshold (default 0, 0.05, ..., 1) by the Hungarian, Equal and
    max-cosine rules."""
    thresholds_T = np.linspace(0, 1, 21) if thresholds is None else np.asarray(thresholds, dtype=float)
    return ThresholdSweep(
        thresholds_T,
        np.array([match.fraction_shared(t) for t in thresholds_T]),
        np.array([match.fraction_shared_equal(t) for t in thresholds_T]),
        np.array([match.fraction_shared_max_cos(t) for t in thresholds_T]),
    )


def interpolate_frontier(x_N: Sequence[float] | np.ndarray, y_N: Sequence[float] | np.ndarray,
                         at_M: Sequence[float] | np.ndarray | float, log_x: bool = True) -> np.ndarray:
    """y of the piecewise-linear curve through the points (x, y), sorted by x, at each ``at`` (linear
    in log x by default, as frontiers are drawn against log L0). NaN outside [min x, max x]: a
    frontier says nothing beyond its sweep."""
    x_N, y_N = np.asarray(x_N, dtype=float), np.asarray(y_N, dtype=float)
    at_M = np.atleast_1d(np.asarray(at_M, dtype=float))
    if x_N.shape != y_N.shape or x_N.ndim != 1 or len(x_N) < 2:
        raise ValueError(f"interpolate_frontier needs at least two (x, y) points; got x of shape "
                         f"{x_N.shape} and y of shape {y_N.shape}")
    if log_x and (x_N.min() <= 0 or at_M.min() <= 0):
        raise ValueError("log_x=True needs positive x values (e.g. L0 > 0); pass log_x=False otherwise")
    order = np.argsort(x_N)
    warp = np.log if log_x else np.asarray
    out_M = np.interp(warp(at_M), warp(x_N[order]), y_N[order])
    out_M[(at_M < x_N.min()) | (at_M > x_N.max())] = np.nan
    return out_M


def _hungarian(cos_FG: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pi, matched cosine, row max) of the maximum-total-cosine bijection of a square matrix."""
    rows_F, cols_F = linear_sum_assignment(cos_FG, maximize=True)
    match_F = np.empty(cos_FG.shape[0], dtype=np.int64)
    match_F[rows_F] = cols_F
    matched_F = cos_FG[np.arange(cos_FG.shape[0]), match_F]
    return match_F, matched_F, cos_FG.max(axis=1)
