"""DeepST on synthetic slides with planted domains, where the histology enters, and its pieces by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

from stcore import graphs, metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods.deepst import (
    DeepST,
    DeepSTModel,
    augment_expression,
    augmentation_weights,
    graph_reconstruction_loss,
    leiden_scan,
)


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=400, n_genes=120, n_domains=4, marker_strength=1.0, seed=0)


FAST = {"pre_epochs": 60, "epochs": 20, "tile_epochs": 1, "tile_latent": 16, "image_pcs": 10, "progress": False}


def test_recovers_planted_domains(slide):
    adata = slide.copy()
    method = get_method("deepst")(n_domains=4, histology=False, seed=0, **FAST)
    method.run(adata)
    assert adata.obs["domain_deepst"].nunique() == 4
    assert metrics.ari(adata.obs["domain"], adata.obs["domain_deepst"]) > 0.8
    assert adata.obsm["X_deepst"].shape == (adata.n_obs, 28)            # [f (20) || mu (8)]
    history = method.history_
    assert len(history) == 80 and np.isnan(history.terms["dec_kl"][0]) and history.terms["dec_kl"][-1] >= 0
    assert history.terms["mse"][-1] < history.terms["mse"][0]           # the autoencoder learns


def test_histology_enters_the_augmentation_weights(slide):
    method = DeepST(n_domains=4, seed=0, **FAST)
    x_img, _ = method.prepare(slide)
    w_img, u = method.weights_, method.image_features_
    assert method.image_features_.shape == (slide.n_obs, 10)
    flipped = slide.copy()
    img = flipped.uns["spatial"]["toy"]["images"]["hires"]
    flipped.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])  # another image
    x_flip, _ = method.prepare(flipped)
    assert abs(method.weights_ - w_img).max() > 1e-3 and not torch.allclose(x_img, x_flip)
    # without histology the image is never read, and W = PD * GC; with it W = PD * GC * max(0, cos)
    bare = slide.copy()
    del bare.uns["spatial"]
    plain = DeepST(n_domains=4, histology=False, **FAST)
    plain.prepare(bare)
    assert plain.image_features_ is None
    i, j = plain.weights_.nonzero()
    cos = (u[i] * u[j]).sum(1) / np.linalg.norm(u[i], axis=1) / np.linalg.norm(u[j], axis=1)
    expected = np.asarray(plain.weights_[i, j]).ravel() * np.maximum(cos, 0)
    assert np.allclose(np.asarray(w_img[i, j]).ravel(), expected, atol=1e-6)


def test_augmentation_matches_the_dense_official_rule():
    """W = PD * GC * MS on the 30 nearest spots; x' = x + 0.3 * mean of ranks 2-4 of the row, weighted."""
    rng = np.random.default_rng(1)
    n = 80
    coords, counts = rng.random((n, 2)) * 1000, rng.poisson(3, (n, 40)).astype(float)
    img = rng.normal(size=(n, 5))
    W = augmentation_weights(coords, sparse.csr_matrix(counts), img, spatial_k=30)
    # dense, as the official code computes it
    d = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    pd_ = np.zeros((n, n))
    for r in range(n):
        pd_[r, np.argsort(d[r])[1:31]] = 1
    gc = np.corrcoef(counts)
    norms = np.linalg.norm(img, axis=1)
    ms = np.maximum(img @ img.T / np.outer(norms, norms), 0)
    dense = pd_ * gc * ms
    assert np.allclose(W.toarray(), dense, atol=1e-10)
    expected = counts.copy()
    for r in range(n):
        top = dense[r].argsort()[-4:][:3]
        w = dense[r, top]
        expected[r] += 0.3 * (w / w.sum()) @ counts[top] if w.sum() > 0 else 0
    got = augment_expression(sparse.csr_matrix(counts), W, neighbour_k=4, adjacent_weight=0.3).toarray()
    assert np.allclose(got, expected)


def test_sparse_graph_loss_equals_the_dense_official_loss():
    torch.manual_seed(0)
    n = 50
    edge_index = graphs.knn_graph(np.random.default_rng(0).random((n, 2)), 4)
    z = torch.randn(n, 6)
    mask = torch.as_tensor(graphs.to_scipy(edge_index, n).toarray()) + torch.eye(n)
    norm = n * n / float(2 * (n * n - edge_index.shape[1]))
    dense = norm * F.binary_cross_entropy_with_logits(torch.sigmoid(z @ z.T) * mask, mask)
    sparse_loss = graph_reconstruction_loss(z, graphs.add_self_loops(edge_index, n), n, norm)
    assert sparse_loss.item() == pytest.approx(dense.item(), rel=1e-5)
    model = DeepSTModel(30, edge_index, n)
    assert model.norm == pytest.approx(norm)


def test_dec_assignments_and_coarse_resolution_scan():
    model = DeepSTModel(10, graphs.knn_graph(np.random.default_rng(0).random((30, 2)), 3), 30, alpha=0.9)
    model.centres.data = torch.tensor([[0.0] * 28, [1.0] * 28])
    z = torch.zeros(1, 28)
    q = model.soft_assign(z)
    raw = torch.tensor([1.0, (1 + 28 / 0.9) ** -0.95])                   # (1 + d^2/alpha)^(-(alpha+1)/2)
    assert torch.allclose(q, (raw / raw.sum())[None], atol=1e-6)
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.3, (60, 3)) for c in np.eye(3) * 6 + 1])
    grid = np.round(np.arange(2.0, 0.05, -0.05), 2)                    # a shorter scan than the official
    labels, res = leiden_scan(blobs, 3, resolutions=grid, coarse=8)
    _, full_res = leiden_scan(blobs, 3, resolutions=grid, coarse=1)
    assert res == pytest.approx(full_res) and labels.max() + 1 == 3
    assert metrics.ari(np.repeat([0, 1, 2], 60), labels) == 1.0


def test_errors(slide):
    with pytest.raises(ValueError, match="resolution_search"):
        DeepST(resolution_search="grid")
    with pytest.raises(ValueError, match="neighbour_k"):
        DeepST(neighbour_k=1)
    with pytest.raises(ValueError, match="n_domains"):
        DeepST(n_domains=0)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        DeepST(n_domains=5000, **FAST).run(slide.copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="image"):
        DeepST(n_domains=4, **FAST).run(bare)
    nocoords = slide.copy()
    del nocoords.obsm["spatial"]
    with pytest.raises((KeyError, ValueError), match="spatial"):
        DeepST(n_domains=4, histology=False, **FAST).run(nocoords)
    logged = slide.copy()
    logged.X = logged.X * 0.5
    with pytest.raises(ValueError, match="count"):
        DeepST(n_domains=4, histology=False, **FAST).run(logged)
