"""GraphST: the graph, the features, the contrastive autoencoder loss and the neighbourhood InfoNCE against dense
hand computations; planted domains and proportions; determinism; input errors."""

import anndata as ad
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods import graphst as G
from stcore.metrics import deconvolution_scores, domain_scores

FAST_DECONV = {"epochs": 100, "lr": 0.01, "sc_epochs": 100, "map_epochs": 200, "map_lr": 0.01, "progress": False}


@pytest.fixture(scope="module")
def pair():
    reference, cells = synthetic.toy_pair(n_cells=400, n_spots=1500, n_genes=60, n_types=4, seed=0)
    spots = synthetic.grid_spots(cells, spot_size=100.0)
    return spots, reference


@pytest.fixture(scope="module")
def deconvolved(pair):
    spots, reference = pair
    adata = spots.copy()
    method = G.GraphSTDeconvolution(**FAST_DECONV)
    method.run(adata, reference)
    return adata, method


def test_registered():
    assert get_method("graphst") is G.GraphST and G.GraphST.task == "domains"
    cls = get_method("graphst_deconv")
    assert cls is G.GraphSTDeconvolution and cls.task == "deconv" and cls.needs_reference


# ---------------------------------------------------------------------------------------------- graph, features
def test_graph_official_normalisation_by_hand():
    coords = np.array([[0.0, 0], [1, 0], [3, 0], [6, 0]])
    ei, w, readout = G.graphst_graph(coords, k=1)
    # nearest of 0 is 1, of 1 is 0, of 2 is 1, of 3 is 2: readout edges j -> i
    assert sorted(zip(*readout.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 3)]
    A = np.zeros((4, 4))
    for j, i in zip(*readout.tolist()):
        A[i, j] = A[j, i] = 1
    d = A.sum(1) ** -0.5
    expected = d[:, None] * A * d[None, :] + np.eye(4)
    got = sparse.csr_matrix((w.numpy(), (ei[0].numpy(), ei[1].numpy())), shape=(4, 4)).toarray()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    ei2, w2, _ = G.graphst_graph(coords, k=1, adj_norm="gcn")
    At = A + np.eye(4)
    dt = At.sum(1) ** -0.5
    got2 = sparse.csr_matrix((w2.numpy(), (ei2[0].numpy(), ei2[1].numpy())), shape=(4, 4)).toarray()
    np.testing.assert_allclose(got2, dt[:, None] * At * dt[None, :], atol=1e-6)


def test_features_match_scanpy():
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(50, 30)).astype(np.float32)
    adata = ad.AnnData(sparse.csr_matrix(counts))
    X, genes = G.graphst_features(adata, n_top_genes=3000)
    # scanpy: normalize_total(1e4), log1p, scale(zero_center=False, max_value=10) (sd with n - 1)
    logged = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    expected = np.minimum(logged / logged.std(0, ddof=1), 10)
    np.testing.assert_allclose(X, expected, rtol=1e-4, atol=1e-5)
    assert len(genes) == 30 and X.max() <= 10


# ---------------------------------------------------------------------------------------------- spot encoder
def test_encoder_loss_matches_dense_official_formula():
    torch.manual_seed(0)
    coords = np.random.default_rng(1).random((12, 2))
    x = torch.rand(12, 7)
    ei, w, readout = G.graphst_graph(coords, k=3)
    model = G.GraphSTEncoder(7, ei, w, readout, 12, n_latent=5)
    terms = model.loss(x)
    A_hat = torch.sparse_coo_tensor(ei, w, (12, 12), check_invariants=True).to_dense()
    mask = torch.eye(12)                           # graph_neigh + I: row i = i and its 3 nearest
    for j, i in zip(*readout.tolist()):
        mask[i, j] = 1
    z = A_hat @ x @ model.weight1
    h = A_hat @ z @ model.weight2
    z_a = A_hat @ x[model.permutation] @ model.weight1
    emb, emb_a = F.relu(z), F.relu(z_a)
    g = torch.sigmoid(F.normalize(mask @ emb / mask.sum(1, keepdim=True), dim=1))
    g_a = torch.sigmoid(F.normalize(mask @ emb_a / mask.sum(1, keepdim=True), dim=1))
    disc = model.discriminator
    ret = torch.stack([disc(emb, g), disc(emb_a, g)], 1)
    ret_a = torch.stack([disc(emb_a, g_a), disc(emb, g_a)], 1)
    label = torch.stack([torch.ones(12), torch.zeros(12)], 1)
    bce = torch.nn.BCEWithLogitsLoss()
    assert torch.allclose(terms["contrastive"], bce(ret, label) + bce(ret_a, label), atol=1e-5)
    assert torch.allclose(terms["reconstruction"], 10 * F.mse_loss(x, h), rtol=1e-5)
    assert torch.allclose(model(x)[1], h, atol=1e-5)


