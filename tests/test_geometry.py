"""Dictionary geometry: the tiled nearest neighbours equal the full cosine matrix's row maxima and
argmaxes (uneven tiles, a planted duplicate, a zero row, a Switch decoder's F7b/F7c numbers); t-SNE
keeps the rows it says it kept, is seeded, and keeps well-separated clusters apart. A few seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.eval.geometry import nearest_neighbour_cosine, nearest_neighbours, tsne_embedding
from workbench.saes import SwitchConfig, SwitchSAE


def brute_cosines(W_FD: torch.Tensor) -> torch.Tensor:
    """The full (F, F) cosine matrix in float64, the diagonal at -inf."""
    W = W_FD.double()
    norms = W.norm(dim=-1)
    cos_FF = (W @ W.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
    return cos_FF.fill_diagonal_(-float("inf"))


def brute_nn_cosine(W_FD: torch.Tensor) -> torch.Tensor:
    return brute_cosines(W_FD).max(1).values.float()


@pytest.mark.parametrize("tile", [7, 16, 2048])
def test_nearest_neighbour_cosine_matches_full_matrix(tile):
    gen = torch.Generator().manual_seed(0)
    W_FD = torch.randn(50, 12, generator=gen) * torch.rand(50, 1, generator=gen) * 3
    W_FD[31] = 2.5 * W_FD[4]  # a duplicate direction at another norm: cosine 1 for both
    W_FD[17] = 0  # a zero row: cosine 0 with every row
    got = nearest_neighbour_cosine(W_FD, tile=tile)
    expected = brute_nn_cosine(W_FD)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got[4] == pytest.approx(1.0, abs=1e-5) and got[31] == pytest.approx(1.0, abs=1e-5)
    others = torch.ones(50, dtype=torch.bool)
    others[[4, 31]] = False
    assert float(got[others].max()) < 0.99  # nothing else is a duplicate
    assert float(got[17]) == 0.0


@pytest.mark.parametrize("tile", [5, 16, 2048])
def test_nearest_neighbours_index_is_the_argmax(tile):
    gen = torch.Generator().manual_seed(2)
    W_FD = torch.randn(40, 8, generator=gen)
    W_FD[22] = 3 * W_FD[9] + 0.01 * torch.randn(8, generator=gen)  # 9 and 22: each other's neighbour
    nn = nearest_neighbours(W_FD, tile=tile)
    cos_FF = brute_cosines(W_FD)
    assert torch.equal(nn.index, cos_FF.argmax(1))
    assert int(nn.index[9]) == 22 and int(nn.index[22]) == 9
    assert torch.allclose(nn.cosine.double(), cos_FF[torch.arange(40), nn.index], atol=1e-6)


def test_nearest_neighbour_cosine_of_a_switch_decoder():
    """The paper's F7b (mean) and F7c (fraction above 0.9) on a decoder with three planted twins."""
    sae = SwitchSAE(SwitchConfig(d_in=32, d_sae=96, n_experts=4, k=4, seed=3))
    with torch.no_grad():
        for a, b in [(0, 30), (1, 60), (2, 90)]:  # expert 0's latents copied into experts 1, 2, 3
            sae.W_dec[b] = sae.W_dec[a]
    nn_F = nearest_neighbour_cosine(sae.W_dec, tile=10)
    expected = brute_nn_cosine(sae.W_dec.detach())
    assert float(nn_F.mean()) == pytest.approx(float(expected.mean()), abs=1e-6)
    assert int((nn_F > 0.9).sum()) == 6 == int((expected > 0.9).sum())


def test_nearest_neighbour_cosine_rejects_a_single_row():
    with pytest.raises(ValueError, match="at least 2 rows"):
        nearest_neighbour_cosine(torch.ones(1, 4))


def clusters(n_per: int = 20, n_clusters: int = 3, d: int = 10) -> tuple[torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(d)[:n_clusters] * 20
    labels = np.repeat(np.arange(n_clusters), n_per)
    return centres[labels] + torch.randn(len(labels), d, generator=gen), labels


def test_tsne_embedding_keeps_clusters_apart():
    X_ND, labels = clusters()
    emb = tsne_embedding(X_ND, seed=0)
    assert emb.xy_N2.shape == (60, 2) and np.array_equal(emb.rows_N, np.arange(60))
    dist = np.linalg.norm(emb.xy_N2[:, None] - emb.xy_N2[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert np.array_equal(labels[dist.argmin(1)], labels)  # every nearest neighbour is in its cluster


def test_tsne_embedding_subsample_is_seeded_and_reported():
    X_ND, _ = clusters()
    a = tsne_embedding(X_ND, 25, seed=4)
    b = tsne_embedding(X_ND, 25, seed=4)
    c = tsne_embedding(X_ND, 25, seed=5)
    assert len(a.rows_N) == 25 == len(set(a.rows_N.tolist()))
    assert np.all(np.diff(a.rows_N) > 0) and a.rows_N.max() < 60
    np.testing.assert_array_equal(a.rows_N, b.rows_N)
    np.testing.assert_allclose(a.xy_N2, b.xy_N2)
    assert not np.array_equal(a.rows_N, c.rows_N)
    assert np.array_equal(tsne_embedding(X_ND, 1000, seed=0).rows_N, np.arange(60))  # more than F: all


def test_tsne_embedding_rejects_too_few_points():
    X_ND, _ = clusters()
    with pytest.raises(ValueError, match="n_points=3"):
        tsne_embedding(X_ND, 3)
