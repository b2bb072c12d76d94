"""Data parallel against expert parallel for a Switch SAE: time per step and bytes moved per step.

    python benchmarks/bench_distributed.py [--ranks 2] [--d-in 256] [--batch 2048] [--experts 8]
                                           [--k 32] [--widths 4096 8192 16384 32768] [--reps 5]
                                           [--threads-per-rank 1]

On the CPU with gloo: one training step (forward, backward, gradient reduce, clipping to the global
norm, Adam) of a Switch SAE at the same *global* batch on 1 rank and on ``--ranks`` ranks, for

* ``dp``: data parallel, a whole replica per rank (:func:`workbench.train.expert_parallel.data_parallel_switch_forward`,
  gradients summed by :func:`workbench.train.distributed.all_reduce_grads_`);
* ``ep``: expert parallel, rank r holding experts r*E/N .. (r+1)*E/N - 1
  (:func:`workbench.train.expert_parallel.expert_parallel_forward`, router and b_dec gradients summed).

Bytes are counted by wrapping ``torch.distributed.all_reduce`` and ``all_to_all_single`` in every rank
(torch's differentiable collectives call the same functions, so the backward's traffic is counted
too), per rank and per step, by collective:

* all_to_all: the bytes of the rows this rank sends to *other* ranks (its input split sizes);
* all_reduce: 2 (N - 1) / N x the tensor's bytes, what each rank sends in a ring all-reduce.

The analytic counts beside them (per rank, B_r = B / N tokens, uniform routing so that a fraction
(N - 1)/N of a rank's tokens leave it; P the bytes of the parameters that train):

* data parallel: the gradient all-reduce 2 (N-1)/N P, P = 4 (2 F D + D E + 2 D);
* expert parallel: all-to-alls of (N-1)/N B_r rows: forward the tokens (D floats) and back the decoded
  rows with their codes (D + k floats, k int32 ids); backward the decoded rows' gradient (D + k floats;
  the tokens themselves carry no gradient); plus the replicated router's and b_dec's gradient
  all-reduce 2 (N-1)/N 4 (D E + 2 D).
Both also all-reduce the loss's statistics (E + 1 counts, E + 1 sums and their gradient) and the
squared gradient norm: a few dozen bytes.

Expert parallel's traffic does not grow with the width F; data parallel's grows as F D. The script
prints both over F = 2^12 .. 2^20 and the crossover width above which expert parallel moves fewer
bytes, at this batch and a few others. tokens/s per rank is the global batch / N / step time. Each
rank, and the single rank it is compared with, computes with ``--threads-per-rank`` threads (1 rank on
one core against N ranks on N cores). The byte counts are exact whatever the machine does; the times
on a shared 2-core CPU with gloo over loopback say little about GPUs with NCCL.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.saes import SwitchConfig, SwitchSAE
from workbench.train.distributed import (
    DistContext,
    all_reduce_grads_,
    clip_grad_norm_,
    free_port,
    init_from_env,
    shard_rows,
)
from workbench.train.expert_parallel import (
    data_parallel_switch_forward,
    expert_parallel_forward,
    expert_parameters,
    reduce_replicated_grads_,
    replicated_parameters,
    shard_switch,
)

STRATEGIES = ("dp", "ep")


class CommCounter:
    """Bytes each collective sends from this rank, by (phase, collective, dtype); ``phase`` is set by
    the step as it goes (forward, backward, grad reduce)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.bytes: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._all_reduce, self._all_to_all = dist.all_reduce, dist.all_to_all_single

    def install(self) -> None:
        dist.all_reduce, dist.all_to_all_single = self.all_reduce, self.all_to_all_single

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def _add(self, name: str, dtype: torch.dtype, n_bytes: float) -> None:
        key = f"{self.phase}|{name}|{str(dtype).removeprefix('torch.')}"
        self.bytes[key] += n_bytes
        self.calls[key] += 1

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        n = dist.get_world_size(group)
        self._add("all_reduce", tensor.dtype, 2 * (n - 1) / n * tensor.numel() * tensor.element_size())
        return self._all_reduce(tensor, op=op, group=group, async_op=async_op)

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        splits = input_split_sizes or [input.shape[0] // n] * n
        row_bytes = input.element_size() * math.prod(input.shape[1:])
        self._add("all_to_all", input.dtype, sum(s for j, s in enumerate(splits) if j != rank) * row_bytes)
        return self._all_to_all(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def _build(strategy: str, args, d_sae: int, ctx: DistContext):
    sae = SwitchSAE(SwitchConfig(d_in=args.d_in, d_sae=d_sae, k=args.k, n_experts=args.experts, seed=0))
    x_BD = _global_batch(args)
    sae.init_from_data_(x_BD[:256])
    if strategy == "ep":
        model = shard_switch(sae, ctx.rank, ctx.world_size)
        local, replicated = expert_parameters(model), replicated_parameters(model)
    else:
        model, local, replicated = sae, [], [p for p in sae.parameters() if p.requires_grad]
    return model, local, replicated, shard_rows(x_BD, ctx.rank, ctx.world_size)


def _global_batch(args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, args.d_in, generator=gen) + 0.5


def _step(strategy, model, local, replicated, opt, x_BD, ctx, counter: CommCounter | None) -> None:
    def phase(name: str) -> None:
        if counter is not None:
            counter.phase = name

    phase("forward")
    if strategy == "ep":
        out = expert_parallel_forward(model, x_BD, ctx)
    else:
        out = data_parallel_switch_forward(model, x_BD, ctx)
    opt.zero_grad(set_to_none=True)
    phase("backward")
    # Every rank's losses are the global batch's; each back-propagates its 1/N share.
    (sum(out.losses.values()) / ctx.world_size).backward()
    phase("grad reduce")
    if strategy == "ep":
        reduce_replicated_grads_(model, ctx)
    else:
        all_reduce_grads_(replicated, ctx, op="sum")
    clip_grad_norm_(local, replicated, 1.0, ctx)
    phase("optimiser")
    opt.step()


def _measure(args, ctx: DistContext, counter: CommCounter | None) -> list[dict]:
    rows = []
    for d_sae in args.widths:
        for strategy in STRATEGIES:
            model, local, replicated, x_BD = _build(strategy, args, d_sae, ctx)
            opt = torch.optim.Adam(local + replicated, lr=1e-4)
            _step(strategy, model, local, replicated, opt, x_BD, ctx, counter)  # warm-up
            if counter is not None:
                counter.reset()
            times = []
            for _ in range(args.reps):
                if ctx.distributed:
                    dist.barrier()
                start = time.perf_counter()
                _step(strategy, model, local, replicated, opt, x_BD, ctx, counter)
                times.append(time.perf_counter() - start)
            row = {"d_sae": d_sae, "strategy": strategy, "ranks": ctx.world_size, "rank": ctx.rank,
                   "ms": 1e3 * statistics.median(times), "tokens_per_rank": x_BD.shape[0]}
            if counter is not None:
                row["bytes"] = {key: b / args.reps for key, b in counter.bytes.items()}
                row["calls"] = {key: c / args.reps for key, c in counter.calls.items()}
                counter.phase = "setup"
            rows.append(row)
    return rows


def _rank_main(rank: int, world_size: int, port: int, args_dict: dict, out_dir: str) -> None:
    args = argparse.Namespace(**args_dict)
    torch.set_num_threads(args.threads_per_rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    ctx = init_from_env()
    counter = CommCounter()
    counter.install()
    try:
        rows = _measure(args, ctx, counter)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        ctx.destroy()


# --- the analytic counts ---------------------------------------------------------------------------

def analytic_bytes(strategy: str, d_sae: int, d_in: int, n_experts: int, k: int, batch: int,
                   n: int) -> dict[str, float]:
    """Bytes per rank per step by kind (float32 values, int32 ids), as the module docstring derives."""
    ring, leave, tokens = 2 * (n - 1) / n, (n - 1) / n, batch / n
    small = ring * ((n_experts + 1) * 8 + 2 * (n_experts + 1) * 4 + 8)  # loss statistics, gradient norm
    router = 4 * (d_in * n_experts + 2 * d_in)  # W_router, b_router, b_dec
    # all_reduce_grads_ adds one float per parameter to its bucket (which ranks had a gradient).
    if strategy == "dp":
        return {"grad all_reduce": ring * (4 * 2 * d_sae * d_in + router + 4 * 5), "small all_reduce": small,
                "all_to_all": 0.0}
    a2a = leave * (8 * n_experts + tokens * 4 * (d_in + (d_in + k) + k + (d_in + k)))
    return {"grad all_reduce": ring * (router + 4 * 3), "small all_reduce": small, "all_to_all": a2a}


def crossover_width(d_in: int, n_experts: int, k: int, batch: int, n: int) -> float:
    """The F at which the two analytic totals are equal (data parallel's grows linearly in F)."""
    ep = sum(analytic_bytes("ep", 0, d_in, n_experts, k, batch, n).values())
    dp0 = sum(analytic_bytes("dp", 0, d_in, n_experts, k, batch, n).values())
    dp_per_f = sum(analytic_bytes("dp", 1, d_in, n_experts, k, batch, n).values()) - dp0
    return (ep - dp0) / dp_per_f


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:9.3f}"


def _report(args, rows_1: list[dict], ranks_rows: list[list[dict]]) -> None:
    n = args.ranks
    print(f"\nSwitch SAE d_in={args.d_in} E={args.experts} k={args.k}, global batch {args.batch}, float32, "
          f"{args.threads_per_rank} CPU thread(s) per rank, gloo; median of {args.reps} steps "
          f"(this machine: {os.cpu_count()} cores)")
    print("\nMeasured: time per step and MiB sent per rank per step (counted / analytic)")
    header = (f"{'d_sae':>7} {'strategy':>8} {'ms 1 rank':>10} {f'ms {n} ranks':>11} {'speed-up':>8} "
              f"{'tok/s/rank':>11} {'a2a count':>10} {'a2a analytic':>12} {'all_red count':>13} "
              f"{'all_red analytic':>16}")
    print(header)
    print("-" * len(header))
    rank0 = ranks_rows[0]
    for single, multi in zip(rows_1, rank0):
        # bytes: the mean over ranks (each rank sends its own rows)
        key = (multi["d_sae"], multi["strategy"])
        per_rank = [r for rows in ranks_rows for r in rows if (r["d_sae"], r["strategy"]) == key]
        a2a = statistics.mean(sum(b for key, b in r["bytes"].items() if "|all_to_all|" in key) for r in per_rank)
        ar = statistics.mean(sum(b for key, b in r["bytes"].items() if "|all_reduce|" in key) for r in per_rank)
        ana = analytic_bytes(multi["strategy"], multi["d_sae"], args.d_in, args.experts, args.k, args.batch, n)
        ms = max(r["ms"] for r in per_rank)
        print(f"{multi['d_sae']:>7} {multi['strategy']:>8} {single['ms']:>10.1f} {ms:>11.1f} "
              f"{single['ms'] / ms:>8.2f} {multi['tokens_per_rank'] / ms * 1e3:>11.0f} {_mb(a2a):>10} "
              f"{_mb(ana['all_to_all']):>12} {_mb(ar):>13} {_mb(ana['grad all_reduce'] + ana['small all_reduce']):>16}")
    print("\nBy collective, rank 0, the largest width (MiB per step; calls per step):")
    last = {r["strategy"]: r for r in rank0 if r["d_sae"] == max(args.widths)}
    for strategy, row in last.items():
        for key in sorted(row["bytes"]):
            phase, name, dtype = key.split("|")
            print(f"  {strategy}  {phase:<12} {name:<11} {dtype:<8} {_mb(row['bytes'][key])}  x{row['calls'][key]:g}")

    print(f"\nAnalytic MiB per rank per step on {n} ranks over widths (same d_in, E, k, batch):")
    header = f"{'d_sae':>9} {'data parallel':>14} {'expert parallel':>16} {'dp / ep':>8}  fewer bytes"
    print(header)
    print("-" * len(header))
    for exp in range(12, 21):
        d_sae = 2**exp
        dp = sum(analytic_bytes("dp", d_sae, args.d_in, args.experts, args.k, args.batch, n).values())
        ep = sum(analytic_bytes("ep", d_sae, args.d_in, args.experts, args.k, args.batch, n).values())
        print(f"{'2^' + str(exp):>9} {_mb(dp):>14} {_mb(ep):>16} {dp / ep:>8.1f}  {'expert' if ep < dp else 'data'}")
    cross = crossover_width(args.d_in, args.experts, args.k, args.batch, n)
    print(f"\nCrossover: expert parallel moves fewer bytes than data parallel above d_sae = {cross:,.0f} "
          f"(d_in={args.d_in}, global batch {args.batch}, {n} ranks); roughly 3 (B/N) (d_in + k) / (4 d_in) "
          f"= 3 B/(4N) for k << d_in, whatever d_in. At other global batches:")
    for batch in (2**12, 2**14, 2**16, 2**18, 2**20):
        print(f"  batch {batch:>8,}: d_sae > {crossover_width(args.d_in, args.experts, args.k, batch, n):>10,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="world size compared with 1 rank (default 2)")
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2048, help="global batch (tokens per step over all ranks)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--widths", type=int, nargs="+", default=[2**12, 2**13, 2**14, 2**15],
                        help="d_sae values measured (the analytic table always spans 2^12 .. 2^20)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per row (after one warm-up)")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="torch threads of each rank, and of the single rank it is compared with (default 1: "
                             "1 rank on one core against N ranks on N cores, as 1 GPU against N)")
    args = parser.parse_args()
    if args.batch % args.ranks or args.experts % args.ranks:
        parser.error(f"--batch {args.batch} and --experts {args.experts} must both be divisible by "
                     f"--ranks {args.ranks}")
    for d_sae in args.widths:
        if d_sae % args.experts:
            parser.error(f"--widths {d_sae} is not divisible by --experts {args.experts}")

    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(args.ranks, free_port(), vars(args), out_dir), nprocs=args.ranks,
                           join=True, start_method="spawn")
        ranks_rows = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    torch.set_num_threads(args.threads_per_rank)
    rows_1 = _measure(args, DistContext(), None)
    _report(args, rows_1, ranks_rows)


if __name__ == "__main__":
    main()
