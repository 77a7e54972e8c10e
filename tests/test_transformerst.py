"""TransformerST on synthetic slides with planted domains: graphs, sparse attention, graph loss, super-resolution."""

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

from stcore import metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods import transformerst as T
from stcore.methods.transformerst import TransformerST

FAST = dict(epochs=30, dec_epochs=5, progress=False)


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=300, n_genes=100, n_domains=4, marker_strength=1.5, seed=0)


def test_recovers_planted_domains(slide):
    adata = slide.copy()
    model = get_method("transformerst")(n_domains=4, seed=0, **FAST)
    model.run(adata)
    assert adata.obs["domain_transformerst"].nunique() == 4
    assert metrics.ari(adata.obs["domain"], adata.obs["domain_transformerst"]) > 0.6
    assert adata.obsm["X_transformerst"].shape == (adata.n_obs, 128 + 64)
    assert set(model.history_.terms) == {"reconstruction", "graph", "dec"}
    assert len(model.history_) == 35


def test_knn_cut_graph_matches_hand_rule():
    rng = np.random.default_rng(1)
    pts = rng.random((60, 3))
    ei = T.knn_cut_graph(pts, k=5).numpy()
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expected = set()
    for i in range(60):
        near = np.argsort(d[i])[:5]
        cut = d[i, near].mean() + d[i, near].std()
        expected |= {(i, j) for j in near if d[i, j] <= cut} | {(j, i) for j in near if d[i, j] <= cut}
    assert set(map(tuple, ei.T)) == expected
    assert (ei[0] != ei[1]).all()


