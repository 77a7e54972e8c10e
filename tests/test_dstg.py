"""DSTG: planted proportions, determinism, input errors, and the graph / CCA / loss pieces on hand-computed cases."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse, stats

from stcore.data import synthetic
from stcore.methods import dstg as D
from stcore.methods import get_method
from stcore.metrics import deconvolution_scores

SMALL = {"n_pseudo": 400, "progress": False}


@pytest.fixture(scope="module")
def pair():
    reference, _ = synthetic.toy_pair(n_cells=600, n_spots=10, n_genes=80, n_types=5, seed=0)
    spots = synthetic.pseudo_spots(reference, n_spots=250, cells_per_spot=(5, 15), seed=1)
    return spots, reference


@pytest.fixture(scope="module")
def fitted(pair):
    spots, reference = pair
    adata = spots.copy()
    method = D.DSTG(**SMALL)
    method.run(adata, reference)
    return adata, method


def _scores(adata, key):
    truth = adata.obsm["proportions"]
    pred = adata.obsm[key].reindex(columns=truth.columns, fill_value=0.0)
    return deconvolution_scores(truth.to_numpy(), pred.to_numpy()).mean()


def test_registered_as_reference_deconvolution():
    cls = get_method("dstg")
    assert cls is D.DSTG and cls.task == "deconv" and cls.needs_reference


def test_recovers_planted_proportions(fitted, pair):
    adata, method = fitted
    props = adata.obsm["proportions_dstg"]
    assert props.shape == (adata.n_obs, 5)
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-5)
    ours = _scores(adata, "proportions_dstg")
    # NNLS on this data reaches PCC ~0.98 / RMSE ~0.05; predicting the mean composition gives PCC NaN / RMSE ~0.2
    assert ours["PCC"] > 0.85 and ours["RMSE"] < 0.17
    truth = adata.obsm["proportions"].to_numpy()
    uniform_rmse = np.sqrt(((truth - truth.mean(0)) ** 2).mean(0)).mean()
    assert uniform_rmse > 0.19 > ours["RMSE"]
    nnls = pair[0].copy()
    get_method("nnls")().run(nnls, pair[1])
    assert _scores(nnls, "proportions_nnls")["RMSE"] < 0.17  # the bound is one NNLS meets
    info = adata.uns["dstg"]
    assert info["n_pseudo_real_edges"] > 0 and info["n_real_real_edges"] > 0
    assert info["real_spots_linked"] > 0.9 and info["pseudo_test_rmse"] < 0.15
    assert len(info["val_loss"]) == info["epochs_run"] == len(method.history_)


def test_deterministic_given_seed(pair):
    spots, reference = pair
    runs = []
    for seed in (3, 3, 4):
        adata = spots[:80].copy()
        D.DSTG(n_pseudo=100, epochs=15, seed=seed, progress=False).run(adata, reference)
        runs.append(adata.obsm["proportions_dstg"].to_numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-4


def test_early_stopping_rule_and_switch(pair):
    spots, reference = pair
    m = D.DSTG(n_pseudo=100, epochs=12, early_stopping=0, progress=False)
    m.run(spots[:60].copy(), reference)
    assert len(m.history_) == 12 and not m.history_.stopped_early
    assert not D.early_stop([1.0] * 5 + [9.0], 10)  # too early
    assert D.early_stop([3, 2, 1, 1.6], 2)  # 1.6 > mean(2, 1)
    assert not D.early_stop([3, 2, 1, 1.5], 2) and not D.early_stop([2, 1, 1.6], 2)  # not above / too early
    assert not D.early_stop([5.0] * 30 + [99.0], 0)


# ----------------------------------------------------------------------------------------------- pieces
def test_cca_embed_matches_dense_svd():
    rng = np.random.default_rng(0)
    S1, S2 = rng.normal(size=(40, 12)), rng.normal(size=(30, 12))
    U, V, d = D.cca_embed(S1, S2, n_cc=5)
    z = lambda S: (S - S.mean(1, keepdims=True)) / S.std(1, keepdims=True)
    Ud, dd, Vdt = np.linalg.svd(z(S1) @ z(S2).T)
    np.testing.assert_allclose(d, dd[:5], rtol=1e-8)
    np.testing.assert_allclose(np.abs(U), np.abs(Ud[:, :5]), atol=1e-8)
    np.testing.assert_allclose(np.abs(V), np.abs(Vdt.T[:, :5]), atol=1e-8)
    np.testing.assert_allclose(U @ np.diag(d) @ V.T, (Ud[:, :5] * dd[:5]) @ Vdt[:5], atol=1e-8)
    assert np.all(U[0] >= 0)


def test_dstg_graph_hand_computed():
    # nodes p0 p1 | r0 r1; edges p0-r0 (graph 1), r0-r1 and the self pair r1-r1 (graph 2); self loops weigh 2
    ei, w = D.dstg_graph(np.array([[0], [0]]), np.array([[0, 1], [1, 1]]), 2, 2)
    A = sparse.csr_matrix((w.numpy(), (ei[0].numpy(), ei[1].numpy())), shape=(4, 4)).toarray()
    deg = np.array([3.0, 2.0, 4.0, 3.0])
    raw = np.array([[2, 0, 1, 0], [0, 2, 0, 0], [1, 0, 2, 1], [0, 0, 1, 2]], float)
    np.testing.assert_allclose(A, raw / np.sqrt(np.outer(deg, deg)), rtol=1e-6)
    ei1, w1 = D.dstg_graph(np.array([[0], [0]]), None, 2, 2, self_loop_weight=1.0)
    assert ei1.shape[1] == 6 and np.isclose(w1.numpy().max(), 1.0)


def test_soft_cross_entropy_matches_torch_and_hand_value():
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
    y = torch.softmax(torch.randn(7, 4, generator=torch.Generator().manual_seed(1)), 1)
    torch.testing.assert_close(D.soft_cross_entropy(logits, y), F.cross_entropy(logits, y))
    assert np.isclose(float(D.soft_cross_entropy(torch.zeros(3, 4), torch.eye(4)[:3])), np.log(4))


def test_anova_genes_follow_scipy_f_oneway():
    rng = np.random.default_rng(0)
    codes = np.repeat([0, 1, 2], 20)
    X = rng.poisson(3.0, size=(60, 8)).astype(float)
    X[:, 2] += 10 * (codes == 1)
    X[:, 5] += 4 * (codes == 2)
    X[:, 7] = 0.0  # no variance: ranked last
    p = np.array([stats.f_oneway(*(X[codes == k, g] for k in range(3))).pvalue for g in range(7)])
    top3 = D.anova_genes(X, codes, 3)
    np.testing.assert_array_equal(top3, np.sort(np.argsort(p)[:3]))
    assert {2, 5} <= set(top3)
    assert 7 not in D.anova_genes(X, codes, 7) and len(D.anova_genes(X, codes, 99)) == 8


def test_pseudo_spots_sum_their_cells_and_downsample():
    counts = sparse.csr_matrix(np.repeat(np.arange(1, 7)[:, None] * 1000.0, 5, axis=1))  # 6 cells, 5 genes
    codes = np.array([0, 0, 1, 1, 2, 2])
    X, props = D.mix_pseudo_spots(counts, codes, 3, n_spots=50, cells_per_spot=(2, 3), seed=0)
    totals = np.asarray(X.sum(1)).ravel()
    assert X.shape == (50, 5) and props.shape == (50, 3)
    np.testing.assert_allclose(props.sum(1), 1.0)
    assert np.all((totals <= 25_000) | (totals == 20_000))  # > 25k is down-sampled to exactly 20k
    assert np.any(totals == 20_000)
    small = totals < 20_000  # untouched spots: total = 5000 x (sum of cell ids); the fractions follow the cells
    ok = [np.isclose(t / 5000, round(t / 5000)) for t in totals[small]]
    assert all(ok)


def test_top_loading_genes_and_filter_hand_cases():
    # one dimension, cap 3 genes: i = 1 gives 0 genes, i = 2 gives 2 (top + bottom), i = 3 gives 4 >= 3
    loadings = np.array([[5.0], [-3.0], [1.0], [0.0], [2.0], [-1.0]])
    np.testing.assert_array_equal(D.top_loading_genes(loadings, dim_genes=10, max_genes=3), [0, 1])
    E1 = np.array([[0.0], [10.0]])
    E2 = np.array([[0.0], [1.0], [2.0], [9.0]])
    pairs = np.array([[0, 0, 1], [1, 3, 3]])
    np.testing.assert_array_equal(D.filter_pairs(pairs, E1, E2, k_filter=2), [True, False, True])
    assert D.filter_pairs(pairs, E1, E2, k_filter=4).all()


def test_integration_features_and_scale_data():
    ranks = [["a", "b", "c", "d"], ["c", "a", "e"]]
    assert D.integration_features(ranks, 3) == ["a", "c", "b"]  # in both lists first, then by median rank
    X = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [5.0, 5.0, 200.0]] + [[3.0, 5.0, 2.0]] * 200)
    Z = D.scale_data(X, max_value=10)
    np.testing.assert_allclose(Z[:3, 0], np.minimum((X[:3, 0] - X[:, 0].mean()) / X[:, 0].std(ddof=1), 10))
    assert Z[0, 0] < -10  # only the upper side is clipped, as Seurat does
    assert np.all(Z[:, 1] == 0) and np.isclose(Z[:, 2].max(), 10.0)


# ------------------------------------------------------------------------------------------------ errors
def test_errors_on_bad_input(pair):
    spots, reference = pair
    m = D.DSTG(**SMALL)
    with pytest.raises(ValueError, match="needs a single-cell reference"):
        m.run(spots.copy())
    with pytest.raises(KeyError, match="cell_type"):
        D.DSTG(cell_type_key="celltype", **SMALL).run(spots.copy(), reference)
    one = reference.copy()
    one.obs["cell_type"] = "A"
    with pytest.raises(ValueError, match="at least 2"):
        m.run(spots.copy(), one)
    renamed = reference.copy()
    renamed.var_names = [f"ENSG{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="share"):
        m.run(spots.copy(), renamed)
    logged = spots.copy()
    logged.X = np.log1p(logged.X.toarray()) if sparse.issparse(logged.X) else np.log1p(logged.X)
    with pytest.raises(ValueError, match="not raw counts"):
        m.run(logged, reference)
    nan = spots.copy()
    nan.X = nan.X.toarray()
    nan.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        m.run(nan, reference)
    empty = spots.copy()
    empty.X = empty.X.toarray()
    empty.X[3] = 0
    with pytest.raises(ValueError, match="no counts"):
        m.run(empty, reference)


@pytest.mark.parametrize("opts, match", [
    ({"n_pseudo": 5}, "n_pseudo"),
    ({"cells_per_spot": (5, 2)}, "cells_per_spot"),
    ({"dropout": 1.0}, "dropout"),
    ({"lr": 0.0}, "lr"),
    ({"epochs": 0}, "epochs"),
    ({"k_mnn": 0}, "k_mnn"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        D.DSTG(**opts)


def test_works_on_anndata_with_dense_int_counts(pair):
    spots, reference = pair
    dense = ad.AnnData(spots.X.toarray().astype(np.int64)[:50], var=spots.var.copy(),
                       obs=pd.DataFrame(index=spots.obs_names[:50]))
    D.DSTG(n_pseudo=100, epochs=5, progress=False).run(dense, reference)
    assert list(dense.obsm["proportions_dstg"].columns) == sorted(reference.obs["cell_type"].unique())
