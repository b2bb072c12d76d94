"""Half-precision activation caches: disk per token against what an SAE trained from them loses.

    python benchmarks/bench_cache_dtype.py [--tokens 60000] [--eval-tokens 20000] [--steps 300]

Harvests the offline default (the embedded all-MiniLM-L6-v2, site resid_post.2, cpython train text,
contexts of 128) into a fresh temporary cache once per cache dtype (float32, float16, bfloat16),
trains the same seeded TopK SAE (d_sae 1536, k 32, batch 1024) on each, and evaluates every SAE on
one float32 held-out store of the eval text. Each SAE trains on its own store's ``norm_scale()``;
the held-out MSE is given back in raw activation units (divided by that scale squared) so the rows
compare, and FVU does not depend on the scale. Prints one table: bytes per token on disk (the acts
files alone, and the whole folder with its index and contexts), held-out MSE and FVU, and the
harvest's wall time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from workbench.data.embedded import DEFAULT_MODEL, cpython_texts, load_model
from workbench.data.harvest import harvest
from workbench.data.sites import resolve_site
from workbench.data.store import ActivationStore, CacheKey
from workbench.data.text import tokenize_contexts
from workbench.eval.metrics import evaluate
from workbench.saes import build_sae
from workbench.train.trainer import TrainConfig, Trainer

SITE, L = "resid_post.2", 128


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=60_000, help="training tokens harvested per dtype")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens (float32)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of batch 1024")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(DEFAULT_MODEL)
    site = resolve_site(model, SITE)

    def producer(split: str):
        def produce(start_context: int):
            batches = (b for b in tokenize_contexts(cpython_texts(split), tokenizer, context_length=L,
                                                    progress=False)
                       if int(b.seq_S[-1]) >= start_context)
            return harvest(model, site, batches, exclude_special_ids=tokenizer.all_special_ids,
                           progress=False)
        return produce

    def key(split: str, n_tokens: int, dtype: str) -> CacheKey:
        return CacheKey(model=DEFAULT_MODEL, site=site.name, text=f"cpython:{split}", n_tokens=n_tokens,
                        context_length=L, options="exclude_special=True", dtype=dtype)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_cache_dtype_") as tmp:
        held_out = ActivationStore.get_or_create(Path(tmp) / "eval", key("eval", args.eval_tokens, "float32"),
                                                 producer("eval"), progress=False)
        for dtype in ("float32", "float16", "bfloat16"):
            start = time.perf_counter()
            store = ActivationStore.get_or_create(Path(tmp) / dtype, key("train", args.tokens, dtype),
                                                  producer("train"), progress=False)
            seconds = time.perf_counter() - start
            acts_bytes = sum(p.stat().st_size for p in store.folder.glob("acts_*.npy"))
            folder_bytes = sum(p.stat().st_size for p in store.folder.iterdir())
            scale = store.norm_scale()
            torch.manual_seed(0)
            sae = build_sae({"architecture": "topk", "d_in": store.d, "d_sae": 4 * store.d, "k": 32})
            trainer = Trainer(sae, TrainConfig(total_steps=args.steps, progress_bar=False))
            trainer.fit(store.batches(1024, seed=0, epochs=None, scale=scale))
            metrics = evaluate(sae, held_out.batches(4096, epochs=1, drop_last=False, scale=scale))
            rows.append((dtype, acts_bytes / store.n_rows, folder_bytes / store.n_rows,
                         metrics["mse"] / scale**2, metrics["fvu"], seconds, store.n_rows))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {DEFAULT_MODEL} {site.name}, "
          f"d={held_out.d}; {rows[0][-1]:,} training rows, {held_out.n_rows:,} held-out rows (float32); "
          f"TopK d_sae={4 * held_out.d} k=32, {args.steps} steps of 1024")
    print(f"{'dtype':<10}{'acts B/tok':>11}{'folder B/tok':>13}{'held-out MSE':>14}{'FVU':>9}"
          f"{'vs f32':>8}{'harvest s':>11}")
    fvu32 = rows[0][4]
    for dtype, acts, folder, mse, fvu, seconds, _ in rows:
        print(f"{dtype:<10}{acts:>11.1f}{folder:>13.1f}{mse:>14.6f}{fvu:>9.5f}{fvu / fvu32:>8.4f}"
              f"{seconds:>11.1f}")


if __name__ == "__main__":
    main()
