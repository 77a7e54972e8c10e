"""SD²: planted proportions, determinism, input errors, and the M3Drop / autoencoder / graph pieces on hand cases."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import optimize, sparse, stats

from stcore.data import synthetic
from stcore.methods import dstg as D
from stcore.methods import get_method
from stcore.methods import sd2 as S
from stcore.metrics import deconvolution_scores

SMALL = {"n_pseudo": 400, "progress": False}


@pytest.fixture(scope="module")
def pair():
    reference, cells = synthetic.toy_pair(n_cells=600, n_spots=4000, n_genes=80, n_types=5, seed=0)
    spots = synthetic.grid_spots(cells, spot_size=100.0)  # 100 spots of ~40 cells, with obsm["spatial"]
    return spots[:, spots.var_names.isin(reference.var_names)].copy(), reference


@pytest.fixture(scope="module")
def fitted(pair):
    spots, reference = pair
    adata = spots.copy()
    method = S.SD2(**SMALL)
    method.run(adata, reference)
    return adata, method


def _scores(adata, key):
    truth = adata.obsm["proportions"]
    pred = adata.obsm[key].reindex(columns=truth.columns, fill_value=0.0)
    return deconvolution_scores(truth.to_numpy(), pred.to_numpy()).mean()


def test_registered_as_reference_deconvolution():
    cls = get_method("sd2")
    assert cls is S.SD2 and cls.task == "deconv" and cls.needs_reference


def test_recovers_planted_proportions(fitted, pair):
    adata, method = fitted
    props = adata.obsm["proportions_sd2"]
    assert props.shape == (adata.n_obs, 5)
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-5)
    ours = _scores(adata, "proportions_sd2")
    # SD2 reaches PCC ~0.95 / RMSE ~0.09 here, NNLS PCC ~0.99 / RMSE ~0.05; the mean composition has RMSE > 0.19
    assert ours["PCC"] > 0.85 and ours["RMSE"] < 0.15
    truth = adata.obsm["proportions"].to_numpy()
    mean_rmse = np.sqrt(((truth - truth.mean(0)) ** 2).mean(0)).mean()
    assert mean_rmse > 0.19 > ours["RMSE"]
    nnls = pair[0].copy()
    get_method("nnls")().run(nnls, pair[1])
    assert _scores(nnls, "proportions_nnls")["RMSE"] < 0.15  # the bound is one NNLS meets
    info = adata.uns["sd2"]
    assert info["n_pseudo_real_edges"] > 0 and info["n_spatial_pairs"] == adata.n_obs
    assert info["real_spots_linked"] > 0.5 and info["pseudo_test_rmse"] < 0.15
    assert len(info["val_loss"]) == info["epochs_run"] == len(method.history_) <= 100
    assert len(info["ae_loss"]) == 5 and info["ae_loss"][-1] < info["ae_loss"][0]
    assert len(info["dropout_genes"]) > 0 and set(info["dropout_genes"]) <= set(info["genes"])


def test_graph_holds_the_spatial_edges(fitted):
    adata, method = fitted
    n_p = method.prep_["pseudo"].shape[0]
    ei = method.graph_["edge_index"].numpy()
    edges = set(zip(ei[0].tolist(), ei[1].tolist()))
    i, j = S.spatial_pairs(adata.obsm["spatial"])
    assert all((n_p + a, n_p + b) in edges and (n_p + b, n_p + a) in edges for a, b in zip(i, j))
    assert all((a, n_p + b) in edges for a, b in method.graph_["pseudo_real"].T)
    assert method.graph_["code"].shape == (n_p + adata.n_obs, 50)
    assert method.data_["train"].numel() == 360 and method.data_["val"].numel() == 40  # 90 / 10
    assert method.data_["test"] is method.data_["val"]


def test_deterministic_given_seed(pair):
    spots, reference = pair
    runs = []
    for seed in (3, 3, 4):
        adata = spots[:60].copy()
        S.SD2(n_pseudo=100, epochs=15, seed=seed, progress=False).run(adata, reference)
        runs.append(adata.obsm["proportions_sd2"].to_numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-4


def test_switches_without_spatial_links_and_early_stopping(pair):
    spots, reference = pair
    adata = spots[:50].copy()
    del adata.obsm["spatial"]
    m = S.SD2(n_pseudo=100, epochs=12, early_stopping=0, spatial_links=False, m3drop=False, progress=False)
    m.run(adata, reference)
    assert m.graph_["real_real"] is None and adata.uns["sd2"]["n_spatial_pairs"] == 0
    assert len(adata.uns["sd2"]["dropout_genes"]) == 0 and adata.uns["sd2"]["epochs_run"] == 12
    assert D.early_stop([1.0] * 51 + [1.1], 50) and not D.early_stop([1.0] * 50 + [1.1], 50)


# ------------------------------------------------------------------------------------------------- M3Drop
def test_dropout_stats_match_numpy():
    X = np.array([[0, 2, 0], [1, 0, 0], [3, 4, 0], [0, 0, 5]], dtype=float)
    st = S.dropout_stats(sparse.csr_matrix(X))
    np.testing.assert_allclose(st["s"], X.mean(0))
    np.testing.assert_allclose(st["p"], [0.5, 0.5, 0.75])
    np.testing.assert_allclose(st["s_stderr"], X.std(0) / 2)  # population sd / sqrt(n)
    np.testing.assert_allclose(st["p_stderr"], np.sqrt([0.25 / 4, 0.25 / 4, 0.75 * 0.25 / 4]))


def test_michaelis_menten_fit_recovers_k_and_matches_curve_fit():
    s = np.logspace(-2, 2, 60)
    K, sigma = S.fit_michaelis_menten(2.5 / (2.5 + s), s)
    assert abs(K - 2.5) < 1e-6 and sigma < 1e-8
    rng = np.random.default_rng(0)
    p = np.clip(0.7 / (0.7 + s) + rng.normal(0, 0.05, s.size), 0, 1)
    (K_cf,), _ = optimize.curve_fit(lambda x, k: k / (k + x), s, p, p0=[3.0])
    assert abs(S.fit_michaelis_menten(p, s)[0] - K_cf) < 1e-5


def test_m3drop_test_hand_computed():
    st = {"s": np.array([2.0, 1.0, 4.0]), "p": np.array([0.5, 0.0, 0.8]),
          "s_stderr": np.array([0.2, 0.1, 0.5]), "p_stderr": np.array([0.05, 0.0, 0.04])}
    K = 1.0
    pval = S.m3drop_test(st, K)
    assert pval[1] == 1.0  # never at zero
    # hand: gene 0 has K_g = 0.5 * 2 / 0.5 = 2, err = 2 sqrt(0.1^2 + 0.1^2); gene 1 uses p = 0.5 / 2 = 0.25
    Kg = np.array([2.0, 0.25 * 1.0 / 0.75, 0.8 * 4 / 0.2])
    err = Kg * np.sqrt(np.array([0.1, 0.1, 0.125]) ** 2 + np.array([0.1, 0.0, 0.05]) ** 2)
    err_log = np.abs(np.log(Kg - err) - np.log(Kg))
    err_K = np.std(np.log(Kg), ddof=1) / np.sqrt(3)
    z = np.log(Kg) / np.sqrt(err_log**2 + err_K**2)
    np.testing.assert_allclose(pval[[0, 2]], stats.norm.sf(z[[0, 2]]))


def test_m3drop_selects_planted_dropout_genes():
    rng = np.random.default_rng(0)
    n = 500
    mu = np.exp(rng.uniform(-2, 3, 40))
    X = rng.poisson(mu, size=(n, 40)).astype(float)  # Poisson: few dropouts for their mean
    on = rng.random((n, 5)) < 0.15
    X = np.hstack([X, on * rng.poisson(20, size=(n, 5)), np.zeros((n, 1))])  # 5 on/off genes + 1 undetected
    idx, table = S.m3drop_genes(X)
    assert set(range(40, 45)) <= set(idx.tolist()) and 45 not in table.index
    assert len(set(idx.tolist()) - set(range(40, 45))) <= 2
    assert (table["q_value"] == np.minimum(table["p_value"] * 45, 1)).all()  # Bonferroni over detected genes
    with pytest.raises(ValueError, match="mt_method"):
        S.m3drop_genes(X, mt_method="holm")


# --------------------------------------------------------------------------------- autoencoder and graphs
def test_autoencoder_layers_and_training():
    ae = S.SD2Autoencoder(134)
    assert ae.encoder.dims == [134, 92, 71, 60, 50] and ae.decoder.dims == [50, 60, 71, 92, 134]
    lin = [m for m in ae.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.all(m.bias == 0) for m in lin)
    bound = np.sqrt(6 / (134 + 92))  # Glorot uniform
    assert lin[0].weight.abs().max() <= bound and lin[0].weight.abs().max() > 0.9 * bound
    x = torch.randn(7, 134)
    assert ae(x).abs().max() < 1 and ae.encoder(x).shape == (7, 50)
    S_ = np.random.default_rng(0).normal(size=(450, 30)) * 0.5
    code, _, hist = S.train_autoencoder(S_, n_latent=8, epochs=5, seed=1)
    code2, _, _ = S.train_autoencoder(S_, n_latent=8, epochs=5, seed=1)
    assert code.shape == (450, 8) and len(hist) == 5 and hist.total[-1] < hist.total[0]
    np.testing.assert_array_equal(code, code2)


def test_spatial_pairs_hand_case():
    coords = np.array([[0.0, 0], [1, 0], [3, 0], [7, 0]])
    np.testing.assert_array_equal(S.spatial_pairs(coords), [[0, 1, 2, 3], [1, 0, 1, 2]])
    dup = np.array([[0.0, 0], [0, 0], [5, 5]])
    pairs = S.spatial_pairs(dup)
    assert (pairs[0] != pairs[1]).all() and pairs[1, 0] == 1 and pairs[1, 1] == 0


def test_inter_pairs_mutual_and_filtered():
    code_p = np.array([[0.0, 0], [10, 0], [0, 10]])
    code_r = np.array([[0.1, 0], [10.1, 0], [7, 4]])
    expr_p = np.array([[1.0, 0], [1, 0], [0, 1]])
    expr_r = np.array([[1.0, 0], [0, 1], [0, 1]])
    pairs, n = S.inter_pairs(code_p, code_r, expr_p, expr_r, k_mnn=1, k_filter=1)
    assert n == 2  # (0, 0), (1, 1) mutual; p2's nearest is r2 but r2's is p1
    np.testing.assert_array_equal(pairs, [[0], [0]])  # (1, 1) fails the expression filter


def test_one_layer_gcn_is_a_hat_x_w():
    ei, w = D.dstg_graph(np.array([[0], [1]]), np.array([[0], [1]]), 2, 2)
    A = np.zeros((4, 4))
    A[0, 3] = A[3, 0] = A[2, 3] = A[3, 2] = 1
    A += 2 * np.eye(4)
    d = 1 / np.sqrt(A.sum(1))
    A_hat = d[:, None] * A * d[None]
    torch.manual_seed(0)
    model = S.SD2Model(6, 3)
    x = torch.rand(4, 6)
    W = model.gcn.convs[0].lin.weight.detach().numpy().T
    out = model({"x": x, "edge_index": ei, "edge_weight": w}).detach().numpy()
    np.testing.assert_allclose(out, A_hat @ x.numpy() @ W, atol=1e-5)
    assert len(model.gcn.convs) == 1 and sum(p.numel() for p in model.parameters()) == 18  # no bias


# ------------------------------------------------------------------------------------------------ errors
def test_errors_on_bad_input(pair):
    spots, reference = pair
    m = S.SD2(**SMALL)
    with pytest.raises(ValueError, match="needs a single-cell reference"):
        m.run(spots.copy())
    with pytest.raises(KeyError, match="cell_type"):
        S.SD2(cell_type_key="celltype", **SMALL).run(spots.copy(), reference)
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
    no_xy = spots.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        m.run(no_xy, reference)


@pytest.mark.parametrize("opts, match", [
    ({"n_pseudo": 5}, "n_pseudo"),
    ({"cells_per_spot": (5, 2)}, "cells_per_spot"),
    ({"dropout": 1.0}, "dropout"),
    ({"lr": 0.0}, "lr"),
    ({"epochs": 0}, "epochs"),
    ({"k_filter": 0}, "k_filter"),
    ({"n_latent": 0}, "n_latent"),
    ({"mt_method": "holm"}, "mt_method"),
    ({"mt_threshold": 0.0}, "mt_threshold"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        S.SD2(**opts)


def test_works_on_anndata_with_dense_int_counts(pair):
    spots, reference = pair
    dense = ad.AnnData(spots.X.toarray().astype(np.int64)[:50], var=spots.var.copy(),
                       obs=pd.DataFrame(index=spots.obs_names[:50]))
    dense.obsm["spatial"] = np.asarray(spots.obsm["spatial"])[:50]
    S.SD2(n_pseudo=100, epochs=5, progress=False).run(dense, reference)
    assert list(dense.obsm["proportions_sd2"].columns) == sorted(reference.obs["cell_type"].unique())
