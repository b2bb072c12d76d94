"""The sparse encode/decode paths of TopK and Switch give the same outputs, losses and parameter
gradients as a plain-autograd dense computation of the same model."""
from __future__ import annotations

import pytest
import torch

from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE
from workbench.saes import topk as topk_module
from workbench.saes.base import sparse_decode, sparse_encode

ATOL = 1e-5
RTOL = 1e-5


def _data(d_in: int, n: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen) + 0.3


def _perturb_(sae: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter off its (tied, zero-bias) initialisation so each gradient path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _grads(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


def _assert_close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _switch_dense_reference(sae: SwitchSAE, x_BD: torch.Tensor):
    """The Switch SAE paper's code path: all M latents, masked to the chosen expert's block."""
    cfg = sae.cfg
    probs_BE = torch.softmax((x_BD - sae.b_router) @ sae.W_router, dim=-1)
    expert_B = probs_BE.argmax(-1)
    z_BF = torch.relu((x_BD - sae.b_dec) @ sae.W_enc)
    p_top_B = probs_BE.gather(1, expert_B[:, None]).squeeze(1)
    block_B = torch.arange(cfg.d_sae) // cfg.expert_width
    mask_BF = (block_B[None, :] == expert_B[:, None]).to(x_BD.dtype) * p_top_B[:, None]
    masked_BF = z_BF * mask_BF
    vals_BK, idx_BK = masked_BF.topk(cfg.k, dim=-1)
    dense_BF = torch.zeros_like(masked_BF).scatter(1, idx_BK, vals_BK)
    recon_BD = dense_BF @ sae.W_dec + sae.b_dec
    mse = (x_BD - recon_BD).pow(2).mean()
    f_E = torch.bincount(expert_B, minlength=cfg.n_experts).to(x_BD.dtype) / x_BD.shape[0]
    lb = cfg.lb_alpha * cfg.n_experts * (f_E * probs_BE.mean(0)).sum()
    return recon_BD, dense_BF, {"mse": mse, "load_balance": lb}


@pytest.mark.parametrize("n_experts,k", [(1, 4), (4, 3), (8, 5)])
def test_switch_matches_dense_masked_reference(n_experts, k):
    sae = SwitchSAE(SwitchConfig(d_in=16, d_sae=64, k=k, n_experts=n_experts))
    _perturb_(sae)
    x_BD = _data(16)

    out = sae(x_BD)
    sum(out.losses.values()).backward()
    grads = _grads(sae)

    sae.zero_grad(set_to_none=True)
    recon_ref, dense_ref, losses_ref = _switch_dense_reference(sae, x_BD)
    sum(losses_ref.values()).backward()
    grads_ref = _grads(sae)

    _assert_close(out.recon_BD, recon_ref, "recon")
    _assert_close(out.code.dense(), dense_ref, "dense code")
    assert set(out.losses) == set(losses_ref)
    for name in losses_ref:
        _assert_close(out.losses[name], losses_ref[name], f"loss {name}")
    assert set(grads) == set(grads_ref) == {"W_enc", "W_dec", "b_dec", "W_router", "b_router"}
    for name in grads_ref:
        _assert_close(grads[name], grads_ref[name], f"grad {name}")


def _topk_dense_reference(sae: TopKSAE, x_BD: torch.Tensor, dead_F: torch.Tensor | None = None):
    cfg = sae.cfg
    pre_BF = (x_BD - sae.b_dec) @ sae.W_enc
    if cfg.latent_bias:
        pre_BF = pre_BF + sae.b_enc
    vals_BK, idx_BK = pre_BF.topk(cfg.k, dim=-1)
    dense_BF = torch.zeros_like(pre_BF).scatter(1, idx_BK, vals_BK.relu())
    recon_BD = dense_BF @ sae.W_dec + sae.b_dec
    total_var = (x_BD - x_BD.mean(0)).pow(2).sum(-1).mean()
    losses = {"fvu": (x_BD - recon_BD).pow(2).sum(-1).mean() / total_var}
    if dead_F is not None:
        k_aux = min(cfg.k_aux_eff, int(dead_F.sum()))
        aux_vals_BK, aux_idx_BK = pre_BF.masked_fill(~dead_F, float("-inf")).topk(k_aux, dim=-1)
        aux_BF = torch.zeros_like(pre_BF).scatter(1, aux_idx_BK, aux_vals_BK.relu())
        err_BD = (x_BD - recon_BD).detach()
        err_var = (err_BD - err_BD.mean(0)).pow(2).sum(-1).mean()
        aux = (err_BD - aux_BF @ sae.W_dec).pow(2).sum(-1).mean() / err_var
        losses["auxk"] = cfg.auxk_coef * aux
    return recon_BD, dense_BF, losses


@pytest.mark.parametrize("chunk_rows", [None, 7])
@pytest.mark.parametrize("n_dead", [0, 20])
@pytest.mark.parametrize("latent_bias", [False, True])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_topk_matches_dense_reference(k, latent_bias, n_dead, chunk_rows, monkeypatch):
    """Also with dead latents (the AuxK path) and with the encoder run in chunks of 7 rows."""
    if chunk_rows is not None:
        monkeypatch.setattr(topk_module, "_CHUNK_ELEMENTS", chunk_rows * 64)
    sae = TopKSAE(TopKConfig(d_in=16, d_sae=64, k=k, k_aux=8, latent_bias=latent_bias))
    _perturb_(sae)
    x_BD = _data(16)
    dead_F = torch.zeros(64, dtype=torch.bool)
    dead_F[torch.randperm(64, generator=torch.Generator().manual_seed(2))[:n_dead]] = True

    out = sae(x_BD, dead_mask=dead_F)
    sum(out.losses.values()).backward()
    grads = _grads(sae)

    sae.zero_grad(set_to_none=True)
    recon_ref, dense_ref, losses_ref = _topk_dense_reference(sae, x_BD, dead_F if n_dead else None)
    sum(losses_ref.values()).backward()
    grads_ref = _grads(sae)

    _assert_close(out.recon_BD, recon_ref, "recon")
    _assert_close(out.code.dense(), dense_ref, "dense code")
    assert set(out.losses) == {"fvu", "auxk"}
    _assert_close(out.losses["fvu"], losses_ref["fvu"], "fvu")
    _assert_close(out.losses["auxk"], losses_ref.get("auxk", torch.zeros(())), "auxk")
    expected = {"W_enc", "W_dec", "b_dec"} | ({"b_enc"} if latent_bias else set())
    assert set(grads) == set(grads_ref) == expected
    for name in grads_ref:
        _assert_close(grads[name], grads_ref[name], f"grad {name}")


def test_sparse_functions_match_autograd_on_repeated_and_unused_latents():
    """Latents picked by many tokens, by none, and values clamped to zero by the ReLU."""
    gen = torch.Generator().manual_seed(3)
    B, D, F_, K = 40, 8, 12, 3
    x_BD = torch.randn(B, D, generator=gen)
    b_pre = torch.randn(D, generator=gen, requires_grad=True)
    W_enc = torch.randn(D, F_, generator=gen, requires_grad=True)
    b_enc = torch.randn(F_, generator=gen, requires_grad=True)
    W_dec = torch.randn(F_, D, generator=gen, requires_grad=True)
    idx_BK = torch.randint(0, 6, (B, K), generator=gen)  # latents 6..11 never picked
    target_BD = torch.randn(B, D, generator=gen)

    def loss_of(acts_BK, recon_BD):
        return (recon_BD - target_BD).pow(2).sum() + acts_BK.sum()

    with torch.no_grad():
        pre_BF = (x_BD - b_pre) @ W_enc + b_enc
        acts_BK = pre_BF.gather(1, idx_BK).relu()
    a = sparse_encode(x_BD, b_pre, W_enc, b_enc, acts_BK, idx_BK)
    loss_of(a, sparse_decode(a, idx_BK, W_dec)).backward()
    got = [t.grad.clone() for t in (b_pre, W_enc, b_enc, W_dec)]
    for t in (b_pre, W_enc, b_enc, W_dec):
        t.grad = None

    pre_BF = (x_BD - b_pre) @ W_enc + b_enc
    a_ref = pre_BF.gather(1, idx_BK).relu()
    dense_BF = torch.zeros(B, F_).scatter_add(1, idx_BK, a_ref)
    loss_of(a_ref, dense_BF @ W_dec).backward()
    for name, g, t in zip(("b_pre", "W_enc", "b_enc", "W_dec"), got, (b_pre, W_enc, b_enc, W_dec)):
        _assert_close(g, t.grad, f"grad {name}")
    assert torch.count_nonzero(got[1][:, 6:]) == 0 and torch.count_nonzero(got[3][6:]) == 0


def test_sparse_decode_output_can_be_modified_in_place():
    """sparse_decode's result is an ordinary tensor: an in-place add keeps the gradients right."""
    gen = torch.Generator().manual_seed(4)
    W_dec = torch.randn(10, 4, generator=gen, requires_grad=True)
    acts_BK = torch.rand(6, 3, generator=gen, requires_grad=True)
    idx_BK = torch.randint(0, 10, (6, 3), generator=gen)
    bias = torch.randn(4, generator=gen)

    out_BD = sparse_decode(acts_BK, idx_BK, W_dec)
    assert not out_BD._is_view()
    out_BD += bias
    out_BD.pow(2).sum().backward()
    got = (W_dec.grad.clone(), acts_BK.grad.clone())
    W_dec.grad = acts_BK.grad = None

    dense_BF = torch.zeros(6, 10).scatter_add(1, idx_BK, acts_BK)
    (dense_BF @ W_dec + bias).pow(2).sum().backward()
    _assert_close(got[0], W_dec.grad, "grad W_dec")
    _assert_close(got[1], acts_BK.grad, "grad acts")
