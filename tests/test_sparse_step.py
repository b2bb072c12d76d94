"""The row-sparse step (``TrainConfig.optimizer="sparse_adam"``) against the dense step and against a
lazy Adam written out here from its definition; bf16 autocast and the refusals of the GPU path."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from workbench.eval.metrics import FiringStats
from workbench.saes import build_sae, make_config
from workbench.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

D, F, B = 24, 96, 48
K_SPARSE = {
    "topk": {"k": 4, "latent_bias": True, "k_aux": 8},
    "switch": {"k": 4, "n_experts": 4},
    "batchtopk": {"k": 4, "k_aux": 8},
    "matryoshka_batchtopk": {"k": 4, "k_aux": 8, "matryoshka_widths": [24, 96]},
}


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(64, D, generator=gen)
    out = []
    for _ in range(n):
        coef = torch.rand(B, 64, generator=gen) * (torch.rand(B, 64, generator=gen) < 0.08)
        out.append(coef @ dirs + 0.3 + 0.05 * torch.randn(B, D, generator=gen))
    return out


def trainer(sae, optimizer: str, grad_clip: float | None = 1.0, lr: float = 3e-3) -> Trainer:
    cfg = TrainConfig(total_steps=100, lr=lr, warmup_steps=0, decay_fraction=0.0, progress_bar=False,
                      grad_clip=grad_clip, optimizer=optimizer, dead_window_tokens=10 * B)
    return Trainer(sae, cfg)


def mark_dead(t: Trainer, every: int = 3) -> None:
    """Make every third latent dead, so that AuxK selects among them from the first step."""
    firing = next(iter(t.firing.values()))
    firing.tokens_since_fired_F[::every] = 10**9


@pytest.mark.parametrize("arch", list(K_SPARSE))
def test_first_step_equals_the_dense_step(arch):
    """Clipping, projection, renormalisation and the first Adam step agree, so after one step every
    weight equals the dense step's; the row-sparse weights never get a dense gradient."""
    x = batches(1)[0]
    sae = build_sae(make_config(arch, d_in=D, d_sae=F, **K_SPARSE[arch]))
    sae.init_from_data_(x)
    # grad_clip=1e-3 clips every step: without clipping the weights come out different (checked).
    dense, sparse, unclipped = (trainer(copy.deepcopy(sae), opt, clip) for opt, clip in
                                (("adam", 1e-3), ("sparse_adam", 1e-3), ("sparse_adam", None)))
    for t in (dense, sparse, unclipped):
        mark_dead(t)
        stats = t.train_step(x)
    name = next(iter(sparse.saes))
    if "auxk" in stats[name]:
        assert float(stats[name]["loss/auxk"]) > 0, "AuxK did not run"
    sae_d, sae_s = dense.saes[name], sparse.saes[name]
    for (pname, p_d), p_s in zip(sae_d.named_parameters(), sae_s.parameters()):
        torch.testing.assert_close(p_s, p_d, atol=2e-6, rtol=1e-5, msg=lambda m, n=pname: f"{n}: {m}")
    assert sae_s.W_enc.grad is None and sae_s.W_dec.grad is None
    moved = (unclipped.saes[name].W_dec - sae_s.W_dec).abs().max()
    assert moved > 1e-4, "clipping had no effect; the test would not see a wrong clipping factor"
    torch.testing.assert_close(sae_s.W_dec.norm(dim=-1), torch.ones(F), atol=1e-6, rtol=0)


