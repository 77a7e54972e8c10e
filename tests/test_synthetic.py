"""Simulators: planted answers are where they should be."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import KNeighborsRegressor

from stcore.data import synthetic
from stcore.data.synthetic import grid_spots, pseudo_spots, toy_domains, toy_multiome, toy_pair
from stcore.images import colour_features, image_and_scale


def _dense(X):
    return np.asarray(X.todense()) if sp.issparse(X) else np.asarray(X)


def _lognorm(X):
    X = _dense(X).astype(float)
    return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e3)


def _codes(adata):
    return adata.obs["domain"].cat.codes.to_numpy()


@pytest.fixture(scope="module")
def layers():
    return toy_domains(seed=0)


# --------------------------------------------------------------------------------------------- toy_domains
def test_hex_lattice_neighbours_are_one_spacing_apart():
    row, col, xy = synthetic.hex_lattice(100)
    assert np.all((row + col) % 2 == 0)                       # Visium parity convention
    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[:, 1], synthetic.SPOT_SPACING)
    interior = (d[:, 6] < synthetic.SPOT_SPACING + 1e-6).sum()
    assert interior > 40                                       # interior spots have six neighbours at 100 px


def test_toy_domains_conventions(layers):
    a = layers
    assert a.shape == (900, 100)
    assert sp.isspmatrix_csr(a.X) and a.X.dtype == np.float32
    X = _dense(a.X)
    assert X.min() >= 0 and np.all(X == np.round(X))
    assert list(a.obs["domain"].cat.categories) == ["0", "1", "2", "3"]
    assert a.obsm["spatial"].shape == (900, 2)
    assert {"array_row", "array_col"} <= set(a.obs.columns)
    assert 1000 < X.sum(1).mean() < 2000                       # depth ~ 1500
    lib = a.uns["spatial"]["toy"]
    assert lib["images"]["hires"].dtype == np.uint8 and lib["images"]["hires"].shape[2] == 3
    for res in ("hires", "lowres"):
        img, scale = image_and_scale(a, resolution=res)
        xy = a.obsm["spatial"] * scale
        assert xy.min() > 0 and xy[:, 0].max() < img.shape[1] - 1 and xy[:, 1].max() < img.shape[0] - 1


def test_toy_domains_is_deterministic(layers):
    again = toy_domains(seed=0)
    np.testing.assert_array_equal(_dense(again.X), _dense(layers.X))
    np.testing.assert_array_equal(again.uns["spatial"]["toy"]["images"]["hires"],
                                  layers.uns["spatial"]["toy"]["images"]["hires"])
    assert not np.array_equal(_dense(toy_domains(seed=1).X), _dense(layers.X))


@pytest.mark.parametrize("layout", ["layers", "blobs"])
def test_domains_are_contiguous_and_balanced(layout):
    a = toy_domains(n_spots=600, n_domains=5, layout=layout, image=False, seed=3)
    d = _codes(a)
    xy = a.obsm["spatial"]
    pairs = cKDTree(xy).query_pairs(synthetic.SPOT_SPACING * 1.01, output_type="ndarray")
    same = d[pairs[:, 0]] == d[pairs[:, 1]]
    for k in range(5):
        idx = np.flatnonzero(d == k)
        assert len(idx) > 600 / 5 / 2
        keep = pairs[same & (d[pairs[:, 0]] == k)]
        remap = {v: i for i, v in enumerate(idx)}
        A = sp.coo_matrix((np.ones(len(keep)), ([remap[v] for v in keep[:, 0]], [remap[v] for v in keep[:, 1]])),
                          shape=(len(idx), len(idx)))
        assert connected_components(A, directed=False)[0] == 1, f"domain {k} is split"
    # most hex neighbours share a domain (boundaries are lines, not noise)
    assert same.mean() > 0.85


def test_layers_are_ordered_bands(layers):
    ys = [layers.obsm["spatial"][_codes(layers) == k, 1].mean() for k in range(4)]
    assert np.all(np.diff(ys) > 300)


def test_markers_and_twins():
    a = toy_domains(n_domains=4, twins=[(2, 3)], marker_strength=1.5, image=False, seed=2)
    means = a.varm["domain_means"]
    np.testing.assert_allclose(means[:, 2], means[:, 3])
    assert (a.var["marker_of"] == "2,3").sum() == 100 // 8
    d, X = _codes(a), _dense(a.X)
    for k, label in ((0, "0"), (1, "1"), (2, "2,3")):
        genes = (a.var["marker_of"] == label).to_numpy()
        owners = np.isin(d, [int(v) for v in label.split(",")])
        inside, outside = X[owners][:, genes].mean(), X[~owners][:, genes].mean()
        assert inside / outside > 3                             # exp(1.5) = 4.5 before depth renormalisation
    # expression alone cannot split the twins, but it does split 0 and 1 from the rest
    z = PCA(10, random_state=0).fit_transform(_lognorm(a.X))
    lab = KMeans(4, n_init=10, random_state=0).fit_predict(z)
    twins = np.isin(d, [2, 3])
    assert adjusted_rand_score(d[twins], lab[twins]) < 0.1
    assert adjusted_rand_score(np.where(twins, 2, d), lab) > 0.3


def test_image_colour_follows_domains_only_with_signal():
    res = {}
    for signal in (1.0, 0.0):
        a = toy_domains(n_domains=4, twins=[(2, 3)], image_signal=signal, seed=4)
        img, scale = image_and_scale(a)
        rgb = colour_features(img, a.obsm["spatial"], scale, radius=30)
        d = _codes(a)
        centres = np.array([rgb[d == k].mean(0) for k in range(4)])
        spread = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(4, 1)]
        within = np.sqrt(np.mean([rgb[d == k].var(0).sum() for k in range(4)]))
        ari = adjusted_rand_score(d, KMeans(4, n_init=10, random_state=0).fit_predict(rgb))
        res[signal] = spread, within, ari
    spread, within, ari = res[1.0]
    assert spread.min() > 2 * within and ari > 0.9       # every domain (the expression twins too) has its own colour
    spread, within, ari = res[0.0]
    assert spread.max() < 0.5 * within and ari < 0.05    # uninformative image


def test_lowres_is_aligned_with_hires(layers):
    hi = colour_features(*image_and_scale(layers, resolution="hires")[:1], layers.obsm["spatial"], 0.2, radius=30)
    lo = colour_features(*image_and_scale(layers, resolution="lowres")[:1], layers.obsm["spatial"], 0.05, radius=30)
    assert np.corrcoef(hi[:, 0], lo[:, 0])[0, 1] > 0.9


def test_toy_domains_without_image_and_bad_input():
    assert "spatial" not in toy_domains(n_spots=50, n_genes=20, image=False).uns
    with pytest.raises(ValueError, match="layout"):
        toy_domains(layout="rings")
    with pytest.raises(ValueError, match="twins"):
        toy_domains(twins=[(0, 7)])
    with pytest.raises(ValueError, match="n_markers"):
        toy_domains(n_genes=10, n_markers=5)
    with pytest.raises(ValueError, match="image_signal"):
        toy_domains(image_signal=-1)
    with pytest.raises(ValueError, match="marker_strength"):
        toy_domains(marker_strength=[1.0, 2.0])


# --------------------------------------------------------------------------------------------- pseudo_spots
def _identifiable_reference(n=12, types=("a", "b", "c")):
    """Cell i expresses only gene i, (i + 1) counts: a spot's counts reveal exactly which cells it holds."""
    X = np.diag(np.arange(1, n + 1)).astype(np.float32)
    labels = pd.Categorical([types[i % len(types)] for i in range(n)], categories=list(types))
    return ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"g{i}" for i in range(n)]))


