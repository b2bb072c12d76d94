"""What the lazy semantics of ``optimizer="sparse_adam"`` cost in quality: dense vs sparse Adam on real
activations, with seeds as error bars.

    python benchmarks/compare_optimizers.py [--seeds 0 1 2] [--steps 800] [--width 4096] [--k 16]

For each seed, two runs of the main job (:func:`workbench.run.run`) on the offline default (MiniLM
resid_post.2 on CPython's prose), identical but for ``TrainConfig.optimizer``: the same SAEs (TopK
with AuxK, Switch with 8 experts; width, k, batch, steps and the AuxK dead window from the flags),
the same initial weights and the same batches (seed s for both the SAEs and the data order). Each run
is evaluated on the same held-out tokens: FVU, dead fraction (never fired on the evaluation tokens),
L0, and fidelity (MiniLM's final hidden states with the SAE spliced in, 1 = as clean, 0 = as zero
ablation). Printed: one line per (SAE, optimizer) with the mean and standard deviation over seeds,
then the paired difference sparse - dense with its standard deviation, and whether it is within
two standard errors of zero.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

from workbench.profiles import QUICK
from workbench.run import run
from workbench.runconfig import RunConfig
from workbench.train import TrainConfig

METRICS = ("fvu", "dead_fraction", "l0", "fidelity")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens harvested (epochs repeat them)")
    ap.add_argument("--dead-window", type=int, default=100_000, help="TrainConfig.dead_window_tokens (AuxK)")
    args = ap.parse_args(argv)

    saes = {"topk": {"architecture": "topk", "d_sae": args.width, "k": args.k},
            "switch": {"architecture": "switch", "d_sae": args.width, "k": args.k, "n_experts": args.experts}}
    print(f"MiniLM resid_post.2, width {args.width}, k {args.k}, switch E={args.experts}, batch {args.batch}, "
          f"{args.steps} steps ({args.steps * args.batch:,} tokens), AuxK dead window {args.dead_window:,}, "
          f"seeds {args.seeds}")
    results: dict[tuple[str, str], list[dict]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for optimizer in ("adam", "sparse_adam"):
                data = copy.deepcopy(QUICK.data)
                data.batch_size, data.seed, data.model.n_tokens = args.batch, seed, args.tokens
                train = TrainConfig(total_steps=args.steps, lr=None, warmup_steps=min(100, args.steps // 10),
                                    log_every=args.steps, progress_bar=False, seed=seed, optimizer=optimizer,
                                    dead_window_tokens=args.dead_window)
                cfg = RunConfig(saes={name: {**fields, "seed": seed} for name, fields in saes.items()},
                                train=train, data=data, run_dir=os.path.join(tmp, f"{optimizer}-{seed}"))
                for name, metrics in run(cfg, progress=False).items():
                    results.setdefault((name, optimizer), []).append(metrics)
                print(f"  seed {seed} {optimizer}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def mean_sd(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    print()
    print(f"{'sae':8s} {'optimizer':12s} " + " ".join(f"{m:>20s}" for m in METRICS))
    for (name, optimizer), runs in results.items():
        print(f"{name:8s} {optimizer:12s} " + " ".join(f"{mean_sd([r[m] for r in runs]):>20s}" for m in METRICS))
    print("\npaired difference sparse_adam - adam (mean ± sd over seeds; '~' within 2 standard errors of 0):")
    for name in saes:
        cells = []
        for m in METRICS:
            diffs = [s[m] - d[m] for s, d in zip(results[(name, "sparse_adam")], results[(name, "adam")])]
            mean = statistics.mean(diffs)
            sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
            se = sd / len(diffs) ** 0.5
            cells.append(f"{mean:+.4f} ± {sd:.4f} {'~' if abs(mean) <= 2 * se else '*'}")
        print(f"{name:8s} {'':12s} " + " ".join(f"{c:>20s}" for c in cells))
    print(f"\n(total {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
