"""The feature index: what the feature browser shows about every latent of an SAE, computed in one
streaming pass over held-out activations and saved to a folder.

For each feature f: how often it fires (frequency), its mean activation over the tokens where it
fires and its max; its top-N activating tokens; tokens sampled from each activation quantile; an
activation histogram; and, where the model has an unembedding, the output tokens its decoder
direction promotes and suppresses. Every example comes with a window of its context and the
feature's activation at each token of the window.

The (tokens, F) activations are never held. Each chunk of rows is encoded once and reduced to its
firing (row, feature, activation) triples, which update:

- counts, sums and maxima per feature;
- the top-N, a bounded (F, N) table of values and row ids. A chunk's triples are merged only where
  they beat the feature's current N-th value, so after the first chunks almost nothing is sorted;
- a uniform reservoir of R firing rows per feature: each triple draws a random priority and the R
  highest priorities are kept, merged like the top-N. At the end each feature's reservoir is sorted
  by activation and cut into equal-count quantile buckets, so the buckets' edges are the sample's
  quantiles: exact when the feature fired on at most R tokens, otherwise off by about 1/sqrt(R) in
  rank. Each bucket shows examples spread evenly through it;
- a histogram on log-spaced bins shared by all features (``bins_per_octave`` per factor of two,
  from 2^-24 to 2^24; smaller activations count in the first bin, larger in the last). Fixed bins
  make the counts exact in one pass, where bins relative to each feature's max would need its max
  first; :meth:`FeatureIndex.histogram` returns the range of bins the feature occupies.

After the pass, the rows of every example's context window (found by (seq, pos)) are read again
and encoded, only those rows, to fill in the window activations. Tokens of a window that are not
in the store (special tokens left out of the harvest) get activation 0; padding is left out.

Each feature's nearest features by decoder cosine (the ``n_nearest`` rows of ``W_dec`` pointing
most nearly its way) are found once, a chunk of rows at a time.

Saved as ``feature_index.safetensors`` (every table) and ``feature_index.json`` (sizes, settings,
the token strings): nothing is pickled. Format 2 added the nearest features; a format-1 index still
loads, and :meth:`FeatureIndex.nearest` says None for it.

Shape suffixes: F features, N top examples, Q quantile buckets, P samples per bucket, R reservoir,
W window tokens, H histogram bins, O output tokens, V vocabulary, D model width, M firing pairs,
X examples, K nearest features.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.store import ActivationStore
from ..saes.base import BaseSAE, Code, LatentGroups
from .router import analyze_router, routes_tokens

FORMAT = 2
READ_FORMATS = (1, 2)
"""Formats :meth:`FeatureIndex.load` reads: 1 lacks the nearest features, otherwise the same."""
TENSORS_FILE = "feature_index.safetensors"
INFO_FILE = "feature_index.json"
HIST_EXPONENTS = (-24, 24)
"""Histogram bins span activations 2^-24 to 2^24; outside it they count in the first or last bin."""


@dataclass
class FeatureIndexConfig:
    """How much the index keeps about each feature."""

    n_top: int = 20
    """Top activating tokens kept per feature."""
    n_quantiles: int = 5
    """Equal-count buckets the feature's firing activations are cut into (lowest first)."""
    per_quantile: int = 5
    """Example tokens shown from each quantile bucket."""
    reservoir: int = 250
    """Firing tokens sampled per feature (uniformly) to find its quantiles; exact for features that
    fire on at most this many tokens."""
    window_before: int = 10
    """Context tokens shown before each example token."""
    window_after: int = 4
    """Context tokens shown after each example token."""
    n_output_tokens: int = 10
    """Output tokens listed as most promoted and most suppressed by each decoder direction."""
    n_nearest: int = 5
    """Features listed as nearest to each, by the cosine of their decoder directions."""
    bins_per_octave: int = 4
    """Histogram bins per factor of two in activation."""
    chunk_rows: int = 4096
    """Rows encoded at a time."""
    seed: int = 0
    """Seed of the reservoir's random priorities."""

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            least = 0 if field.name in ("window_before", "window_after", "seed") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"FeatureIndexConfig.{field.name}={value!r} must be an integer >= {least}")
        if self.reservoir < self.n_quantiles:
            raise ValueError(f"FeatureIndexConfig.reservoir={self.reservoir} must be at least "
                             f"n_quantiles={self.n_quantiles}, one sampled token per bucket")


