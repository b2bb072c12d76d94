"""The training loop: schedule, history, callbacks, shared batches, lr defaults, unit-norm decoders,
bad-input errors and the files a run writes. Tiny sizes so the file runs in seconds on 2 cores."""
from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import torch

from workbench import io as sae_io
from workbench.saes import build_sae, make_config
from workbench.train import BatchError, TrainConfig, Trainer, lr_factor
from workbench.train.trainer import NonFiniteError
from workbench.train import checkpoint

D, F, B = 32, 128, 128


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

class SparseStream:
    """Deterministic, re-iterable batches of sparse positive combinations of 96 fixed unit
    directions plus a little noise. Counts how often it is iterated and how many batches it yields;
    ``bad`` maps a batch index to the object to yield there instead."""

    def __init__(self, n_batches: int, batch: int = B, d: int = D, seed: int = 0, bad: dict | None = None):
        self.n_batches, self.batch, self.d, self.seed, self.bad = n_batches, batch, d, seed, bad or {}
        self.iterations = 0
        self.fetched = 0

    def __iter__(self):
        self.iterations += 1
        gen = torch.Generator().manual_seed(self.seed)
        dirs = torch.randn(96, self.d, generator=gen)
        dirs /= dirs.norm(dim=-1, keepdim=True)
        for i in range(self.n_batches):
            idx = torch.rand(self.batch, 96, generator=gen).topk(4, dim=-1).indices
            coef = torch.rand(self.batch, 4, generator=gen) + 0.5
            x = (coef[..., None] * dirs[idx]).sum(1) + 0.01 * torch.randn(self.batch, self.d, generator=gen)
            self.fetched += 1
            yield self.bad.get(i, x)


def four_saes(d_in: int = D) -> dict:
    return {
        "topk": build_sae(make_config("topk", d_in=d_in, d_sae=F, k=4)),
        "gated": build_sae(make_config("gated", d_in=d_in, d_sae=F)),
        "relu": build_sae(make_config("relu", d_in=d_in, d_sae=F, l1_warmup_steps=20)),
        "switch": build_sae(make_config("switch", d_in=d_in, d_sae=F, k=4, n_experts=4)),
    }


def with_non_finite(x, nan: int, inf: int):
    x.view(-1)[:nan] = float("nan")
    x.view(-1)[nan:nan + inf] = float("-inf")
    return x


def cfg(**fields) -> TrainConfig:
    # Dead after two batches without a fire: latents go dead within the runs, so AuxK is active.
    return TrainConfig(**{"warmup_steps": 5, "log_every": 5, "progress_bar": False, "dead_window_tokens": 2 * B,
                          **fields})


# -------------------------------------------------------------------------------------------------
# Config and schedule

@pytest.mark.parametrize("field, value", [
    ("total_steps", 0), ("total_steps", 2.5), ("lr", 0.0), ("lr", -1e-3), ("warmup_steps", -1),
    ("decay_fraction", 1.5), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("grad_clip", 0.0),
    ("log_every", 0), ("checkpoint_every", 0), ("dead_window_tokens", 0), ("seed", "0"),
])
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    fields = {"total_steps": 10, field: value}
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**fields)


def test_train_config_fields_all_have_docstrings():
    import ast
    import inspect
    from workbench.train import trainer as trainer_module

    tree = ast.parse(inspect.getsource(trainer_module))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig").body
    for stmt, nxt in zip(body, body[1:] + [None]):
        if isinstance(stmt, ast.AnnAssign):
            assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), stmt.target.id


