"""Streaming (``data.model.cache: false``) against cached training, on the offline default.

    python benchmarks/bench_streaming.py [--tokens 65536] [--width 2048] [--saes 1] [--repeats 3]

One pass over ``--tokens`` training tokens of MiniLM's resid_post.2 on CPython's prose, batch 1024,
measured interleaved (median of ``--repeats``), each with ``--saes`` TopK SAEs trained side by side
on the one stream:
  harvest     writing the training cache once (the model's forward passes + disk writes);
  cached      training from the finished cache (disk reads + the SAE steps);
  streamed    training straight from the model (forward passes + the SAE steps, nothing on disk).
A cached run pays harvest once and cached per pass; a streamed run pays streamed per pass. So streaming
costs (streamed - cached) per pass and saves one harvest: it wins for fewer passes than
harvest / (streamed - cached), and whenever the cache does not fit the disk.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from workbench.data.source import ActivationSource
from workbench.runconfig import ModelDataConfig
from workbench.saes import build_sae
from workbench.train.trainer import TrainConfig, Trainer

BATCH = 1024


def _train(stream, steps: int, width: int, n_saes: int) -> float:
    saes = {f"topk{i}": build_sae({"architecture": "topk", "d_in": 384, "d_sae": width, "k": 32, "seed": i})
            for i in range(n_saes)}
    trainer = Trainer(saes, TrainConfig(total_steps=steps, lr=1e-3, progress_bar=False))
    start = time.perf_counter()
    trainer.fit(stream)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--saes", type=int, default=1, help="TopK SAEs trained side by side on one stream")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    steps = args.tokens // BATCH

    times: dict[str, list[float]] = {"harvest": [], "cached": [], "streamed": []}
    with tempfile.TemporaryDirectory() as cache:
        base = ModelDataConfig(n_tokens=args.tokens, cache_dir=cache)
        streamed = ActivationSource(replace(base, cache=False, stream_buffer_tokens=args.tokens), eval_tokens=8192,
                                    progress=False)
        for i in range(args.repeats):
            source = ActivationSource(replace(base, cache_dir=f"{cache}/round{i}"), eval_tokens=8192, progress=False)
            source.eval  # the held-out store (the training harvest checks against it), outside the timing
            start = time.perf_counter()
            store = source.train
            times["harvest"].append(time.perf_counter() - start)
            times["cached"].append(_train(store.batches(BATCH, seed=0, epochs=None, scale=source.scale), steps,
                                          args.width, args.saes))
            times["streamed"].append(_train(streamed.training_stream(BATCH, seed=0), steps, args.width, args.saes))

    tokens = steps * BATCH
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; MiniLM resid_post.2, {tokens:,} tokens a pass, {args.saes} TopK SAE(s) "
          f"of width {args.width}, batch {BATCH}, median of {args.repeats}")
    print(f"{'way':<10}{'seconds':>10}{'tokens/s':>12}")
    for name, seconds in median.items():
        print(f"{name:<10}{seconds:>10.2f}{tokens / seconds:>12,.0f}")
    extra = median["streamed"] - median["cached"]
    if extra > 0:
        print(f"\nstreaming costs {extra:.2f} s more per pass and saves one {median['harvest']:.2f} s harvest: "
              f"it is faster for up to {median['harvest'] / extra:.1f} passes over the text")
    else:
        print("\nstreaming is faster than training from the cache even without counting the harvest")


if __name__ == "__main__":
    main()