def test_refine_majority_of_neighbours():
    coords = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0], [10, 0]])
    labels = np.array(["a", "a", "b", "a", "b"])
    # radius 3 (self excluded): spot 2 sees a, a, a; spot 4 sees 3, 2, 1 = a, b, a -> every spot becomes a
    np.testing.assert_array_equal(G.graphst_refine(labels, coords, radius=3), ["a"] * 5)
    # a tie goes to the nearest label: spot 3 with radius 2 sees 2 (b, distance 1) and 1 (a, distance 2)
    assert G.graphst_refine(labels, coords, radius=2)[3] == "b"


def test_recovers_planted_domains_and_is_deterministic():
    adata = synthetic.toy_domains(n_spots=400, n_genes=60, n_domains=3, image=False, seed=0)
    kw = {"n_domains": 3, "epochs": 60, "lr": 0.01, "progress": False}
    a1, a2 = G.GraphST(**kw).run(adata.copy()), G.GraphST(**kw).run(adata.copy())
    assert domain_scores(adata.obs["domain"], a1.obs["domain_graphst"])["ARI"] > 0.8
    np.testing.assert_array_equal(a1.obsm["X_graphst"], a2.obsm["X_graphst"])
    assert a1.obsm["X_graphst"].shape == (400, 60)


# ---------------------------------------------------------------------------------------------- deconvolution
def _dense_nce(pred, target, mask):
    mat = F.normalize(pred, dim=1) @ F.normalize(target, dim=1).T
    k = torch.exp(mat).sum(1) - torch.exp(torch.diag(mat))
    p = (torch.exp(mat) * mask).sum(1)
    return -torch.log(p / k).mean()


def test_info_nce_blocks_match_dense_loss_and_gradient():
    torch.manual_seed(0)
    coords = np.random.default_rng(2).random((10, 2))
    _, _, readout = G.graphst_graph(coords, k=3)
    mask = torch.eye(10)
    for j, i in zip(*readout.tolist()):
        mask[i, j] = 1
    target = torch.randn(10, 6)
    pred = torch.randn(10, 6, requires_grad=True)
    dense = _dense_nce(pred, target, mask)
    (g_dense,) = torch.autograd.grad(dense, pred)
    for block in (1, 3, 2048):
        ours = G.neighbourhood_info_nce(pred, target, readout, block_size=block)
        (g_ours,) = torch.autograd.grad(ours, pred)
        assert torch.allclose(ours, dense, atol=1e-5) and torch.allclose(g_ours, g_dense, atol=1e-5)
    every = G.neighbourhood_info_nce(pred, target, readout, negatives=torch.arange(10))
    assert torch.allclose(every, dense, atol=1e-5)


def test_top_cells_proportions_by_hand():
    P = torch.tensor([[0.5, 0.1], [0.3, 0.2], [0.1, 0.6], [0.05, 0.05], [0.05, 0.05]])  # 5 cells x 2 spots
    codes = np.array([0, 1, 1, 0, 0])
    props = G.top_cells_proportions(P, codes, retain_percent=0.4)   # keep 2 cells per spot
    np.testing.assert_allclose(props, [[0.5 / 0.8, 0.3 / 0.8], [0.0, 1.0]], atol=1e-6)