def test_lr_factor_by_hand():
    # 100 steps, warm-up 10, decay over the last 20: steps 80..99.
    f = lambda step: lr_factor(step, 100, 10, 0.2)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == 1.0 and f(10) == 1.0 and f(79) == 1.0
    assert f(80) == 1.0
    assert f(81) == pytest.approx(0.95)
    assert f(99) == pytest.approx(0.05)
    assert f(100) == 0.0
    # warmup_steps longer than the run: cut to end where the decay starts (step 8 of 10).
    g = lambda step: lr_factor(step, 10, 100, 0.2)  # noqa: E731
    assert [g(s) for s in range(10)] == pytest.approx([1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1, 0.5])
    assert lr_factor(0, 10, 0, 0.2) == 1.0            # no warm-up
    assert lr_factor(99, 100, 10, 0.0) == 1.0         # no decay
    assert lr_factor(100, 100, 10, 0.0) == 0.0        # past the end
    assert [lr_factor(s, 1, 100, 0.2) for s in range(2)] == [1.0, 0.0]   # one-step run
    assert [lr_factor(s, 4, 10, 1.0) for s in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])


def test_schedule_is_applied_to_the_optimiser():
    sae = build_sae(make_config("topk", d_in=D, d_sae=F, k=4))
    trainer = Trainer({"a": sae}, cfg(total_steps=20, lr=1e-3, log_every=1, decay_fraction=0.2))
    lrs = []
    trainer.add_callback(lambda row: lrs.append(row["lr"]))
    trainer.fit(SparseStream(20))
    expected = [1e-3 * lr_factor(s, 20, 5, 0.2) for s in range(20)]
    assert lrs == pytest.approx(expected)
    assert lrs[4] == pytest.approx(1e-3)              # end of warm-up: the peak
    assert lrs[-1] == pytest.approx(1e-3 / 4)         # final step: last of 4 decay steps
    assert trainer.optimizers["a"].param_groups[0]["lr"] == 0.0


def test_default_lr_per_sae_and_configured_lr():
    trainer = Trainer(four_saes(), cfg(total_steps=10))
    initial = {name: opt.param_groups[0]["initial_lr"] for name, opt in trainer.optimizers.items()}
    topk_lr = 2e-4 / math.sqrt(F / 2**14)
    assert initial["topk"] == pytest.approx(topk_lr)
    assert initial["switch"] == pytest.approx(topk_lr)
    assert initial["gated"] == pytest.approx(3e-4)
    assert initial["relu"] == pytest.approx(5e-5)

    trainer = Trainer(four_saes(), cfg(total_steps=10, lr=1e-3))
    assert all(opt.param_groups[0]["initial_lr"] == 1e-3 for opt in trainer.optimizers.values())


def test_optimiser_covers_trainable_parameters_only():
    trainer = Trainer(four_saes(), cfg(total_steps=10))
    for name, sae in trainer.saes.items():
        opt_params = {id(p) for p in trainer.optimizers[name].param_groups[0]["params"]}
        assert opt_params == {id(p) for p in sae.parameters() if p.requires_grad}
    # Frozen: Switch's b_enc, and TopK's b_enc without latent_bias.
    for name in ("switch", "topk"):
        frozen = trainer.saes[name].b_enc
        assert all(p is not frozen for p in trainer.optimizers[name].param_groups[0]["params"])


# -------------------------------------------------------------------------------------------------
# The loop

def test_loss_goes_down_on_sparse_synthetic_data():
    trainer = Trainer(four_saes(), cfg(total_steps=150, log_every=10, warmup_steps=10))
    history = trainer.fit(SparseStream(150))
    for name in ("topk", "gated", "switch"):
        rows = [r for r in history if r["sae"] == name]
        assert rows[-1]["mse"] < 0.85 * rows[0]["mse"], name
    for name, factor in (("topk", 0.6), ("gated", 0.7)):  # Gated starts lower, from its small encoder
        rows = [r for r in history if r["sae"] == name]
        assert rows[-1]["loss"] < factor * rows[0]["loss"], name
    # ReLU at its paper's lr (5e-5) barely moves in 150 steps; started at W_enc = 0.1 W_dec^T it
    # reconstructs better than the mean from the start (the tied init's first reconstructions are
    # several times the data's variance, and still were after these steps).
    x_ND = torch.cat(list(SparseStream(4)))
    variance = (x_ND - x_ND.mean(0)).pow(2).mean().item()
    assert [r for r in history if r["sae"] == "relu"][-1]["mse"] < 0.7 * variance