def test_pseudo_spots_counts_are_sums_of_their_cells():
    ref = _identifiable_reference()
    ps = pseudo_spots(ref, n_spots=40, cells_per_spot=(2, 6), n_types_per_spot=(1, 3), seed=1)
    X = _dense(ps.X)
    used = X / np.arange(1, 13)                                  # times each cell went into each spot
    np.testing.assert_allclose(used, np.round(used))
    np.testing.assert_allclose(used, _dense(ps.uns["pseudo_spots"]["membership"]))
    onehot = pd.get_dummies(ref.obs["cell_type"]).to_numpy(float)
    np.testing.assert_array_equal(ps.obsm["cell_counts"].to_numpy(), used @ onehot)
    props = ps.obsm["proportions"]
    assert list(props.columns) == ["a", "b", "c"] and list(props.index) == list(ps.obs_names)
    np.testing.assert_allclose(props.sum(1), 1.0)
    np.testing.assert_allclose(props.to_numpy(), (used @ onehot) / used.sum(1, keepdims=True))
    n_cells, n_types = ps.obs["n_cells"].to_numpy(), (props.to_numpy() > 0).sum(1)
    assert n_cells.min() >= 2 and n_cells.max() <= 6 and n_types.min() >= 1 and n_types.max() <= 3
    assert np.array_equal(n_cells, used.sum(1))