def test_adaptive_graph_keeps_only_same_label_edges(slide):
    method = TransformerST(n_domains=4)
    x, _ = T.transformerst_expression(slide, 100)
    g1, g2, init = method.build_graphs(slide, x)
    lab = np.asarray(init)
    assert (lab[g2[0]] == lab[g2[1]]).all()
    e1, e2 = set(map(tuple, g1.T.tolist())), set(map(tuple, g2.T.tolist()))
    assert e2 <= e1 and len(e2) < len(e1)
    same = {e for e in e1 if lab[e[0]] == lab[e[1]]}
    assert e2 == same                       # the pruning is kept, not discarded as in the official code
    # the BCE target is (A1 + A2)/2 + I: 1 on graph-2 edges and the diagonal, 0.5 on the pruned edges
    model = T.TransformerSTModel(x.shape[1], slide.n_obs, g1, g2)
    n = slide.n_obs
    y = sparse.csr_matrix((model.pos_values.numpy(), (model.pos_keys.numpy() // n, model.pos_keys.numpy() % n)),
                          shape=(n, n)).toarray()
    a1 = np.zeros((n, n))
    a1[tuple(g1)] = 1
    a2 = np.zeros((n, n))
    a2[tuple(g2)] = 1
    assert np.allclose(y, (a1 + a2) / 2 + np.eye(n))


def test_attention_mix_equals_dense_product():
    """The sparse mix equals the official to_dense_adj(attention) @ h."""
    torch.manual_seed(0)
    n = 30
    ei = T.knn_cut_graph(np.random.default_rng(0).random((n, 2)), 4)
    conv = torch.nn.Module()
    from torch_geometric.nn import TransformerConv

    conv = TransformerConv(8, 8, heads=1).eval()
    h = torch.randn(n, 8)
    out, (edge_index, alpha) = conv(h, ei, return_attention_weights=True)
    dense = torch.zeros(n, n)
    dense[edge_index[0], edge_index[1]] = alpha[:, 0]
    assert torch.allclose(T.attention_mix(out, (edge_index, alpha)), dense @ out, atol=1e-5)


def test_graph_loss_estimates_dense_bce():
    torch.manual_seed(0)
    n = 80
    ei = T.knn_cut_graph(np.random.default_rng(0).random((n, 2)), 5)
    model = T.TransformerSTModel(10, n, ei, ei[:, ::2])
    z = torch.randn(n, 6) * 0.5
    a1 = torch.zeros(n, n)
    a1[ei[0], ei[1]] = 1
    a2 = torch.zeros(n, n)
    a2[ei[0, ::2], ei[1, ::2]] = 1
    y = (a1 + a2) / 2 + torch.eye(n)
    dense = model.norm * torch.nn.functional.binary_cross_entropy_with_logits(z @ z.T, y)
    estimates = torch.stack([model.graph_loss(z, n_samples=400) for _ in range(200)])
    assert estimates.mean() == pytest.approx(float(dense), rel=0.03)
    exact_pos = model.graph_loss(z, n_samples=10**6)       # all positives exactly, negatives sampled
    assert float(exact_pos) == pytest.approx(float(dense), rel=0.1)


def test_exact_graph_loss_equals_dense_bce_and_its_gradient():
    torch.manual_seed(0)
    n = 80
    ei = T.knn_cut_graph(np.random.default_rng(0).random((n, 2)), 5)
    model = T.TransformerSTModel(10, n, ei, ei[:, ::2])
    model.block_entries = 7 * n                      # several row blocks
    z = (torch.randn(n, 6) * 2).requires_grad_()
    a1 = torch.zeros(n, n)
    a1[ei[0], ei[1]] = 1
    a2 = torch.zeros(n, n)
    a2[ei[0, ::2], ei[1, ::2]] = 1
    y = (a1 + a2) / 2 + torch.eye(n)
    dense = model.norm * torch.nn.functional.binary_cross_entropy_with_logits(z @ z.T, y)
    exact = model.graph_loss(z)
    assert float(exact.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
    g_dense, = torch.autograd.grad(dense, z)
    g_exact, = torch.autograd.grad(exact, z)
    assert torch.allclose(g_exact, g_dense, atol=1e-6)


def test_histology_changes_the_graph_and_false_never_reads_the_image(slide):
    method = TransformerST(n_domains=4)
    pts = method.graph_points(slide)
    other = slide.copy()
    img = other.uns["spatial"]["toy"]["images"]["hires"]
    other.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])
    pts2 = method.graph_points(other)
    assert not np.allclose(pts[:, 2], pts2[:, 2])
    g_a = set(map(tuple, T.knn_cut_graph(pts, 10).T.tolist()))
    g_b = set(map(tuple, T.knn_cut_graph(pts2, 10).T.tolist()))
    assert g_a != g_b
    bare = slide.copy()
    del bare.uns["spatial"]                 # no image at all: histology=False must still run
    no_img = TransformerST(n_domains=4, histology=False)
    assert np.all(no_img.graph_points(bare)[:, 2] == 0)
    no_img = TransformerST(n_domains=4, histology=False, epochs=2, dec_epochs=1, progress=False)
    no_img.run(bare)
    assert bare.obs["domain_transformerst"].nunique() == 4


def _striped_slide(n_side=8, spacing=100.0, scale=0.25, seed=0):
    """Spots on a grid over an image of vertical red/blue stripes 40 full-resolution px wide (finer than the
    60-px spots); the gene follows the red fraction of the spot. Returns adata and the stripe of each column."""
    rng = np.random.default_rng(seed)
    size = int(spacing * (n_side + 1))
    stripe = (np.arange(size) // 40) % 2 == 0              # full-resolution columns
    cols = stripe[(np.arange(int(size * scale)) / scale).astype(int)]
    img = np.zeros((int(size * scale), int(size * scale), 3), np.uint8)
    img[:, cols] = (200, 40, 40)
    img[:, ~cols] = (40, 40, 200)
    gy, gx = np.meshgrid(np.arange(1, n_side + 1), np.arange(1, n_side + 1), indexing="ij")
    xy = np.column_stack([gx.ravel(), gy.ravel()]) * spacing + rng.uniform(-20, 20, (n_side**2, 2))
    diam = 60.0
    red = np.array([stripe[int(x - diam / 2):int(x + diam / 2)].mean() for x in xy[:, 0]])
    gene = rng.poisson(5 + 60 * red)
    other = rng.poisson(30, (len(xy), 3))
    X = sparse.csr_matrix(np.column_stack([gene, other]).astype(np.float32))
    adata = ad.AnnData(X=X)
    adata.var_names = ["G", "A", "B", "C"]
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"s": {"images": {"hires": img},
                                  "scalefactors": {"tissue_hires_scalef": scale, "spot_diameter_fullres": diam}}}
    return adata, stripe


def test_super_resolve_recovers_sub_spot_stripes():
    adata, stripe = _striped_slide()
    grid = np.column_stack([np.arange(100, 800, 20.0) + 10, np.full(35, 400.0)])
    out = T.super_resolve(adata, ["G"], res=20, grid=grid, epochs=150, progress=False)
    assert out.shape == (35, 1) and out.obsm["spatial"].shape == (35, 2)
    pred = np.asarray(out.X).ravel()
    truth = stripe[np.floor(grid[:, 0]).astype(int)]
    # sub-spot windows lie inside one stripe, so the planted pattern is visible only below spot resolution
    assert pred[truth].mean() - pred[~truth].mean() > 0.5
    assert metrics.ari(truth, pred > np.median(pred)) > 0.5
    assert out.uns["transformerst"]["pearson"][0] > 0.5


def test_errors(slide):
    with pytest.raises(ValueError, match="n_domains"):
        TransformerST(n_domains=None)
    with pytest.raises(ValueError, match="epochs"):
        TransformerST(epochs=0)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        TransformerST(n_domains=5000).run(slide.copy())
    with pytest.raises(ValueError, match="lower k"):
        TransformerST(n_domains=2, k=50).run(slide[:30].copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        TransformerST(n_domains=4).run(bare)
    with pytest.raises(KeyError, match="var_names"):
        T.super_resolve(slide, ["NOT_A_GENE"])
    no_diam = slide.copy()
    no_diam.uns["spatial"]["toy"]["scalefactors"].pop("spot_diameter_fullres", None)
    with pytest.raises(KeyError, match="spot_diameter_fullres"):
        T.super_resolve(no_diam, [slide.var_names[0]])
