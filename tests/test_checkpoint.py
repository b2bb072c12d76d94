"""Checkpoints: a resumed run is bit-identical to an uninterrupted one, a write killed half-way
leaves the previous checkpoint whole, and leftovers of such a write are cleaned on resume."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import io as sae_io
from workbench.saes import TopKConfig, TopKSAE, build_sae, make_config
from workbench.train import BatchError, TrainConfig, Trainer
from workbench.train import checkpoint

D, F, B = 32, 128, 128
KILL_MARKER = "INSIDE-CHECKPOINT-WRITE"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

class SparseStream:
    """Deterministic, re-iterable batches: sparse positive combinations of fixed unit directions
    plus noise. ``crash_at`` raises while fetching that batch; ``bad`` maps an index to what to
    yield there instead."""

    def __init__(self, n_batches: int, seed: int = 0, crash_at: int | None = None, bad: dict | None = None):
        self.n_batches, self.seed, self.crash_at, self.bad = n_batches, seed, crash_at, bad or {}

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        dirs = torch.randn(96, D, generator=gen)
        dirs /= dirs.norm(dim=-1, keepdim=True)
        for i in range(self.n_batches):
            if i == self.crash_at:
                raise RuntimeError("simulated crash")
            idx = torch.rand(B, 96, generator=gen).topk(4, dim=-1).indices
            coef = torch.rand(B, 4, generator=gen) + 0.5
            yield self.bad.get(i, (coef[..., None] * dirs[idx]).sum(1) + 0.01 * torch.randn(B, D, generator=gen))


def every_sae() -> dict:
    return {
        "topk": build_sae(make_config("topk", d_in=D, d_sae=F, k=4)),
        "gated": build_sae(make_config("gated", d_in=D, d_sae=F)),
        # The L1 warm-up is still running at the interruption.
        "relu": build_sae(make_config("relu", d_in=D, d_sae=F, l1_warmup_steps=20)),
        "switch": build_sae(make_config("switch", d_in=D, d_sae=F, k=4, n_experts=4)),
        # BatchTopK and Matryoshka keep an inference threshold (a buffer); JumpReLU's thresholds
        # are parameters saved under another key, and its L0 penalty is still warming up.
        "batchtopk": build_sae(make_config("batchtopk", d_in=D, d_sae=F, k=4)),
        "matryoshka": build_sae(make_config("matryoshka_batchtopk", d_in=D, d_sae=F, k=4)),
        "jumprelu": build_sae(make_config("jumprelu", d_in=D, d_sae=F, init_threshold=0.05, l0_warmup_steps=20)),
    }


def train_cfg(**fields) -> TrainConfig:
    # Dead after two batches without a fire: latents go dead within the run, so AuxK is active.
    return TrainConfig(**{"total_steps": 30, "warmup_steps": 5, "log_every": 4, "checkpoint_every": 5,
                          "progress_bar": False, "dead_window_tokens": 2 * B, **fields})


def assert_same_run(a: Trainer, b: Trainer) -> None:
    """Every parameter, buffer and optimiser state tensor equal bit for bit."""
    assert a.step == b.step and a.tokens_seen == b.tokens_seen
    for name in a.saes:
        state_a, state_b = a.saes[name].state_dict(), b.saes[name].state_dict()
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}.{key}"
        opt_a, opt_b = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        for i in opt_a:
            for key in opt_a[i]:
                assert torch.equal(opt_a[i][key], opt_b[i][key]), f"{name} optimiser {i}.{key}"
        rows_a, rows_b = a.row_optimizers[name], b.row_optimizers[name]
        assert (rows_a is None) == (rows_b is None)
        if rows_a is not None:
            assert torch.equal(rows_a.step_count, rows_b.step_count)
            for weight, moments in rows_a.state.items():
                for key, tensor in moments.items():
                    assert torch.equal(tensor, rows_b.state[weight][key]), f"{name} row optimiser {weight}.{key}"
        firing_a, firing_b = a.firing[name].state_dict(), b.firing[name].state_dict()
        assert firing_a["tokens_seen"] == firing_b["tokens_seen"]
        for key in ("tokens_since_fired", "fire_counts"):
            assert torch.equal(firing_a[key], firing_b[key]), f"{name} firing {key}"
        assert a.schedulers[name].state_dict() == b.schedulers[name].state_dict()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Trainer:
    trainer = Trainer(every_sae(), train_cfg(), run_dir=tmp_path_factory.mktemp("straight"))
    trainer.fit(SparseStream(30))
    return trainer


@pytest.mark.parametrize("interruption", ["stream_ends", "crash"])
def test_resumed_run_is_bit_identical(tmp_path, straight_run, interruption):
    if interruption == "stream_ends":  # stops at 13, checkpointed there (not a multiple of 5)
        with pytest.warns(UserWarning, match="ran out after 13 batches"):
            Trainer(every_sae(), train_cfg(), run_dir=tmp_path).fit(SparseStream(13))
        resume_step = 13
    else:  # dies while reading batch 13; the last checkpoint is step 10
        with pytest.raises(RuntimeError, match="simulated crash"):
            Trainer(every_sae(), train_cfg(), run_dir=tmp_path).fit(SparseStream(30, crash_at=13))
        resume_step = 10

    resumed = Trainer.resume(tmp_path)
    assert resumed.step == resume_step
    history = resumed.fit(SparseStream(30))
    assert_same_run(straight_run, resumed)
    # The history matches too, apart from the extra row logged where the short stream ended.
    assert [r for r in history if r["step"] != 13] == straight_run.history
    assert any(r["loss/auxk"] > 0 for r in history if r["sae"] == "topk"), "AuxK never ran"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000030\n"


def k_sparse_saes() -> dict:
    return {name: sae for name, sae in every_sae().items() if sae.row_sparse_weights()}


@pytest.mark.parametrize("fields", [{"optimizer": "sparse_adam"}, {"prefetch": True},
                                    {"optimizer": "sparse_adam", "prefetch": True}],
                         ids=["sparse_adam", "prefetch", "both"])
def test_resume_is_bit_identical_with_sparse_adam_and_prefetch(tmp_path, fields):
    """The row-sparse optimiser's moments and step count go into checkpoints; with prefetch the
    checkpoint records the stream and generators after the batch last trained on, not after the one
    the reading thread has already drawn. (Prefetch alone trains every architecture.)"""
    saes = k_sparse_saes if "optimizer" in fields else every_sae
    straight = Trainer(saes(), train_cfg(total_steps=12, **fields), run_dir=tmp_path / "a")
    straight.fit(SparseStream(12))
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(saes(), train_cfg(total_steps=12, **fields), run_dir=tmp_path / "b").fit(SparseStream(12, crash_at=8))
    resumed = Trainer.resume(tmp_path / "b")
    assert resumed.step == 5 and resumed.cfg.optimizer == fields.get("optimizer")
    resumed.fit(SparseStream(12))
    assert_same_run(straight, resumed)
    if fields == {"prefetch": True}:  # and prefetching trains exactly what reading in the loop trains
        plain = Trainer(saes(), train_cfg(total_steps=12), run_dir=tmp_path / "c")
        plain.fit(SparseStream(12))
        assert_same_run(straight, plain)


def test_prefetch_keeps_a_global_generator_stream_exact_and_reports_bad_batches(tmp_path):
    """The reading thread draws from the global generator one batch ahead; resume is still exact.
    A bad batch read by the thread is reported by fit, with its index."""
    def setup() -> tuple[dict, TrainConfig]:
        return {"topk": build_sae(make_config("topk", d_in=D, d_sae=F, k=4))}, train_cfg(total_steps=12, prefetch=True)

    straight = Trainer(*setup(), run_dir=tmp_path / "a")
    straight.fit(GlobalRngStream(12))
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(*setup(), run_dir=tmp_path / "b").fit(GlobalRngStream(12, crash_at=7))
    resumed = Trainer.resume(tmp_path / "b")
    resumed.fit(GlobalRngStream(12))
    assert_same_run(straight, resumed)
    nan = torch.full((B, D), float("nan"))
    with pytest.raises(BatchError, match=r"^batch 3 contains 4096 NaN/Inf values"):
        Trainer(*setup(), run_dir=tmp_path / "c").fit(SparseStream(12, bad={3: nan}))


def test_checkpoint_that_latest_never_pointed_to_is_replaced(tmp_path, straight_run):
    # As if killed after renaming step_00000010 into place but before updating `latest`.
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(every_sae(), train_cfg(), run_dir=tmp_path).fit(SparseStream(30, crash_at=12))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000005\n")
    resumed = Trainer.resume(tmp_path)
    assert resumed.step == 5
    resumed.fit(SparseStream(30))  # writes step_00000010 again over the orphan
    assert_same_run(straight_run, resumed)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    draws = torch.rand(3), random.random(), np.random.standard_normal(2)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = torch.rand(3), random.random(), np.random.standard_normal(2)
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and (draws[2] == again[2]).all()


class GlobalRngStream:
    """Batches drawn from the global torch generator (which the Trainer seeds); raises while
    fetching batch ``crash_at``."""

    def __init__(self, n_batches: int, crash_at: int | None = None):
        self.n_batches, self.crash_at = n_batches, crash_at

    def __iter__(self):
        for i in range(self.n_batches):
            if i == self.crash_at:
                raise RuntimeError("simulated crash")
            yield torch.randn(B, D)


def test_resume_replays_a_stream_that_draws_from_the_global_generator(tmp_path):
    def setup() -> tuple[dict, TrainConfig]:
        return {"topk": build_sae(make_config("topk", d_in=D, d_sae=F, k=4))}, train_cfg(total_steps=12)

    straight = Trainer(*setup(), run_dir=tmp_path / "a")
    straight.fit(GlobalRngStream(12))
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(*setup(), run_dir=tmp_path / "b").fit(GlobalRngStream(12, crash_at=7))
    torch.manual_seed(1234)  # whatever the notebook did in between
    resumed = Trainer.resume(tmp_path / "b")
    assert resumed.step == 5
    resumed.fit(GlobalRngStream(12))
    assert_same_run(straight, resumed)


def test_leftovers_of_an_interrupted_write_are_ignored_and_cleaned(tmp_path):
    Trainer(every_sae(), train_cfg(total_steps=10), run_dir=tmp_path).fit(SparseStream(10))
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / ".step_00000015.tmp"
    (partial / "saes" / "topk").mkdir(parents=True)
    (partial / "saes" / "topk" / "cfg.json").write_text("{trunc")
    (ckpts / ".latest.tmp").write_text("step_000")
    resumed = Trainer.resume(tmp_path)
    assert resumed.step == 10
    assert not partial.exists() and not (ckpts / ".latest.tmp").exists()


def test_dangling_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    Trainer(every_sae(), train_cfg(total_steps=10), run_dir=tmp_path).fit(SparseStream(10))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099\n")
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000010"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000010"


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        Trainer.resume(tmp_path)


def test_resume_with_a_shorter_stream_says_so(tmp_path):
    Trainer(every_sae(), train_cfg(total_steps=10), run_dir=tmp_path).fit(SparseStream(10))
    resumed = Trainer.resume(tmp_path, cfg=train_cfg(total_steps=20))
    with pytest.raises(ValueError, match="ended after 4 batches while skipping the 10 this run has already"):
        resumed.fit(SparseStream(4))


def test_bad_batch_keeps_earlier_checkpoints(tmp_path):
    trainer = Trainer(every_sae(), train_cfg(), run_dir=tmp_path)
    with pytest.raises(BatchError, match="^batch 7 has 100 columns"):
        trainer.fit(SparseStream(30, bad={7: torch.randn(B, 100)}))
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000005"
    saes, state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 5 and set(saes) == set(every_sae())
    resumed = Trainer.resume(tmp_path)
    resumed.fit(SparseStream(30))
    assert resumed.step == 30


# -------------------------------------------------------------------------------------------------
# Killed in the middle of a checkpoint write

def kill_test_setup() -> tuple[dict, TrainConfig, SparseStream]:
    """The run the child trains (and the parent repeats uninterrupted): checkpoints at 4, 8, 12."""
    saes = {"topk": build_sae(make_config("topk", d_in=D, d_sae=F, k=4))}
    return saes, train_cfg(total_steps=12, checkpoint_every=4), SparseStream(12)


def child_main(run_dir: str) -> None:
    """Train; on the second checkpoint, block after its first SAE folder is written."""
    import workbench.io

    torch.set_num_threads(1)
    real_save, calls = workbench.io.save, []

    def save_then_block(*args, **kwargs):
        out = real_save(*args, **kwargs)
        calls.append(args[1])
        if len(calls) == 2:
            print(KILL_MARKER, flush=True)
            time.sleep(120)
        return out

    workbench.io.save = save_then_block
    saes, cfg, stream = kill_test_setup()
    Trainer(saes, cfg, run_dir=run_dir).fit(stream)


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_checkpoint
        test_checkpoint.child_main(sys.argv[1])
    """))
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()  # blocks until the child is inside the second write
        assert line.strip() == KILL_MARKER, f"child never reached the write: {line!r} {child.stderr.read()}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004\n"
    assert not (ckpts / "step_00000008").exists()
    partial = ckpts / ".step_00000008.tmp"
    assert (partial / "saes" / "topk" / "cfg.json").is_file()
    assert not (partial / "trainer_state.pt").exists()

    saes, state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(run_dir))
    assert state["step"] == 4 and list(saes) == ["topk"]

    resumed = Trainer.resume(run_dir)
    assert not partial.exists()
    assert resumed.step == 4
    _, cfg, stream = kill_test_setup()
    resumed.fit(stream)
    straight_saes, cfg, stream = kill_test_setup()
    straight = Trainer(straight_saes, cfg, run_dir=tmp_path / "straight")
    straight.fit(stream)
    assert_same_run(straight, resumed)


