"""stLearn SME on synthetic slides: planted domains, the official weights and smoothing by hand, histology's role."""

import numpy as np
import pytest
from scipy import sparse
from sklearn.metrics import pairwise_distances

from stcore import cluster, images, metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods.stlearn import (
    STLearn,
    scaled_pca,
    sme_neighbours,
    sme_normalize,
    sme_top_weights,
    sme_unit,
    sme_weights,
    stlearn_expression,
)


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=700, n_genes=120, n_domains=4, marker_strength=0.4, seed=0)


def test_recovers_planted_domains(slide, tile_weights):
    adata = slide.copy()
    get_method("stlearn")(n_domains=4, tile_weights=tile_weights, progress=False).run(adata)
    assert adata.obs["domain_stlearn"].nunique() == 4
    assert adata.obsm["X_stlearn"].shape == (adata.n_obs, 30)
    ari = metrics.ari(adata.obs["domain"], adata.obs["domain_stlearn"])
    X, _ = stlearn_expression(slide)
    unsmoothed = metrics.ari(slide.obs["domain"], cluster.kmeans(scaled_pca(X, 30), 4))
    assert ari > 0.85 and ari > unsmoothed + 0.08  # the smoothing, not k-means alone, recovers the layers


def test_lattice_unit_and_neighbourhood(slide):
    """Official unit = sqrt(2) x column slope (50 px on the toy lattice): 18 neighbours within 2.12 spacings."""
    assert sme_unit(slide) == pytest.approx(50 * np.sqrt(2))
    assert sme_unit(slide, unit="corrected") == pytest.approx(100.0)
    no_array = slide.copy()
    del no_array.obs["array_row"], no_array.obs["array_col"]
    assert sme_unit(no_array) == pytest.approx(50 * np.sqrt(2))  # from the nearest-neighbour spacing
    i, j, d = sme_neighbours(slide.obsm["spatial"], 3 * sme_unit(slide))
    degree = np.bincount(i, minlength=slide.n_obs)
    assert degree.max() == 19 and np.all(d[i == j] == 0)  # 18 neighbours + the spot itself


def test_weights_and_smoothing_match_dense_official_computation():
    """W = PD * MD * GD and the top-3 average, against the official dense recipe (sklearn distances + argsort)."""
    ad = synthetic.toy_domains(n_spots=120, n_genes=40, n_domains=3, seed=1)
    X, pcs = stlearn_expression(ad, 15)
    morph = np.random.default_rng(0).normal(size=(ad.n_obs, 8))
    xy = ad.obsm["spatial"]
    radius = 3 * sme_unit(ad)
    i, j, d = sme_neighbours(xy, radius)
    T = sme_top_weights(i, j, sme_weights(i, j, morphology=morph, pcs=pcs), d, ad.n_obs, 3)
    pd_ = (pairwise_distances(xy) < radius).astype(float)
    md = np.clip(1 - pairwise_distances(morph, metric="cosine"), 0, None)
    gd = 1 - pairwise_distances(pcs, metric="correlation")
    W = pd_ * md * gd
    dense = X.toarray()
    expected = np.empty_like(dense)
    for r in range(ad.n_obs):
        top = W[r].argsort()[-3:]
        tilde = (W[r, top, None] * dense[top]).sum(0) / W[r, top].sum()
        expected[r] = np.where(tilde == 0, dense[r], (dense[r] + tilde) / 2)
    assert np.allclose(sme_normalize(X, T).toarray(), expected, atol=1e-5)
    sparse_w = sparse.csr_matrix((sme_weights(i, j, morphology=morph, pcs=pcs), (i, j)), shape=W.shape).toarray()
    assert np.allclose(sparse_w, W, atol=1e-10)
    assert np.allclose(T.diagonal() > 0, True)  # each spot is among its own top three


def test_physical_distance_keeps_self_and_five_nearest(slide):
    i, j, d = sme_neighbours(slide.obsm["spatial"], 3 * sme_unit(slide))
    T = sme_top_weights(i, j, sme_weights(i, j, weights="physical_distance"), d, slide.n_obs, 6)
    assert np.all(np.diff(T.indptr) == 6) and np.allclose(T.data, 1 / 6)
    rows, cols = T.nonzero()
    dist = np.linalg.norm(slide.obsm["spatial"][rows] - slide.obsm["spatial"][cols], axis=1)
    interior = np.bincount(i, minlength=slide.n_obs)[rows] == 19
    assert np.all(T.diagonal() > 0) and dist[interior].max() == pytest.approx(100.0)


def test_histology_enters_through_morphology(slide, tile_weights, monkeypatch):
    method = STLearn(n_domains=4, tile_weights=tile_weights, progress=False)
    other = slide.copy()
    img = other.uns["spatial"]["toy"]["images"]["hires"]
    other.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])
    m1, m2 = method.morphology(slide), method.morphology(other)
    assert m1.shape == (slide.n_obs, 50) and not np.allclose(m1, m2)
    _, pcs = stlearn_expression(slide)
    T1, T2 = method.smoothing_matrix(slide, pcs, m1), method.smoothing_matrix(slide, pcs, m2)
    assert abs(T1 - T2).sum() > 1.0
    # without histology the image is never read: no uns["spatial"], and the tile encoder is not called
    bare = slide.copy()
    del bare.uns["spatial"]
    monkeypatch.setattr(images, "slide_tile_features", lambda *a, **k: pytest.fail("image read"))
    no_image = STLearn(n_domains=4, histology=False)
    assert no_image.weights_used == "weights_matrix_pd_gd"
    no_image.run(bare)
    assert metrics.ari(bare.obs["domain"], bare.obs["domain_stlearn"]) > 0.8


def test_deterministic(slide):
    a, b = slide.copy(), slide.copy()
    STLearn(n_domains=4, histology=False, seed=3).run(a)
    STLearn(n_domains=4, histology=False, seed=3).run(b)
    assert np.array_equal(a.obs["domain_stlearn"], b.obs["domain_stlearn"])


def test_errors(slide):
    with pytest.raises(ValueError, match="weights="):
        STLearn(weights="gene_expression_correlation")
    with pytest.raises(ValueError, match="platform"):
        STLearn(platform="Slide-seq")
    with pytest.raises(ValueError, match="clustering"):
        STLearn(clustering="gmm")
    with pytest.raises(ValueError, match="n_domains"):
        STLearn(n_domains=None)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        STLearn(n_domains=5000, histology=False).run(slide.copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="uns\\['spatial'\\]"):
        STLearn(n_domains=4).run(bare)
    logged = slide.copy()
    logged.X = np.log1p(logged.X.toarray())
    with pytest.raises(ValueError, match="raw counts"):
        STLearn(n_domains=4, histology=False).run(logged)
    no_xy = slide.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match="obsm"):
        STLearn(n_domains=4, histology=False).run(no_xy)
