"""The lazy Adam of ``optimizer="sparse_adam"`` (:class:`workbench.train.sparse_step.RowAdam`) against
``torch.optim.SparseAdam`` and the dense fused Adam, on the same touched rows.

    python benchmarks/bench_row_adam.py [--rows 262144] [--d 384] [--touched 100000] [--rounds 7]

One (F, D) weight, T touched rows (sorted unique ids, as the row-sparse backward gives them), fp32 on
the CPU. Rows: ``row adam`` (gather, torch's fused Adam kernel, scatter, chunk by chunk); ``torch
SparseAdam`` (a sparse COO gradient on an (F, D) parameter); ``dense adam`` (fused Adam over all F
rows, what the dense step pays whatever T is). Timed round-robin; medians and paired ratios.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from workbench.perf import Timed, measure, paired_ratio
from workbench.saes.base import RowWeight
from workbench.train.sparse_step import RowAdam, RowGrads


class _OneWeight:
    """Just enough of an SAE for RowAdam: one row-sparse (F, D) weight."""

    def __init__(self, W: nn.Parameter):
        self.W = W
        self.cfg = type("cfg", (), {"architecture": "bench"})()

    def row_sparse_weights(self) -> list[RowWeight]:
        return [RowWeight("W", self.W, self.W, False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--touched", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(args.rows, generator=gen)[:args.touched].sort().values
    grad = torch.randn(args.touched, args.d, generator=gen) * 1e-3

    W_row = nn.Parameter(torch.randn(args.rows, args.d, generator=gen))
    holder = _OneWeight(W_row)
    row_adam = RowAdam(holder, (0.9, 0.999))
    grads = RowGrads(holder)

    def row_step() -> None:
        grads.rows = {"W": (ids, grad.clone())}
        row_adam.step(grads, 1e-4)

    W_sparse = nn.Parameter(W_row.detach().clone())
    sparse_adam = torch.optim.SparseAdam([W_sparse], lr=1e-4)

    def sparse_step() -> None:
        W_sparse.grad = torch.sparse_coo_tensor(ids[None], grad, W_sparse.shape, is_coalesced=True)
        sparse_adam.step()

    W_dense = nn.Parameter(W_row.detach().clone())
    dense_adam = torch.optim.Adam([W_dense], lr=1e-4, fused=True)
    W_dense.grad = torch.zeros_like(W_dense).index_copy_(0, ids, grad)

    rows = [Timed("row adam", row_step), Timed("torch SparseAdam", sparse_step), Timed("dense adam", dense_adam.step)]
    with torch.sparse.check_sparse_tensor_invariants(False):
        measure(rows, args.rounds, warmup=1)
    print(f"F={args.rows:,} rows of d={args.d}, T={args.touched:,} touched, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    row = rows[0]
    for r in rows:
        print(f"{r.name:18s} {1e3 * r.median:8.1f} ms   {paired_ratio(r, row):5.2f}x row adam's time")


if __name__ == "__main__":
    main()
