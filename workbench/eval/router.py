"""What a Switch SAE's router does with held-out data, and how much its experts overlap.

A Switch SAE is only as good as its routing: an expert that receives no tokens is wasted width, a
router that is unsure on every token blurs the split, and top-1 routing pushes common features to be
learned again in every expert (Mudide et al. 2024, F4 and F7). :func:`analyze_router` measures all of
that in one pass over an activation cache and keeps the results small enough to save next to a
feature index and to draw in the router inspector:

- expert load f_i (fraction of tokens routed to i) against the uniform 1/E, and the mean router
  probability P_i; E * sum_i f_i P_i is the load-balancing loss;
- a histogram of the router's per-token entropy, from 0 (certain) to ln E (uniform);
- each expert's most frequent tokens and its dead latents (never fired on the data);
- the inter-expert similarity matrix and the duplicate features across experts, from the decoder.

Shape suffixes: N rows of the cache, D model dim, F latents, E experts, W expert width (F / E),
R and C rows and columns of a tile of the decoder cosine matrix, P duplicate pairs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.store import ActivationStore
from ..saes.base import BaseSAE
from .geometry import unit_rows

ENTROPY_BINS = 40
"""Bins of the router-entropy histogram between 0 and ln E."""
TOP_TOKENS = 10
"""Most frequent tokens kept per expert."""
MAX_DUPLICATES = 1000
"""Duplicate pairs kept (the most similar first); their total count is kept too."""
JSON_FILE = "router.json"
TENSORS_FILE = "router.safetensors"
_FORMAT = 1
_TILE = 2048  # rows and columns of one decoder-cosine tile: 16 MiB of float32


class Duplicates(NamedTuple):
    """Latents whose decoder rows, in different experts, have cosine above a threshold."""

    pairs: list[tuple[int, int, float]]
    """(latent_a, latent_b, cosine) with latent_a < latent_b, most similar first, at most
    ``max_pairs`` of them."""
    n_pairs: int
    """How many pairs are above the threshold in all."""
    n_latents: int
    """How many latents are in at least one pair (the paper's "fraction of duplicates" is this / F)."""


@dataclass
class RouterAnalysis:
    """The result of :func:`analyze_router`; :meth:`save` and :meth:`load` round-trip it exactly."""

    n_tokens: int
    """Rows of the activation cache the routing statistics are over."""
    expert_width: int
    """Latents per expert; latent f belongs to expert f // expert_width."""
    expert_load: Tensor
    """(E,) float64 f_i: fraction of the tokens routed to each expert (uniform routing gives 1/E)."""
    mean_prob: Tensor
    """(E,) float64 P_i: each expert's router probability averaged over the tokens."""
    entropy_counts: Tensor
    """(ENTROPY_BINS,) int64: tokens per bin of router entropy (nats)."""
    entropy_edges: Tensor
    """(ENTROPY_BINS + 1,) float64 bin edges, from 0 to ln E."""
    top_tokens: list[list[tuple[str, int]]]
    """Per expert, its most frequent tokens as (token text, count), most frequent first; the text as
    :func:`~workbench.eval.features.readable_tokens` gives it (analyses saved before it was used
    have ``tokenizer.decode`` of each id: "##ing" for a WordPiece continuation)."""
    dead_per_expert: Tensor
    """(E,) int64: latents of each expert that never fired on the data."""
    similarity: Tensor
    """(E, E) float32: cell (i, j) is the mean over expert i's decoder rows of their highest cosine
    with a row of expert j; on the diagonal, with another row of expert i itself."""
    duplicates: list[tuple[int, int, float]]
    """Pairs (latent_a, latent_b, cosine) in different experts above ``dup_threshold``, most
    similar first, at most MAX_DUPLICATES."""
    n_duplicate_pairs: int
    """How many such pairs there are in all."""
    n_duplicated_latents: int
    """How many latents are in at least one such pair."""
    dup_threshold: float
    """The cosine above which two decoder rows count as duplicates."""

    @property
    def n_experts(self) -> int:
        return self.expert_load.shape[0]

    @property
    def load_balance(self) -> float:
        """E * sum_i f_i P_i, the Switch load-balancing loss without its alpha: 1 for uniform routing."""
        return float(self.n_experts * (self.expert_load * self.mean_prob).sum())

    def save(self, folder: str | Path) -> Path:
        """Write router.json (numbers, tokens) and router.safetensors (tensors) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pairs_P2 = torch.tensor([[a, b] for a, b, _ in self.duplicates], dtype=torch.long).reshape(-1, 2)
        tensors = {"expert_load": self.expert_load, "mean_prob": self.mean_prob,
                   "entropy_counts": self.entropy_counts, "entropy_edges": self.entropy_edges,
                   "dead_per_expert": self.dead_per_expert, "similarity": self.similarity,
                   "duplicate_latents": pairs_P2,
                   "duplicate_cos": torch.tensor([c for _, _, c in self.duplicates], dtype=torch.float32)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS_FILE))
        meta = {"format": _FORMAT, "n_tokens": self.n_tokens, "expert_width": self.expert_width,
                "top_tokens": self.top_tokens, "n_duplicate_pairs": self.n_duplicate_pairs,
                "n_duplicated_latents": self.n_duplicated_latents, "dup_threshold": self.dup_threshold}
        (folder / JSON_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> RouterAnalysis:
        folder = Path(folder)
        if not (folder / JSON_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
            raise FileNotFoundError(f"no router analysis in {folder}; build one with "
                                    f"analyze_router(sae, store, tokenizer).save(folder)")
        meta = json.loads((folder / JSON_FILE).read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{folder / JSON_FILE} has format {meta.get('format')!r} but this workbench "
                             f"reads format {_FORMAT}; run analyze_router again")
        t = load_file(str(folder / TENSORS_FILE))
        duplicates = [(a, b, c) for (a, b), c in zip(t["duplicate_latents"].tolist(), t["duplicate_cos"].tolist())]
        return cls(n_tokens=meta["n_tokens"], expert_width=meta["expert_width"],
                   expert_load=t["expert_load"], mean_prob=t["mean_prob"],
                   entropy_counts=t["entropy_counts"], entropy_edges=t["entropy_edges"],
                   top_tokens=[[(tok, n) for tok, n in expert] for expert in meta["top_tokens"]],
                   dead_per_expert=t["dead_per_expert"], similarity=t["similarity"],
                   duplicates=duplicates, n_duplicate_pairs=meta["n_duplicate_pairs"],
                   n_duplicated_latents=meta["n_duplicated_latents"], dup_threshold=meta["dup_threshold"])


def routes_tokens(sae: BaseSAE) -> bool:
    """Whether ``sae`` sends each token to one expert: it has ``route(x) -> (probs_BE, expert_B)``
    and its ``latent_groups()`` are those experts, each a contiguous block of equal width."""
    groups = sae.latent_groups()
    return callable(getattr(sae, "route", None)) and groups is not None and groups.kind == "expert"


@torch.no_grad()
def analyze_router(sae: BaseSAE, store: ActivationStore, tokenizer: PreTrainedTokenizerBase, *,
                   scale: float | None = None, dup_threshold: float = 0.9, batch_size: int = 4096,
                   progress: bool = True) -> RouterAnalysis:
    """Route every row of ``store`` (e.g. the held-out cache) through ``sae`` and measure the router.

    ``scale`` multiplies the rows first: None for a saved SAE, which reads raw activations (its
    training scale is folded in), else the scale the SAE was trained with. Rows are read in order,
    ``batch_size`` at a time, so memory stays bounded whatever the cache's size; the decoder
    geometry is computed in tiles for the same reason.
    """
    if not routes_tokens(sae):
        raise ValueError(f"the router view needs a Switch SAE; this is a {sae.cfg.architecture} SAE")
    if store.d != sae.cfg.d_in:
        raise ValueError(f"the SAE reads d_in={sae.cfg.d_in} but the cache's activations have d={store.d}; "
                         f"pass the cache of the site the SAE was trained on")
    n_experts = sae.latent_groups().n_groups
    width = sae.cfg.d_sae // n_experts
    device = next(sae.parameters()).device
    # ln 1 = 0 would leave no room for bins; a one-expert router's entropy is 0 anyway.
    edges = torch.from_numpy(np.linspace(0, math.log(n_experts) if n_experts > 1 else 1.0, ENTROPY_BINS + 1))
    routed_E = torch.zeros(n_experts, dtype=torch.long)
    prob_sum_E = torch.zeros(n_experts, dtype=torch.float64)
    entropy_counts = torch.zeros(ENTROPY_BINS, dtype=torch.long)
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    expert_N = np.empty(store.n_rows, dtype=np.int32)

    was_training = sae.training
    sae.eval()
    try:
        with tqdm(total=store.n_rows, unit="tok", desc="routing", disable=not progress) as bar:
            for start in range(0, store.n_rows, batch_size):
                stop = min(start + batch_size, store.n_rows)
                x_BD = store.read_rows(start, stop).to(device)
                if scale is not None:
                    x_BD = x_BD * scale
                probs_BE, expert_B = (t.cpu() for t in sae.route(x_BD))
                routed_E += torch.bincount(expert_B, minlength=n_experts)
                prob_sum_E += probs_BE.double().sum(0)
                entropy_B = torch.special.entr(probs_BE.double()).sum(-1).clamp(edges[0], edges[-1])
                # right=True on the inner edges: bins are [lo, hi), the last one [lo, hi], as numpy's.
                bin_B = torch.bucketize(entropy_B, edges[1:-1], right=True)
                entropy_counts += torch.bincount(bin_B, minlength=ENTROPY_BINS)
                fired_F += sae.encode_code(x_BD).fire_counts().cpu()
                expert_N[start:stop] = expert_B.numpy()
                bar.update(stop - start)
    finally:
        sae.train(was_training)

    W_dec_FD = sae.W_dec.detach()
    duplicates = duplicate_features(W_dec_FD, n_experts, dup_threshold)
    return RouterAnalysis(
        n_tokens=store.n_rows, expert_width=width,
        expert_load=routed_E.double() / store.n_rows, mean_prob=prob_sum_E / store.n_rows,
        entropy_counts=entropy_counts, entropy_edges=edges,
        top_tokens=_top_tokens(expert_N, store.token_ids, n_experts, tokenizer),
        dead_per_expert=(fired_F == 0).reshape(n_experts, width).sum(1),
        similarity=inter_expert_similarity(W_dec_FD, n_experts).cpu(),
        duplicates=duplicates.pairs, n_duplicate_pairs=duplicates.n_pairs,
        n_duplicated_latents=duplicates.n_latents, dup_threshold=dup_threshold)


def _top_tokens(expert_N: np.ndarray, token_ids_N: np.ndarray, n_experts: int,
                tokenizer: PreTrainedTokenizerBase) -> list[list[tuple[str, int]]]:
    """Each expert's TOP_TOKENS most frequent token ids (ties: lower id first), as the text each
    stands for, as the feature index has them (:func:`~workbench.eval.features.readable_tokens`: a
    word's first piece with its space, " the", a WordPiece continuation bare, "ing")."""
    from .features import readable_tokens  # features imports this module

    order_N = np.argsort(expert_N, kind="stable")
    bounds = np.searchsorted(expert_N[order_N], np.arange(n_experts + 1))
    top = []
    for e in range(n_experts):
        counts_V = np.bincount(token_ids_N[order_N[bounds[e]:bounds[e + 1]]])
        ids = np.argsort(-counts_V, kind="stable")[:TOP_TOKENS]
        ids = [int(i) for i in ids if counts_V[i] > 0]
        top.append(list(zip(readable_tokens(tokenizer, ids), (int(counts_V[i]) for i in ids))))
    return top


def _unit_rows(W_dec_FD: Tensor, n_experts: int) -> Tensor:
    if W_dec_FD.shape[0] % n_experts:
        raise ValueError(f"the decoder has {W_dec_FD.shape[0]} rows, not divisible by n_experts={n_experts}")
    return unit_rows(W_dec_FD)


def _expert_tiles(unit_FD: Tensor, n_experts: int, upper: bool):
    """Yield (i, j, r0, c0, cos_RC): tiles of the decoder cosine matrix that never cross an expert's
    boundary, rows from expert i and columns from expert j (only j > i if ``upper``); r0 and c0 are
    the first latent ids of the tile."""
    width = unit_FD.shape[0] // n_experts
    for i in range(n_experts):
        for r0 in range(i * width, (i + 1) * width, _TILE):
            rows_RD = unit_FD[r0:min(r0 + _TILE, (i + 1) * width)]
            for j in range(i + 1 if upper else 0, n_experts):
                for c0 in range(j * width, (j + 1) * width, _TILE):
                    yield i, j, r0, c0, rows_RD @ unit_FD[c0:min(c0 + _TILE, (j + 1) * width)].T


@torch.no_grad()
def inter_expert_similarity(W_dec_FD: Tensor, n_experts: int) -> Tensor:
    """(E, E) float32: cell (i, j) is the mean, over expert i's decoder rows, of the highest cosine
    similarity to any decoder row of expert j (the paper's F7a; the matrix is not symmetric). On the
    diagonal a row's own cosine of 1 is left out, so cell (i, i) is how close expert i's rows are to
    each other: the baseline that off-diagonal cells are compared to. Memory is one tile."""
    unit_FD = _unit_rows(W_dec_FD, n_experts)
    width = unit_FD.shape[0] // n_experts
    best_FE = unit_FD.new_full((unit_FD.shape[0], n_experts), -math.inf)
    for i, j, r0, c0, cos_RC in _expert_tiles(unit_FD, n_experts, upper=False):
        if r0 == c0:  # rows and columns step through an expert alike: its own rows are the diagonal
            cos_RC.fill_diagonal_(-math.inf)
        r1 = r0 + cos_RC.shape[0]
        best_FE[r0:r1, j] = torch.maximum(best_FE[r0:r1, j], cos_RC.max(1).values)
    return best_FE.reshape(n_experts, width, n_experts).mean(1)


@torch.no_grad()
def duplicate_features(W_dec_FD: Tensor, n_experts: int, threshold: float,
                       max_pairs: int = MAX_DUPLICATES) -> Duplicates:
    """Pairs of latents in different experts whose decoder rows have cosine > ``threshold`` (0.9 in
    the paper's F7c): the features that top-1 routing made several experts learn each. Computed in
    tiles, keeping only the ``max_pairs`` most similar pairs (ties: lower ids first)."""
    unit_FD = _unit_rows(W_dec_FD, n_experts)
    n_pairs = 0
    in_pair_F = torch.zeros(unit_FD.shape[0], dtype=torch.bool, device=unit_FD.device)
    kept_P2 = torch.zeros(0, 2, dtype=torch.long, device=unit_FD.device)
    kept_P = unit_FD.new_zeros(0)
    for _, _, r0, c0, cos_RC in _expert_tiles(unit_FD, n_experts, upper=True):
        hits_P2 = (cos_RC > threshold).nonzero()
        if not len(hits_P2):
            continue
        n_pairs += len(hits_P2)
        kept_P = torch.cat([kept_P, cos_RC[hits_P2[:, 0], hits_P2[:, 1]]])
        hits_P2 += torch.tensor([r0, c0], device=hits_P2.device)
        in_pair_F[hits_P2.reshape(-1)] = True
        kept_P2 = torch.cat([kept_P2, hits_P2])
        if len(kept_P) > max_pairs:
            kept_P, top_P = kept_P.topk(max_pairs)
            kept_P2 = kept_P2[top_P]
    pairs = sorted(((a, b, c) for (a, b), c in zip(kept_P2.tolist(), kept_P.tolist())),
                   key=lambda pair: (-pair[2], pair[0], pair[1]))
    return Duplicates(pairs, n_pairs, int(in_pair_F.sum()))
