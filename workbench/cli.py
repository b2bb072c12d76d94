"""The ``workbench`` command: ``workbench train CONFIG``, ``workbench demo``, ``workbench index RUN_DIR`` and ``workbench browse RUN_DIR`` (or ``--sae PATH_OR_HUB_ID``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .configtools import describe, read_config_file
from .data.store import CacheError
from .run import format_table, index_run, run
from .runconfig import DataConfig, RunConfig
from .saes import ARCHITECTURES
from .train.checkpoint import CheckpointError
from .train.distributed import init_from_env
from .train.trainer import TrainConfig

USER_ERRORS = (ValueError, OSError, CacheError, CheckpointError)
"""What a command raises for bad input or a bad environment (a config, a path, a cache, a full disk):
printed as one line, exit status 2. Anything else is a bug and keeps its traceback."""

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


def demo_saes(d_sae: int, k: int) -> dict[str, dict]:
    """TopK, Gated, ReLU and Switch at one width: the four architectures side by side."""
    return {
        "topk": {"architecture": "topk", "d_sae": d_sae, "k": k},
        "gated": {"architecture": "gated", "d_sae": d_sae, "l1_coefficient": 0.01},
        "relu": {"architecture": "relu", "d_sae": d_sae, "l1_coefficient": 0.01, "l1_warmup_steps": 100},
        "switch": {"architecture": "switch", "d_sae": d_sae, "k": k, "n_experts": 4},
    }


def demo_config(run_dir: str, steps: int, synthetic: bool) -> RunConfig:
    """The offline default (MiniLM's middle-layer residual stream on CPython's prose), or the
    synthetic ground truth; every SAE at one lr so that the comparison is like for like."""
    train = TrainConfig(total_steps=steps, lr=3e-3 if synthetic else 1e-3, log_every=max(1, steps // 10))
    if synthetic:
        return RunConfig(saes=demo_saes(1024, 8), train=train, run_dir=run_dir,
                         data=DataConfig(source="synthetic"))
    return RunConfig(saes=demo_saes(2048, 32), train=train, run_dir=run_dir, data=DataConfig(source="model"))


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = RunConfig.from_dict(read_config_file(args.config))
    if args.run_dir:
        cfg.run_dir = args.run_dir
    ctx = init_from_env()  # under torchrun: this rank of the launch; else one process
    try:
        results = run(cfg, resume=args.resume, dist=ctx)
    finally:
        ctx.destroy()
    if not ctx.is_writer:
        return 0
    print(format_table(results))
    print(f"\nSAE folders: {Path(cfg.run_dir) / 'saes'}/<name>   metrics: {Path(cfg.run_dir) / 'metrics.json'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    steps = args.steps or (2000 if args.synthetic else 400)
    cfg = demo_config(args.run_dir, steps, args.synthetic)
    if args.synthetic:
        what = (f"synthetic activations (d={cfg.data.synthetic.d}, {cfg.data.synthetic.n_features} true "
                f"features in superposition)")
    else:
        m = cfg.data.model
        what = f"{m.name} {m.site} activations of {m.n_tokens:,} tokens of CPython's prose (harvested once, cached)"
    print(f"Training {', '.join(cfg.saes)} side by side for {steps} steps on {what}...")
    start = time.perf_counter()
    results = run(cfg)
    print(f"\nHeld-out evaluation ({cfg.data.eval_tokens:,} tokens), {time.perf_counter() - start:.0f} s:\n")
    print(format_table(results))
    if args.synthetic:
        print("\nrecovery = mean over true features of the best cosine with a decoder row (1 = all found).")
    else:
        print("\nMSE, FVU on activations normalised to E|x|^2 = d. fidelity = how much of the gap between the "
              "clean and\nthe zero-ablated final hidden states the SAE closes when spliced in (1 = perfect).")
        print("\nIndexing the features (top contexts, histograms, router) on the held-out tokens...")
        index_run(cfg.run_dir)
    print(f"SAE folders: {Path(cfg.run_dir) / 'saes'}/<name>   load with workbench.io.load(folder)")
    if not args.synthetic:
        print(f"Look inside: workbench browse {cfg.run_dir}   (total {time.perf_counter() - start:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the SAEs described by a YAML/JSON config",
                           description="Train SAEs side by side on one activation stream, then evaluate them. "
                                       "On N ranks: torchrun --nproc-per-node N -m workbench train CONFIG, with "
                                       "train.parallel: data (any SAE: replicas, each rank on 1/N of every "
                                       "batch) or expert (Switch SAEs: the experts sharded over the ranks); "
                                       "README, 'Beyond one GPU'.",
                           epilog=_train_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="YAML or JSON run config (fields below)")
    train.add_argument("--run-dir", help="override the config's run_dir")
    train.add_argument("--resume", action="store_true", help="continue from the run_dir's latest checkpoint")
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="train TopK, Gated, ReLU and Switch side by side on the offline default")
    demo.add_argument("--run-dir", default="runs/demo", help="where to write the SAE folders (default: runs/demo)")
    demo.add_argument("--steps", type=int, help="training steps (default: 400; 2000 with --synthetic)")
    demo.add_argument("--synthetic", action="store_true",
                      help="train on synthetic activations with known features and score their recovery")
    demo.set_defaults(func=_cmd_demo)
    _add_browse_commands(sub)
    return parser


def _cmd_index(args: argparse.Namespace) -> int:
    for name, folder in index_run(args.run_dir, args.sae).items():
        print(f"{name}: {folder}")
    print(f"\nBrowse them with: workbench browse {args.run_dir}")
    return 0


def _cmd_browse(args: argparse.Namespace) -> int:
    from .ui.app import serve  # Panel takes seconds to import; only this command needs it

    sae_options = {name: getattr(args, name) for name in ("subfolder", "model", "site", "text", "eval_tokens")
                   if getattr(args, name) is not None}
    serve(args.run_dir, port=args.port, address=args.address, sae=args.sae, **sae_options)
    return 0


BROWSE_EPILOG = """\
examples:
  workbench browse runs/demo                      a run's SAEs (indexed first if they are not)
  workbench browse runs/demo --sae topk           ... showing its SAE "topk" first
  workbench browse --sae tests/fixtures/saelens/topk_minilm
                                                  an SAE folder (ours, SAELens', sparsify's)
  workbench browse --sae OWNER/REPO --subfolder blocks.8.hook_resid_post --model gpt2
                                                  one SAE of a hub repo, on a model its metadata lacks

