"""Training-step speed of the TopK and Switch SAEs, measured side by side in one run.

    python benchmarks/bench_saes.py [--large] [--steps N] [--batch B] [--device cuda]
                                    [--optimizer adam|sparse_adam] [--moonshot]

Rows (all at the same d, M, k and batch, float32, on the CPU unless --device says otherwise):

* ``topk``          our TopKSAE: one full training step, the trainer's own
                    (:meth:`workbench.train.Trainer.train_step`, timed by :func:`workbench.perf.step_row`).
* ``enc matmul``    TopK's dense encoder matmul alone, ``(x - b_dec) @ W_enc``.
* ``enc matmul chunked``  the same matmul in the row chunks TopKSAE uses on the CPU (for reference:
                    it skips the page faults of a fresh (B, M) output, as TopKSAE does).
* ``topk dense``    a naive TopK: dense encoder, topk, scatter into a dense (B, M) code, dense
                    decoder matmul, plain autograd.
* ``switch E=e``    our SwitchSAE with e experts (same total width M and same k).
* ``switch dense E=e``  the Switch SAE paper's code path: all M latents encoded, masked by the router
                    probability on the chosen expert's block, topk over all M, dense decode.

``--optimizer`` steps our SAEs with that ``TrainConfig.optimizer`` (default: the trainer's default;
the dense references always use dense Adam). ``--moonshot`` adds, after the usual rows, a Switch SAE
with E=32 at M = 32*M0 against a TopK at M0 (d=384, M0=8,192 on the CPU; d=768, M0=32,768 with
``--large``) and the line ``moonshot: switch E=32 at M=... vs topk at M=...: R.RRx topk's tokens/s``
(target: 0.8x or more). ``--no-usual`` leaves the usual rows out.

The rows and the timing live in :mod:`workbench.perf` (notebook 09 plots the same measurements). The
rows are timed round-robin (one step of each per round, the order rotated every round) after warm-up
steps, so a slow spell on a shared machine hits all rows alike; each time is the median over rounds
and each ratio is the median of the per-round ratios of the two rows it compares.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.perf import Timed, measure, moonshot_rows, paired_ratio, sae_rows
from workbench.train import TrainConfig


def _load() -> float | str:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass
class Comparison:
    """time(slow) / time(fast), shown on ``row``'s line as ``text`` with the ratio filled in."""

    row: str
    slow: str
    fast: str
    text: str
    target: str = ""
    met: Callable[[float], bool] | None = None


