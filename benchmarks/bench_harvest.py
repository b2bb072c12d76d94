"""Harvest throughput: our hooked, early-stopped harvest against the bare model run to that layer.

    python benchmarks/bench_harvest.py [--model NAME] [--site resid_post.2] [--batches 8] [--repeats 5]

Three ways of getting the site's activations for the same token batches, measured interleaved in one
run (median of ``--repeats``; the ways are in :func:`workbench.perf.harvest_rows`):
  harvest      workbench.data.harvest.harvest: forward hook at the site, forward stopped right after it,
               padding and special tokens dropped, rows with token ids and positions;
  bare         the model with its block list cut to blocks 0..L, run plainly;
               the floor for any harvester that has to compute those layers;
  full         the whole model with output_hidden_states=True, what a harvest without early stop costs.
Target: harvest >= 0.95x the bare model's tokens/s.
"""
from __future__ import annotations

import argparse

import torch

from workbench.data.embedded import DEFAULT_MODEL, cpython_texts, load_model
from workbench.data.sites import resolve_site
from workbench.data.text import tokenize_contexts
from workbench.perf import harvest_rows, measure, n_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--site", default="resid_post.2")
    parser.add_argument("--batches", type=int, default=8, help="batches of 32 contexts x 128 tokens")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    site = resolve_site(model, args.site)
    batches = list(tokenize_contexts(cpython_texts("train"), tokenizer, context_length=128, batch_size=32,
                                     max_tokens=args.batches * 32 * 128, progress=False))
    tokens = n_tokens(batches)
    rows = harvest_rows(model, site, batches, exclude_special_ids=tokenizer.all_special_ids)
    measure(rows, rounds=args.repeats, warmup=1)
    median = {row.name: row.median for row in rows}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{next(model.parameters()).device.type}; {args.model} {site.name} "
          f"({len(batches)} batches, {tokens:,} tokens, median of {args.repeats})")
    print(f"{'way':<10}{'seconds':>10}{'tokens/s':>12}{'vs bare':>10}")
    for name, seconds in median.items():
        print(f"{name:<10}{seconds:>10.3f}{tokens / seconds:>12,.0f}{median['bare'] / seconds:>9.2f}x")
    ratio = median["bare"] / median["harvest"]
    print(f"\nharvest throughput / bare model to layer {site.layer}: {ratio:.2f}x "
          f"(target >= 0.95x) {'MET' if ratio >= 0.95 else 'MISSED'}")
    print(f"early stop saves {1 - median['harvest'] / median['full']:.0%} of the full forward")


if __name__ == "__main__":
    main()