def test_pseudo_spots_real_counts_and_downsampling():
    ref, _ = toy_pair(n_cells=300, seed=0)
    full = pseudo_spots(ref, n_spots=100, seed=5)
    np.testing.assert_allclose(_dense(full.X), _dense(full.uns["pseudo_spots"]["membership"] @ ref.X))
    thin = pseudo_spots(ref, n_spots=100, downsample=0.1, seed=5)
    np.testing.assert_array_equal(thin.obsm["cell_counts"], full.obsm["cell_counts"])
    Xf, Xt = _dense(full.X), _dense(thin.X)
    assert np.all(Xt <= Xf) and np.all(Xt == np.round(Xt))
    assert abs(Xt.sum() / Xf.sum() - 0.1) < 0.01
    again = pseudo_spots(ref, n_spots=100, seed=5)
    np.testing.assert_array_equal(_dense(again.X), Xf)


def test_pseudo_spots_errors():
    ref = _identifiable_reference()
    with pytest.raises(KeyError, match="cell_type_key"):
        pseudo_spots(ref, cell_type_key="celltype")
    empty = ref.copy()
    empty.obs["cell_type"] = empty.obs["cell_type"].cat.add_categories(["d"])
    with pytest.raises(ValueError, match=r"\['d'\].*remove_unused_categories"):
        pseudo_spots(empty)
    with pytest.raises(ValueError, match="only 3"):
        pseudo_spots(ref, n_types_per_spot=(4, 5))
    lognorm = ref.copy()
    lognorm.X = np.log1p(_dense(lognorm.X) / 3)
    with pytest.raises(ValueError, match="raw counts"):
        pseudo_spots(lognorm)
    with pytest.raises(ValueError, match="downsample"):
        pseudo_spots(ref, downsample=1.5)


# --------------------------------------------------------------------------------------------- grid_spots
def test_grid_spots_hand_placed_cells():
    xy = np.array([[0, 0], [5, 5], [15, 2], [25, 25], [26, 27], [29.9, 20]], dtype=float)
    X = np.array([[1, 0], [2, 1], [0, 3], [4, 4], [1, 1], [0, 7]], dtype=np.float32)
    cells = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"cell_type": ["t", "u", "t", "u", "u", "t"]},
                                                            index=[f"c{i}" for i in range(6)]))
    cells.obsm["spatial"] = xy
    g = grid_spots(cells, spot_size=10)
    assert g.n_obs == 3                                            # windows (0,0), (0,1), (2,2)
    np.testing.assert_array_equal(g.obs["grid_row"], [0, 0, 2])
    np.testing.assert_array_equal(g.obs["grid_col"], [0, 1, 2])
    np.testing.assert_array_equal(_dense(g.X), [[3, 1], [0, 3], [5, 12]])
    np.testing.assert_array_equal(g.obs["n_cells"], [2, 1, 3])
    np.testing.assert_allclose(g.obsm["spatial"], [[5, 5], [15, 5], [25, 25]])
    np.testing.assert_array_equal(g.obsm["cell_counts"].to_numpy(), [[1, 1], [1, 0], [1, 2]])
    np.testing.assert_allclose(g.obsm["proportions"].to_numpy(), [[0.5, 0.5], [1, 0], [1 / 3, 2 / 3]])
    np.testing.assert_array_equal(g.uns["grid_spots"]["cell_spot"], [0, 0, 1, 2, 2, 2])


def test_grid_spots_conserves_counts_and_cells():
    _, spatial = toy_pair(n_spots=2000, seed=1)
    g = grid_spots(spatial, spot_size=100.0)
    assert g.obs["n_cells"].sum() == spatial.n_obs
    np.testing.assert_allclose(_dense(g.X).sum(0), _dense(spatial.X).sum(0), rtol=1e-6)
    np.testing.assert_allclose(g.obsm["proportions"].sum(1), 1.0)
    assert g.n_obs <= 100 and g.obs["n_cells"].min() >= 1
    # a cell lies inside its window
    spot = g.uns["grid_spots"]["cell_spot"]
    assert np.all(np.abs(spatial.obsm["spatial"] - g.obsm["spatial"][spot]) <= 50.0)


