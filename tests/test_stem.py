"""STEM: the adjacency target, the three losses and integrated gradients against hand/dense computations; cells
placed near their planted positions; determinism; output format; input errors."""

import anndata as ad
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

from stcore import metrics
from stcore.cli import main
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods import stem as S
from stcore.nn import mmd

FAST = {"epochs": 100, "mmd_batch": 300, "progress": False}


@pytest.fixture(scope="module")
def pair():
    reference, cells = synthetic.toy_pair(n_cells=400, n_spots=1500, n_genes=60, n_types=4, seed=0)
    spots = synthetic.grid_spots(cells, spot_size=100.0)
    return spots[spots.obs["n_cells"] >= 3].copy(), reference


@pytest.fixture(scope="module")
def fitted(pair):
    spots, reference = pair
    method = S.STEM(**FAST)
    return method, method.run(spots, reference)


def test_registered():
    cls = get_method("stem")
    assert cls is S.STEM and cls.task == "locate" and cls.needs_reference


# ---------------------------------------------------------------------------------------------- inputs
def test_dropout_rate_and_sigma_by_hand():
    spots = sparse.csr_matrix(np.array([[1, 1, 1, 1, 0, 0], [2, 0, 3, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))
    cells = np.array([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert S.st_dropout_rate(spots, cells) == pytest.approx(1 - 2 / 4)        # medians 4 and 2
    assert S.st_dropout_rate(cells, spots) == 0.0                            # spots no denser: clipped
    grid = np.array([[x, y] for x in range(4) for y in range(3)], dtype=float) * 100
    assert S.default_sigma(grid) == pytest.approx(50.0)


def test_adjacency_target_by_hand():
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    row = np.exp(-np.array([0.0, 1.0, 9.0]) / 2)
    T = S.adjacency_target(coords, 1.0)
    np.testing.assert_allclose(T[0].numpy(), row / row.sum(), rtol=1e-6)
    np.testing.assert_allclose(T.sum(1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(S.adjacency_target(coords, 1.0, 1, 3).numpy(), T[1:].numpy())
    np.testing.assert_array_equal(S.adjacency_target(coords, 0.0).numpy(), np.eye(3))
    np.testing.assert_array_equal(S.adjacency_target(coords, 0.0, 2, 3).numpy(), [[0, 0, 1]])


def test_cycle_ramp_matches_official_schedule():
    assert S.cycle_ramp(0, 400) == 0 and S.cycle_ramp(50, 400) == 0
    assert S.cycle_ramp(225, 400) == pytest.approx(0.5) and S.cycle_ramp(400, 400) == pytest.approx(1.0)
    assert S.cycle_ramp(12, 40) == pytest.approx((12 - 5) / 35)               # short run: starts at E // 8


# ---------------------------------------------------------------------------------------------- losses
def _embeddings(n_st=9, n_sc=13, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    e_st = torch.randn(n_st, d, generator=g).requires_grad_(True)
    e_sc = torch.randn(n_sc, d, generator=g).requires_grad_(True)
    coords = torch.rand(n_st, 2, generator=g).double()
    return e_st, e_sc, coords


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_adjacency_loss_blocks_match_official_dense_formula():
    e_st, _, coords = _embeddings()
    dense = F.cross_entropy(e_st @ e_st.T, S.adjacency_target(coords, 0.2))
    (g_dense,) = _grads(dense, e_st)
    for block in (2, 3, 2048):                          # blocks of <= block^2 entries: 2, 1 and 9 rows
        ours = S.adjacency_loss(e_st, coords, 0.2, block_size=block)
        (g_ours,) = _grads(ours, e_st)
        assert torch.allclose(ours, dense, atol=1e-5) and torch.allclose(g_ours, g_dense, atol=1e-5)


def test_cycle_loss_blocks_match_official_dense_formula():
    e_st, e_sc, coords = _embeddings()
    T = S.adjacency_target(coords, 0.2)
    st2st = F.softmax(e_st @ e_sc.T, 1) @ F.softmax(e_sc @ e_st.T, 1)
    dense = F.kl_div(torch.log(st2st + 1e-7), T, reduction="none").sum(1).mean()
    g_dense = _grads(dense, e_st, e_sc)
    for block in (3, 5, 2048):
        ours = S.cycle_loss(e_st, e_sc, coords, 0.2, block_size=block)
        g_ours = _grads(ours, e_st, e_sc)
        assert torch.allclose(ours, dense, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_dense))


def test_mmd_identical_shifted_and_against_stcore_mmd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    assert abs(float(S.stem_mmd(x, x.clone()))) < 1e-5
    shifts = [float(S.stem_mmd(x, x + s)) for s in (0.25, 0.5, 1.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    y = (torch.randn(25, 4, generator=g) + 0.5).requires_grad_(True)
    x = x.requires_grad_(True)
    ours = S.stem_mmd(x, y)
    assert torch.allclose(ours, mmd(x, y), atol=1e-5)                        # same value, data-driven widths
    assert torch.allclose(S.stem_mmd(x, y, block_size=4), ours, atol=1e-5)  # blockwise = dense
    z = torch.cat([x, y]).detach()
    gamma = torch.cdist(z, z).pow(2).sum() / (len(z) ** 2 - len(z))
    widths = [float((gamma * 2.0 ** (s - 2) / 2).sqrt()) for s in range(5)]  # exp(-d2/b) = exp(-d2/(2 w^2))
    fixed = mmd(x, y, bandwidths=widths)                                      # official: widths detached
    assert torch.allclose(ours, fixed, atol=1e-5)
    g_fixed = _grads(fixed, x, y)
    for loss in (ours, S.stem_mmd(x, y, block_size=4)):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_grads(loss, x, y), g_fixed))


# ---------------------------------------------------------------------------------------------- attributions
def test_integrated_gradients_completeness():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(6, 3, generator=g)
    x, base = torch.randn(10, 6, generator=g), torch.randn(6, generator=g)
    quadratic = lambda v: (v @ W).pow(2).sum(1) + v[:, 0]
    A = S.integrated_gradients(quadratic, x, base, n_steps=2)                 # Gauss-Legendre: exact
    np.testing.assert_allclose(A.sum(1), quadratic(x) - quadratic(base.expand_as(x)), rtol=1e-5, atol=1e-5)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    f = lambda v: net(v).squeeze(1)
    with torch.no_grad():
        gap = f(x) - f(torch.zeros_like(x))
    for method in ("gausslegendre", "riemann_trapezoid"):
        A = S.integrated_gradients(f, x, n_steps=64, method=method, batch_size=3)
        np.testing.assert_allclose(A.sum(1), gap, atol=2e-3)
    linear = lambda v: v @ W[:, 0]
    np.testing.assert_allclose(S.integrated_gradients(linear, x, n_steps=1), x * W[:, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="method"):
        S.integrated_gradients(f, x, method="left")


# ---------------------------------------------------------------------------------------------- the method
def test_places_cells_near_their_planted_positions(pair, fitted):
    spots, reference = pair
    method, out = fitted
    truth = reference.obsm["spatial_truth"]
    shuffled = np.median(metrics.location_error(truth, np.random.default_rng(0).permutation(truth)))
    bound = 0.4 * shuffled
    error = np.median(metrics.location_error(truth, out.obsm["spatial_stem"]))
    untrained = S.STEM(**{**FAST, "epochs": 1}).run(spots, reference).obsm["spatial_stem"]
    assert error < bound < np.median(metrics.location_error(truth, untrained))
    chance = 10 / (reference.n_obs - 1)
    assert metrics.neighbourhood_preservation(truth, out.obsm["spatial_stem"], k=10) > 4 * chance
    assert method.dropout_ > 0 and method.sigma_ == pytest.approx(50.0)
    assert set(method.history_.terms) == {"adjacency", "mmd", "cycle"} and len(method.history_) == 100
    assert method.history_.terms["cycle"][0] == 0 and method.history_.terms["cycle"][-1] > 0


def test_outputs_and_mappings(pair, fitted):
    spots, reference = pair
    method, out = fitted
    assert out is not reference and "spatial_stem" not in reference.obsm
    assert list(out.obs_names) == list(reference.obs_names)
    assert out.obsm["spatial_stem"].shape == (reference.n_obs, 2) and out.obsm["X_stem"].shape == (reference.n_obs, 128)
    P = method.mapping("sc2st")
    assert P.shape == (reference.n_obs, spots.n_obs) and np.allclose(P.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(P @ spots.obsm["spatial"], out.obsm["spatial_stem"], rtol=1e-4)
    assert method.mapping("st2sc", rows=[0, 1]).shape == (2, reference.n_obs)
    top1 = method.predict_coords(top_k=1)
    np.testing.assert_allclose(top1, spots.obsm["spatial"][P.argmax(1)])
    mass = method.spot_type_mass(reference.obs["cell_type"])
    assert mass.shape == (spots.n_obs, 4) and mass.to_numpy().sum() == pytest.approx(reference.n_obs, rel=1e-4)
    with pytest.raises(ValueError, match="max_entries"):
        method.mapping(max_entries=10)


def test_dominant_genes_attributions_are_complete(fitted):
    method, out = fitted
    cells = np.arange(30)
    table = method.dominant_genes(cells, n_steps=128)
    assert list(table.columns) == ["score", "dx", "dy"] and table["score"].is_monotonic_decreasing
    assert method.attributions_.shape == (30, len(method.genes_), 2) == (30, 50, 2)
    x = method.x_sc_[cells]
    for axis, u in enumerate(([1.0, 0.0], [0.0, 1.0])):
        f = method.position_function(u)
        with torch.no_grad():
            gap = (f(x) - f(torch.zeros_like(x))).numpy()
        miss = np.abs(method.attributions_[..., axis].sum(1) - gap)        # quadrature error, side = 1000
        assert miss.max() < 10 and np.median(miss) < 2
        np.testing.assert_allclose(f(x).detach().numpy(), out.obsm["spatial_stem"][cells, axis], rtol=1e-4)


def test_deterministic_given_the_seed(pair):
    spots, reference = pair
    kw = {"epochs": 3, "mmd_batch": 50, "progress": False, "seed": 3}
    a = S.STEM(**kw).run(spots, reference).obsm["spatial_stem"]
    b = S.STEM(**kw).run(spots, reference).obsm["spatial_stem"]
    np.testing.assert_array_equal(a, b)
    c = S.STEM(**{**kw, "seed": 4}).run(spots, reference).obsm["spatial_stem"]
    assert not np.array_equal(a, c)


def test_command_line(pair, tmp_path):
    spots, reference = pair
    spots.write_h5ad(tmp_path / "spots.h5ad")
    reference.write_h5ad(tmp_path / "cells.h5ad")
    code = main(["run", "stem", str(tmp_path / "spots.h5ad"), "--reference", str(tmp_path / "cells.h5ad"), "-o",
                 str(tmp_path / "out.h5ad"), "--epochs", "2", "--dims", "32,8", "--progress", "false"])
    assert code == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["spatial_stem"].shape == (reference.n_obs, 2) and out.obsm["X_stem"].shape[1] == 8


def test_input_errors(pair):
    spots, reference = pair
    quick = {"epochs": 1, "progress": False}
    with pytest.raises(ValueError, match="reference"):
        S.STEM(**quick).run(spots)
    no_coords = spots.copy()
    del no_coords.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        S.STEM(**quick).run(no_coords, reference)
    logged = reference.copy()
    logged.X = np.log1p(logged.X.toarray())
    with pytest.raises(ValueError, match="raw counts"):
        S.STEM(**quick).run(spots, logged)
    renamed = reference.copy()
    renamed.var_names = [f"other{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="share 0 genes"):
        S.STEM(**quick).run(spots, renamed)
    empty = reference.copy()
    X = empty.X.toarray()
    X[0] = 0
    empty.X = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match="no counts"):
        S.STEM(**quick).run(spots, empty)
    for bad in ({"epochs": 0}, {"sigma": -1.0}, {"dropout": 1.0}, {"top_k": 0}, {"lr": 0.0}, {"gamma": 2.0}):
        with pytest.raises(ValueError):
            S.STEM(**bad)
    with pytest.raises(RuntimeError, match="Fit STEM first"):
        S.STEM().predict_coords()
