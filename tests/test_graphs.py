import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from stcore import graphs


def _edges(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


@pytest.fixture
def coords():
    return np.random.default_rng(0).random((200, 2)) * 100


def test_knn_matches_brute_force(coords):
    k = 5
    d = cdist(coords, coords)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    directed = graphs.knn_graph(coords, k, symmetric=False)
    assert directed.dtype == torch.long and directed.shape == (2, 200 * k)
    assert _edges(directed) == {(j, i) for i in range(200) for j in nearest[i]}
    sym = graphs.knn_graph(coords, k)
    expected = {(j, i) for i in range(200) for j in nearest[i]}
    expected |= {(b, a) for a, b in expected}
    assert _edges(sym) == expected
    assert not any(a == b for a, b in _edges(sym))


def test_knn_with_duplicate_points_keeps_k():
    pts = np.array([[0, 0], [0, 0], [1, 0], [2, 0], [3, 0]], float)
    ei = graphs.knn_graph(pts, 2, symmetric=False)
    assert np.bincount(ei[1].numpy(), minlength=5).tolist() == [2] * 5
    assert all(a != b for a, b in _edges(ei))


def test_knn_self_loops_and_bad_k(coords):
    ei = graphs.knn_graph(coords, 3, include_self=True)
    assert sum(a == b for a, b in _edges(ei)) == 200
    with pytest.raises(ValueError, match="between 1 and"):
        graphs.knn_graph(coords[:3], 3)


def test_radius_graph_matches_brute_force(coords):
    d = cdist(coords, coords)
    expected = {(i, j) for i, j in zip(*np.nonzero((d < 10) & (d > 0)))}
    assert _edges(graphs.radius_graph(coords, 10.0)) == expected
    with pytest.raises(ValueError, match="positive"):
        graphs.radius_graph(coords, 0)


def test_visium_hex_graph_has_six_neighbours_inside():
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    row = rows.ravel()
    col = cols.ravel() * 2 + row % 2  # Visium: odd rows are shifted by one column
    ei = graphs.visium_hex_graph(row, col)
    deg = np.bincount(ei[1].numpy(), minlength=row.size)
    interior = (row > 0) & (row < 7) & (cols.ravel() > 0) & (cols.ravel() < 7)
    assert (deg[interior] == 6).all() and deg.max() == 6 and deg.min() >= 2
    # the hex neighbours are exactly the spots at Euclidean distance 1 in (col/2, row*sqrt(3)/2) space
    xy = np.column_stack([col / 2, row * np.sqrt(3) / 2])
    d = cdist(xy, xy)
    assert _edges(ei) == {(i, j) for i, j in zip(*np.nonzero(np.isclose(d, 1)))}


def test_visium_hex_graph_errors():
    with pytest.raises(ValueError, match="same"):
        graphs.visium_hex_graph([0, 0], [0, 0])
    with pytest.raises(ValueError, match="same length"):
        graphs.visium_hex_graph([0, 1], [0])


def test_feature_knn_cosine_ignores_scale():
    rng = np.random.default_rng(1)
    X = rng.random((50, 8))
    scaled = X * rng.uniform(1, 100, size=(50, 1))
    assert _edges(graphs.feature_knn_graph(X, 4)) == _edges(graphs.feature_knn_graph(scaled, 4))
    assert _edges(graphs.feature_knn_graph(X, 4, metric="euclidean")) != _edges(
        graphs.feature_knn_graph(scaled, 4, metric="euclidean"))
    X[3] = 0
    with pytest.raises(ValueError, match="all zeros"):
        graphs.feature_knn_graph(X, 4)
    X[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        graphs.feature_knn_graph(X, 4)


def test_histology_edge_weights():
    ei = torch.tensor([[0, 1, 0, 2], [1, 0, 2, 0]])
    colour = np.array([[0.0, 0, 0], [0.0, 0, 0.1], [1.0, 1, 1]])
    w = graphs.histology_edge_weights(ei, colour, sigma=1.0)
    assert torch.allclose(w, torch.tensor(np.exp(-np.array([0.01, 0.01, 3, 3]) / 2), dtype=torch.float32))
    hue = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0]])
    cos = graphs.histology_edge_weights(ei, hue, kind="cosine")
    assert np.allclose(cos.numpy(), [0.9939, 0.9939, 0, 0], atol=1e-4)
    with pytest.raises(ValueError, match="rows"):
        graphs.histology_edge_weights(torch.tensor([[0], [5]]), colour)


def test_mutual_nn_pairs_matching_points():
    rng = np.random.default_rng(2)
    A = rng.normal(size=(30, 5))
    B = A[::-1] + 1e-3 * rng.normal(size=(30, 5))
    pairs = graphs.mutual_nn(A, B, k=1, metric="euclidean")
    assert _edges(pairs) == {(i, 29 - i) for i in range(30)}
    more = graphs.mutual_nn(A, B, k=5)
    assert _edges(pairs) <= _edges(more)
    with pytest.raises(ValueError, match="same number of columns"):
        graphs.mutual_nn(A, B[:, :3])


def test_normalize_sym_and_rw():
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # path 0-1-2
    ei_s, w_s = graphs.normalize(ei, 3, kind="sym")
    A = graphs.to_scipy(ei_s, 3, w_s).toarray()
    deg = np.array([2, 3, 2])
    expected = (np.eye(3) + graphs.to_scipy(ei, 3).toarray()) / np.sqrt(np.outer(deg, deg))
    assert np.allclose(A, expected)
    ei_r, w_r = graphs.normalize(ei, 3, kind="rw")
    assert np.allclose(graphs.to_scipy(ei_r, 3, w_r).toarray().sum(1), 1)


def test_to_undirected_and_roundtrip():
    ei = torch.tensor([[0, 2], [1, 1]])
    und = graphs.to_undirected(ei, 3)
    assert _edges(und) == {(0, 1), (1, 0), (2, 1), (1, 2)}
    A = graphs.to_scipy(und, 3)
    back, w = graphs.from_scipy(A)
    assert _edges(back) == _edges(und) and torch.all(w == 1)


def test_knn_indices_exclude_self_even_with_duplicates():
    xy = np.array([[0, 0], [0, 0], [1, 0], [5, 0]], float)
    idx = graphs.knn_indices(xy, 2)
    assert not (idx == np.arange(4)[:, None]).any()
    assert set(idx[0]) == {1, 2} and set(idx[1]) == {0, 2}
