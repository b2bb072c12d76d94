"""Run a typed prompt through the model and an SAE: which latents fire on which tokens.

    runner = PromptRunner(model, tokenizer, "resid_post.2", sae)
    result = runner.run("The cat sat on the mat.")
    result.acts_TF[:, 123]            # latent 123 at every token, special tokens included

Shape suffixes: T prompt tokens, F latents, E experts, D model width.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..data.harvest import harvest
from ..data.sites import Site, resolve_site
from ..data.types import TokenBatch
from ..saes.base import BaseSAE
from .features import readable_tokens
from .router import routes_tokens

EMPTY_PROMPT = "type a prompt to see which features fire"


class PromptResult(NamedTuple):
    """An SAE's latents on every token of one prompt."""

    tokens: list[str]
    """Each token as readable text (special tokens such as [CLS] included)."""
    token_ids: Tensor
    """(T,) the tokenizer's ids."""
    acts_TF: Tensor
    """(T, F) every latent's activation at every token."""
    expert_T: Tensor | None
    """(T,) the expert the SAE routes each token to (a Switch SAE); None for SAEs without a router."""
    probs_TE: Tensor | None
    """(T, E) the router's probabilities; None for SAEs without a router."""


class PromptRunner:
    """Tokenises a prompt (with the tokenizer's special tokens), reads the site's activations and
    encodes them with the SAE, which must read raw activations (as saved SAEs do)."""

    def __init__(self, model: nn.Module, tokenizer: Any, site: str | Site, sae: BaseSAE):
        self.model = model
        self.tokenizer = tokenizer
        self.site = resolve_site(model, site) if isinstance(site, str) else site
        self.sae = sae.eval()

    def run(self, text: str) -> PromptResult:
        """The SAE's latents on ``text``; a prompt longer than the model's context is truncated."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(EMPTY_PROMPT)
        enc = self.tokenizer(text, return_tensors="pt", truncation=True)
        ids_1T = enc["input_ids"]
        batch = TokenBatch(ids_1T, enc["attention_mask"], torch.zeros(1, dtype=torch.long))
        # Every token is kept (no special ids excluded): the user sees [CLS] and BOS fire too.
        chunk = next(iter(harvest(self.model, self.site, [batch], progress=False)))
        x_TD = chunk.acts_ND.to(self.sae.W_dec.device)
        with torch.no_grad():
            acts_TF = self.sae.encode(x_TD).cpu()
            expert_T = probs_TE = None
            if routes_tokens(self.sae):
                probs_TE, expert_T = (t.cpu() for t in self.sae.route(x_TD))
        return PromptResult(readable_tokens(self.tokenizer, ids_1T[0]), ids_1T[0], acts_TF, expert_T, probs_TE)
