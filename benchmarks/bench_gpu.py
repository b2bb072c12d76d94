"""Training-step speed on one GPU: fp32 and bf16 autocast, dense vs sparse Adam, and the moonshot.

    python benchmarks/bench_gpu.py [--rounds 5] [--no-compile]      # on a CUDA machine, < 8 minutes on an H200
    python benchmarks/bench_gpu.py --device cpu --small             # a smoke run of the script on a CPU

Imports only torch and ``workbench.saes`` / ``workbench.train`` / ``workbench.perf`` (a GPU machine
may lack the notebook stack). Rows, every one a full ``Trainer.train_step`` on a batch already on the
device (d=768, M=24,576, k=32, B=8,192 by default):

* ``topk``, ``gated``, ``switch E=16``, ``switch E=32`` at fp32 and at ``bf16`` (``TrainConfig.autocast``),
  each with dense Adam and, for the k-sparse ones, with ``sparse_adam``;
* ``topk bf16 compiled`` (``TrainConfig.compile``; its compilation is not timed), unless --no-compile;
* the moonshot: Switch E=32 at M = 32 * 32,768 = 1,048,576 against TopK at M=32,768, bf16, each with
  the optimiser of its best row above.

For each row: median ms per step, tokens/s, the ratio to TopK's tokens/s at the same precision and
optimiser (paired per round), and the host-device synchronisations of one step that is not logged
(``torch.cuda.set_sync_debug_mode``). Targets (issue 11): TopK >= 1M tokens/s; moonshot >= 0.8.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from workbench.perf import Timed, benchmark_batch, measure, paired_ratio, step_row
from workbench.saes import GatedConfig, GatedSAE, SwitchConfig, SwitchSAE, TopKConfig, TopKSAE


def build(kind: str, d: int, m: int, k: int, device: str):
    if kind == "topk":
        return TopKSAE(TopKConfig(d_in=d, d_sae=m, k=k)).to(device)
    if kind == "gated":
        return GatedSAE(GatedConfig(d_in=d, d_sae=m)).to(device)
    e = int(kind.split("=")[1])
    return SwitchSAE(SwitchConfig(d_in=d, d_sae=m, k=k, n_experts=e)).to(device)


def count_syncs(row: Timed) -> int | str:
    """Host-device synchronisations during one call of ``row`` (CUDA only)."""
    if not torch.cuda.is_available():
        return "-"
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            row.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke run of the script itself")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine, or try it here with --device cpu --small")
    d, m, k, batch, m0 = (768, 24_576, 32, 8_192, 32_768) if not args.small else (64, 1_024, 8, 256, 256)
    device = args.device
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}; d={d}, M={m:,}, k={k}, B={batch:,}; {args.rounds} rounds")
    x_BD = benchmark_batch(d, batch, device)
    precisions = ("fp32", "bf16") if device == "cuda" else ("fp32",)  # bf16 on a CPU is ~150x slower

    rows: list[Timed] = []
    meta: dict[str, tuple[str, str, str]] = {}  # row name -> (kind, precision, optimizer)
    for kind in ("topk", "gated", "switch E=16", "switch E=32"):
        for precision in precisions:
            for optimizer in ("adam", "sparse_adam") if kind != "gated" else ("adam",):
                sae = build(kind, d, m, k, device)
                sae.init_from_data_(x_BD)
                row_name = f"{kind} {precision} {optimizer}"
                rows.append(step_row(row_name, sae, x_BD, sae.default_lr(), optimizer,
                                     autocast=precision == "bf16"))
                meta[row_name] = (kind, precision, optimizer)
    if not args.no_compile:
        precision = precisions[-1]
        sae = build("topk", d, m, k, device)
        sae.init_from_data_(x_BD)
        row = step_row(f"topk {precision} adam compiled", sae, x_BD, sae.default_lr(), "adam",
                       autocast=precision == "bf16", compile=True)
        tc = time.perf_counter()
        row.run()  # compiles
        print(f"(topk compiled in {time.perf_counter() - tc:.0f} s)")
        rows.append(row)
        meta[row.name] = ("topk", precision, "adam")
    measure(rows, args.rounds, warmup=2)
    syncs = {row.name: count_syncs(row) for row in rows}

    by = {row.name: row for row in rows}
    print(f"\n{'row':34s} {'median ms':>10s} {'tokens/s':>12s} {'x topk':>7s} {'syncs/step':>10s}")
    for row in rows:
        kind, precision, optimizer = meta[row.name]
        ref = by[f"topk {precision} {optimizer}"]
        print(f"{row.name:34s} {1e3 * row.median:10.2f} {batch / row.median:12,.0f} "
              f"{paired_ratio(ref, row):7.2f} {syncs[row.name]!s:>10s}")

    # The moonshot, bf16 where there is a GPU, each with its faster optimiser from the rows above.
    precision = precisions[-1]
    best = {kind: min(("adam", "sparse_adam"), key=lambda o, kd=kind: by[f"{kd} {precision} {o}"].median)
            for kind in ("topk", "switch E=32")}
    x_moon = benchmark_batch(d, batch, device)
    moon = []
    for kind, width in (("topk", m0), ("switch E=32", 32 * m0)):
        sae = build(kind, d, width, k, device)
        sae.init_from_data_(x_moon)
        moon.append(step_row(f"moonshot {kind} M={width:,}", sae, x_moon, sae.default_lr(), best[kind],
                             autocast=precision == "bf16"))
    measure(moon, args.rounds, warmup=2)
    for row, kind in zip(moon, ("topk", "switch E=32")):
        print(f"{row.name:34s} {1e3 * row.median:10.2f} {batch / row.median:12,.0f}   ({precision}, {best[kind]})")
    ratio = paired_ratio(moon[0], moon[1])
    print(f"moonshot: switch E=32 at M={32 * m0:,} vs topk at M={m0:,}: {ratio:.2f}x topk's tokens/s "
          f"(target >= 0.8: {'met' if ratio >= 0.8 else 'MISSED'})")
    topk_rate = max(batch / by[f"topk {p} {o}"].median for p in precisions for o in ("adam", "sparse_adam"))
    print(f"topk best: {topk_rate:,.0f} tokens/s (target >= 1,000,000: {'met' if topk_rate >= 1e6 else 'MISSED'})")
    print(f"(total {time.perf_counter() - t0:.0f} s; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