def lazy_adam_reference(sae, xs: list[torch.Tensor], lr: float, clip: float, window: int,
                        betas=(0.9, 0.999), eps=1e-8) -> None:
    """Train ``sae`` in place: dense autograd gradients, clipping to the global norm, the decoder
    gradient projected off its rows, Adam on the biases and router, and on W_enc / W_dec the lazy
    Adam of torch.optim.SparseAdam written out: a row whose gradient is zero this step keeps its
    moments and its value; bias correction counts every step; decoder rows renormalised."""
    params = {n: p for n, p in sae.named_parameters() if p.requires_grad}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    firing = FiringStats(sae.cfg.d_sae, window)
    sae.train()
    for t, x in enumerate(xs, start=1):
        firing.tokens_since_fired_F[::3] = max(int(firing.tokens_since_fired_F.max()), 10**9)
        out = sae(x, dead_mask=firing.silent_for(window))
        for p in params.values():
            p.grad = None
        sum(out.losses.values()).backward()
        g = {n: p.grad.clone() for n, p in params.items()}
        norm = math.sqrt(sum(float(gi.pow(2).sum()) for gi in g.values()))
        coef = min(1.0, clip / (norm + 1e-6))
        g = {n: gi * coef for n, gi in g.items()}
        W_dec = params["W_dec"].detach()
        g["W_dec"] -= (g["W_dec"] * W_dec).sum(-1, keepdim=True) * W_dec
        bc1, bc2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        with torch.no_grad():
            for n, p in params.items():
                rows = n in ("W_enc", "W_dec")
                gi, mi, vi, pi = (a.t() if n == "W_enc" else a for a in (g[n], m[n], v[n], p))
                touched = gi.abs().sum(-1) > 0 if rows else torch.ones(1, dtype=torch.bool)
                sel = touched[:, None] if rows else touched
                new_m = betas[0] * mi + (1 - betas[0]) * gi
                new_v = betas[1] * vi + (1 - betas[1]) * gi * gi
                mi.copy_(torch.where(sel, new_m, mi))
                vi.copy_(torch.where(sel, new_v, vi))
                step = lr / bc1 * mi / ((vi / bc2).sqrt() + eps)
                pi.sub_(torch.where(sel, step, torch.zeros_like(step)))
            params["W_dec"].div_(params["W_dec"].norm(dim=-1, keepdim=True))
        firing.update(out.code)


