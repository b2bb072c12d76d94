"""Training-step speed of the TopK and Switch SAEs, measured side by side in one run.

    python benchmarks/bench_saes.py [--large] [--steps N] [--batch B]

Rows (all at the same d, M, k and batch, float32, on the CPU):

* ``topk``          our TopKSAE: one full training step (see :func:`train_step`).
* ``enc matmul``    TopK's dense encoder matmul alone, ``(x - b_dec) @ W_enc``.
* ``enc matmul chunked``  the same matmul in the row chunks TopKSAE uses on the CPU (for reference:
                    it skips the page faults of a fresh (B, M) output, as TopKSAE does).
* ``topk dense``    a naive TopK: dense encoder, topk, scatter into a dense (B, M) code, dense
                    decoder matmul, plain autograd.
* ``switch E=e``    our SwitchSAE with e experts (same total width M and same k).
* ``switch dense E=e``  the Switch SAE paper's code path: all M latents encoded, masked by the router
                    probability on the chosen expert's block, topk over all M, dense decode.

Every step-time row uses the same :func:`train_step` (forward, loss backward, clip_grad_norm_(1.0),
UnitNormDecoder.project_grads, fused Adam step, renormalise). The rows are timed round-robin (one step
of each per round, the order rotated every round) after warm-up steps, so a slow spell on a shared
machine hits all rows alike; each time is the median over rounds and each ratio is the median of the
per-round ratios of the two rows it compares.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE, UnitNormDecoder
from workbench.saes import topk as topk_module
from workbench.saes.switch import load_balance_loss


# --------------------------------------------------------------------------------------------------
# The one training step every variant runs


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, decoder: UnitNormDecoder, x_BD: Tensor) -> None:
    out = model(x_BD)
    loss = sum(out.losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
    decoder.project_grads()
    optimizer.step()
    decoder.renormalise()


# --------------------------------------------------------------------------------------------------
# Dense reference models (plain autograd), initialised from one of ours


@dataclass
class _Out:
    losses: dict[str, Tensor]


class DenseTopK(nn.Module):
    """Naive TopK: dense pre-activations, topk, scatter into a dense code, dense decoder matmul."""

    def __init__(self, sae: TopKSAE):
        super().__init__()
        self.k = sae.cfg.k
        self.W_enc = nn.Parameter(sae.W_enc.detach().clone())
        self.W_dec = nn.Parameter(sae.W_dec.detach().clone())
        self.b_dec = nn.Parameter(sae.b_dec.detach().clone())

    def forward(self, x_BD: Tensor) -> _Out:
        pre_BF = (x_BD - self.b_dec) @ self.W_enc
        vals_BK, idx_BK = pre_BF.topk(self.k, dim=-1, sorted=False)
        z_BF = torch.zeros_like(pre_BF).scatter(1, idx_BK, vals_BK.relu())
        recon_BD = z_BF @ self.W_dec + self.b_dec
        total_var = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
        return _Out({"fvu": (x_BD - recon_BD).pow(2).sum(-1).mean() / total_var})


class DenseMaskedSwitch(nn.Module):
    """The Switch SAE paper's forward: every latent encoded, masked by p_{i*} on the chosen expert's
    block (0 elsewhere), topk over all M, dense decoder matmul."""

    def __init__(self, sae: SwitchSAE):
        super().__init__()
        self.cfg = sae.cfg
        for name in ("W_enc", "W_dec", "b_dec", "W_router", "b_router"):
            setattr(self, name, nn.Parameter(getattr(sae, name).detach().clone()))
        self.register_buffer("block_F", torch.arange(sae.cfg.d_sae) // sae.cfg.expert_width)

    def forward(self, x_BD: Tensor) -> _Out:
        probs_BE = torch.softmax((x_BD - self.b_router) @ self.W_router, dim=-1)
        p_top_B, expert_B = probs_BE.max(-1)
        z_BF = torch.relu((x_BD - self.b_dec) @ self.W_enc)
        mask_BF = (self.block_F[None, :] == expert_B[:, None]) * p_top_B[:, None]
        vals_BK, idx_BK = (z_BF * mask_BF).topk(self.cfg.k, dim=-1, sorted=False)
        dense_BF = torch.zeros_like(z_BF).scatter(1, idx_BK, vals_BK)
        recon_BD = dense_BF @ self.W_dec + self.b_dec
        return _Out({"mse": (x_BD - recon_BD).pow(2).mean(),
                     "load_balance": self.cfg.lb_alpha * load_balance_loss(probs_BE, expert_B)})


# --------------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    name: str
    run: Callable[[], object]
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def _step_row(name: str, model: nn.Module, x_BD: Tensor, lr: float) -> Row:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    decoder = UnitNormDecoder([model.W_dec])
    model.train()
    return Row(name, lambda: train_step(model, optimizer, decoder, x_BD))


def build_rows(d: int, m: int, k: int, batch: int, experts: list[int], dense_experts: list[int]) -> list[Row]:
    torch.manual_seed(0)
    x_BD = torch.randn(batch, d) + 2.0 * torch.randn(d)

    topk = TopKSAE(TopKConfig(d_in=d, d_sae=m, k=k))
    topk.init_from_data_(x_BD)
    lr = topk.cfg.default_lr()
    rows = [_step_row("topk", topk, x_BD, lr)]

    W_enc, b_dec = topk.W_enc.detach().clone(), topk.b_dec.detach().clone()

    def encoder_matmul():
        with torch.no_grad():
            return (x_BD - b_dec) @ W_enc

    rows.append(Row("enc matmul", encoder_matmul))
    chunk = max(1, topk_module._CHUNK_ELEMENTS // m)

    def encoder_matmul_in_chunks():
        # The same matmul as TopKSAE runs it on the CPU: row chunks of ~24 MiB of output, reused.
        with torch.no_grad():
            xc_BD = x_BD - b_dec
            for start in range(0, batch, chunk):
                xc_BD[start:start + chunk] @ W_enc

    rows.append(Row("enc matmul chunked", encoder_matmul_in_chunks))
    rows.append(_step_row("topk dense", DenseTopK(topk), x_BD, lr))
    for e in sorted(set(experts) | set(dense_experts)):
        switch = SwitchSAE(SwitchConfig(d_in=d, d_sae=m, k=k, n_experts=e))
        switch.init_from_data_(x_BD)
        if e in experts:
            rows.append(_step_row(f"switch E={e}", switch, x_BD, lr))
        if e in dense_experts:
            rows.append(_step_row(f"switch dense E={e}", DenseMaskedSwitch(switch), x_BD, lr))
    return rows


def measure(rows: list[Row], steps: int, warmup: int) -> None:
    for row in rows:
        for _ in range(warmup):
            row.run()
    for r in range(steps):
        shift = r % len(rows)
        for row in rows[shift:] + rows[:shift]:
            t0 = time.perf_counter()
            row.run()
            row.times.append(time.perf_counter() - t0)


def paired_ratio(a: Row, b: Row) -> float:
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(ta / tb for ta, tb in zip(a.times, b.times))


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


def report(rows: list[Row], batch: int) -> list[tuple[str, bool]]:
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
    args = ap.parse_args(argv)
    d, m = (768, 24_576) if args.large else (384, 12_288)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu ({_cpu_name()}), float32")
    print(f"d={d}, M={m:,}, k={args.k}, batch={args.batch}; {args.warmup} warm-up step(s) per row, "
          f"then {args.steps} interleaved rounds")
    load_before = _load()
    t0 = time.perf_counter()
    rows = build_rows(d, m, args.k, args.batch, args.experts, args.dense_experts)
    measure(rows, args.steps, args.warmup)
    load_after = _load()
    print(f"(measured in {time.perf_counter() - t0:.0f} s; 1-min load average {load_before} before, "
          f"{load_after} after, on {os.cpu_count()} CPUs)")
    if isinstance(load_after, float) and load_after > torch.get_num_threads() + 0.5:
        print("NOTE: the load average says other processes competed for the CPUs during the run; "
              "the times (and, less so, the ratios) are inflated by it")
    print()
    met = report(rows, args.batch)
    print("\nratio: median over the rounds of the per-round ratio of the two rows it compares (targets are "
          "judged on it); of mins: the same ratio from the two rows' fastest steps; tokens/s: batch / "
          "median time")
    print("targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in met))


if __name__ == "__main__":
    main()