def test_grid_spots_errors():
    _, spatial = toy_pair(n_spots=50, seed=0)
    with pytest.raises(ValueError, match="spot_size"):
        grid_spots(spatial, 0)
    with pytest.raises(KeyError, match="celltype"):
        grid_spots(spatial, 100, cell_type_key="celltype")
    bare = spatial.copy()
    del bare.obsm["spatial"]
    with pytest.raises(KeyError, match="obsm\\['spatial'\\]"):
        grid_spots(bare, 100)


# --------------------------------------------------------------------------------------------- toy_pair
def test_toy_pair_shapes_and_truth():
    ref, spa = toy_pair(n_cells=400, n_spots=300, n_genes=60, n_types=4, n_hidden_genes=8, seed=0)
    assert ref.shape == (400, 60) and spa.shape == (300, 52)
    hidden = spa.uns["hidden_genes"]
    assert list(spa.obsm["hidden_truth"].columns) == hidden and len(set(hidden) & set(spa.var_names)) == 0
    assert set(hidden) | set(spa.var_names) == set(ref.var_names)
    assert (~ref.var["measured_in_spatial"]).sum() == 8
    assert ref.obsm["spatial_truth"].shape == (400, 2) and spa.obsm["spatial"].shape == (300, 2)
    assert ref.obs["cell_type"].nunique() == 4
    assert np.all(_dense(ref.X) == np.round(_dense(ref.X)))
    # types are spatially patterned: neighbours share a type far more often than by chance
    _, nn = cKDTree(spa.obsm["spatial"]).query(spa.obsm["spatial"], 6)
    t = spa.obs["cell_type"].cat.codes.to_numpy()
    chance = ((np.bincount(t) / len(t)) ** 2).sum()
    assert (t[nn[:, 1:]] == t[:, None]).mean() > chance + 0.2


def test_toy_pair_hidden_genes_and_locations_are_predictable():
    ref, spa = toy_pair(seed=0)
    shared, hidden = list(spa.var_names), spa.uns["hidden_genes"]
    Xr = _lognorm(ref[:, shared].X)
    Yr = _lognorm(ref.X)[:, [ref.var_names.get_loc(g) for g in hidden]]
    knn = KNeighborsRegressor(15).fit(Xr, Yr)
    pred = knn.predict(_lognorm(spa.X))
    truth = spa.obsm["hidden_truth"].to_numpy()
    r = np.array([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(len(hidden))])
    assert np.median(r) > 0.5 and r.min() > 0.1
    # the same predictor maps cells to positions much better than chance
    pos = KNeighborsRegressor(15).fit(Xr, ref.obsm["spatial_truth"]).predict(_lognorm(spa.X))
    err = np.linalg.norm(pos - spa.obsm["spatial"], axis=1).mean()
    assert err < 0.5 * 520                                      # random pairs in a 1000 µm square: ~520 µm


def test_toy_pair_errors():
    with pytest.raises(ValueError, match="n_hidden_genes"):
        toy_pair(n_genes=10, n_hidden_genes=10)


# --------------------------------------------------------------------------------------------- toy_multiome
def test_toy_multiome_needs_both_modalities():
    a, b = toy_multiome(seed=0)
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert (a.obs["domain"] == b.obs["domain"]).all()
    assert a.shape == (900, 50) and b.shape == (900, 30) and a.X.dtype == np.float32
    assert a.uns["separates"] == [0, 1, 2] and b.uns["separates"] == [3, 4]
    d = _codes(a)

    def ari(X):
        return adjusted_rand_score(d, KMeans(5, n_init=10, random_state=0).fit_predict(X))

    ari_a, ari_b, ari_ab = ari(a.X), ari(b.X), ari(np.hstack([a.X, b.X]))
    assert ari_a < 0.75 and ari_b < 0.75
    assert ari_ab > 0.9
    # A cannot tell domains 3 and 4 apart: their A-centroids coincide up to noise
    c3, c4, c0 = (a.X[d == k].mean(0) for k in (3, 4, 0))
    assert np.linalg.norm(c3 - c4) < 0.3 * np.linalg.norm(c3 - c0)


def test_toy_multiome_errors():
    with pytest.raises(ValueError, match="n_domains"):
        toy_multiome(n_domains=2)
    with pytest.raises(ValueError, match="dims"):
        toy_multiome(dims=(10, 10, 10))
