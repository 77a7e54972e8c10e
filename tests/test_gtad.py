"""GTAD: planted proportions, determinism, input errors, and the forest graph / weighted attention / schedule /
integration pieces on hand-computed cases."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from torch_geometric.nn import GATConv

from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods import gtad as G
from stcore.metrics import deconvolution_scores

SMALL = {"n_pseudo": 400, "epochs": 200, "n_hidden": 16, "progress": False}


@pytest.fixture(scope="module")
def pair():
    reference, _ = synthetic.toy_pair(n_cells=600, n_spots=10, n_genes=80, n_types=5, seed=0)
    spots = synthetic.pseudo_spots(reference, n_spots=250, cells_per_spot=(5, 15), seed=1)
    return spots, reference


@pytest.fixture(scope="module")
def fitted(pair):
    spots, reference = pair
    adata = spots.copy()
    method = G.GTAD(**SMALL)
    method.run(adata, reference)
    return adata, method


def _scores(adata, key):
    truth = adata.obsm["proportions"]
    pred = adata.obsm[key].reindex(columns=truth.columns, fill_value=0.0)
    return deconvolution_scores(truth.to_numpy(), pred.to_numpy()).mean()


def test_registered_as_reference_deconvolution():
    cls = get_method("gtad")
    assert cls is G.GTAD and cls.task == "deconv" and cls.needs_reference


def test_recovers_planted_proportions(fitted, pair):
    adata, method = fitted
    props = adata.obsm["proportions_gtad"]
    assert props.shape == (adata.n_obs, 5)
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-5)
    ours = _scores(adata, "proportions_gtad")
    # NNLS on this data reaches PCC ~0.98 / RMSE ~0.05; predicting the mean composition gives PCC NaN / RMSE ~0.2.
    # GTAD (200 epochs here): PCC ~0.96, RMSE ~0.13 (its predictions are smoother than the truth).
    assert ours["PCC"] > 0.9 and ours["RMSE"] < 0.15
    truth = adata.obsm["proportions"].to_numpy()
    uniform_rmse = np.sqrt(((truth - truth.mean(0)) ** 2).mean(0)).mean()
    assert uniform_rmse > 0.19
    nnls = pair[0].copy()
    get_method("nnls")().run(nnls, pair[1])
    assert _scores(nnls, "proportions_nnls")["RMSE"] < 0.15  # the bound is one NNLS meets
    info = adata.uns["gtad"]
    assert info["n_anchors"] > 0 and info["pseudo_real_edge_fraction"] > 0.05
    assert info["pseudo_test_rmse"] < 0.12
    assert len(info["val_loss"]) == len(info["lr"]) == info["epochs_run"] == len(method.history_)
    np.testing.assert_allclose(info["lr"], G.cosine_warm_restart_lr(info["epochs_run"]), rtol=1e-6)


def test_deterministic_given_seed(pair):
    spots, reference = pair
    runs = []
    for seed in (3, 3, 4):
        adata = spots[:60].copy()
        G.GTAD(n_pseudo=100, epochs=8, n_hidden=8, seed=seed, progress=False).run(adata, reference)
        runs.append(adata.obsm["proportions_gtad"].to_numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-4


# ------------------------------------------------------------------------------------ forest graph (step 5)
def test_rp_tree_leaves_partition_and_size_bound():
    X = np.random.default_rng(0).normal(size=(500, 6))
    leaves = G.rp_tree_leaves(X, leaf_size=20, rng=0)
    allidx = np.sort(np.concatenate(leaves))
    np.testing.assert_array_equal(allidx, np.arange(500))  # a partition
    sizes = np.array([len(leaf) for leaf in leaves])
    assert sizes.max() <= 20 and sizes.min() >= 1
    # every split cuts between the 25 % and 75 % quantiles, so a leaf keeps at least ~1/4 of its parent (> 20)
    assert np.median(sizes) > 5


def test_rp_tree_on_a_line_gives_intervals():
    # in 1-D every projection is +-x, so each leaf must be a run of consecutive points
    x = np.sort(np.random.default_rng(1).uniform(size=200))[:, None]
    for leaf in G.rp_tree_leaves(x, leaf_size=10, rng=3):
        s = np.sort(leaf)
        assert s[-1] - s[0] == len(s) - 1 and len(s) <= 10


def test_rp_tree_duplicates_terminate_within_bound():
    X = np.ones((90, 4))
    leaves = G.rp_tree_leaves(X, leaf_size=20, rng=0)
    assert max(len(leaf) for leaf in leaves) <= 20 and sum(len(leaf) for leaf in leaves) == 90


def test_rp_forest_graph_matches_co_leaf_counts():
    X = np.random.default_rng(2).normal(size=(150, 5))
    ei, w = G.rp_forest_graph(X, n_trees=4, leaf_size=12, seed=7)
    n = X.shape[0]
    # recount co-leaf memberships with the same generator stream, densely (N is tiny here)
    rng = np.random.default_rng(7)
    count = np.zeros((n, n))
    for _ in range(4):
        for leaf in G.rp_tree_leaves(X, leaf_size=12, rng=rng):
            count[np.ix_(leaf, leaf)] += 1
    np.fill_diagonal(count, 0)
    A = sparse.csr_matrix((w.numpy(), (ei[0].numpy(), ei[1].numpy())), shape=(n, n)).toarray()
    np.testing.assert_allclose(A, count / 4, atol=1e-7)
    assert ei.shape[1] == np.count_nonzero(count)
    assert (w > 0).all() and (w <= 1).all() and not (ei[0] == ei[1]).any()
    np.testing.assert_array_equal(A, A.T)  # symmetric
    # per tree a node has at most leaf_size - 1 partners, so its degree is at most n_trees * (leaf_size - 1)
    assert np.bincount(ei[0].numpy(), minlength=n).max() <= 4 * 11
    assert np.isclose(w.numpy().max(), 1.0)  # some pairs share a leaf in every tree


def test_rp_forest_small_input_is_complete_graph():
    ei, w = G.rp_forest_graph(np.random.default_rng(0).normal(size=(6, 3)), n_trees=10, leaf_size=20)
    assert ei.shape[1] == 30 and torch.all(w == 1.0)


# ------------------------------------------------------------------------------- weighted attention (step 6)
def _dense_reference(layer, x, W):
    """Dense GAT with logits multiplied by W (entries 0 = no edge, -1e9 mask), as the official dense code."""
    h = layer.lin(x).view(x.shape[0], layer.heads, layer.n_out)
    outs = []
    for k in range(layer.heads):
        f1 = h[:, k] @ layer.att_dst[k] + layer.att_bias[0, k]
        f2 = h[:, k] @ layer.att_src[k] + layer.att_bias[1, k]
        logits = torch.nn.functional.leaky_relu(f1[:, None] + f2[None, :], 0.2) * W - 1e9 * (W == 0)
        outs.append(torch.softmax(logits, 1) @ h[:, k] + layer.bias[k])
    out = torch.stack(outs, 1)
    return out.reshape(x.shape[0], -1) if layer.concat else out.mean(1)


@pytest.mark.parametrize("concat", [True, False])
def test_weighted_attention_matches_dense_computation(concat):
    torch.manual_seed(0)
    n = 7
    x = torch.randn(n, 5)
    ei = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 0], [1, 0, 2, 1, 4, 3, 6, 3]])
    w = torch.tensor([0.3, 0.3, 1.0, 1.0, 0.7, 0.7, 0.1, 0.5])
    ei_sl, w_sl = G._add_self_loops(ei, w, n)
    layer = G.WeightedGATConv(5, 4, heads=3, concat=concat)
    with torch.no_grad():
        layer.att_bias.normal_()
        layer.bias.normal_()
    W = torch.zeros(n, n)
    W[ei_sl[0], ei_sl[1]] = w_sl
    torch.testing.assert_close(layer(x, ei_sl, w_sl), _dense_reference(layer, x, W), rtol=1e-5, atol=1e-5)
    alpha, _ = layer.attention(x, ei_sl, w_sl)
    torch.testing.assert_close(torch.zeros(n, 3).index_add_(0, ei_sl[0], alpha), torch.ones(n, 3))  # rows sum to 1
    # gradients through the sparse products (CSR forward, transposed CSR + sampled_addmm backward) match dense
    target = torch.randn(n, layer.heads * 4 if concat else 4)
    grads = []
    for fn in (lambda: layer(x, ei_sl, w_sl), lambda: _dense_reference(layer, x, W)):
        layer.zero_grad()
        ((fn() - target) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for g_sparse, g_dense in zip(*grads):
        torch.testing.assert_close(g_sparse, g_dense, rtol=1e-4, atol=1e-5)
    assert layer.att_src.grad.abs().sum() > 0


def test_unit_weights_reduce_to_pyg_gatconv():
    torch.manual_seed(1)
    n = 9
    x = torch.randn(n, 6)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 0], [1, 2, 3, 4, 5, 6, 7, 8, 0, 5]])
    ei = torch.cat([ei, ei.flip(0)], 1)
    ei_sl, w_sl = G._add_self_loops(ei, torch.ones(ei.shape[1]), n)
    ours = G.WeightedGATConv(6, 3, heads=2, concat=True)
    pyg = GATConv(6, 3, heads=2, concat=True, add_self_loops=False)
    with torch.no_grad():
        pyg.lin.weight.copy_(ours.lin.weight)  # PyG: edge_index[0] sends, edge_index[1] receives
        pyg.att_src.copy_(ours.att_src[None])
        pyg.att_dst.copy_(ours.att_dst[None])
        pyg.bias.zero_()
    torch.testing.assert_close(ours(x, ei_sl, w_sl), pyg(x, ei_sl.flip(0)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- training rules (step 8)
def test_cosine_warm_restart_schedule_hand_values():
    lr = G.cosine_warm_restart_lr(50)
    assert np.isclose(lr[0], 1e-6) and np.isclose(lr[5], 0.01)  # linear warm-up over 5 steps
    np.testing.assert_allclose(lr[:6], 1e-6 + (0.01 - 1e-6) / 5 * np.arange(6))
    np.testing.assert_allclose(lr[12], 1e-6 + 0.5 * (0.01 - 1e-6) * (1 + np.cos(np.pi * 7 / 15)))
    assert np.isclose(lr[20], 1e-6)  # restart after 20 steps
    # second cycle: 25 steps with 6.25 warm-up steps, so the peak is reached after step 26 and restart at 45
    np.testing.assert_allclose(lr[26], 1e-6 + (0.01 - 1e-6) / 6.25 * 6)
    assert lr[27] < 0.01 and np.isclose(lr[45], 1e-6) and lr[44] < 1e-4


def test_early_stopping_rule():
    es = G.EarlyStopping(patience=2)
    # epoch 0 improves both; 1 improves accuracy only (resets the counter); 2 and 3 improve nothing -> stop
    assert not es.step(0, 1.0, 0.5) and es.best_epoch == 0
    assert not es.step(1, 1.2, 0.6) and es.best_epoch == 0 and es.wait == 0
    assert not es.step(2, 1.3, 0.4) and es.wait == 1
    assert es.step(3, 1.4, 0.4)
    never = G.EarlyStopping(patience=0)
    assert not any(never.step(e, 1.0 + e, 0.0 - e) for e in range(20))


def test_early_stopping_restores_kept_weights():
    model = torch.nn.Linear(2, 1)
    es = G.EarlyStopping(patience=1)
    es.step(0, 0.5, 0.9, model)
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert es.step(1, 0.7, 0.1, model)
    torch.testing.assert_close(model.weight.detach(), kept)


# -------------------------------------------------------------------------------------- integration (step 3)
def test_anchor_weights_hand_case():
    query = np.array([[0.0], [10.0]])
    anchors = np.array([[1.0], [3.0], [10.0]])
    scores = np.array([1.0, 0.5, 1.0])
    W = G.anchor_weights(query, anchors, scores, k_weight=2).toarray()
    # k = 2, query 0: anchors 0 (d=1) and 1 (d=3, the k-th: weight 0) -> all weight on anchor 0
    np.testing.assert_allclose(W[0], [1.0, 0.0, 0.0])
    # query 1: anchor 2 (d=0, 1 - exp(-1/2)) and anchor 1 (d=7, the k-th -> 0)
    np.testing.assert_allclose(W[1], [0.0, 0.0, 1.0])
    W3 = G.anchor_weights(query, anchors, scores, k_weight=3).toarray()
    raw = 1 - np.exp(-np.array([1 - 1 / 10, 1 - 3 / 10]) * np.array([1.0, 0.5]) / 2)
    np.testing.assert_allclose(W3[0, :2], raw / raw.sum())
    np.testing.assert_allclose(W3.sum(1), 1.0)


def test_integration_removes_a_gene_wise_batch_effect(pair):
    _, reference = pair
    from stcore.methods.dstg import mix_pseudo_spots

    codes = pd.Categorical(reference.obs["cell_type"]).codes
    X, _ = mix_pseudo_spots(reference.X, codes, 5, n_spots=300, seed=0)
    twin = np.random.default_rng(0).permutation(300)[:150]
    factor = np.where(np.arange(X.shape[1]) % 2 == 0, 4.0, 1.0)  # half the genes read 4x higher in "real"
    real = sparse.csr_matrix(X.toarray()[twin] * factor)
    genes = np.asarray(reference.var_names, str)
    X1, X2, info = G.integrate(X, real, genes, k_filter=50)
    before = np.log1p(real.toarray() / real.sum(1).A * 1e4)[:, pd.Index(genes).get_indexer(info["features"])]
    err_before = np.linalg.norm(before - X1[twin], axis=1).mean()
    err_after = np.linalg.norm(X2 - X1[twin], axis=1).mean()
    assert info["anchors"].shape[1] > 50 and 0 <= info["scores"].min() and info["scores"].max() <= 1
    assert err_after < 0.6 * err_before


# ------------------------------------------------------------------------------------------------ errors
def test_errors_on_bad_input(pair):
    spots, reference = pair
    m = G.GTAD(**SMALL)
    with pytest.raises(ValueError, match="needs a single-cell reference"):
        m.run(spots.copy())
    with pytest.raises(KeyError, match="cell_type"):
        G.GTAD(cell_type_key="celltype", **SMALL).run(spots.copy(), reference)
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
    empty = spots.copy()
    empty.X = empty.X.toarray()
    empty.X[3] = 0
    with pytest.raises(ValueError, match="no counts"):
        m.run(empty, reference)
    single = reference.copy()
    single.obs["cell_type"] = single.obs["cell_type"].astype(str)
    single.obs.iloc[0, single.obs.columns.get_loc("cell_type")] = "Lonely"
    with pytest.raises(ValueError, match="single reference cell"):
        m.run(spots.copy(), single)


@pytest.mark.parametrize("opts, match", [
    ({"n_pseudo": 5}, "n_pseudo"),
    ({"cells_per_spot": (5, 2)}, "cells_per_spot"),
    ({"lr": 0.0}, "lr"),
    ({"min_lr": 0.1}, "min_lr"),
    ({"epochs": 0}, "epochs"),
    ({"leaf_size": 1}, "leaf_size"),
    ({"n_trees": 2.5}, "n_trees"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        G.GTAD(**opts)


def test_works_on_anndata_with_dense_int_counts(pair):
    spots, reference = pair
    dense = ad.AnnData(spots.X.toarray().astype(np.int64)[:50], var=spots.var.copy(),
                       obs=pd.DataFrame(index=spots.obs_names[:50]))
    G.GTAD(n_pseudo=100, epochs=3, n_hidden=8, progress=False).run(dense, reference)
    assert list(dense.obsm["proportions_gtad"].columns) == sorted(reference.obs["cell_type"].unique())
