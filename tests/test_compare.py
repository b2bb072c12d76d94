"""Seed-stability matching (Paulo & Belrose): cosines, the Hungarian bijections, the AND rule, the
Equal and max-cosine variants, checked against brute force and hand-built dictionaries; and frontier
interpolation checked against hand-computed values."""
import copy
import itertools

import numpy as np
import pytest
import torch

from workbench.eval.compare import (cosine_matrix, encoder_directions, interpolate_frontier, match_directions,
                                    match_latents, threshold_sweep)
from workbench.saes import build_sae, make_config


def _sae(arch, seed=0, d_in=16, d_sae=24):
    fields = {"topk": {"k": 4}}.get(arch, {})
    sae = build_sae(make_config(arch, d_in=d_in, d_sae=d_sae, seed=seed, **fields))
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # untie encoder from decoder so that the two matchings are independent
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return sae


def _permuted(sae, perm):
    """The same SAE with latent j of the copy being latent perm[j] of ``sae``, rows rescaled."""
    out = copy.deepcopy(sae)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name == "W_enc":
                p.copy_(sae.W_enc[:, perm] * (torch.rand(len(perm), generator=gen) + 0.5))
            elif name == "W_dec":
                p.copy_(sae.W_dec[perm] * (torch.rand(len(perm), 1, generator=gen) + 0.5))
            elif p.shape == (sae.cfg.d_sae,):
                p.copy_(getattr(sae, name)[perm])
    return out


def _basis(*rows, d=6):
    out = torch.zeros(len(rows), d)
    for i, row in enumerate(rows):
        for axis, value in row.items():
            out[i, axis] = value
    return out


def test_cosine_matrix_matches_brute_force_in_any_block_size():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(9, 5, generator=gen)
    a[3] = 0  # a dead row: cosine 0, as the authors' nan_to_num gives
    expected = np.array([[0.0 if not a[i].any() else
                          float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) for j in range(9)] for i in range(7)])
    for block in (1, 3, 4096):
        np.testing.assert_allclose(cosine_matrix(a, b, block_rows=block), expected, atol=1e-6)


@pytest.mark.parametrize("arch", ["relu", "topk", "gated"])
def test_a_permuted_copy_is_fully_shared_and_the_permutation_is_recovered(arch):
    sae = _sae(arch)
    perm = torch.randperm(sae.cfg.d_sae, generator=torch.Generator().manual_seed(3))
    match = match_latents(sae, _permuted(sae, perm))
    inverse = np.argsort(perm.numpy())  # a's latent i is the copy's latent inverse[i]
    np.testing.assert_array_equal(match.enc_match_F, inverse)
    np.testing.assert_array_equal(match.dec_match_F, inverse)
    np.testing.assert_allclose(match.enc_cos_F, 1.0, atol=1e-5)
    np.testing.assert_allclose(match.dec_cos_F, 1.0, atol=1e-5)
    assert match.fraction_shared() == 1.0 and match.fraction_shared_equal() == 1.0
    assert match.fraction_equal() == 1.0


def test_gated_encoder_rows_are_the_gate_directions():
    sae = _sae("gated")
    torch.testing.assert_close(encoder_directions(sae), sae.W_enc.detach().t())
    assert encoder_directions(sae).shape == (sae.cfg.d_sae, sae.cfg.d_in)


def test_independent_random_saes_share_almost_nothing():
    a, b = _sae("topk", seed=0, d_in=64, d_sae=128), _sae("topk", seed=1, d_in=64, d_sae=128)
    match = match_latents(a, b)
    assert match.fraction_shared() == 0.0
    assert match.dec_cos_F.mean() < 0.35, match.dec_cos_F.mean()  # random 64-d directions
    assert match.fraction_equal() < 0.05


def test_hungarian_maximises_total_cosine_like_brute_force():
    gen = torch.Generator().manual_seed(5)
    for trial in range(5):
        enc_a, dec_a, enc_b, dec_b = (torch.randn(6, 3, generator=gen) for _ in range(4))
        match = match_directions(enc_a, dec_a, enc_b, dec_b)
        for ours_F, ours_cos, x, y in [(match.enc_match_F, match.enc_cos_F, enc_a, enc_b),
                                       (match.dec_match_F, match.dec_cos_F, dec_a, dec_b)]:
            cos = cosine_matrix(x, y)
            best = max(sum(cos[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6)))
            assert sorted(ours_F) == list(range(6))  # a bijection
            np.testing.assert_allclose(ours_cos.sum(), best, atol=1e-5)
            np.testing.assert_allclose(ours_cos, cos[np.arange(6), ours_F])
            np.testing.assert_allclose(match.enc_max_cos_F if x is enc_a else match.dec_max_cos_F,
                                       cos.max(1))