def test_history_rows_at_the_right_steps_with_the_right_keys():
    trainer = Trainer(four_saes(), cfg(total_steps=23, log_every=5))
    history = trainer.fit(SparseStream(30))
    assert [(r["step"], r["sae"]) for r in history] == [
        (step, name) for step in (5, 10, 15, 20, 23) for name in ("topk", "gated", "relu", "switch")]
    common = {"step", "sae", "tokens", "lr", "loss", "mse", "l0", "dead_fraction"}
    terms = {"topk": {"fvu", "auxk"}, "gated": {"l2", "l1", "aux"}, "relu": {"l2", "l1"},
             "switch": {"mse", "load_balance"}}
    for row in history:
        extra = {"expert_load", "load_balance", "router_entropy"} if row["sae"] == "switch" else set()
        assert set(row) == common | {f"loss/{t}" for t in terms[row["sae"]]} | extra
        assert row["tokens"] == row["step"] * B
        assert row["loss"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("loss/")), rel=1e-5)
        assert 0.0 <= row["dead_fraction"] <= 1.0
        assert all(isinstance(v, (int, float, str, list)) for v in row.values())
    for row in (r for r in history if r["sae"] == "switch"):
        assert len(row["expert_load"]) == 4 and sum(row["expert_load"]) == pytest.approx(1.0)
        assert row["loss/load_balance"] == pytest.approx(3.0 * row["load_balance"], rel=1e-5)
        assert 0.0 < row["router_entropy"] <= math.log(4) + 1e-6
    for row in (r for r in history if r["sae"] == "topk"):
        assert row["l0"] <= 4.0


@pytest.mark.parametrize("window_batches, steps", [(2, 6), (100, 1)])
def test_dead_fraction_counts_latents_silent_for_the_window(window_batches, steps):
    sae = build_sae(make_config("topk", d_in=D, d_sae=4 * F, k=4))
    fired = []
    sae.register_forward_hook(lambda module, args, out: fired.append(out.code.fire_counts() > 0))
    trainer = Trainer(sae, cfg(total_steps=steps, log_every=3, dead_window_tokens=window_batches * B))
    history = trainer.fit(SparseStream(steps))
    # Dead: fired in none of the window's batches, or of all batches while fewer have been seen.
    fired_any = torch.stack(fired[-window_batches:]).any(0)
    expected = (~fired_any).float().mean().item()
    assert 0.0 < expected < 1.0
    assert history[-1]["dead_fraction"] == pytest.approx(expected)


def test_the_trainer_passes_its_dead_mask_into_forward():
    """The one firing counter is the trainer's: forward gets the latents silent for the whole
    window (none before a window has passed), and AuxK is on exactly when some are dead."""
    sae = build_sae(make_config("topk", d_in=D, d_sae=4 * F, k=4))
    seen = []
    sae.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["dead_mask"].clone()),
                                  with_kwargs=True)
    fired = []
    sae.register_forward_hook(lambda module, args, out: fired.append(out.code.fire_counts() > 0))
    trainer = Trainer(sae, cfg(total_steps=6, log_every=1, dead_window_tokens=2 * B))
    history = trainer.fit(SparseStream(6))
    assert not seen[0].any() and not seen[1].any()  # fewer than a window's tokens seen
    for step in range(2, 6):
        expected = ~(fired[step - 1] | fired[step - 2])
        assert torch.equal(seen[step], expected), step
    assert history[1]["loss/auxk"] == 0.0 and history[-1]["loss/auxk"] > 0.0


def test_callback_receives_every_row():
    trainer = Trainer(four_saes(), cfg(total_steps=12, log_every=4))
    received = []
    trainer.add_callback(received.append)
    history = trainer.fit(SparseStream(12))
    assert received == history and len(received) == 3 * 4