def report(rows: list[Timed], batch: int) -> list[tuple[str, bool]]:
    by = {row.name: row for row in rows}
    comparisons = [
        Comparison("topk", "topk", "enc matmul", "{:.2f}x enc matmul", "<= 2x", lambda r: r <= 2.0),
        Comparison("enc matmul chunked", "topk", "enc matmul chunked", "topk is {:.2f}x this"),
        Comparison("topk dense", "topk dense", "enc matmul", "{:.2f}x enc matmul", "~4-6x"),
    ]
    for name in by:
        if name.startswith("switch E="):
            e = name.split("=")[1]
            target = (">= 8x", lambda r: r >= 8.0) if e == "16" else ("", None)
            comparisons.append(Comparison(name, "topk", name, "{:.2f}x topk's tokens/s", *target))
            if f"switch dense E={e}" in by:
                comparisons.append(Comparison(f"switch dense E={e}", f"switch dense E={e}", name,
                                              f"switch E={e} is {{:.2f}}x faster", *target))

    notes, verdicts = {}, []
    for c in comparisons:
        slow, fast = by[c.slow], by[c.fast]
        r = paired_ratio(slow, fast)
        r_min = min(slow.times) / min(fast.times)
        met = "" if c.met is None else ("met" if c.met(r) else "MISSED")
        notes[c.row] = (c.text.format(r), f"{r_min:.2f}", c.target, met)
        if c.met is not None:
            verdicts.append((c.row, c.met(r)))

    header = ("row", "median ms", "min ms", "tokens/s", "ratio (paired medians)", "of mins", "target", "")
    table = [header]
    for row in rows:
        table.append((row.name, f"{1e3 * row.median:.1f}", f"{1e3 * min(row.times):.1f}",
                      f"{batch / row.median:,.0f}", *notes.get(row.name, ("", "", "", ""))))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {1, 2, 3, 5}
    for i, line in enumerate(table):
        cells = [c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return verdicts


def report_moonshot(rows: list[Timed], batch: int) -> list[tuple[str, bool]]:
    """The two moonshot rows and the line ``moonshot: ...: R.RRx topk's tokens/s`` (target >= 0.8)."""
    topk, switch = rows
    for row in rows:
        print(f"{row.name:40s} {1e3 * row.median:9.1f} ms  {batch / row.median:12,.0f} tokens/s")
    r = paired_ratio(topk, switch)
    m_topk, m_switch = topk.name.split("M=")[1], switch.name.split("M=")[1]
    print(f"moonshot: switch E=32 at M={m_switch} vs topk at M={m_topk}: {r:.2f}x topk's tokens/s "
          f"(target >= 0.8: {'met' if r >= 0.8 else 'MISSED'})")
    return [("moonshot", r >= 0.8)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", action="store_true", help="d=768, M=24,576 instead of d=384, M=12,288")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per row first (default 1)")
    ap.add_argument("--batch", type=int, default=4096, help="tokens per step (default 4096)")
    ap.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="Switch expert counts")
    ap.add_argument("--dense-experts", type=int, nargs="*", default=[16],
                    help="expert counts for the dense-masked Switch rows (default 16; each row costs "
                         "about as much as 'topk dense' whatever E is)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--optimizer", choices=("adam", "sparse_adam"), default=None,
                    help="TrainConfig.optimizer of our SAEs' steps (default: the trainer's default)")
    ap.add_argument("--moonshot", action="store_true",
                    help="add Switch E=32 at M=32*M0 against TopK at M0 (M0 8,192, or 32,768 with --large)")
    ap.add_argument("--no-usual", action="store_true", help="only the moonshot rows")
    args = ap.parse_args(argv)
    if args.no_usual and not args.moonshot:
        ap.error("--no-usual leaves only the moonshot rows: add --moonshot")
    d, m = (768, 24_576) if args.large else (384, 12_288)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    where = f"cpu ({_cpu_name()})" if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})"
    m0 = 32_768 if args.large else 8_192
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {where}, float32, "
          f"optimizer {args.optimizer or TrainConfig.optimizer or 'adam'}")
    print(f"d={d}, M={m:,}, k={args.k}, batch={args.batch}; {args.warmup} warm-up step(s) per row, "
          f"then {args.steps} interleaved rounds")
    load_before = _load()
    t0 = time.perf_counter()
    rows = [] if args.no_usual else sae_rows(d, m, args.k, args.batch, args.experts, args.dense_experts,
                                             device=args.device, optimizer=args.optimizer)
    moon = (moonshot_rows(d, m0, args.k, args.batch, device=args.device, optimizer=args.optimizer)
            if args.moonshot else [])
    measure(rows + moon, args.steps, args.warmup)
    load_after = _load()
    print(f"(measured in {time.perf_counter() - t0:.0f} s; 1-min load average {load_before} before, "
          f"{load_after} after, on {os.cpu_count()} CPUs)")
    if args.device == "cpu" and isinstance(load_after, float) and load_after > torch.get_num_threads() + 0.5:
        print("NOTE: the load average says other processes competed for the CPUs during the run; "
              "the times (and, less so, the ratios) are inflated by it")
    print()
    met = report(rows, args.batch) if rows else []
    if moon:
        if rows:
            print()
        met += report_moonshot(moon, args.batch)
    print("\nratio: median over the rounds of the per-round ratio of the two rows it compares (targets are "
          "judged on it); of mins: the same ratio from the two rows' fastest steps; tokens/s: batch / "
          "median time")
    print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in met))


if __name__ == "__main__":
    main()