def test_shared_needs_both_encoder_and_decoder_above_threshold():
    eye = _basis({0: 1}, {1: 1}, {2: 1})
    enc_b = _basis({0: 1}, {1: 0.6, 3: 0.8}, {2: 1})  # latent 1 reads a different direction: cos 0.6
    dec_b = _basis({0: 1}, {1: 1}, {2: 0.8, 4: 0.6})  # latent 2 writes one at cos 0.8
    match = match_directions(eye, eye, enc_b, dec_b)
    np.testing.assert_allclose(match.enc_cos_F, [1, 0.6, 1], atol=1e-6)
    np.testing.assert_allclose(match.dec_cos_F, [1, 1, 0.8], atol=1e-6)
    np.testing.assert_array_equal(match.shared_F(0.7), [True, False, True])
    assert match.fraction_shared(0.7) == pytest.approx(2 / 3)
    assert match.fraction_shared(0.9) == pytest.approx(1 / 3)  # the AND drops latent 2 as well
    assert match.fraction_shared(0.5) == 1.0


def test_main_number_does_not_need_the_two_matchings_to_agree_but_equal_does():
    eye = _basis({0: 1}, {1: 1}, {2: 1})
    swapped = _basis({0: 1}, {2: 1}, {1: 1})  # b's decoder lists latents 1 and 2 the other way round
    match = match_directions(eye, eye, eye, swapped)
    np.testing.assert_array_equal(match.enc_match_F, [0, 1, 2])
    np.testing.assert_array_equal(match.dec_match_F, [0, 2, 1])
    np.testing.assert_array_equal(match.equal_F, [True, False, False])
    assert match.fraction_shared() == 1.0
    assert match.fraction_shared_equal() == pytest.approx(1 / 3)
    assert match.fraction_equal() == pytest.approx(1 / 3)


def test_max_cosine_variant_counts_latents_the_bijection_must_pair_badly():
    a = _basis({0: 1}, {0: 1, 1: 0.1}, {2: 1})  # a's latents 0 and 1 both resemble b's latent 0
    b = _basis({0: 1}, {1: 1}, {2: 1})
    match = match_directions(a, a, b, b)
    cos_11 = 0.1 / np.sqrt(1.01)
    np.testing.assert_allclose(match.dec_cos_F, [1, cos_11, 1], atol=1e-6)
    np.testing.assert_allclose(match.dec_max_cos_F, [1, 1 / np.sqrt(1.01), 1], atol=1e-6)
    assert match.fraction_shared() == pytest.approx(2 / 3)
    assert match.fraction_shared_max_cos() == 1.0


def test_threshold_sweep_applies_each_rule_at_each_threshold():
    eye = _basis({0: 1}, {1: 1}, {2: 1}, {3: 1})
    enc_b = _basis({0: 1}, {1: 0.6, 4: 0.8}, {3: 1}, {2: 1})  # latents 2, 3 swapped on the encoder
    dec_b = _basis({0: 0.8, 5: 0.6}, {1: 1}, {2: 1}, {3: 1})
    sweep = threshold_sweep(match_directions(eye, eye, enc_b, dec_b), [0.0, 0.5, 0.7, 0.9, 1.0])
    np.testing.assert_allclose(sweep.hungarian_T, [1, 1, 0.75, 0.5, 0])
    np.testing.assert_allclose(sweep.equal_T, [0.5, 0.5, 0.25, 0, 0])
    np.testing.assert_allclose(sweep.max_cos_T, [1, 1, 0.75, 0.5, 0])
    default = threshold_sweep(match_directions(eye, eye, enc_b, dec_b))
    assert len(default.thresholds_T) == 21 and default.thresholds_T[14] == pytest.approx(0.7)
    assert default.hungarian_T[14] == 0.75


def test_mismatched_shapes_are_refused_with_both_shapes_named():
    with pytest.raises(ValueError, match="d_sae=24 and d_in=16, d_sae=32"):
        match_latents(_sae("relu"), _sae("relu", d_sae=32))
    with pytest.raises(ValueError, match=r"\(3, 4\), \(3, 5\)"):
        match_directions(torch.ones(3, 4), torch.ones(3, 4), torch.ones(3, 5), torch.ones(3, 4))


def test_interpolate_frontier_is_linear_in_log_x_and_nan_outside_the_sweep():
    l0, score = [40.0, 2.5, 10.0], [0.9, 0.5, 0.7]  # unsorted, as a dict of runs gives them
    got = interpolate_frontier(l0, score, [2.5, 5.0, 10.0, 20.0, 1.0, 50.0])
    # log 5 is halfway between log 2.5 and log 10; log 20 halfway between log 10 and log 40
    np.testing.assert_allclose(got[:4], [0.5, 0.6, 0.7, 0.8])
    assert np.isnan(got[4]) and np.isnan(got[5])
    np.testing.assert_allclose(interpolate_frontier(l0, score, 6.25, log_x=False), [0.5 + 0.2 * 3.75 / 7.5])
    with pytest.raises(ValueError, match="positive x"):
        interpolate_frontier([0.0, 1.0], [1.0, 2.0], 0.5)
