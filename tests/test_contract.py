"""The SAE contract: every registered architecture plugs into the trainer, the evaluator, io and the
feature index through the same interface, and those modules name no architecture."""
import re
from pathlib import Path

import pytest
import torch

from workbench import io
from workbench.eval.metrics import evaluate
from workbench.saes import ARCHITECTURES, BaseSAE, Code, SAEOutput, build_sae, make_config
from workbench.saes.base import LatentGroups

D, F = 12, 64
SMALL = {"k": 4}
"""Fields every k-sparse architecture needs at width F; the rest train on their defaults."""


def small_sae(arch: str, seed: int = 0) -> BaseSAE:
    fields = {name: value for name, value in SMALL.items() if name in ARCHITECTURES[arch][0].__dataclass_fields__}
    sae = build_sae(make_config(arch, d_in=D, d_sae=F, seed=seed, **fields))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the tied, zero-bias start so every weight matters
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return sae


def data(n: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 2 + 0.5


GENERIC_MODULES = ["workbench/train/trainer.py", "workbench/eval/any_sae.py", "workbench/eval/metrics.py", "workbench/io.py", "workbench/run.py",
                   "workbench/runconfig.py", "workbench/data/source.py", "workbench/data/streaming.py"]


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_generic_modules_name_no_architecture(module):
    words = {"switch", "router", "expert", "load_balance", *ARCHITECTURES}
    text = (Path(__file__).parent.parent / module).read_text()
    found = sorted({m.group(0).lower() for m in re.finditer(rf"\b({'|'.join(words)})\b", text, re.IGNORECASE)})
    assert not found, f"{module} names {found}; ask the SAE instead (see workbench/saes/base.py)"


def test_an_architecture_must_implement_the_whole_interface():
    class Partial(BaseSAE):
        def flops_per_token(self, training=False):
            return 0

    with pytest.raises(TypeError, match="abstract"):
        Partial(ARCHITECTURES["topk"][0](d_in=D, d_sae=F))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_forward_returns_the_contracts_output(arch):
    sae = small_sae(arch).train()
    x_BD = data()
    out = sae(x_BD, dead_mask=torch.zeros(F, dtype=torch.bool))
    assert isinstance(out, SAEOutput) and isinstance(out.code, Code)
    assert out.recon_BD.shape == x_BD.shape and out.code.dense().shape == (48, F)
    assert out.losses and all(t.ndim == 0 for t in out.losses.values())
    loss = sum(out.losses.values())
    assert loss.requires_grad
    loss.backward()
    assert sae.W_dec.grad is not None and sae.W_enc.grad is not None
    assert all(isinstance(t, torch.Tensor) for t in out.metrics.values())
    assert sae.default_lr() > 0 and 0 < sae.flops_per_token() < sae.flops_per_token(training=True)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_metric_totals_summarize_the_same_in_parts(arch):
    sae = small_sae(arch).eval()
    x_BD = data(n=50)
    whole = sae.summarize_metrics(sae(x_BD).metrics, 50)
    first, second = sae(x_BD[:20]).metrics, sae(x_BD[20:]).metrics
    parts = sae.summarize_metrics({name: first[name] + second[name] for name in first}, 50)
    assert parts.keys() == whole.keys()
    for name in whole:
        assert parts[name] == pytest.approx(whole[name], rel=1e-5), name


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_folding_the_input_scale_reads_raw_activations(arch):
    sae = small_sae(arch).eval()
    x_BD, scale = data(), 0.25
    folded = io.fold_input_scale(sae, scale)
    with torch.no_grad():
        torch.testing.assert_close(folded.encode(x_BD), sae.encode(scale * x_BD), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded(x_BD).recon_BD, sae(scale * x_BD).recon_BD / scale, atol=1e-4, rtol=1e-5)
    assert torch.equal(sae.W_enc, small_sae(arch).W_enc)  # the copy was folded, not the original


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_latent_groups_cover_every_latent(arch):
    groups = small_sae(arch).latent_groups()
    if groups is None:
        return
    assert isinstance(groups, LatentGroups) and groups.kind in ("expert", "level")
    assert groups.group_F.shape == (F,) and groups.group_F.dtype == torch.long
    assert torch.equal(groups.group_F.unique(), torch.arange(groups.n_groups))
    assert (groups.group_F.diff() >= 0).all()  # contiguous blocks, in order


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_save_load_round_trip_and_evaluation(arch, tmp_path):
    sae = small_sae(arch).eval()
    io.save(sae, tmp_path / arch)
    loaded = io.load(tmp_path / arch)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x_BD = data()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_BD).recon_BD, sae(x_BD).recon_BD)
    metrics = evaluate(loaded, [x_BD[:30], x_BD[30:]])
    assert metrics["l0"] > 0 and 0 <= metrics["dead_fraction"] <= 1