class Example(NamedTuple):
    """One token where a feature fired, in its context window."""

    feature: int
    activation: float
    """The feature's activation at this token."""
    seq: int
    """The context it comes from (the store's ``seq``)."""
    pos: int
    """Its position in that context."""
    tokens: list[str]
    """The window's tokens as readable strings (word starts carry their leading space)."""
    token_acts: list[float]
    """The feature's activation at each window token (0 where the token is not in the store)."""
    center: int
    """Index of the example's own token in ``tokens``."""

    def text(self, mark: tuple[str, str] = ("[[", "]]")) -> str:
        """The window as one line of text with the example's own token between ``mark``s, e.g.
        "the value of [[ x]] is"."""
        tokens = list(self.tokens)
        tokens[self.center] = f"{mark[0]}{tokens[self.center]}{mark[1]}"
        return "".join(tokens).strip()


class FeatureIndex:
    """Per-feature statistics, examples, histograms and output effects of one SAE on one store.

    Built by :func:`build_feature_index` or read by :meth:`load`. ``tensors`` holds the tables by
    name (see the module docstring for shapes); ``info`` the sizes, settings, where the activations
    came from and the strings of every token the index shows.
    """

    def __init__(self, tensors: dict[str, Tensor], info: dict[str, Any]):
        self.tensors = tensors
        self.info = info
        self.cfg = FeatureIndexConfig(**info["config"])
        self.d_sae: int = info["d_sae"]
        self.n_tokens: int = info["n_tokens"]
        self.frequency: Tensor = tensors["count_F"].double() / self.n_tokens
        """(F,) fraction of the tokens on which each feature fired."""
        self.mean_act: Tensor = tensors["mean_act_F"]
        """(F,) mean activation over the tokens where the feature fired (0 if it never did)."""
        self.max_act: Tensor = tensors["max_act_F"]
        """(F,) largest activation (0 if it never fired)."""
        self.groups: LatentGroups | None = _groups(tensors, info)
        """The expert or prefix level of each feature (the SAE's ``latent_groups()``); None for a
        flat dictionary."""
        self._strings = dict(zip(info["token_ids"], info["token_strings"]))

    def __repr__(self) -> str:
        return (f"FeatureIndex(d_sae={self.d_sae}, n_tokens={self.n_tokens}, "
                f"architecture={self.info['architecture']!r}, site={self.info['source'].get('site')!r})")

    def check_feature(self, f: Any) -> int:
        """``f`` as an int; an IndexError naming the valid range (a TypeError for a non-integer)."""
        if not isinstance(f, (int, np.integer)) or isinstance(f, bool):
            raise TypeError(f"feature {f!r} is not an integer id; pass a feature id 0-{self.d_sae - 1}")
        if not 0 <= f < self.d_sae:
            raise IndexError(f"feature {f} is out of range: this SAE has {self.d_sae} features "
                             f"(0-{self.d_sae - 1})")
        return int(f)

    def top(self, f: int, distinct: bool = False) -> list[Example]:
        """The feature's top activating tokens, highest first (fewer if it fired on fewer tokens).

        ``distinct``: leave out an example whose window holds the same token ids as one before it
        (the same text met twice in the data, e.g. a repeated header), as the browser shows them."""
        f = self.check_feature(f)
        t = self.tensors
        return self._examples(f, t["top_act_FN"][f], t["top_seq_FN"][f], t["top_pos_FN"][f],
                              t["top_ids_FNW"][f], t["top_acts_FNW"][f], distinct)

    def quantile_samples(self, f: int, distinct: bool = False) -> list[list[Example]]:
        """Example tokens from each activation quantile bucket, lowest bucket first, each bucket's
        examples in increasing activation; see :meth:`quantile_edges` for the buckets' bounds.
        ``distinct`` as for :meth:`top`, within each bucket."""
        f = self.check_feature(f)
        t = self.tensors
        return [self._examples(f, t["sample_act_FQP"][f, q], t["sample_seq_FQP"][f, q],
                               t["sample_pos_FQP"][f, q], t["sample_ids_FQPW"][f, q],
                               t["sample_acts_FQPW"][f, q], distinct)
                for q in range(self.cfg.n_quantiles)]

    def nearest(self, f: int) -> list[tuple[int, float]] | None:
        """The features whose decoder directions are nearest the feature's, as (feature, cosine),
        most similar first; None for an index of format 1, which did not keep them."""
        f = self.check_feature(f)
        if "nearest_ids_FK" not in self.tensors:
            return None
        ids, cos = self.tensors["nearest_ids_FK"][f].tolist(), self.tensors["nearest_cos_FK"][f].tolist()
        return list(zip(ids, cos))

    def quantile_edges(self, f: int) -> Tensor:
        """(n_quantiles + 1,) activations bounding the quantile buckets: bucket q holds activations
        in [edges[q], edges[q + 1]]. NaN for a feature that never fired."""
        return self.tensors["quantile_edges_FQ"][self.check_feature(f)]

    def histogram(self, f: int) -> tuple[Tensor, Tensor]:
        """(counts, edges) of the feature's firing activations over the log-spaced bins it occupies
        (len(edges) == len(counts) + 1); the counts add up to the tokens it fired on. The first edge
        is 0 when the lowest bin is the catch-all one, and the last the feature's max when it is the
        top one. Empty counts and edges [0] for a feature that never fired."""
        f = self.check_feature(f)
        counts_H = self.tensors["hist_FH"][f]
        occupied = counts_H.nonzero().flatten()
        if not len(occupied):
            return counts_H[:0], torch.zeros(1, dtype=torch.float64)
        lo, hi = int(occupied[0]), int(occupied[-1]) + 1
        edges = hist_edges(self.cfg.bins_per_octave)[lo:hi + 1].clone()
        if math.isinf(edges[-1]):
            edges[-1] = float(self.max_act[f])
        return counts_H[lo:hi], edges

    def output_effects(self, f: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]] | None:
        """The output tokens whose logits the feature's decoder direction raises most and lowers
        most (``W_dec[f] @ unembedding.T``), each as (token, logit change) from the extreme inward;
        None when the index was built without an unembedding."""
        f = self.check_feature(f)
        t = self.tensors
        if "effect_top_FO" not in t:
            return None

        def listing(end: str) -> list[tuple[str, float]]:
            ids, values = t[f"effect_{end}_ids_FO"][f].tolist(), t[f"effect_{end}_FO"][f].tolist()
            return [(self._strings[i], v) for i, v in zip(ids, values)]

        return listing("top"), listing("bottom")

    def top_tokens(self, n: int = 5) -> list[list[str]]:
        """For every feature, the distinct tokens of its top examples (each example's own token,
        stripped), most activating first, at most ``n``: a name to search features by."""
        center_FN = self.tensors["top_ids_FNW"][:, :, self.cfg.window_before].tolist()
        names = []
        for ids in center_FN:
            distinct = dict.fromkeys(self._strings[i].strip() for i in ids if i >= 0)
            names.append(list(distinct)[:n])
        return names

    def _examples(self, f: int, act_K: Tensor, seq_K: Tensor, pos_K: Tensor, ids_KW: Tensor,
                  acts_KW: Tensor, distinct: bool = False) -> list[Example]:
        examples = []
        seen: set[tuple[int, ...]] = set()
        for k in range(len(act_K)):
            if seq_K[k] < 0:  # an empty slot: the feature fired on fewer tokens than there are slots
                continue
            if distinct:
                window = tuple(ids_KW[k].tolist())  # -1 outside the context, so the place is in it too
                if window in seen:
                    continue
                seen.add(window)
            real_W = ids_KW[k] >= 0
            examples.append(Example(
                feature=f, activation=float(act_K[k]), seq=int(seq_K[k]), pos=int(pos_K[k]),
                tokens=[self._strings[int(i)] for i in ids_KW[k][real_W]],
                token_acts=acts_KW[k][real_W].tolist(),
                center=int(real_W[:self.cfg.window_before].sum())))
        return examples

    def save(self, folder: str | Path) -> Path:
        """Write the index into ``folder`` (created if needed) as safetensors + JSON."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in self.tensors.items()}, str(folder / TENSORS_FILE))
        (folder / INFO_FILE).write_text(json.dumps(self.info) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureIndex:
        """The index saved in ``folder`` by :meth:`save`, exactly as it was."""
        folder = Path(folder)
        if not (folder / INFO_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
            raise FileNotFoundError(f"no feature index in {folder} (expected {INFO_FILE} and {TENSORS_FILE}); "
                                    f"build one with build_feature_index(sae, store, tokenizer).save(folder)")
        info = json.loads((folder / INFO_FILE).read_text())
        if info.get("format") not in READ_FORMATS:
            raise ValueError(f"{folder / INFO_FILE} has format {info.get('format')!r} but this workbench "
                             f"reads formats {', '.join(map(str, READ_FORMATS))}; build the index again")
        return cls(load_file(str(folder / TENSORS_FILE)), info)


def hist_edges(bins_per_octave: int) -> Tensor:
    """(H + 1,) float64 edges of the bins every feature's histogram shares, with b = bins_per_octave:
    0, 2^(-24 + 1/b), 2^(-24 + 2/b), ..., 2^(24 - 1/b), inf. The first bin so holds everything
    below 2^(-24 + 1/b) and the last everything from 2^(24 - 1/b) up."""
    lo, hi = HIST_EXPONENTS
    n_bins = (hi - lo) * bins_per_octave
    inner = torch.pow(2.0, lo + torch.arange(1, n_bins, dtype=torch.float64) / bins_per_octave)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.full((1,), math.inf, dtype=torch.float64)])


def _hist_bin(act_M: Tensor, bins_per_octave: int) -> Tensor:
    lo, hi = HIST_EXPONENTS
    bin_M = torch.floor((torch.log2(act_M.double()) - lo) * bins_per_octave)
    return bin_M.clamp_(0, (hi - lo) * bins_per_octave - 1).long()


def unembedding(model: nn.Module) -> Tensor | None:
    """The (V, D) matrix that turns the model's last hidden state into token logits: a causal LM's
    output head, or for an encoder with tied word embeddings (BERT, MiniLM) its input embedding
    matrix; None for a model with neither."""
    head = model.get_output_embeddings()
    if head is not None:
        return head.weight.detach()
    if getattr(model.config, "tie_word_embeddings", False):
        return model.get_input_embeddings().weight.detach()
    return None


def readable_tokens(tokenizer: Any, ids: Sequence[int] | Tensor) -> list[str]:
    """Each token id as the text it stands for, so that joining them reads as the text.

    WordPiece (BERT) pieces lose their "##" marker and every other piece gets back the space it
    stood after; byte-level BPE (GPT-2) pieces are decoded from their byte alphabet ("Ġthe" ->
    " the"); SentencePiece's "▁" becomes a space.
    """
    ids = ids.tolist() if isinstance(ids, Tensor) else [int(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(model).__name__ == "WordPiece":
        prefix = model.continuing_subword_prefix
        return [p[len(prefix):] if p.startswith(prefix) else " " + p for p in pieces]
    strings = []
    for piece in pieces:
        text = tokenizer.convert_tokens_to_string([piece])
        strings.append(" " + text.lstrip(" ") if piece.startswith("▁") else text)
    return strings


# -------------------------------------------------------------------------------------------------
# Building


@torch.inference_mode()
def build_feature_index(sae: BaseSAE, store: ActivationStore, tokenizer: Any, *, unembed_VD: Tensor | None = None,
                        scale: float | None = None, cfg: FeatureIndexConfig | None = None,
                        progress: bool = True) -> FeatureIndex:
    """Index every feature of ``sae`` over the rows of ``store`` (see the module docstring).

    ``tokenizer`` turns the stored token ids into strings. ``unembed_VD`` (from :func:`unembedding`)
    adds each feature's output-token effects. ``scale`` multiplies the activations before encoding,
    for an SAE trained on scaled activations; SAEs saved by a run read raw activations (the scale is
    folded into them), so leave it None for those.
    """
    cfg = cfg or FeatureIndexConfig()
    cfg.validate()
    d_in = sae.cfg.d_in
    if store.d != d_in:
        raise ValueError(f"the SAE reads d_in={d_in} but the store's activations have d={store.d}; "
                         f"index the SAE on activations of the site it was trained on")
    if store.n_rows == 0:
        raise ValueError(f"the store at {store.folder} holds no rows; harvest some tokens first")
    if unembed_VD is not None and (unembed_VD.ndim != 2 or unembed_VD.shape[1] != d_in):
        raise ValueError(f"unembed_VD has shape {tuple(unembed_VD.shape)} but the SAE's decoder rows have "
                         f"d={d_in}; pass the (vocab, {d_in}) matrix from unembedding(model)")
    if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < math.inf):
        raise ValueError(f"scale={scale!r} must be a positive number, or None for raw activations")
    sae.eval()
    device = sae.W_dec.device

    acc = _Accumulator(sae.cfg.d_sae, cfg)
    with tqdm(total=store.n_rows, unit="tok", desc="index features", disable=not progress) as bar:
        for start in range(0, store.n_rows, cfg.chunk_rows):
            stop = min(start + cfg.chunk_rows, store.n_rows)
            x_BD = _scaled(store.read_rows(start, stop), scale).to(device)
            acc.add(*_firing_pairs(sae.encode_code(x_BD), start))
            bar.update(stop - start)

    tensors = acc.stats() | acc.top_and_samples(store)
    tensors |= _example_windows(sae, store, tensors, cfg, scale, progress)
    shown_ids = [tensors["top_ids_FNW"].flatten(), tensors["sample_ids_FQPW"].flatten()]
    if unembed_VD is not None:
        tensors.update(_output_effects(sae.W_dec.detach().float().cpu(), unembed_VD.detach().float().cpu(),
                                       cfg.n_output_tokens, progress))
        shown_ids += [tensors["effect_top_ids_FO"].flatten(), tensors["effect_bottom_ids_FO"].flatten()]
    tensors.update(nearest_by_decoder(sae.W_dec.detach(), cfg.n_nearest))
    groups = sae.latent_groups()
    if groups is not None:
        tensors["group_F"] = groups.group_F

    token_ids = [i for i in torch.cat([ids.long() for ids in shown_ids]).unique().tolist() if i >= 0]
    info = {"format": FORMAT, "d_sae": sae.cfg.d_sae, "n_tokens": store.n_rows,
            "architecture": sae.cfg.architecture, "config": dataclasses.asdict(cfg),
            "group_kind": None if groups is None else groups.kind,
            "source": {"model": store.key.model, "site": store.key.site, "text": store.key.text,
                       "store": str(store.folder), "scale": scale},
            "token_ids": token_ids, "token_strings": readable_tokens(tokenizer, token_ids)}
    return FeatureIndex(tensors, info)


def index_sae(sae: BaseSAE, store: ActivationStore, tokenizer: Any, folder: str | Path, *,
              unembed_VD: Tensor | None = None, progress: bool = True) -> Path:
    """Everything the browser shows about one SAE (which reads raw activations), saved into
    ``folder``: the feature index on ``store`` and, for an SAE that routes tokens to experts, the
    router analysis (:func:`workbench.eval.router.analyze_router`)."""
    build_feature_index(sae, store, tokenizer, unembed_VD=unembed_VD, progress=progress).save(folder)
    if routes_tokens(sae):
        analyze_router(sae, store, tokenizer, progress=progress).save(folder)
    return Path(folder)


def _groups(tensors: dict[str, Tensor], info: dict[str, Any]) -> LatentGroups | None:
    if "group_F" in tensors:
        return LatentGroups(info["group_kind"], tensors["group_F"])
    if "expert_F" in tensors:  # indexes written before latent groups had a kind
        return LatentGroups("expert", tensors["expert_F"])
    return None


def _scaled(x_BD: Tensor, scale: float | None) -> Tensor:
    return x_BD if scale is None else x_BD.mul_(scale)


def _firing_pairs(code: Code, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """(feature, activation, row) of every (token, feature) where the feature fired (value > 0),
    on the CPU; ``start`` is the store row of the code's first token."""
    fired = code.acts > 0
    if code.idx is None:
        b_M, f_M = fired.nonzero(as_tuple=True)
    else:
        b_M, k_M = fired.nonzero(as_tuple=True)
        f_M = code.idx[b_M, k_M]
    act_M = code.acts[fired]
    return f_M.cpu(), act_M.float().cpu(), b_M.cpu() + start


