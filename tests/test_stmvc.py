"""stMVC on synthetic slides with planted domains, where the histology enters, and its pieces by hand."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from stcore import graphs, metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods.stmvc import StMVC, ViewAttention, graph_loss, histology_graph, training_labels


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=400, n_genes=120, n_domains=4, marker_strength=1.0, seed=0)


FAST = {"epochs": 30, "rounds": 2, "ae_epochs": 10, "ae_hidden": 64, "n_hvg": 120, "tile_epochs": 1, "tile_fullres": 80,
        "tile_latent": 16, "progress": False, "label_key": "domain"}


def test_recovers_planted_domains_supervised_and_not(slide):
    adata = slide.copy()
    method = get_method("stmvc")(n_domains=4, seed=0, **FAST)
    method.run(adata)
    assert adata.obs["domain_stmvc"].nunique() == 4
    assert adata.obsm["X_stmvc"].shape == (adata.n_obs, 10)
    # the supervised model is scored on the spots whose labels it never saw
    held_out = ~method.train_mask_
    assert 0.25 < held_out.mean() < 0.35
    assert metrics.ari(adata.obs["domain"][held_out], adata.obs["domain_stmvc"][held_out]) > 0.85
    history = method.history_
    assert {"graph_hsg", "graph_slg", "robust", "ce_views", "ce_fused"} <= set(history.terms)
    assert len(history) == method.rounds_run_ * 3 * 30
    lam = adata.obsm["attention_stmvc"]
    assert list(lam.columns) == ["hsg", "slg"] and lam.shape == (adata.n_obs, 2)
    assert np.allclose(lam.sum(1), 1.0, atol=1e-5) and (lam.to_numpy() > 0).all()
    plain = slide.copy()
    StMVC(n_domains=4, supervised=False, histology=False, seed=0, **FAST).run(plain)
    assert metrics.ari(plain.obs["domain"], plain.obs["domain_stmvc"]) > 0.8


def test_histology_enters_the_hsg_and_histology_false_never_reads_the_image(slide):
    method = StMVC(n_domains=4, supervised=False, seed=0, **FAST)
    h, views = method.prepare(slide)
    assert list(views) == ["hsg", "slg"] and h.shape == (slide.n_obs, 50)
    feats = method.image_features_
    flipped = slide.copy()
    img = flipped.uns["spatial"]["toy"]["images"]["hires"]
    flipped.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])
    h2, views2 = method.prepare(flipped)
    assert torch.equal(h, h2) and torch.equal(views["slg"], views2["slg"])       # RNA and SLG untouched
    assert not np.allclose(feats, method.image_features_)
    assert views["hsg"].shape != views2["hsg"].shape or not torch.equal(views["hsg"], views2["hsg"])
    z1 = method.build_model(h, views).fuse(h)[1]
    z2 = method.build_model(h2, views2).fuse(h2)[1]
    assert not torch.allclose(z1, z2)
    bare = slide.copy()
    del bare.uns["spatial"]
    plain = StMVC(n_domains=4, supervised=False, histology=False, seed=0, **FAST)
    plain.run(bare)
    assert plain.image_features_ is None and list(plain.graphs_) == ["slg"]
    assert np.allclose(plain.attention_.to_numpy(), 1.0)


def test_hsg_links_the_most_similar_spots():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 8))
    edge_index = histology_graph(feats, k=7)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    A = graphs.to_scipy(edge_index, 60).toarray() > 0
    for i in range(60):
        top6 = np.argsort(-sim[i])[:6]           # 7 nearest counting the spot itself
        assert A[i, top6].all()
        worst = np.argsort(sim[i])[1:7]          # the official bug would link these
        assert not A[i, worst].all()
    assert (A == A.T).all() and not A.diagonal().any()


def test_view_attention_by_hand():
    torch.manual_seed(0)
    att = ViewAttention(n_latent=10, n_views=2, n_classes=5)
    z1, z2 = torch.randn(30, 10), torch.randn(30, 10)
    lam, robust, logits = att([z1, z2])
    assert lam.shape == (30, 2) and robust.shape == (30, 10) and logits.shape == (30, 5)
    assert torch.allclose(lam.sum(1), torch.ones(30))
    scores = torch.cat([z1, z2], 1) @ att.a
    scores = torch.where(scores > 0, scores, 0.2 * scores)
    expected = torch.exp(scores) / torch.exp(scores).sum(1, keepdim=True)
    assert torch.allclose(lam, expected, atol=1e-6)
    assert torch.allclose(robust, expected[:, :1] * z1 + expected[:, 1:] * z2, atol=1e-6)


def test_unsupervised_collaborative_step_trains_the_attention(slide):
    method = StMVC(n_domains=4, supervised=False, seed=0, **FAST)
    h = torch.randn(slide.n_obs, 50)
    views = {"hsg": graphs.knn_graph(np.random.default_rng(1).random((slide.n_obs, 2)), 6),
             "slg": graphs.knn_graph(slide.obsm["spatial"], 6)}
    model = method.build_model(h, views)
    model.stage = "collab"
    terms = model.loss(h)
    assert set(terms) == {"graph_hsg", "graph_slg", "robust", "graph_fused"}
    sum(terms.values()).backward()
    assert model.attention.a.grad is not None and model.attention.a.grad.abs().sum() > 0
    model.zero_grad()
    model.stage = 1                                  # a view step touches only its own view
    sum(model.loss(h).values()).backward()
    assert model.views[0].conv1.lin.weight.grad is None and model.views[1].conv1.lin.weight.grad is not None


def test_sparse_graph_loss_equals_the_dense_official_loss():
    torch.manual_seed(0)
    n = 40
    edge_index = graphs.knn_graph(np.random.default_rng(0).random((n, 2)), 4)
    z = torch.randn(n, 6)
    A = torch.as_tensor(graphs.to_scipy(edge_index, n).toarray(), dtype=torch.float32)
    label = A + torch.eye(n)
    pos_weight = (n * n - A.sum()) / A.sum()
    norm = n * n / float(2 * (n * n - A.sum()))
    dense = norm * F.binary_cross_entropy_with_logits(z @ z.T, label, pos_weight=pos_weight)
    all_pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n)).T
    pos = graphs.add_self_loops(edge_index, n)
    exact = graph_loss(z, pos, n, edge_index.shape[1], pairs=all_pairs)
    assert exact.item() == pytest.approx(dense.item(), rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    sampled = torch.stack([graph_loss(z, pos, n, edge_index.shape[1], neg_ratio=4, generator=gen)
                           for _ in range(200)]).mean()
    assert sampled.item() == pytest.approx(dense.item(), rel=0.05)          # unbiased estimate


def test_training_labels_are_stratified_and_skip_unlabelled():
    labels = np.array(["a"] * 50 + ["b"] * 30 + [np.nan] * 20, dtype=object)
    y, classes = training_labels(labels, 0.7, seed=0)
    assert classes == ["a", "b"]
    assert (y[80:] == -1).all()
    assert (y[:50] == 0).sum() == 35 and (y[50:80] == 1).sum() == 21
    assert set(np.unique(y[:50])) <= {0, -1} and set(np.unique(y[50:80])) <= {1, -1}


def test_errors(slide):
    with pytest.raises(ValueError, match="n_domains"):
        StMVC(n_domains=0)
    with pytest.raises(ValueError, match="train_fraction"):
        StMVC(train_fraction=0.0)
    with pytest.raises(ValueError, match="epochs"):
        StMVC(epochs=0)
    with pytest.raises(KeyError, match="supervised=False"):
        StMVC(n_domains=4, label_key="layer", progress=False).run(slide.copy())
    unlabelled = slide.copy()
    unlabelled.obs["domain"] = pd.Series([np.nan] * unlabelled.n_obs, index=unlabelled.obs_names, dtype=object)
    with pytest.raises(ValueError, match="no labels"):
        StMVC(n_domains=4, **FAST).run(unlabelled)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        StMVC(n_domains=5000, **FAST).run(slide.copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="image"):
        StMVC(n_domains=4, **FAST).run(bare)
    logged = slide.copy()
    logged.X = logged.X * 0.5
    with pytest.raises(ValueError, match="count"):
        StMVC(n_domains=4, histology=False, **FAST).run(logged)