def test_saes_read_the_same_batches_and_each_batch_is_fetched_once():
    saes = four_saes()
    seen = {name: [] for name in saes}
    for name, sae in saes.items():
        sae.register_forward_pre_hook(lambda module, args, name=name: seen[name].append(args[0].clone()))
    stream = SparseStream(100)  # longer than the run: no batch past total_steps may be read
    Trainer(saes, cfg(total_steps=9)).fit(stream)
    assert stream.iterations == 1 and stream.fetched == 9
    reference = list(SparseStream(9))
    for name in saes:
        assert len(seen[name]) == 9
        assert all(torch.equal(a, b) for a, b in zip(seen[name], reference)), name


def test_decoder_rows_are_unit_norm_after_training():
    trainer = Trainer(four_saes(), cfg(total_steps=15, lr=1e-2))
    trainer.fit(SparseStream(15))
    for name, sae in trainer.saes.items():
        norms = sae.W_dec.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), name
        assert not sae.training  # handed back in eval mode


def test_single_sae_is_named_by_its_architecture():
    trainer = Trainer(build_sae(make_config("gated", d_in=D, d_sae=F)), cfg(total_steps=3))
    assert list(trainer.saes) == ["gated"]


def test_stream_that_runs_out_early_warns_and_logs_the_last_step():
    trainer = Trainer(four_saes(), cfg(total_steps=20, log_every=5))
    with pytest.warns(UserWarning, match=r"ran out after 7 batches, so only 7 of 20 steps ran"):
        history = trainer.fit(SparseStream(7))
    assert trainer.step == 7
    assert sorted({r["step"] for r in history}) == [5, 7]


# -------------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("index, bad, message", [
    (7, torch.randn(B, 100), r"^batch 7 has 100 columns but the SAEs read d_in=32; .*build them with d_in=100$"),
    (2, torch.randn(4, B, D),
     r"^batch 2 has shape \(4, 128, 32\) but the SAEs need a 2-D \(batch, d_in=32\) tensor; "),
    (3, with_non_finite(torch.randn(B, D), nan=5, inf=7),
     r"^batch 3 contains 12 NaN/Inf values .*; drop or clip them upstream"),
    (1, [[0.0] * D] * B, r"^batch 1 is a list, not a torch.Tensor; convert it upstream with torch.as_tensor$"),
    (4, torch.ones(B, D, dtype=torch.long), r"^batch 4 has dtype torch.int64; .*\.float\(\)$"),
    (5, torch.randn(0, D), r"^batch 5 has no rows; drop empty batches upstream$"),
])
def test_bad_batch_is_a_one_line_error_raised_before_the_saes_see_it(index, bad, message):
    saes = four_saes()
    trainer = Trainer(saes, cfg(total_steps=20, log_every=1))
    snapshots = []
    trainer.add_callback(lambda row: snapshots.append(copy.deepcopy(saes[row["sae"]].state_dict())))
    with pytest.raises(BatchError, match=message) as err:
        trainer.fit(SparseStream(20, bad={index: bad}))
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)
    assert trainer.step == index
    # The SAEs (buffers included) are exactly as after the last good batch.
    for name, sae in saes.items():
        last = snapshots[-4:][list(saes).index(name)]
        assert all(torch.equal(v, sae.state_dict()[k]) for k, v in last.items()), name


def test_empty_stream_is_an_error():
    trainer = Trainer(four_saes(), cfg(total_steps=5))
    with pytest.raises(BatchError, match=r"^the activation stream yielded no batches; ") as err:
        trainer.fit(iter([]))
    assert "\n" not in str(err.value)


def test_saes_with_different_d_in_are_rejected():
    saes = {"a": build_sae(make_config("topk", d_in=32, d_sae=F, k=4)),
            "b": build_sae(make_config("topk", d_in=16, d_sae=F, k=4))}
    with pytest.raises(ValueError, match=r"differ in d_in: \{'a': 32, 'b': 16\}"):
        Trainer(saes, cfg(total_steps=5))


