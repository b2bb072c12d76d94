"""Feature-index build time: ``build_feature_index`` over 100k tokens for a 6k-feature SAE.

    python benchmarks/bench_features.py [--tokens 100000] [--d-sae 6144] [--k 32] [--threads N]

The store holds real token contexts (CPython's prose through MiniLM's tokenizer, 128 tokens each)
with random activations (d=384, seeded), and the SAE is a freshly initialised TopK SAE: the index
cost depends on how many (token, feature) pairs fire, k per token, not on what the features mean.
The output effects use MiniLM's real (30,522 x 384) unembedding. Target: about a minute or less on
two CPU cores.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator

import torch

from workbench.data.embedded import DEFAULT_MODEL, cpython_texts, load_model
from workbench.data.store import ActivationStore, CacheKey
from workbench.data.text import tokenize_contexts
from workbench.data.types import ActivationChunk
from workbench.eval.features import build_feature_index, unembedding
from workbench.saes import TopKConfig, TopKSAE

D = 384
CONTEXT = 128


def fake_store(cache_root: str, tokenizer, n_tokens: int) -> ActivationStore:
    """A store of ``n_tokens`` rows: real contexts, seeded random activations."""
    key = CacheKey(model="bench-random", site="random", text="cpython:train", n_tokens=n_tokens,
                   context_length=CONTEXT, options="bench_features")

    def produce(start_context: int) -> Iterator[ActivationChunk]:
        gen = torch.Generator().manual_seed(0)
        for batch in tokenize_contexts(cpython_texts("train"), tokenizer, context_length=CONTEXT,
                                       max_tokens=n_tokens, progress=False):
            if int(batch.seq_S[-1]) < start_context:
                continue
            keep_SL = batch.attention_mask_SL.bool()
            S, L = keep_SL.shape
            n = int(keep_SL.sum())
            yield ActivationChunk(torch.randn(n, D, generator=gen), batch.input_ids_SL[keep_SL],
                                  batch.seq_S[:, None].expand(S, L)[keep_SL],
                                  torch.arange(L)[None, :].expand(S, L)[keep_SL], batch)

    return ActivationStore.get_or_create(cache_root, key, produce, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as cache_root:
        start = time.perf_counter()
        store = fake_store(cache_root, tokenizer, args.tokens)
        made = time.perf_counter() - start
        sae = TopKSAE(TopKConfig(d_in=D, d_sae=args.d_sae, k=args.k))
        start = time.perf_counter()
        index = build_feature_index(sae, store, tokenizer, unembed_VD=unembedding(model), progress=False)
        took = time.perf_counter() - start
    fired = int((index.frequency > 0).sum())
    print(f"store: {store.n_rows:,} tokens x d={D} made in {made:.1f} s")
    print(f"feature index: {store.n_rows:,} tokens x {args.d_sae:,} features, k={args.k} "
          f"({fired:,} features fired), {torch.get_num_threads()} threads: {took:.1f} s "
          f"({store.n_rows / took:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