def test_recovers_planted_proportions(deconvolved, pair):
    adata, method = deconvolved
    truth = adata.obsm["proportions"]
    props = adata.obsm["proportions_graphst_deconv"]
    np.testing.assert_allclose(props.sum(1), 1.0, atol=1e-5)
    scores = deconvolution_scores(truth.to_numpy(), props.reindex(columns=truth.columns).to_numpy()).mean()
    uniform_rmse = np.sqrt(((truth.to_numpy() - truth.to_numpy().mean(0)) ** 2).mean(0)).mean()
    # NNLS: PCC 0.95, RMSE 0.11; the mean composition: RMSE 0.31, PCC undefined; random mapping: PCC ~0
    assert scores["PCC"] > 0.5 and scores["RMSE"] < 0.26 < uniform_rmse
    nnls = pair[0].copy()
    get_method("nnls")().run(nnls, pair[1])
    assert deconvolution_scores(truth.to_numpy(), nnls.obsm["proportions_nnls"].reindex(
        columns=truth.columns).to_numpy()).mean()["RMSE"] < 0.26
    assert method.mapping_.shape == (pair[1].n_obs, adata.n_obs)
    np.testing.assert_allclose(method.mapping_.sum(1).numpy(), 1.0, atol=1e-5)


def test_deconvolution_is_deterministic(pair, deconvolved):
    small = {**FAST_DECONV, "epochs": 5, "sc_epochs": 5, "map_epochs": 5}
    a, b = pair[0].copy(), pair[0].copy()
    G.GraphSTDeconvolution(**small).run(a, pair[1])
    G.GraphSTDeconvolution(**small).run(b, pair[1])
    np.testing.assert_array_equal(a.obsm["proportions_graphst_deconv"], b.obsm["proportions_graphst_deconv"])


def test_sampled_negatives_option(pair):
    m = G.GraphSTDeconvolution(n_negatives="auto", exact_nce_max=10)
    assert m.n_negatives_for(10) is None and m.n_negatives_for(11) == 1024
    assert G.GraphSTDeconvolution(n_negatives=None).n_negatives_for(10**6) is None


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs(pair):
    spots, reference = pair
    with pytest.raises(ValueError, match="single-cell reference"):
        G.GraphSTDeconvolution(progress=False).run(spots.copy(), None)
    with pytest.raises(KeyError, match="spatial"):
        no_xy = spots.copy()
        del no_xy.obsm["spatial"]
        G.GraphSTDeconvolution(progress=False).run(no_xy, reference)
    with pytest.raises(KeyError, match="cell_type"):
        G.GraphSTDeconvolution(cell_type_key="celltype", progress=False).run(spots.copy(), reference)
    other = reference.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="share 0 genes"):
        G.GraphSTDeconvolution(progress=False).run(spots.copy(), other)
    logged = spots.copy()
    logged.X = np.log1p(logged.X.toarray() if sparse.issparse(logged.X) else logged.X) + 0.5
    with pytest.raises(ValueError, match="raw counts"):
        G.GraphSTDeconvolution(progress=False).run(logged, reference)
    with pytest.raises(ValueError, match="more spots than k"):
        G.graphst_graph(np.zeros((3, 2)), k=3)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "k=0"), ({"epochs": 0}, "epochs=0"), ({"alpha": -1.0}, "alpha=-1.0"), ({"lr": 0}, "lr=0"),
    ({"adj_norm": "rw"}, "adj_norm"), ({"clustering": "dbscan"}, "clustering"), ({"n_domains": 0}, "n_domains=0"),
])
def test_bad_domain_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.GraphST(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"retain_percent": 0.0}, "retain_percent"), ({"map_epochs": 0}, "map_epochs"),
    ({"lambda1": -1.0}, "lambda1"), ({"n_negatives": "some"}, "n_negatives"),
])
def test_bad_deconv_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.GraphSTDeconvolution(**kwargs)


def test_too_many_domains():
    adata = synthetic.toy_domains(n_spots=20, n_genes=30, n_domains=2, image=False, seed=0)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        G.GraphST(n_domains=50, progress=False).run(adata)
