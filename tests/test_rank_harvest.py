"""A harvest under torchrun: two gloo ranks, spawned by the test, share the model's forward passes of
the offline default (MiniLM on CPython's prose) and rank 0 writes the caches, which must be the very
caches one process writes: same folders (the key does not name the world size), same rows in the same
order, same contexts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workbench.data.source import ActivationSource  # imported here, so forked ranks start with it
from workbench.data.store import ActivationStore
from workbench.runconfig import ModelDataConfig
from workbench.train.distributed import start_local_ranks

N_TOKENS, EVAL_TOKENS, CONTEXT = 5_000, 1_000, 32


def _config(cache_dir: Path) -> ModelDataConfig:
    return ModelDataConfig(n_tokens=N_TOKENS, context_length=CONTEXT, cache_dir=str(cache_dir))


def _rank(rank: int, world_size: int, port: int, cache_dir: str) -> None:
    import os

    import torch
    import torch.distributed as dist

    from workbench.data.rank_harvest import RankGroup

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        ranks = RankGroup(rank, world_size)
        source = ActivationSource(_config(Path(cache_dir)), EVAL_TOKENS, progress=False, ranks=ranks)
        source.prepare()
        (Path(cache_dir) / f"batches_run_{rank}").write_text(str(ranks.batches_run))
        # Every rank opens the same finished stores.
        assert source.train.n_rows == source.train.meta["n_rows"]
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _folders(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.iterdir() if p.is_dir()}


@pytest.mark.usefixtures("one_thread")
def test_two_ranks_write_the_cache_one_process_writes(tmp_path):
    start_local_ranks(_rank, 2, (str(tmp_path / "ranks"),), preload=["workbench.data.source"])
    ActivationSource(_config(tmp_path / "one"), EVAL_TOKENS, progress=False).prepare()

    runs = [int((tmp_path / "ranks" / f"batches_run_{r}").read_text()) for r in (0, 1)]
    assert min(runs) > 0 and abs(runs[0] - runs[1]) <= 2, runs  # each ran about half the batches
    shared, single = _folders(tmp_path / "ranks"), _folders(tmp_path / "one")
    assert sorted(shared) == sorted(single) and len(single) == 2  # the held-out and the training store
    for name in single:
        a, b = ActivationStore.open(shared[name]), ActivationStore.open(single[name])
        assert a.n_rows == b.n_rows > 0
        assert np.array_equal(a.read_rows(0, a.n_rows).numpy(), b.read_rows(0, b.n_rows).numpy())
        files = sorted(p.name for p in single[name].iterdir())
        assert sorted(p.name for p in shared[name].iterdir()) == files
        for file in files:
            if file.endswith(".npy"):  # shards, token ids, positions, contexts: byte for byte
                assert (shared[name] / file).read_bytes() == (single[name] / file).read_bytes(), file
        meta_a, meta_b = (json.loads((f / "meta.json").read_text()) for f in (shared[name], single[name]))
        assert meta_a == meta_b
