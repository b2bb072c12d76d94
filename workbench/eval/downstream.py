"""Downstream fidelity: how much of the model's behaviour survives when an SAE's reconstruction
replaces the activations it was trained on.

Reconstruction MSE says how close x_hat is to x; it does not say whether the error lands on
directions the rest of the model reads. Splicing answers that: run the model three times on the same
held-out tokens, clean, with the site replaced by ``sae(x).recon_BD``, and with the site zero-ablated,
and compare what comes out. Zero ablation is the "knows nothing" baseline that the SAE's score is
scaled against.

Shape suffixes: S contexts, L tokens per context, N scored tokens, D model width, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..data.sites import Site, hook_site, resolve_site
from ..data.types import TokenBatch
from ..saes.base import BaseSAE

Splice = Callable[[Tensor], Tensor] | None


def splice_scores(model: nn.Module, sae: BaseSAE, site: str | Site, token_batches: Iterable[TokenBatch], *,
                  progress: bool = True) -> dict[str, float | str]:
    """Score the SAE spliced into the model at ``site``, over all tokens of ``token_batches``.

    The SAE's reconstruction replaces the site's value at every position (padding included, so the
    model sees what it would see in use), but only real tokens are scored. Both model and SAE are put
    in eval mode (the SAE's training mode is restored afterwards); the SAE must be on the model's
    device and runs in float32.

    Causal LMs (a class transformers registers as ``*ForCausalLM``; ``"kind": "causal_lm"``), scoring
    every next-token prediction whose position and target are both real tokens:

    - ``ce_clean``, ``ce_sae``, ``ce_zero``: mean next-token cross-entropy (nats) of each run.
    - ``delta_ce = ce_sae - ce_clean``: the loss the SAE's error costs.
    - ``loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``: 1 for a perfect SAE, 0 for one
      as bad as zero ablation. It can exceed 1 (the spliced model happens to predict these tokens
      better than the clean one) or go below 0 (worse than ablation); NaN when ablation costs nothing.
    - ``kl_sae``, ``kl_zero``: mean KL(clean next-token distribution || spliced one), in nats.

    Encoder models (BERT, MiniLM) and any model without a causal LM head (a bare ``GPT2Model``;
    ``"kind": "encoder"``) have no next-token loss, so the analogue compares final hidden states
    (the last ``output_hidden_states`` entry) over non-padding tokens:

    - ``dist_sae``, ``dist_zero``: mean ||h_run - h_clean||^2 divided by the clean states' total
      variance (mean ||h_clean - mean h_clean||^2), so 1 means "as far off as a random other token".
    - ``fidelity = (dist_zero - dist_sae) / dist_zero``: 1 for a perfect SAE, 0 for one as bad as
      zero ablation, like ``loss_recovered``.
    - ``cos_sae``, ``cos_zero``: mean cosine similarity of the spliced and clean final states.
    """
    return splice_scores_many(model, {"sae": sae}, site, token_batches, progress=progress)["sae"]


def splice_scores_many(model: nn.Module, saes: dict[str, BaseSAE], site: str | Site,
                       token_batches: Iterable[TokenBatch], *, progress: bool = True) -> dict[str, dict[str, float | str]]:
    """:func:`splice_scores` of several SAEs of one site, {name: scores}, in one pass over the
    batches: the clean and the zero-ablated runs are computed once for all of them."""
    site = resolve_site(model, site) if isinstance(site, str) else site
    model.eval()
    was_training = {name: sae.training for name, sae in saes.items()}
    for sae in saes.values():
        sae.eval()
    device = next(model.parameters()).device
    splices: dict[str, Splice] = {"zero": torch.zeros_like}
    splices.update({("sae", name): _sae_splice(sae, site) for name, sae in saes.items()})
    batches = tqdm(token_batches, disable=not progress, desc=f"splice {site.name}")
    try:
        with torch.inference_mode():
            if _is_causal_lm(model):
                return _causal_lm_scores(model, site, splices, batches, device)
            return _encoder_scores(model, site, splices, batches, device)
    finally:
        for name, sae in saes.items():
            sae.train(was_training[name])


def _is_causal_lm(model: nn.Module) -> bool:
    """True for a model transformers itself lists as a causal LM and that has its LM head."""
    return (type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
            and model.get_output_embeddings() is not None)


def _sae_splice(sae: BaseSAE, site: Site) -> Callable[[Tensor], Tensor]:
    """The hook function that replaces the site's (S, L, D) value with the SAE's reconstruction."""
    def splice(x_SLD: Tensor) -> Tensor:
        if x_SLD.shape[-1] != sae.cfg.d_in:
            raise ValueError(
                f"SAE d_in={sae.cfg.d_in} but site {site.name} of this model has width {x_SLD.shape[-1]}; "
                f"train the SAE on this site's activations"
            )
        recon_BD = sae(x_SLD.reshape(-1, x_SLD.shape[-1]).float()).recon_BD
        return recon_BD.reshape(x_SLD.shape).to(x_SLD.dtype)
    return splice


def _forward(model: nn.Module, site: Site, splice: Splice, batch: TokenBatch, device: torch.device, **kwargs):
    """The model's output on one batch, with the site's value replaced by ``splice(value)`` if given."""
    with hook_site(model, site, splice) if splice is not None else nullcontext():
        return model(input_ids=batch.input_ids_SL.to(device),
                     attention_mask=batch.attention_mask_SL.to(device), **kwargs)


def _causal_lm_scores(model: nn.Module, site: Site, splices: dict[Any, Splice], batches: Iterable[TokenBatch],
                      device: torch.device) -> dict[str, dict[str, float | str]]:
    ce = dict.fromkeys(["clean", *splices], 0.0)
    kl = dict.fromkeys(splices, 0.0)
    n_scored = 0
    for batch in batches:
        mask_SL = batch.attention_mask_SL.to(device).bool()
        # Position t predicts token t + 1; score it only when both are real tokens.
        scored_SL = mask_SL[:, :-1] & mask_SL[:, 1:]
        targets_N1 = batch.input_ids_SL.to(device)[:, 1:][scored_SL][:, None]
        clean_logp_NV = _next_token_logprobs(_forward(model, site, None, batch, device).logits, scored_SL)
        ce["clean"] += -clean_logp_NV.gather(1, targets_N1).sum().item()
        for run, splice in splices.items():
            logp_NV = _next_token_logprobs(_forward(model, site, splice, batch, device).logits, scored_SL)
            ce[run] += -logp_NV.gather(1, targets_N1).sum().item()
            kl[run] += F.kl_div(logp_NV, clean_logp_NV, log_target=True, reduction="sum").item()
        n_scored += len(targets_N1)
    _check_scored(n_scored, site)
    ce_clean, ce_zero, kl_zero = ce["clean"] / n_scored, ce["zero"] / n_scored, kl["zero"] / n_scored
    scores = {}
    for run in splices:
        if run == "zero":
            continue
        ce_sae = ce[run] / n_scored
        scores[run[1]] = {"kind": "causal_lm", "ce_clean": ce_clean, "ce_sae": ce_sae, "kl_sae": kl[run] / n_scored,
                          "ce_zero": ce_zero, "kl_zero": kl_zero, "delta_ce": ce_sae - ce_clean,
                          "loss_recovered": _ratio(ce_zero - ce_sae, ce_zero - ce_clean)}
    return scores


def _next_token_logprobs(logits_SLV: Tensor, scored_SL: Tensor) -> Tensor:
    """(N, V) float32 log-probabilities at the scored positions (logits at t predict token t + 1)."""
    return logits_SLV[:, :-1][scored_SL].float().log_softmax(-1)


def _encoder_scores(model: nn.Module, site: Site, splices: dict[Any, Splice], batches: Iterable[TokenBatch],
                    device: torch.device) -> dict[str, dict[str, float | str]]:
    sq_dist = dict.fromkeys(splices, 0.0)
    cos = dict.fromkeys(splices, 0.0)
    sum_h_D: Tensor | None = None
    sum_sq_norm = 0.0
    n_tokens = 0
    for batch in batches:
        mask_SL = batch.attention_mask_SL.to(device).bool()
        clean_ND = _final_states(model, site, None, batch, device)[mask_SL].double()
        for run, splice in splices.items():
            run_ND = _final_states(model, site, splice, batch, device)[mask_SL].double()
            sq_dist[run] += (run_ND - clean_ND).pow(2).sum().item()
            cos[run] += F.cosine_similarity(run_ND, clean_ND, dim=-1).sum().item()
        batch_sum_D = clean_ND.sum(0)
        sum_h_D = batch_sum_D if sum_h_D is None else sum_h_D + batch_sum_D
        sum_sq_norm += clean_ND.pow(2).sum().item()
        n_tokens += len(clean_ND)
    _check_scored(n_tokens, site)
    # Total variance E||h||^2 - ||E h||^2, in float64 so the difference keeps its digits.
    total_var = sum_sq_norm / n_tokens - (sum_h_D / n_tokens).pow(2).sum().item()
    dist = {run: sq_dist[run] / n_tokens / total_var for run in splices}
    return {run[1]: {"kind": "encoder", "dist_sae": dist[run], "dist_zero": dist["zero"],
                     "fidelity": _ratio(dist["zero"] - dist[run], dist["zero"]),
                     "cos_sae": cos[run] / n_tokens, "cos_zero": cos["zero"] / n_tokens}
            for run in splices if run != "zero"}


def _final_states(model: nn.Module, site: Site, splice: Splice, batch: TokenBatch, device: torch.device) -> Tensor:
    """(S, L, D) last hidden states, for bare encoders and encoders with a task head alike."""
    return _forward(model, site, splice, batch, device, output_hidden_states=True).hidden_states[-1]


def _check_scored(n: int, site: Site) -> None:
    if n == 0:
        raise ValueError(f"splice_scores at {site.name}: the token batches hold no scorable tokens; pass "
                         "non-empty batches whose attention_mask has real tokens (two per context for a causal LM)")


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0 (the baseline costs nothing, so nothing can be recovered)."""
    return num / den if den != 0 else float("nan")
