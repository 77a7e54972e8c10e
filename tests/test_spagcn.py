"""SpaGCN on synthetic slides with planted domains, and where the histology enters."""

import numpy as np
import pytest
import torch

from stcore import graphs, metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods.spagcn import SpaGCN, SpaGCNModel, spagcn_expression


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=700, n_genes=120, n_domains=4, marker_strength=1.0, seed=0)


def test_recovers_planted_domains(slide):
    adata = slide.copy()
    model = get_method("spagcn")(n_domains=4, n_pcs=20, seed=0, progress=False)
    model.run(adata)
    assert adata.obs["domain_spagcn"].nunique() == 4
    assert metrics.ari(adata.obs["domain"], adata.obs["domain_spagcn"]) > 0.8
    assert adata.obsm["X_spagcn"].shape == (adata.n_obs, 20)
    assert len(model.history_) <= 200 and "kl" in model.history_.terms


def test_neighbours_contribute_p(slide):
    """l is chosen so that neighbours add p = 0.5 to each spot's own weight (the paper's rule)."""
    method = SpaGCN(n_domains=4)
    points = method.graph_points(slide)
    w, l = method.adjacency(points)
    row_sums = torch.sparse.mm(w, torch.ones(slide.n_obs, 1)).numpy().ravel()
    assert row_sums.mean() - 1 == pytest.approx(0.5, abs=0.011)
    dense = np.exp(-((points[:, None] - points[None]) ** 2).sum(-1) / (2 * l**2))
    assert np.abs(w.to_dense().numpy() - dense).max() < 2e-4  # sparse truncation error


def test_histology_changes_the_graph(slide):
    method = SpaGCN(n_domains=4)
    with_image = method.graph_points(slide)
    assert with_image.shape == (slide.n_obs, 3)
    flat = slide.copy()
    img = flat.uns["spatial"]["toy"]["images"]["hires"]
    flat.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])  # another image
    other = method.graph_points(flat)
    assert not np.allclose(with_image[:, 2], other[:, 2])
    w1, _ = method.adjacency(with_image)
    w2, _ = method.adjacency(other)
    assert not torch.allclose(w1.to_dense(), w2.to_dense())
    no_image = SpaGCN(n_domains=4, histology=False).graph_points(slide)
    assert no_image.shape == (slide.n_obs, 2)


def test_colour_coordinate_follows_domains(slide):
    """The histology coordinate separates domains that differ in colour and has the spots' spatial spread."""
    z = SpaGCN(n_domains=4).graph_points(slide)[:, 2]
    xy = slide.obsm["spatial"]
    assert z.std() == pytest.approx(max(xy[:, 0].std(), xy[:, 1].std()), rel=1e-6)
    means = [z[slide.obs["domain"] == d].mean() for d in slide.obs["domain"].cat.categories]
    assert np.ptp(means) > z.std()


def test_sparse_graph_scales_linearly():
    pts = np.random.default_rng(0).random((20_000, 2)) * 14_000
    l = graphs.search_bandwidth(pts, 0.5)
    edge_index, _ = graphs.gaussian_kernel_graph(pts, l)
    assert edge_index.shape[1] < 60 * 20_000


def test_errors(slide):
    with pytest.raises(ValueError, match="n_domains"):
        SpaGCN(n_domains=None)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        SpaGCN(n_domains=5000).run(slide.copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError):
        SpaGCN(n_domains=4).run(bare)



@pytest.mark.parametrize("train_centroids", [False, True])
def test_centroids_stay_fixed_as_in_the_official_code_unless_asked(slide, train_centroids):
    method = SpaGCN(n_domains=4, histology=False, epochs=5, tol=0.0, seed=0, train_centroids=train_centroids)
    x = torch.as_tensor(spagcn_expression(slide, n_pcs=10), dtype=torch.float32)
    model = SpaGCNModel(10, 10, method.adjacency(method.graph_points(slide))[0])
    initial, initialise = {}, model.init_centroids

    def recording_init(x_, labels):
        initialise(x_, labels)
        initial["mu"] = model.mu.detach().clone()

    model.init_centroids = recording_init
    method._train(model, x, 1.0, 5, False)
    assert torch.equal(model.mu.detach(), initial["mu"]) is not train_centroids
