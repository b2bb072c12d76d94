"""Synthetic activations built from known feature directions in superposition.

Each token is x = sum_i c_i f_i + noise, with n_features unit-norm directions f_i in d < n_features
dimensions. Feature i is active with probability p_i, p_i proportional to (i + 1)^-frequency_exponent
(a Zipf spread, so feature 0 is the most frequent) and scaled so that sum_i p_i = mean_active; an
active feature's coefficient c_i is drawn uniformly from [magnitude_min, magnitude_max], an inactive
one's is 0. Optional structure keeps every marginal p_i unchanged:

* correlated groups: a group-wide event, of probability group_cofire * (the smallest p_i in the
  group), switches every member on at once; members also fire on their own.
* hierarchy: a child fires only on tokens where its parent fires, with probability p_child / p_parent
  there. The parent is the most frequent feature of its tree.

Groups and trees use disjoint features picked at random by the config seed. Because the true
directions are known, :func:`recovery_score` measures how many of them an SAE's decoder found.

Shape suffixes: N tokens, D model dim (d), F true features, M decoder rows, G groups, S group size,
T trees (parents), C children per parent.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Leading words of the numpy seed sequences, so that the feature directions, sample(seed=s) and the
# batches of stream s never share a random stream.
_FEATURES, _SAMPLE, _BATCH = 1, 2, 3


@dataclass
class SyntheticConfig:
    """How the synthetic activations are built; every default is the setting tuned for the demo."""

    d: int = 64
    """Dimension of the activations (the SAE's d_in)."""
    n_features: int = 512
    """Number of true feature directions; more than ``d`` puts them in superposition."""
    mean_active: float = 5.0
    """Expected number of active features per token (sum of the per-feature probabilities)."""
    frequency_exponent: float = 0.5
    """Zipf exponent a of the firing probabilities, p_i proportional to (i + 1)^-a; 0 makes every
    feature equally frequent, larger values make rare features rarer (the rarest is n_features^-a
    times as frequent as the commonest, before probabilities are capped at 1)."""
    magnitude_min: float = 0.5
    """Smallest coefficient of an active feature (coefficients are uniform on [min, max])."""
    magnitude_max: float = 1.5
    """Largest coefficient of an active feature."""
    correlated_groups: int = 0
    """Number of groups of features that co-fire; 0 for none."""
    group_size: int = 4
    """Features per correlated group."""
    group_cofire: float = 0.5
    """Share of its group's rarest member's firing that comes from group-wide events (all members
    on at once); 1 means that member never fires without the whole group."""
    hierarchy_parents: int = 0
    """Number of parent features that have children; 0 for no hierarchy."""
    children_per_parent: int = 2
    """Children of each parent; a child fires only when its parent fires."""
    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every coordinate of x."""
    seed: int = 0
    """Seed of the feature directions, the groups and the hierarchy (not of the sampled tokens)."""

    def validate(self) -> None:
        """Raise ValueError naming the bad field and how to fix it."""
        for name in ("d", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"SyntheticConfig.{name}={value!r} must be a positive integer")
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(f"SyntheticConfig.mean_active={self.mean_active} must be in (0, n_features="
                             f"{self.n_features}]; lower mean_active or raise n_features")
        if self.frequency_exponent < 0:
            raise ValueError(f"SyntheticConfig.frequency_exponent={self.frequency_exponent} must be >= 0 "
                             f"(0 makes all features equally frequent)")
        if not 0 < self.magnitude_min <= self.magnitude_max:
            raise ValueError(f"SyntheticConfig.magnitude_min={self.magnitude_min} and magnitude_max="
                             f"{self.magnitude_max} must satisfy 0 < magnitude_min <= magnitude_max")
        if self.noise_std < 0:
            raise ValueError(f"SyntheticConfig.noise_std={self.noise_std} must be >= 0")
        if self.correlated_groups < 0 or self.hierarchy_parents < 0:
            raise ValueError(f"SyntheticConfig.correlated_groups={self.correlated_groups} and "
                             f"hierarchy_parents={self.hierarchy_parents} must be >= 0 (0 turns them off)")
        if self.group_size < 2:
            raise ValueError(f"SyntheticConfig.group_size={self.group_size} must be at least 2")
        if not 0 <= self.group_cofire <= 1:
            raise ValueError(f"SyntheticConfig.group_cofire={self.group_cofire} is a probability share; "
                             f"use a value in [0, 1]")
        if self.children_per_parent < 1:
            raise ValueError(f"SyntheticConfig.children_per_parent={self.children_per_parent} must be >= 1")
        structured = (self.correlated_groups * self.group_size
                      + self.hierarchy_parents * (1 + self.children_per_parent))
        if structured > self.n_features:
            raise ValueError(
                f"SyntheticConfig: correlated groups and hierarchy need {structured} distinct features but "
                f"n_features={self.n_features}; raise n_features or lower correlated_groups or "
                f"hierarchy_parents")
        _check_seed(self.seed, "SyntheticConfig.seed")


def firing_probabilities(n_features: int, mean_active: float, exponent: float) -> Tensor:
    """p_i = min(1, s * (i + 1)^-exponent) with s chosen so that sum_i p_i = mean_active, (F,)."""
    weights_F = torch.arange(1, n_features + 1, dtype=torch.float64).pow(-exponent)
    capped_F = torch.zeros(n_features, dtype=torch.bool)
    # Water-filling: capping the commonest features at 1 moves their excess onto the others,
    # which can push more over 1; each round caps at least one more feature, so it ends.
    while True:
        scale = (mean_active - capped_F.sum()) / weights_F[~capped_F].sum()
        probs_F = torch.where(capped_F, 1.0, weights_F * scale)
        newly_capped_F = probs_F > 1
        if not newly_capped_F.any():
            return probs_F.float()
        capped_F |= newly_capped_F


def _check_seed(seed: int, name: str = "seed") -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{name}={seed!r} must be a non-negative integer")


class SyntheticData:
    """Samples activations from a :class:`SyntheticConfig`.

    Attributes: ``features_FD`` the unit-norm true directions, ``probs_F`` each feature's marginal
    firing probability, ``groups`` the feature ids of each correlated group, ``parent_of`` a map
    from each child feature id to its parent's id. All are fixed by ``cfg.seed``.
    """

    def __init__(self, cfg: SyntheticConfig | None = None):
        cfg = cfg if cfg is not None else SyntheticConfig()
        cfg.validate()
        self.cfg = cfg
        # numpy rather than torch generators: a torch CPU generator keeps only 32 bits of its seed,
        # and one seeded like an SAE's init would draw that SAE's decoder as the true features.
        rng = np.random.default_rng([_FEATURES, cfg.seed])
        features_FD = torch.from_numpy(rng.standard_normal((cfg.n_features, cfg.d), dtype=np.float32))
        self.features_FD = features_FD / features_FD.norm(dim=-1, keepdim=True)
        self.probs_F = firing_probabilities(cfg.n_features, cfg.mean_active, cfg.frequency_exponent)

        perm_F = torch.from_numpy(rng.permutation(cfg.n_features))
        n_grouped = cfg.correlated_groups * cfg.group_size
        self._groups_GS = perm_F[:n_grouped].view(cfg.correlated_groups, cfg.group_size).sort(1).values
        n_tree = 1 + cfg.children_per_parent
        # Sorted ids put each tree's most frequent feature first: it becomes the parent.
        tree_ids = perm_F[n_grouped:n_grouped + cfg.hierarchy_parents * n_tree]
        trees_TC = tree_ids.view(cfg.hierarchy_parents, n_tree).sort(1).values
        self._parents_T, self._children_TC = trees_TC[:, 0], trees_TC[:, 1:]
        self.groups = self._groups_GS.tolist()
        self.parent_of = {int(c): int(p) for p, cs in zip(self._parents_T, self._children_TC) for c in cs}

        # Probability that a feature fires "on its own", chosen so every marginal stays probs_F.
        own_F = self.probs_F.clone()
        group_probs_GS = self.probs_F[self._groups_GS]
        self._event_G = cfg.group_cofire * group_probs_GS.min(1).values
        own_F[self._groups_GS] = 1 - (1 - group_probs_GS) / (1 - self._event_G[:, None]).clamp_min(1e-12)
        own_F[self._children_TC] = self.probs_F[self._children_TC] / self.probs_F[self._parents_T][:, None]
        self._own_F = own_F

    def sample_with_codes(self, n_tokens: int, seed: int | np.random.Generator = 0) -> tuple[Tensor, Tensor]:
        """(x (N, D), the true coefficients c (N, F)) with x = c @ features_FD + noise.

        ``seed`` is an int (the same int always gives the same tokens) or a numpy Generator to draw from.
        """
        if isinstance(seed, np.random.Generator):
            rng = seed
        else:
            _check_seed(seed)
            rng = np.random.default_rng([_SAMPLE, seed])
        return self._draw(n_tokens, rng)

    def _draw(self, n_tokens: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        u_NF = torch.from_numpy(rng.random((n_tokens, cfg.n_features), dtype=np.float32))
        own_NF = u_NF < self._own_F
        active_NF = own_NF
        if cfg.correlated_groups:
            events_NG = torch.from_numpy(rng.random((n_tokens, cfg.correlated_groups), dtype=np.float32))
            events_NG = events_NG < self._event_G
            active_NF = active_NF.clone()
            active_NF[:, self._groups_GS.flatten()] |= events_NG.repeat_interleave(cfg.group_size, dim=1)
        if cfg.hierarchy_parents:
            parent_on_NC = active_NF[:, self._parents_T].repeat_interleave(cfg.children_per_parent, dim=1)
            active_NF[:, self._children_TC.flatten()] &= parent_on_NC
        # u is uniform on whichever side of own_F it fell, so rescaling that side to [0, 1) gives
        # the magnitude without a second (N, F) draw.
        frac_NF = torch.where(own_NF, u_NF / self._own_F, (u_NF - self._own_F) / (1 - self._own_F))
        span = cfg.magnitude_max - cfg.magnitude_min
        codes_NF = torch.where(active_NF, cfg.magnitude_min + span * frac_NF, 0.0)
        x_ND = codes_NF @ self.features_FD
        if cfg.noise_std:
            noise_ND = torch.from_numpy(rng.standard_normal((n_tokens, cfg.d), dtype=np.float32))
            x_ND += cfg.noise_std * noise_ND
        return x_ND, codes_NF

    def sample(self, n_tokens: int, seed: int | np.random.Generator = 0) -> Tensor:
        """(N, D) activations; the same int seed always gives the same tokens."""
        return self.sample_with_codes(n_tokens, seed)[0]

    def batches(self, batch_size: int, n_batches: int | None = None, seed: int = 0,
                start: int = 0) -> Iterator[Tensor]:
        """Yield (batch_size, D) batches number start, start + 1, ... (forever if n_batches is None).

        Batch i depends only on (seed, i), so a fresh iterator with the same seed repeats the stream,
        and ``start=s`` resumes it at batch s without generating the earlier ones.
        """
        _check_seed(seed)
        stop = None if n_batches is None else start + n_batches
        i = start
        while stop is None or i < stop:
            yield self._draw(batch_size, np.random.default_rng([_BATCH, seed, i]))[0]
            i += 1


def recovery_score(features_FD: Tensor, W_dec_MD: Tensor) -> float:
    """mean_i max_j cos(f_i, W_dec_j): how well the decoder's rows cover the true features.

    1.0 when every true direction is a decoder row. Signed cosine: SAE latents are non-negative, so
    a row pointing opposite to a feature does not reconstruct it.
    """
    f_FD = features_FD.detach() / features_FD.detach().norm(dim=-1, keepdim=True)
    w_MD = W_dec_MD.detach() / W_dec_MD.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (f_FD @ w_MD.t()).max(1).values.mean().item()