An SAE browsed without a run is indexed on held-out text of the model and site its metadata records
(SAELens' model_name and hook_name), or that --model and --site give; the text is --text, else the
one it was trained on here, else CPython's prose (offline). The index is kept in the activation cache
($WORKBENCH_CACHE), so the second time it opens at once."""


def _add_browse_commands(sub: argparse._SubParsersAction) -> None:
    """``workbench index RUN_DIR`` and ``workbench browse RUN_DIR`` / ``--sae PATH_OR_HUB_ID``: look
    inside a finished run, or any SAE."""
    index = sub.add_parser("index", help="build the feature index (and router analysis) of a run's SAEs",
                           description="Index every feature of a finished run's SAEs on its held-out "
                                       "activations (top examples, histograms, output tokens; the router "
                                       "of a Switch SAE), into RUN_DIR/features/<name>/.")
    index.add_argument("run_dir", help="a finished run's folder (with config.json and saes/)")
    index.add_argument("--sae", action="append", metavar="NAME",
                       help="index only this SAE (repeat for several; default: all)")
    index.set_defaults(func=_cmd_index)

    browse = sub.add_parser("browse", help="open the feature browser on a run, or on any SAE, in a web browser",
                            description="Serve the feature browser and router inspector of a finished run's "
                                        "SAEs (those without a feature index are indexed first, once), or of "
                                        "one SAE from a folder or the Hugging Face hub (--sae without RUN_DIR).",
                            epilog=BROWSE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    browse.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                        help="a finished run's folder (with config.json and saes/); leave it out to browse one "
                             "SAE given by --sae")
    browse.add_argument("--sae", metavar="NAME | PATH_OR_HUB_ID",
                        help="with RUN_DIR: the name of the run's SAE to show first (default: the first by "
                             "name); without: the SAE to browse, a folder (ours, SAELens', sparsify's) or a "
                             "hub id OWNER/REPO")
    browse.add_argument("--port", type=int, default=5006, help="port to serve on (default: 5006)")
    browse.add_argument("--address", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; from elsewhere, "
                             "forward the port, e.g. ssh -L 5006:localhost:5006 HOST)")
    one = browse.add_argument_group("an SAE browsed without a run (--sae PATH_OR_HUB_ID)")
    one.add_argument("--subfolder", help="the SAE's folder inside the hub repo or folder, for one that holds several")
    one.add_argument("--model", metavar="NAME",
                     help="the model the SAE reads (default: its metadata's model_name), a hub name or a "
                          "local folder")
    one.add_argument("--site", metavar="SITE",
                     help="where in the model it reads, e.g. resid_post.8 or blocks.8.hook_resid_post "
                          "(default: from its metadata's hook_name)")
    one.add_argument("--text", metavar="SOURCE",
                     help="held-out text to index it on: cpython, a hub dataset or a local file (default: "
                          "the text it was trained on here, else cpython)")
    one.add_argument("--eval-tokens", type=int, metavar="N",
                     help="held-out tokens to index it on (default: 16,384, about 20 s on 2 CPU cores for MiniLM)")
    browse.set_defaults(func=_cmd_browse)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"workbench {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