@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_several_steps_follow_lazy_adam_and_differ_from_dense_adam(arch):
    """After 8 steps the sparse step matches the lazy Adam reference; dense Adam, whose moments keep
    moving rows that did not fire, ends elsewhere (the documented difference)."""
    xs = batches(8, seed=1)
    sae = build_sae(make_config(arch, d_in=D, d_sae=F, **K_SPARSE[arch]))
    sae.init_from_data_(xs[0])
    ref = copy.deepcopy(sae)
    sparse, dense = trainer(copy.deepcopy(sae), "sparse_adam", 0.05), trainer(copy.deepcopy(sae), "adam", 0.05)
    for t in (sparse, dense):
        for x in xs:
            t.firing[arch].tokens_since_fired_F[::3] = max(int(t.firing[arch].tokens_since_fired_F.max()), 10**9)
            t.train_step(x)
    lazy_adam_reference(ref, xs, lr=3e-3, clip=0.05, window=10 * B)
    for (name, p_ref), p_s, p_d in zip(ref.named_parameters(), sparse.saes[arch].parameters(),
                                       dense.saes[arch].parameters()):
        torch.testing.assert_close(p_s, p_ref, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    gap = (dense.saes[arch].W_dec - sparse.saes[arch].W_dec).abs().max()
    assert gap > 1e-4, "dense and lazy Adam agree after 8 steps: the test cannot tell them apart"


def test_sparse_adam_refuses_an_architecture_without_row_sparse_weights():
    relu = build_sae(make_config("relu", d_in=D, d_sae=F))
    with pytest.raises(ValueError, match=r"^a relu SAE has no row-sparse weights .* use 'adam'$"):
        trainer(relu, "sparse_adam")
    with pytest.raises(ValueError, match=r"^TrainConfig.optimizer='sgd' must be one of"):
        TrainConfig(total_steps=1, optimizer="sgd")


def test_resume_with_another_optimizer_is_refused(tmp_path):
    sae = build_sae(make_config("topk", d_in=D, d_sae=F, k=4))
    cfg = TrainConfig(total_steps=4, checkpoint_every=2, progress_bar=False, optimizer="sparse_adam")
    with pytest.warns(UserWarning, match="ran out after 2 batches"):
        Trainer(sae, cfg, run_dir=tmp_path).fit(batches(2))
    other = TrainConfig(total_steps=4, checkpoint_every=2, progress_bar=False, optimizer="adam")
    with pytest.raises(ValueError, match=r"trained with optimizer='sparse_adam', this trainer has "
                                         r"optimizer='adam'; resume with the optimizer the run started with"):
        Trainer.resume(tmp_path, other)


def test_encoder_is_stored_latent_by_latent_and_saved_as_before(tmp_path):
    """W_enc is (D, F) as SAELens has it, stored so that each latent's weights are one row."""
    from workbench import io as sae_io
    sae = build_sae(make_config("switch", d_in=D, d_sae=F, k=4, n_experts=4))
    assert sae.W_enc.shape == (D, F) and sae.W_enc.t().is_contiguous()
    sae_io.save(sae, tmp_path / "s")
    again = sae_io.load(tmp_path / "s")
    assert torch.equal(again.W_enc, sae.W_enc) and again.W_enc.t().is_contiguous()


def test_autocast_is_refused_on_the_cpu():
    sae = build_sae(make_config("topk", d_in=D, d_sae=F, k=4))
    with pytest.raises(ValueError, match=r"^TrainConfig.autocast=True .* needs the SAEs on a CUDA device "
                                         r"\(they are on cpu\)"):
        Trainer(sae, TrainConfig(total_steps=1, autocast=True))


@pytest.mark.parametrize("arch", list(K_SPARSE))
def test_forward_under_bf16_autocast_keeps_float32_codes_and_gradients(arch):
    """What the trainer runs on a GPU with autocast=True, run here under CPU autocast: the encoder
    matmul in bfloat16, everything after it (codes, reconstruction, loss, gradients) float32, and
    the loss within bf16 rounding of the float32 loss."""
    x = batches(1)[0]
    sae = build_sae(make_config(arch, d_in=D, d_sae=F, **K_SPARSE[arch]))
    sae.init_from_data_(x)
    sae.train()
    dead = torch.arange(F) % 3 == 0
    loss32 = float(sum(sae(x, dead_mask=dead).losses.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, dead_mask=dead)
        loss = sum(out.losses.values())
    loss.backward()
    assert out.code.acts.dtype == out.recon_BD.dtype == loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in sae.parameters() if p.grad is not None)
    assert loss.item() == pytest.approx(loss32, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch, syncs", [("topk", 0), ("switch", 1)])
def test_a_step_that_is_not_logged_does_not_sync_the_gpu(arch, syncs):
    """With dense Adam, a TopK step that is not logged never waits for the GPU; a Switch step waits
    once, for the expert counts its grouped dispatch sizes its matmuls by."""
    import warnings
    sae = build_sae(make_config(arch, d_in=D, d_sae=F, **K_SPARSE[arch])).cuda()
    t = Trainer(sae, TrainConfig(total_steps=100, log_every=100, progress_bar=False, optimizer="adam"))
    xs = [x.cuda() for x in batches(3)]
    sae.init_from_data_(xs[0])
    sae.train()
    t.train_step(xs[0])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            t.train_step(xs[1])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(found) == syncs, [str(w.message) for w in found]


@pytest.mark.parametrize("n_dead", [0, 3, 40])
@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_auxk_without_counting_dead_latents_trains_the_same(monkeypatch, n_dead, optimizer):
    """On a GPU the AuxK selection is not sized by the number of dead latents (reading it back would
    wait for the device): with fewer dead latents than k_aux the surplus entries are alive latents at
    -inf, ReLU'd to 0; with none dead the loss is multiplied by 0. Run here by pretending the CPU is
    such a device: the loss and the step are those of the exact path."""
    import workbench.saes.topk as topk_module
    x = batches(1)[0]
    sae = build_sae(make_config("topk", d_in=D, d_sae=F, k=4, k_aux=8))
    sae.init_from_data_(x)
    results = []
    for on_host in (True, False):
        monkeypatch.setattr(topk_module, "_sizes_on_host", lambda x_BD, v=on_host: v)
        t = trainer(copy.deepcopy(sae), optimizer)
        t.firing["topk"].tokens_since_fired_F[:n_dead] = 10**9
        stats = t.train_step(x)["topk"]
        results.append((float(stats["loss/auxk"]), t.saes["topk"]))
    (loss_exact, exact), (loss_gpu, gpu) = results
    assert loss_gpu == pytest.approx(loss_exact, rel=1e-6, abs=1e-12)
    assert (loss_exact > 0) == (n_dead > 0)
    for (name, p_exact), p_gpu in zip(exact.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu, p_exact, atol=1e-7, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_compiled_forward_trains_as_the_eager_one_with_sparse_adam():
    """torch.compile of the forward keeps the row-gradient collection working (a captured sink
    would silently leave the encoder and decoder unchanged)."""
    xs = batches(3, seed=2)
    sae = build_sae(make_config("topk", d_in=D, d_sae=F, k=4))
    sae.init_from_data_(xs[0])
    eager = trainer(copy.deepcopy(sae), "sparse_adam")
    compiled = Trainer(copy.deepcopy(sae), TrainConfig(**{**eager.cfg.__dict__, "compile": True}))
    for x in xs:
        eager.train_step(x)
        compiled.train_step(x)
    for (name, p_e), p_c in zip(eager.saes["topk"].named_parameters(), compiled.saes["topk"].parameters()):
        torch.testing.assert_close(p_c, p_e, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert (eager.saes["topk"].W_dec - sae.W_dec).abs().max() > 1e-4  # it did train


@pytest.mark.parametrize("touched", ["all", "some"])
def test_row_adam_in_place_and_gathered_paths_agree(touched):
    """With every row touched, RowAdam steps the weight in place; otherwise it gathers and scatters
    (also when the rows are not contiguous). Both give the same rows, and untouched rows stay as
    they were, moments included."""
    from torch import nn

    from workbench.saes.base import RowWeight
    from workbench.train.sparse_step import RowAdam, RowGrads

    class Holder:
        cfg = type("cfg", (), {"architecture": "test"})()

        def __init__(self, W_FD):
            self.W = nn.Parameter(W_FD)

        def row_sparse_weights(self):
            return [RowWeight("W", self.W, self.W, True)]

    gen = torch.Generator().manual_seed(3)
    W = torch.randn(40, 8, generator=gen)
    W /= W.norm(dim=-1, keepdim=True)
    contiguous = Holder(W.clone())
    strided = Holder(W.clone().t().contiguous().t())  # the same values, column-major
    assert not strided.W.is_contiguous()
    ids = torch.arange(40) if touched == "all" else torch.tensor([1, 5, 6, 30])
    results = []
    for holder in (contiguous, strided):
        adam = RowAdam(holder, (0.9, 0.999))
        grads = RowGrads(holder)
        for step in range(3):
            g = torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(step))
            grads.rows = {"W": (ids, g)}
            adam.step(grads, 1e-2, torch.tensor(0.5))
        results.append((holder.W.detach().clone(), adam.state["W"]["exp_avg"].clone()))
    (W_c, m_c), (W_s, m_s) = results
    torch.testing.assert_close(W_s, W_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(m_s, m_c, atol=1e-7, rtol=1e-6)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(W_c[untouched], W[untouched]) and not m_c[untouched].any()
    assert not torch.allclose(W_c[ids], W[ids])