def test_final_saes_fold_the_input_scale_and_keep_metadata_across_resume(tmp_path):
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randn(64, 16, generator=gen) * 4 for _ in range(6)]
    scale = 0.25
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=32, k=3))
    cfg = TrainConfig(total_steps=6, checkpoint_every=3, progress_bar=False)
    trainer = Trainer({"a": sae}, cfg, run_dir=tmp_path, metadata={"site": "resid_post.2"}, input_scale=scale)
    with pytest.warns(UserWarning, match="ran out after 3 batches"):
        trainer.fit([scale * x for x in raw][:3])
    resumed = Trainer.resume(tmp_path, cfg)
    resumed.fit([scale * x for x in raw])
    final = sae_io.load(tmp_path / "saes" / "a")
    meta = sae_io.read_config(tmp_path / "saes" / "a")["metadata"]
    assert meta["site"] == "resid_post.2" and meta["folded_input_scale"] == scale
    trained = resumed.saes["a"].eval()
    torch.testing.assert_close(final(raw[0]).recon_BD, trained(scale * raw[0]).recon_BD / scale, atol=1e-4, rtol=1e-5)
    checkpointed = sae_io.read_config(tmp_path / "checkpoints" / "step_00000006" / "saes" / "a")["metadata"]
    assert checkpointed["reads_scaled_input"] == scale
