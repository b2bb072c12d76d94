"""Training-step time of every registered architecture at one width, side by side in one run.

    python benchmarks/bench_architectures.py [--d 384] [--m 4096] [--k 32] [--batch 2048] [--steps 7]

Each row is one step of the trainer's own ``Trainer.train_step`` (through ``workbench.perf.step_row``)
on the same seeded batch, float32, k-sparse architectures at ``--k`` and Switch with 4 experts; the
other fields are each architecture's defaults. Printed: median ms, tokens/s, and the median of the
per-round ratios to TopK's step (round-robin timing, so a slow spell hits every row alike).
"""
from __future__ import annotations

import argparse
import os

import torch

from workbench.perf import benchmark_batch, measure, paired_ratio, step_row
from workbench.saes import ARCHITECTURES, build_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--m", type=int, default=4096, help="latents (d_sae) of every SAE")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=7, help="timed rounds")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    x_BD = benchmark_batch(args.d, args.batch, args.device)
    rows = []
    for arch, (cfg_cls, _) in ARCHITECTURES.items():
        fields = {name: value for name, value in {"k": args.k, "n_experts": 4}.items()
                  if name in cfg_cls.__dataclass_fields__}
        sae = build_sae({"architecture": arch, "d_in": args.d, "d_sae": args.m, **fields}).to(args.device)
        sae.init_from_data_(x_BD)
        rows.append(step_row(arch, sae, x_BD, lr=1e-3))
    measure(rows, rounds=args.steps, warmup=2)
    topk = next(row for row in rows if row.name == "topk")
    print(f"d={args.d}, M={args.m}, k={args.k}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'architecture':22s} {'median ms':>10s} {'tokens/s':>10s} {'x topk':>7s}")
    for row in rows:
        print(f"{row.name:22s} {1e3 * row.median:10.1f} {args.batch / row.median:10.0f} "
              f"{paired_ratio(row, topk):7.2f}")


if __name__ == "__main__":
    main()
