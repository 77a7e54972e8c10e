"""TESLA: super-pixel imputation checked against the official dense formula, and domains on planted slides."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from stcore import metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods import tesla as T


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=600, n_genes=80, n_domains=4, marker_strength=1.0, seed=0)


def _official_weights(grid, spots, num_nbs, k):
    """The official rule on a dense distance matrix: kNN, global quantile cut-off, (d+0.1)/min, power k."""
    dis = cdist(grid, spots)
    tau = np.quantile(dis, num_nbs / spots.shape[0])
    W = np.zeros_like(dis)
    for i in range(len(grid)):
        order = np.argsort(dis[i])[:num_nbs]
        order = order[dis[i, order] <= tau]
        if len(order):
            d = (dis[i, order] + 0.1) / np.min(dis[i, order] + 0.1)
            W[i, order] = (1 / d**k) / (1 / d**k).sum()
    return W, tau


def test_weights_match_official_dense_rule():
    rng = np.random.default_rng(1)
    spots, grid = rng.random((60, 3)) * 100, rng.random((250, 3)) * 100
    W, tau = T.superpixel_weights(grid, spots, num_nbs=10, k=2)
    W_ref, tau_ref = _official_weights(grid, spots, 10, 2)
    assert tau == pytest.approx(tau_ref, rel=1e-12)
    np.testing.assert_allclose(W.toarray(), W_ref, atol=1e-12)
    assert W.nnz <= 10 * len(grid)                       # sparse: at most num_nbs entries per super-pixel
    assert (np.asarray(W.sum(1)).ravel()[np.diff(W.indptr) > 0] == pytest.approx(1.0))


def test_distance_quantile_is_numpy_quantile():
    rng = np.random.default_rng(2)
    a, b = rng.random((200, 2)), rng.random((40, 2))
    b[:3] = a[:3]                                        # exact zero distances
    for q in (0.0, 0.01, 0.25, 0.9, 1.0):
        assert T.distance_quantile(a, b, q) == pytest.approx(np.quantile(cdist(a, b), q), rel=1e-12, abs=1e-15)


def test_imputation_is_weighted_log_counts(slide):
    sp = T.impute_superpixels(slide, genes=["gene000", "gene001"])
    W = sp.uns["tesla"]["W"]
    logc = np.log1p(slide[:, ["gene000", "gene001"]].X.toarray())
    np.testing.assert_allclose(sp.X.toarray(), W @ logc, rtol=1e-5)
    assert sp.n_obs > 2 * slide.n_obs                    # res = 50 px on a 100-px lattice: ~4 super-pixels per spot
    assert np.all(np.diff(np.unique(sp.obsm["spatial"][:, 0])) % 50 == 0)


def test_grid_and_enlarged_mask():
    mask = np.zeros((100, 100), dtype=bool)
    mask[40:60, 40:60] = True                            # scale 0.1: the square spans 400..600 full-res px
    inner = T.superpixel_grid(mask, 0.1, res=50, enlarge=1.0)
    assert set(np.unique(inner[:, 0])) == {400, 450, 500, 550}
    wider = T.superpixel_grid(mask, 0.1, res=50, enlarge=1.5)
    assert set(np.unique(wider[:, 0])) == {350, 400, 450, 500, 550, 600}


def test_mask_from_image_and_spots(slide):
    mask, scale = T.tissue_mask(slide)
    xy = np.floor(slide.obsm["spatial"] * scale + 0.5).astype(int)
    assert mask[xy[:, 1], xy[:, 0]].all() and not mask.all()
    spots_mask, s2 = T.tissue_mask(slide, "spots")
    xy2 = np.floor(slide.obsm["spatial"] * s2 + 0.5).astype(int)
    assert spots_mask[xy2[:, 1], xy2[:, 0]].all()


def test_meta_gene_and_merge_by_hand():
    import anndata as ad
    sp = ad.AnnData(np.array([[0.0, 2.0], [1.0, 0.0], [2.0, 1.0]]), var=pd.DataFrame(index=["A", "B"]))
    # min-max per gene: A -> 0, .5, 1; B -> 1, 0, .5; top-1 = max, top-2 pooled by min
    np.testing.assert_allclose(T.meta_gene(sp, ["A", "B"], 1), [1.0, 0.5, 1.0])
    np.testing.assert_allclose(T.meta_gene(sp, ["A", "B"], 2), [0.0, 0.0, 0.5])
    labels = np.zeros((6, 6), dtype=int)
    labels[:, 3:] = 1
    labels[0, 5] = 7                                     # a one-pixel cluster inside cluster 1
    merged = T.merge_minor_clusters(labels, threshold=5, radius=1)
    assert merged[0, 5] == 1 and set(np.unique(merged)) == {0, 1}


def test_recovers_planted_domains(slide):
    adata = slide.copy()
    model = get_method("tesla")(n_domains=4, n_bands=5, seed=0, progress=False)
    model.run(adata)
    assert adata.obs["domain_tesla"].nunique() == 4
    assert metrics.ari(adata.obs["domain"], adata.obs["domain_tesla"]) > 0.6
    assert adata.obsm["X_tesla"].shape == (adata.n_obs, 100)
    assert set(model.history_.terms) == {"similarity", "continuity"} and len(model.history_) <= 30
    assert model.superpixels_.obs["domain"].nunique() == 4


def test_histology_enters_the_bands_and_neighbours(slide):
    method = T.TESLA(n_domains=4, n_bands=3)
    raster, sp = method.bands(slide)
    assert raster.shape[0] == 4                          # grey band + 3 expression bands
    other = slide.copy()
    img = other.uns["spatial"]["toy"]["images"]["hires"]
    other.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])  # another image
    grid = sp.obsm["spatial"]
    z_grid, z_spot = T.colour_z(slide, grid)
    z_grid2, z_spot2 = T.colour_z(other, grid)
    assert not np.allclose(z_grid, z_grid2) and not np.allclose(z_spot, z_spot2)
    xy = slide.obsm["spatial"]
    W1, _ = T.superpixel_weights(np.column_stack([grid, z_grid]), np.column_stack([xy, z_spot]))
    W2, _ = T.superpixel_weights(np.column_stack([grid, z_grid2]), np.column_stack([xy, z_spot2]))
    assert (W1 != W2).nnz > 0                            # the image changes which spots a super-pixel borrows from
    raster2, _ = method.bands(other)
    assert not np.isclose(raster[0].sum(), raster2[0].sum())
    bare = slide.copy()
    del bare.uns["spatial"]                              # without histology the image is never read
    raster3, sp3 = T.TESLA(n_domains=4, n_bands=3, histology=False).bands(bare)
    assert raster3.shape[0] == 3 and np.all(sp3.obs["z"] == 0)


def test_errors(slide):
    with pytest.raises(ValueError, match="n_bands"):
        T.TESLA(n_bands=0)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        T.TESLA(n_domains=5000).run(slide.copy())
    with pytest.raises(ValueError, match="power"):
        T.superpixel_weights(np.zeros((3, 2)), np.ones((4, 2)), k=-1)
    with pytest.raises(ValueError, match="same d"):
        T.superpixel_weights(np.zeros((3, 3)), np.ones((4, 2)))
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="uns"):
        T.TESLA(n_domains=4).run(bare)
    shifted = slide.copy()
    shifted.obsm["spatial"] = shifted.obsm["spatial"] * 0.3  # coordinates that miss the tissue in the image
    with pytest.raises(ValueError, match="scale"):
        T.tissue_mask(shifted)
    with pytest.raises(ValueError, match="source"):
        T.tissue_mask(slide, "edges")
    with pytest.raises(KeyError, match="not in adata.var_names"):
        T.impute_superpixels(slide, genes=["NOPE"])
