"""Named sites on tiny random GPT-2, GPT-NeoX, Llama and BERT models built from configs (offline):
each site reads the value its name promises, matched against ``output_hidden_states`` and against the
residual-stream arithmetic of each family; bad names fail with the list of valid ones; hook_site
replaces values and always cleans up."""
from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

from workbench.data.sites import Site, hook_site, resolve_site, valid_sites

N_LAYERS, D, VOCAB = 3, 32, 100
SMALL = dict(num_hidden_layers=N_LAYERS, hidden_size=D, num_attention_heads=2, intermediate_size=64,
             vocab_size=VOCAB, max_position_embeddings=64)

# family -> (model builder, pre-LN?, attn_out module path, mlp_out module path), paths with {} = layer.
FAMILIES = {
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_layer=N_LAYERS, n_embd=D, n_head=2, vocab_size=VOCAB,
                                                n_positions=64, bos_token_id=0, eos_token_id=0)),
             True, "transformer.h.{}.attn", "transformer.h.{}.mlp"),
    "gpt2_bare": (lambda: GPT2Model(GPT2Config(n_layer=N_LAYERS, n_embd=D, n_head=2, vocab_size=VOCAB,
                                               n_positions=64, bos_token_id=0, eos_token_id=0)),
                  True, "h.{}.attn", "h.{}.mlp"),
    "neox": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL)),
             True, "gpt_neox.layers.{}.attention", "gpt_neox.layers.{}.mlp"),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)),
              True, "model.layers.{}.self_attn", "model.layers.{}.mlp"),
    "bert": (lambda: BertModel(BertConfig(**SMALL)),
             False, "encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: spec[0]().eval() for name, spec in FAMILIES.items()}


@pytest.fixture(scope="module")
def ids_SL():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def final_output(model, ids_SL):
    out = model(ids_SL)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def capture(model, site_name, ids_SL):
    values = []
    with torch.no_grad(), hook_site(model, resolve_site(model, site_name), values.append):
        model(ids_SL)
    assert len(values) == 1
    return values[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_sites_match_output_hidden_states(models, ids_SL, family):
    model, pre_ln = models[family], FAMILIES[family][1]
    with torch.no_grad():
        hidden = model(ids_SL, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        assert torch.equal(capture(model, f"resid_pre.{layer}", ids_SL), hidden[layer])
        # Pre-LN models apply their final norm to the last hidden_states entry; resid_post is before it.
        if not (pre_ln and layer == N_LAYERS - 1):
            assert torch.equal(capture(model, f"resid_post.{layer}", ids_SL), hidden[layer + 1])
    if pre_ln:
        assert not torch.allclose(capture(model, f"resid_post.{N_LAYERS - 1}", ids_SL), hidden[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_mlp_sites_read_the_family_submodules(models, ids_SL, family):
    model, (_, _, attn_path, mlp_path) = models[family], FAMILIES[family]
    for layer in range(N_LAYERS):
        for kind, path in (("attn_out", attn_path), ("mlp_out", mlp_path)):
            site = resolve_site(model, f"{kind}.{layer}")
            assert site == Site(f"{kind}.{layer}", path.format(layer), "output", layer)
            plain = []
            handle = model.get_submodule(path.format(layer)).register_forward_hook(
                lambda _m, _a, out: plain.append(out[0] if isinstance(out, tuple) else out))
            try:
                value = capture(model, site.name, ids_SL)
            finally:
                handle.remove()
            assert value.shape == (*ids_SL.shape, D)
            assert torch.equal(value, plain[0])


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_pre_ln_writers_add_up_to_the_residual(models, ids_SL, family):
    """attn_out and mlp_out are what each sublayer adds to the stream: pre + attn + mlp = post."""
    model = models[family]
    for layer in range(N_LAYERS):
        pre, attn, mlp, post = (capture(model, f"{kind}.{layer}", ids_SL)
                                for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)


def test_bert_writers_come_before_the_residual_add_and_layernorm(models, ids_SL):
    model = models["bert"]
    for layer in range(N_LAYERS):
        block = model.encoder.layer[layer]
        pre, attn, mlp, post = (capture(model, f"{kind}.{layer}", ids_SL)
                                for kind in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        with torch.no_grad():
            mid = block.attention.output.LayerNorm(attn + pre)
            torch.testing.assert_close(block.output.LayerNorm(mlp + mid), post, atol=1e-5, rtol=1e-5)


def test_valid_sites_lists_every_kind_and_layer(models):
    for model in models.values():
        assert valid_sites(model) == [f"{kind}.{layer}" for kind in ("resid_pre", "resid_post", "attn_out", "mlp_out")
                                      for layer in range(N_LAYERS)]


def test_unknown_site_lists_the_valid_ones(models):
    with pytest.raises(ValueError) as err:
        resolve_site(models["gpt2"], "resid_mid.1")
    message = str(err.value)
    assert "'resid_mid.1'" in message
    for group in ("resid_pre.0-2", "resid_post.0-2", "attn_out.0-2", "mlp_out.0-2", "transformer.h.2."):
        assert group in message


def test_out_of_range_layer_names_the_layer_count(models):
    with pytest.raises(ValueError, match="layer 7 is out of range.*has 3 layers"):
        resolve_site(models["llama"], "resid_post.7")


def test_raw_module_path_is_a_site(models, ids_SL):
    model = models["bert"]
    site = resolve_site(model, "encoder.layer.1.intermediate")
    assert site == Site("encoder.layer.1.intermediate", "encoder.layer.1.intermediate", "output", 1)
    assert resolve_site(model, "embeddings").layer is None
    plain = []
    handle = model.encoder.layer[1].intermediate.register_forward_hook(lambda _m, _a, out: plain.append(out))
    try:
        value = capture(model, site.name, ids_SL)
    finally:
        handle.remove()
    assert value.shape == (*ids_SL.shape, 64)
    assert torch.equal(value, plain[0])


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_replacement_changes_output_and_identity_does_not(models, ids_SL, family, kind):
    model = models[family]
    site = resolve_site(model, f"{kind}.1")
    direction_D = torch.randn(D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean = final_output(model, ids_SL)
        with hook_site(model, site, lambda x: x.clone()):
            identity = final_output(model, ids_SL)
        # A random direction, not a constant: LayerNorm would erase a shift along all-ones.
        with hook_site(model, site, lambda x: x + direction_D):
            shifted = final_output(model, ids_SL)
        after = final_output(model, ids_SL)
    assert torch.equal(identity, clean)
    assert (shifted - clean).abs().max() > 1e-3
    assert torch.equal(after, clean)


def test_hook_is_removed_when_fn_raises(models, ids_SL):
    model = models["gpt2"]
    for name in ("resid_pre.0", "attn_out.0"):
        site = resolve_site(model, name)
        module = site.module(model)
        # Transformers 5 keeps hooks of its own on blocks (output capturing); ours must be gone.
        hooks_before = dict(module._forward_hooks), dict(module._forward_pre_hooks)

        def fail(_x):
            raise KeyError("boom")

        with pytest.raises(KeyError), hook_site(model, site, fail):
            model(ids_SL)
        assert (dict(module._forward_hooks), dict(module._forward_pre_hooks)) == hooks_before
