"""The ``workbench`` command: ``workbench train CONFIG`` and ``workbench demo``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .configtools import describe, read_config_file
from .run import DataConfig, RunConfig, format_table, run
from .saes import ARCHITECTURES
from .train.trainer import TrainConfig

TRAIN_EPILOG_HEAD = """\
CONFIG is a YAML or JSON file mirroring these dataclasses, e.g.

  run_dir: runs/k-sweep
  train: {total_steps: 3000}
  saes:
    topk_k8:  {architecture: topk, d_sae: 1024, k: 8}
    switch8:  {architecture: switch, d_sae: 1024, k: 8, n_experts: 8}

Fields (name: type = default):
"""


def _train_help() -> str:
    lines = [TRAIN_EPILOG_HEAD, "run_dir / saes / train / data:"]
    lines += describe(RunConfig, "  ")
    for arch, (cfg_cls, _) in ARCHITECTURES.items():
        lines += ["", f"saes.<name> with architecture: {arch}  ({cfg_cls.__doc__.strip()})"]
        lines += describe(cfg_cls, "  ")
    return "\n".join(lines)


DEMO_SAES = {
    "topk": {"architecture": "topk", "d_sae": 1024, "k": 8},
    "gated": {"architecture": "gated", "d_sae": 1024, "l1_coefficient": 0.01},
    "relu": {"architecture": "relu", "d_sae": 1024, "l1_coefficient": 0.01, "l1_warmup_steps": 200},
    "switch": {"architecture": "switch", "d_sae": 1024, "k": 8, "n_experts": 4},
}


def demo_config(run_dir: str, steps: int) -> RunConfig:
    """TopK, Gated, ReLU and Switch at equal width on the default synthetic data, at one lr."""
    return RunConfig(saes=DEMO_SAES, run_dir=run_dir, data=DataConfig(),
                     train=TrainConfig(total_steps=steps, lr=1e-3, log_every=max(1, steps // 10)))


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_dict(read_config_file(args.config))
    if args.run_dir:
        cfg.run_dir = args.run_dir
    results = run(cfg, resume=args.resume)
    print(format_table(results))
    print(f"\nSAE folders: {Path(cfg.run_dir) / 'saes'}/<name>   metrics: {Path(cfg.run_dir) / 'metrics.json'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    cfg = demo_config(args.run_dir, args.steps)
    print(f"Training {', '.join(cfg.saes)} side by side for {args.steps} steps on synthetic activations "
          f"(d={cfg.data.synthetic.d}, {cfg.data.synthetic.n_features} true features in superposition)...")
    start = time.perf_counter()
    results = run(cfg)
    print(f"\nHeld-out evaluation ({cfg.data.eval_tokens} tokens), {time.perf_counter() - start:.0f} s:\n")
    print(format_table(results))
    print("\nrecovery = mean over true features of the best cosine with a decoder row (1 = all found).")
    print(f"SAE folders: {Path(cfg.run_dir) / 'saes'}/<name>   load with workbench.io.load(folder)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the SAEs described by a YAML/JSON config",
                           description="Train SAEs side by side on one activation stream, then evaluate them.",
                           epilog=_train_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="YAML or JSON run config (fields below)")
    train.add_argument("--run-dir", help="override the config's run_dir")
    train.add_argument("--resume", action="store_true", help="continue from the run_dir's latest checkpoint")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train TopK, Gated, ReLU and Switch side by side on synthetic data")
    demo.add_argument("--run-dir", default="runs/demo", help="where to write the SAE folders (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