def test_bad_trainer_arguments():
    with pytest.raises(ValueError, match="checkpoint_every=5 needs a run_dir"):
        Trainer(four_saes(), cfg(total_steps=5, checkpoint_every=5))
    with pytest.raises(ValueError, match="must be usable as a folder name"):
        Trainer({"../x": build_sae(make_config("gated", d_in=D, d_sae=F))}, cfg(total_steps=5))
    with pytest.raises(ValueError, match="non-empty dict"):
        Trainer({}, cfg(total_steps=5))


# -------------------------------------------------------------------------------------------------
# Files

def test_run_writes_checkpoints_and_final_saes(tmp_path):
    trainer = Trainer(four_saes(), cfg(total_steps=10, checkpoint_every=4), run_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.fit(SparseStream(10))
    ckpts = tmp_path / "checkpoints"
    steps = ["step_00000004", "step_00000008", "step_00000010"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", *steps]
    assert (ckpts / "latest").read_text() == "step_00000010\n"
    for step_dir in steps:
        assert sorted(p.name for p in (ckpts / step_dir).iterdir()) == ["saes", "trainer_state.pt"]
        assert sorted(p.name for p in (ckpts / step_dir / "saes").iterdir()) == ["gated", "relu", "switch", "topk"]
    state = torch.load(ckpts / "step_00000010" / "trainer_state.pt", weights_only=True)
    assert state["step"] == state["batches_consumed"] == 10 and state["tokens_seen"] == 10 * B
    assert set(state["saes"]["topk"]) == {"module", "optimizer", "scheduler", "firing"}
    assert state["saes"]["topk"]["firing"]["tokens_seen"] == 10 * B
    assert len(state["history"]) == 2 * 4
    for name, sae in trainer.saes.items():
        for folder in (tmp_path / "saes" / name, ckpts / "step_00000010" / "saes" / name):
            loaded = sae_io.load(folder)
            assert all(torch.equal(p, dict(sae.named_parameters())[k]) for k, p in loaded.named_parameters())
        metadata = sae_io.read_config(tmp_path / "saes" / name)["metadata"]
        assert {k: metadata[k] for k in ("trained_steps", "trained_tokens")} == {"trained_steps": 10, "trained_tokens": 10 * B}
    assert checkpoint.latest_checkpoint(tmp_path) == ckpts / "step_00000010"


def test_fresh_trainer_refuses_a_run_dir_that_holds_a_run(tmp_path):
    Trainer(four_saes(), cfg(total_steps=3), run_dir=tmp_path).fit(SparseStream(3))
    with pytest.raises(ValueError, match=r"already holds a run with checkpoints; continue it with Trainer.resume"):
        Trainer(four_saes(), cfg(total_steps=3), run_dir=tmp_path).fit(SparseStream(3))


def test_huge_finite_activations_stop_training_before_anything_broken_is_saved(tmp_path):
    """Before: a batch of 3e38 (finite, so it passes the NaN/Inf check) turned every SAE's weights to
    NaN, and they were saved with exit 0."""
    huge = torch.full((B, D), 3e38)
    assert torch.isfinite(huge).all()
    stream = SparseStream(30, bad={12: huge})
    trainer = Trainer(four_saes(), cfg(total_steps=30, checkpoint_every=5, log_every=50), run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"SAE 'topk': the loss became NaN or infinite at step 13, so training "
                                         r"stopped.*last good checkpoint is .*step_00000010"):
        trainer.fit(stream)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000010"
    assert not (tmp_path / "saes").exists()
    resumed = Trainer.resume(tmp_path)
    assert all(torch.isfinite(p).all() for sae in resumed.saes.values() for p in sae.parameters())


def test_a_nan_loss_is_found_without_a_run_dir_at_the_next_logged_step():
    stream = SparseStream(20, bad={3: torch.full((B, D), 1e38)})
    trainer = Trainer(build_sae(make_config("relu", d_in=D, d_sae=F)), cfg(total_steps=20, log_every=10))
    with pytest.raises(ValueError, match="SAE 'relu': the loss became NaN or infinite at step 4.*no checkpoint"):
        trainer.fit(stream)
    assert trainer.step == 10  # checked when step 10 was logged, with no sync at the steps between
    assert trainer.history == []


# -------------------------------------------------------------------------------------------------
# Training in a background thread: Trainer.start and its TrainingRun

class Pause:
    """A callback that holds the training thread at the row of ``sae`` at ``step`` until ``go``
    is set; ``reached`` is set when it gets there, ``thread`` is the thread that called it."""

    def __init__(self, step: int, sae: str):
        self.step, self.sae = step, sae
        self.reached, self.go = threading.Event(), threading.Event()
        self.thread: int | None = None

    def __call__(self, row):
        if (row["step"], row["sae"]) == (self.step, self.sae):
            self.thread = threading.get_ident()
            self.reached.set()
            assert self.go.wait(20), "the test never released the paused training thread"

    def wait(self):
        assert self.reached.wait(20), f"training never reached step {self.step}"


class GlobalRngStream:
    """Batches drawn from the global torch generator (which the Trainer seeds): a stream whose
    continuation needs the generator restored, not only the batches skipped."""

    def __init__(self, n_batches: int):
        self.n_batches = n_batches

    def __iter__(self):
        for _ in range(self.n_batches):
            yield torch.randn(B, D)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    """Weights, buffers, optimiser and firing state and history equal bit for bit."""
    assert (a.step, a.tokens_seen) == (b.step, b.tokens_seen)
    for name in a.saes:
        for key, value in a.saes[name].state_dict().items():
            assert torch.equal(value, b.saes[name].state_dict()[key]), f"{name}.{key}"
        opt_a, opt_b = a.optimizers[name].state_dict()["state"], b.optimizers[name].state_dict()["state"]
        assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i]), name
        assert torch.equal(a.firing[name].tokens_since_fired_F, b.firing[name].tokens_since_fired_F), name
    assert a.history == b.history