class _Accumulator:
    """The running per-feature tables of one streaming pass (everything on the CPU)."""

    def __init__(self, d_sae: int, cfg: FeatureIndexConfig):
        self.F, self.cfg = d_sae, cfg
        self.count_F = torch.zeros(d_sae, dtype=torch.long)
        self.sum_F = torch.zeros(d_sae, dtype=torch.float64)
        self.max_F = torch.zeros(d_sae)
        n_bins = (HIST_EXPONENTS[1] - HIST_EXPONENTS[0]) * cfg.bins_per_octave
        self.hist_FH = torch.zeros(d_sae, n_bins, dtype=torch.long)
        # Bounded top tables, each row sorted by its key, highest first; -inf keys mark empty slots.
        self.top = _TopTable(d_sae, cfg.n_top, n_payload=1)  # key: activation; payload: row
        self.reservoir = _TopTable(d_sae, cfg.reservoir, n_payload=2)  # key: priority; payload: row, act
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def add(self, f_M: Tensor, act_M: Tensor, row_M: Tensor) -> None:
        self.count_F += torch.bincount(f_M, minlength=self.F)
        self.sum_F.index_add_(0, f_M, act_M.double())
        self.max_F.scatter_reduce_(0, f_M, act_M, reduce="amax")
        flat_M = f_M * self.hist_FH.shape[1] + _hist_bin(act_M, self.cfg.bins_per_octave)
        self.hist_FH.view(-1).index_add_(0, flat_M, torch.ones_like(flat_M))
        self.top.merge(f_M, act_M, (row_M,))
        self.reservoir.merge(f_M, torch.rand(len(f_M), generator=self.gen), (row_M, act_M))

    def stats(self) -> dict[str, Tensor]:
        mean_F = (self.sum_F / self.count_F.clamp_min(1)).float()
        return {"count_F": self.count_F, "mean_act_F": mean_F, "max_act_F": self.max_F, "hist_FH": self.hist_FH}

    def top_and_samples(self, store: ActivationStore) -> dict[str, Tensor]:
        """The top examples and the quantile samples (with their seq/pos), and the quantile edges."""
        top_act_FN = self.top.key_FK.clone()
        top_row_FN = self.top.payload[0]
        top_act_FN[top_row_FN < 0] = 0

        Q, P = self.cfg.n_quantiles, self.cfg.per_quantile
        row_FR, act_FR = self.reservoir.payload
        valid_FR = row_FR >= 0
        act_FR, order_FR = torch.where(valid_FR, act_FR, math.inf).sort(dim=1)
        row_FR = row_FR.gather(1, order_FR)
        m_F1 = valid_FR.sum(1, keepdim=True)
        bounds_FQ = torch.arange(Q + 1) * m_F1 // Q  # rank where each bucket starts (and the last ends)
        edges_FQ = act_FR.gather(1, bounds_FQ.minimum(m_F1 - 1).clamp_min(0))
        edges_FQ[m_F1.squeeze(1) == 0] = math.nan
        lo_FQ1, size_FQ1 = bounds_FQ[:, :-1, None], (bounds_FQ[:, 1:] - bounds_FQ[:, :-1])[..., None]
        i_P = torch.arange(P)
        # P ranks spread evenly through each bucket (all of it when it holds fewer than P).
        spread_FQP = torch.where(size_FQ1 >= P, (2 * i_P + 1) * size_FQ1 // (2 * P), i_P)
        filled_FQP = i_P < size_FQ1
        rank_FQP = (lo_FQ1 + spread_FQP).clamp_max(act_FR.shape[1] - 1).flatten(1)
        sample_row_FQP = torch.where(filled_FQP, row_FR.gather(1, rank_FQP).view_as(filled_FQP), -1)
        sample_act_FQP = torch.where(filled_FQP, act_FR.gather(1, rank_FQP).view_as(filled_FQP), 0.0)

        seq_N, pos_N = torch.from_numpy(store.seq), torch.from_numpy(store.pos.astype(np.int64))
        out = {"top_act_FN": top_act_FN, "sample_act_FQP": sample_act_FQP, "quantile_edges_FQ": edges_FQ}
        for name, suffix, row in (("top", "FN", top_row_FN), ("sample", "FQP", sample_row_FQP)):
            safe = row.clamp_min(0)
            out[f"{name}_seq_{suffix}"] = torch.where(row >= 0, seq_N[safe], -1)
            out[f"{name}_pos_{suffix}"] = torch.where(row >= 0, pos_N[safe], -1)
        return out


class _TopTable:
    """Per feature, the K entries with the largest keys seen so far and their payloads, sorted
    highest first. Empty slots have key -inf and payload -1."""

    def __init__(self, d_sae: int, k: int, n_payload: int):
        self.key_FK = torch.full((d_sae, k), -math.inf)
        self.payload = [torch.full((d_sae, k), -1, dtype=torch.long)] + [torch.full((d_sae, k), -1.0)
                                                                         for _ in range(n_payload - 1)]

    def merge(self, f_M: Tensor, key_M: Tensor, payload_M: tuple[Tensor, ...]) -> None:
        """Merge new entries (feature, key, payloads). Only entries above their feature's current
        K-th key can enter; they are sorted per feature and merged into the old rows by counting,
        for each entry, the entries of the other list above it (the old rows are never re-sorted)."""
        F, K = self.key_FK.shape
        enters_M = key_M > self.key_FK[f_M, -1]
        if not enters_M.any():
            return
        f_M, key_M = f_M[enters_M], key_M[enters_M]
        payload_M = [p[enters_M] for p in payload_M]
        # The new entries by feature, highest key first within a feature (two stable sorts), and
        # each one's rank among its feature's new entries; beyond rank K none can be kept.
        order = key_M.argsort(descending=True, stable=True)
        order = order[f_M[order].argsort(stable=True)]
        f_sorted = f_M[order]
        rank = torch.arange(len(order)) - torch.searchsorted(f_sorted, f_sorted)
        fits = rank < K
        order, f_sorted, rank = order[fits], f_sorted[fits], rank[fits]
        touched_T = (torch.bincount(f_sorted, minlength=F) > 0).nonzero().flatten()
        row_of_F = torch.zeros(F, dtype=torch.long)
        row_of_F[touched_T] = torch.arange(len(touched_T))
        new_key_TM = torch.full((len(touched_T), int(rank.max()) + 1), -math.inf)
        new_key_TM[row_of_F[f_sorted], rank] = key_M[order]
        old_key_TK = self.key_FK[touched_T]
        # Merged position = own rank + entries of the other list ranked before it (old first on ties).
        # Descending rows are negated into the ascending ones searchsorted needs.
        pos_old_TK = torch.arange(K) + torch.searchsorted(-new_key_TM, -old_key_TK, side="left")
        pos_new_TM = torch.arange(new_key_TM.shape[1]) + torch.searchsorted(-old_key_TK, -new_key_TM, side="right")
        for table, old, new in [(self.key_FK, old_key_TK, key_M[order])] + [
                (table, table[touched_T], p[order].to(table.dtype)) for table, p in zip(self.payload, payload_M)]:
            new_TM = torch.full(new_key_TM.shape, -1, dtype=table.dtype)
            new_TM[row_of_F[f_sorted], rank] = new
            merged = torch.empty(len(touched_T), K + new_TM.shape[1], dtype=table.dtype)
            merged.scatter_(1, pos_old_TK, old).scatter_(1, pos_new_TM, new_TM)
            table[touched_T] = merged[:, :K]


def _example_windows(sae: BaseSAE, store: ActivationStore, tensors: dict[str, Tensor], cfg: FeatureIndexConfig,
                     scale: float | None, progress: bool) -> dict[str, Tensor]:
    """The context windows of the top examples and the quantile samples, found in one go (their
    windows share rows, each encoded once)."""
    top_seq_FN, sample_seq_FQP = tensors["top_seq_FN"], tensors["sample_seq_FQP"]
    feature_F = torch.arange(top_seq_FN.shape[0])
    f_X = torch.cat([feature_F[:, None].expand_as(top_seq_FN).flatten(),
                     feature_F[:, None, None].expand_as(sample_seq_FQP).flatten()])
    seq_X = torch.cat([top_seq_FN.flatten(), sample_seq_FQP.flatten()])
    pos_X = torch.cat([tensors["top_pos_FN"].flatten(), tensors["sample_pos_FQP"].flatten()])
    ids_XW, acts_XW = _windows(sae, store, f_X, seq_X, pos_X, cfg, scale, progress)
    n_top, W = top_seq_FN.numel(), ids_XW.shape[1]
    return {"top_ids_FNW": ids_XW[:n_top].view(*top_seq_FN.shape, W),
            "top_acts_FNW": acts_XW[:n_top].view(*top_seq_FN.shape, W),
            "sample_ids_FQPW": ids_XW[n_top:].view(*sample_seq_FQP.shape, W),
            "sample_acts_FQPW": acts_XW[n_top:].view(*sample_seq_FQP.shape, W)}


def _windows(sae: BaseSAE, store: ActivationStore, f_X: Tensor, seq_X: Tensor, pos_X: Tensor,
             cfg: FeatureIndexConfig, scale: float | None, progress: bool) -> tuple[Tensor, Tensor]:
    """(token ids (X, W) int32, -1 outside the context or on padding; the feature's activation at
    each, (X, W) float32) of the window around each example (seq -1: an empty slot, all -1)."""
    L = store.key.context_length
    before, after = cfg.window_before, cfg.window_after
    seq_X, pos_X, f_X = seq_X.numpy(), pos_X.numpy(), f_X.numpy()
    used_X = seq_X >= 0
    pos_XW = pos_X[:, None] + np.arange(-before, after + 1)
    if not used_X.any():  # no feature fired on any row
        return torch.full(pos_XW.shape, -1, dtype=torch.int32), torch.zeros(pos_XW.shape)
    ctx_seq_C, ctx_X = np.unique(seq_X[used_X], return_inverse=True)
    ids_CL, mask_CL = store.context(ctx_seq_C)
    ctx_XW = np.zeros(pos_XW.shape, np.int64)
    ctx_XW[used_X] = ctx_X.reshape(-1, 1)
    at_XW = np.clip(pos_XW, 0, L - 1)
    real_XW = used_X[:, None] & (pos_XW >= 0) & (pos_XW < L) & mask_CL[ctx_XW, at_XW]
    ids_XW = np.where(real_XW, ids_CL[ctx_XW, at_XW], -1).astype(np.int32)

    # The store row at each (seq, pos): rows come in stream order, but sorting the keys costs little
    # and does not rely on a producer's positions increasing within a context.
    key_N = store.seq * L + store.pos
    order_N = np.argsort(key_N, kind="stable")
    sorted_key_N = key_N[order_N]
    key_XW = seq_X[:, None] * L + at_XW
    found_XW = np.minimum(np.searchsorted(sorted_key_N, key_XW), len(key_N) - 1)
    in_store_XW = real_XW & (sorted_key_N[found_XW] == key_XW)
    pair_row = order_N[found_XW[in_store_XW]]
    pair_f = np.broadcast_to(f_X[:, None], pos_XW.shape)[in_store_XW]

    rows_U, pair_u = np.unique(pair_row, return_inverse=True)
    by_row = np.argsort(pair_u, kind="stable")
    u_sorted = pair_u[by_row]
    pair_act = np.zeros(len(pair_row), np.float32)
    device = sae.W_dec.device
    with tqdm(total=len(rows_U), unit="tok", desc="context windows", disable=not progress) as bar:
        for u0 in range(0, len(rows_U), cfg.chunk_rows):
            x_BD = _scaled(_read_row_ids(store, rows_U[u0:u0 + cfg.chunk_rows]), scale).to(device)
            code = sae.encode_code(x_BD)
            lo, hi = np.searchsorted(u_sorted, [u0, u0 + cfg.chunk_rows])
            pairs = by_row[lo:hi]
            local_P = torch.from_numpy(pair_u[pairs] - u0).to(device)
            pair_act[pairs] = _code_at(code, local_P, torch.from_numpy(pair_f[pairs]).to(device)).float().cpu().numpy()
            bar.update(len(x_BD))
    acts_XW = np.zeros(pos_XW.shape, np.float32)
    acts_XW[in_store_XW] = pair_act
    return torch.from_numpy(ids_XW), torch.from_numpy(acts_XW)


def _read_row_ids(store: ActivationStore, rows_B: np.ndarray) -> Tensor:
    """The store rows with these increasing ids, as a (B, D) float32 tensor (one gather per shard)."""
    starts = np.concatenate([[0], np.cumsum(store.shard_rows)])
    bounds = np.searchsorted(rows_B, starts)
    out_BD = np.empty((len(rows_B), store.d), np.float32)
    for shard in range(store.n_shards):
        lo, hi = bounds[shard], bounds[shard + 1]
        if lo < hi:
            out_BD[lo:hi] = store.read_shard_rows(shard, rows_B[lo:hi] - starts[shard])
    return torch.from_numpy(out_BD)


def _code_at(code: Code, b_P: Tensor, f_P: Tensor) -> Tensor:
    """The activation of feature f_P[p] at token b_P[p] of a code (0 where it did not fire)."""
    if code.idx is None:
        return code.acts[b_P, f_P]
    hit_PK = code.idx[b_P] == f_P[:, None]
    return (code.acts[b_P] * hit_PK).sum(1)


def nearest_by_decoder(W_dec_FD: Tensor, k: int, chunk: int = 1024) -> dict[str, Tensor]:
    """For every feature (row of ``W_dec_FD``), the ``k`` other features whose decoder rows have the
    highest cosine with its own, most similar first: ``nearest_ids_FK`` (int64) and
    ``nearest_cos_FK`` (float32), on the CPU. A chunk of rows at a time, on the decoder's device
    (the whole (F, F) matrix would take gigabytes at the widths SAEs are trained at)."""
    F = W_dec_FD.shape[0]
    k = min(k, F - 1)
    unit_FD = W_dec_FD.float()
    unit_FD = unit_FD / unit_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ids, cos = [], []
    for s in range(0, F, chunk):
        cos_CF = unit_FD[s:s + chunk] @ unit_FD.T
        rows = torch.arange(cos_CF.shape[0], device=cos_CF.device)
        cos_CF[rows, rows + s] = -math.inf  # not its own neighbour
        values, idx = cos_CF.topk(k, dim=1)
        ids.append(idx.cpu())
        cos.append(values.cpu())
    return {"nearest_ids_FK": torch.cat(ids).long(), "nearest_cos_FK": torch.cat(cos)}


def _output_effects(W_dec_FD: Tensor, unembed_VD: Tensor, n: int, progress: bool,
                    chunk: int = 256) -> dict[str, Tensor]:
    """The n largest and n smallest entries of each row of W_dec @ unembed.T and their token ids,
    a chunk of features at a time (the whole (F, V) product would take gigabytes)."""
    n = min(n, unembed_VD.shape[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in ("effect_top_FO", "effect_top_ids_FO",
                                                       "effect_bottom_FO", "effect_bottom_ids_FO")}
    for s in tqdm(range(0, W_dec_FD.shape[0], chunk), desc="output effects", disable=not progress):
        logits_CV = W_dec_FD[s:s + chunk] @ unembed_VD.T
        for name, largest in (("top", True), ("bottom", False)):
            values, ids = logits_CV.topk(n, dim=1, largest=largest)
            parts[f"effect_{name}_FO"].append(values)
            parts[f"effect_{name}_ids_FO"].append(ids)
    return {name: torch.cat(p) for name, p in parts.items()}