def test_start_returns_at_once_and_the_history_grows_while_it_trains():
    trainer = Trainer(four_saes(), cfg(total_steps=20, log_every=5))
    pause = Pause(10, "switch")
    trainer.add_callback(pause)
    run = trainer.start(SparseStream(20))
    try:
        pause.wait()  # start() returned while the thread trains
        assert pause.thread not in (None, threading.get_ident())  # callbacks run in the training thread
        assert run.running and not run.done and run.step == 10
        assert [(r["step"], r["sae"]) for r in run.history] == [
            (step, name) for step in (5, 10) for name in ("topk", "gated", "relu", "switch")]
        assert "running at step 10 of 20" in repr(run)
        with pytest.raises(TimeoutError, match=r"still training after 0.05 s \(step 10 of 20\)"):
            run.wait(timeout=0.05)
    finally:
        pause.go.set()
    history = run.wait()
    assert run.done and not run.running and not run.stopped and run.error is None
    assert history is trainer.history and len(history) == 4 * 4 and run.history == history
    assert all(not sae.training for sae in trainer.saes.values())


def test_a_started_run_ends_with_the_weights_fit_gives():
    fitted = Trainer(four_saes(), cfg(total_steps=15, log_every=5))
    fitted.fit(SparseStream(15))
    started = Trainer(four_saes(), cfg(total_steps=15, log_every=5))
    started.start(SparseStream(15)).wait()
    assert_same_state(fitted, started)


def test_stop_ends_at_a_step_checkpoints_and_resuming_is_bit_identical(tmp_path):
    def setup(run_dir):
        saes = {"topk": build_sae(make_config("topk", d_in=D, d_sae=F, k=4)),
                "switch": build_sae(make_config("switch", d_in=D, d_sae=F, k=4, n_experts=4))}
        return Trainer(saes, cfg(total_steps=16, log_every=1, checkpoint_every=5), run_dir=run_dir)

    straight = setup(tmp_path / "straight")
    straight.fit(GlobalRngStream(16))

    stopped = setup(tmp_path / "stopped")
    pause = Pause(7, "switch")
    stopped.add_callback(pause)
    run = stopped.start(GlobalRngStream(16))
    try:
        pause.wait()
        run.stop()  # from this thread, while the training thread sits inside step 7's logging
    finally:
        pause.go.set()
    history = run.wait()
    assert run.stopped and run.done and run.step == 7 and history[-1]["step"] == 7
    assert "stopped at step 7 of 16" in repr(run)
    run.stop()  # a run that has ended ignores it
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000005", "step_00000007"]
    assert (checkpoints / "latest").read_text() == "step_00000007\n"
    assert not (tmp_path / "stopped" / "saes").exists()  # final folders belong to a finished run

    torch.manual_seed(1234)  # whatever the notebook did in between
    resumed = Trainer.resume(tmp_path / "stopped")
    assert resumed.step == 7
    resumed.fit(GlobalRngStream(16))
    assert_same_state(straight, resumed)
    # The stopped trainer itself continues exactly too (with fit or start).
    stopped.run_dir = tmp_path / "again"  # its own folder now holds the resumed run's end
    stopped.start(GlobalRngStream(16)).wait()
    assert_same_state(straight, stopped)


@pytest.mark.parametrize("bad, error, message", [
    (torch.full((B, D), 1e38), NonFiniteError, r"SAE 'relu': the loss became NaN or infinite at step 4"),
    (torch.randn(B, 7), BatchError, r"^batch 3 has 7 columns"),
])
def test_an_exception_in_the_training_thread_is_raised_by_wait(bad, error, message):
    trainer = Trainer(build_sae(make_config("relu", d_in=D, d_sae=F)), cfg(total_steps=20, log_every=10))
    run = trainer.start(SparseStream(20, bad={3: bad}))
    with pytest.raises(error, match=message):
        run.wait()
    assert run.done and isinstance(run.error, error) and not run.stopped
    with pytest.raises(error, match=message):  # every wait says it
        run.wait()
    assert "failed" in repr(run)
    # The trainer is free again: a new run starts (and a diverged one still refuses to go on).
    again = trainer.start(SparseStream(20))
    if error is NonFiniteError:
        with pytest.raises(NonFiniteError):
            again.wait()
    else:
        assert again.wait()[-1]["step"] == 20


def test_one_run_per_trainer_at_a_time():
    trainer = Trainer(build_sae(make_config("topk", d_in=D, d_sae=F, k=4)), cfg(total_steps=10, log_every=5))
    pause = Pause(5, "topk")
    trainer.add_callback(pause)
    run = trainer.start(SparseStream(10))
    try:
        pause.wait()
        for again in (trainer.start, trainer.fit):
            with pytest.raises(RuntimeError, match=r"^this trainer is already training .*run\.wait\(\).*run\.stop\(\)") as err:
                again(SparseStream(10))
            assert "\n" not in str(err.value)
    finally:
        pause.go.set()
    run.wait()
    assert trainer.start(SparseStream(10)).wait() == run.history  # free again: nothing left to train


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler for the test, as a kernel has it: where something earlier in the
    session left SIGINT ignored, ``_thread.interrupt_main()`` does nothing."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupting_wait_stops_the_run(python_sigint):
    """Interrupting the cell that waits (Ctrl-C, the kernel's interrupt) ends the run at the next
    step, as it would end a fit, instead of leaving it training unseen."""
    import _thread

    trainer = Trainer(build_sae(make_config("topk", d_in=D, d_sae=F, k=4)), cfg(total_steps=1000, log_every=5))
    pause = Pause(5, "topk")
    trainer.add_callback(pause)
    run = trainer.start(SparseStream(1000))
    pause.wait()

    def interrupt(_run):  # called by wait() while it waits: the interrupt arrives inside it
        if not pause.go.is_set():
            pause.go.set()
            _thread.interrupt_main()

    run.watch(interrupt)
    with pytest.raises(KeyboardInterrupt):
        run.wait()
    assert run.done and run.stopped and 5 <= run.step < 1000
