"""Clustering an embedding into spatial domains, the way the methods of the course do it.

* Graph clustering: :func:`leiden` and :func:`louvain` on a kNN graph of an embedding (or on any adjacency), and
  :func:`search_resolution` to hit a known number of domains K, as SpaGCN, DeepST and TransformerST do.
* Model-based: :func:`kmeans` and :func:`gmm` (tied covariance = R mclust's "EEE" model, which STAGATE, GraphST,
  ConGI, SpatialGlue and PRAGA call through rpy2; no R is needed here).
* :func:`refine`: SpaGCN's majority-vote smoothing of labels over the nearest spots.
* :func:`cluster`: one entry point for the methods, ``cluster(z, K, method="gmm")``.

Graphs of an embedding are built as ``scanpy.pp.neighbors`` builds them (UMAP's fuzzy connectivities over the
exact k nearest neighbours, :func:`umap_connectivities`), and communities are found with ``leidenalg``: the
Leiden algorithm, or the Louvain algorithm of the ``louvain`` package that ``scanpy.tl.louvain`` calls.
"""

from __future__ import annotations

import igraph as ig
import leidenalg
import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from .graphs import feature_knn_graph, knn_indices, to_scipy

__all__ = ["cluster", "communities", "community_graph", "gmm", "kmeans", "knn_adjacency", "leiden", "louvain",
           "refine", "search_resolution", "umap_connectivities"]

METHODS = ("gmm", "kmeans", "leiden", "louvain")


# --------------------------------------------------------------------------------------------------------------
# input checks


def _check_X(X, n_clusters=None) -> np.ndarray:
    X = X.toarray() if sp.issparse(X) else np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X has shape {X.shape}; pass a 2-D (n_spots, n_features) array such as an embedding.")
    if not np.isfinite(X).all():
        raise ValueError(f"X has {int((~np.isfinite(X)).sum())} NaN/inf values; impute or drop them (e.g. "
                         "np.nan_to_num) before clustering.")
    if n_clusters is not None:
        _check_k(n_clusters, len(X))
    return X


def _check_k(n_clusters, n):
    if int(n_clusters) != n_clusters or n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters}; the number of clusters must be a positive integer.")
    if n_clusters > n:
        raise ValueError(f"n_clusters={n_clusters} is larger than the number of spots ({n}); ask for at most "
                         f"{n} clusters.")


def _by_size(membership) -> np.ndarray:
    """Relabel clusters 0, 1, ... from the largest to the smallest (ties: first appearance)."""
    m = np.unique(np.asarray(membership), return_inverse=True)[1].ravel()
    order = np.argsort(-np.bincount(m), kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[m]


# --------------------------------------------------------------------------------------------------------------
# graph clustering


def knn_adjacency(X, n_neighbors: int = 15, weighting: str = "umap") -> sp.csr_matrix:
    """Symmetric kNN adjacency (n, n) of an embedding (sparse, no self loops), as ``scanpy.pp.neighbors`` builds it.

    As in scanpy, ``n_neighbors`` counts the spot itself, so each spot is joined to its ``n_neighbors - 1``
    nearest other spots (Euclidean, exact search). ``weighting="umap"`` (scanpy's default) weights the edges by
    UMAP's fuzzy connectivities (:func:`umap_connectivities`); ``"binary"`` gives every edge of the union
    ``max(A, A^T)`` weight 1.
    """
    X = _check_X(X)
    k = min(n_neighbors - 1, len(X) - 1)
    if k < 1:
        raise ValueError(f"n_neighbors={n_neighbors} with {len(X)} spots leaves no neighbours; use n_neighbors >= 2.")
    if weighting == "umap":
        return umap_connectivities(X, n_neighbors)
    if weighting == "binary":
        return to_scipy(feature_knn_graph(X, k, metric="euclidean"), len(X))
    raise ValueError(f"weighting={weighting!r}: use 'umap' (scanpy's default) or 'binary'.")


def umap_connectivities(X, n_neighbors: int = 15) -> sp.csr_matrix:
    r"""UMAP's fuzzy kNN graph (n, n), the ``connectivities`` of ``scanpy.pp.neighbors`` (McInnes et al. 2018).

    With :math:`d_{ij}` the distance to each of the ``n_neighbors - 1`` nearest other points, :math:`\rho_i` the
    nearest of them and :math:`\sigma_i` solved by bisection so that
    :math:`\sum_{j} \exp(-(d_{ij} - \rho_i)/\sigma_i) = \log_2(\texttt{n\_neighbors})`,
    the directed weights :math:`a_{ij} = \exp(-(d_{ij} - \rho_i)/\sigma_i)` are merged by the fuzzy union
    :math:`w_{ij} = a_{ij} + a_{ji} - a_{ij} a_{ji}`. Memory O(n k).
    """
    X = _check_X(X)
    n = len(X)
    k = min(n_neighbors - 1, n - 1)
    idx = knn_indices(X, k)
    dist = np.linalg.norm(X[idx] - X[:, None, :], axis=2)                       # (n, k), nearest first
    positive = np.where(dist > 0, dist, np.inf)
    rho = np.where(np.isfinite(positive.min(1)), positive.min(1), 0.0)
    gap = np.maximum(dist - rho[:, None], 0.0)
    target = np.log2(n_neighbors)
    lo, hi, sigma = np.zeros(n), np.full(n, np.inf), np.ones(n)
    for _ in range(64):                                                          # bisection, as umap-learn
        total = np.exp(-gap / sigma[:, None]).sum(1)
        done = np.abs(total - target) < 1e-5
        too_big = total > target
        hi = np.where(too_big & ~done, sigma, hi)
        lo = np.where(~too_big & ~done, sigma, lo)
        sigma = np.where(done, sigma, np.where(np.isinf(hi), sigma * 2, (lo + hi) / 2))
    sigma = np.maximum(sigma, 1e-3 * dist.mean(1))
    a = sp.csr_matrix((np.exp(-gap / sigma[:, None]).ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    return (a + a.T - a.multiply(a.T)).tocsr()


def community_graph(data, n_neighbors: int = 15, weighting: str = "umap") -> ig.Graph:
    """igraph Graph (undirected, weighted) from an embedding (:func:`knn_adjacency`) or a sparse adjacency; build
    it once and pass it to :func:`communities` to try many resolutions."""
    if sp.issparse(data):
        A = sp.csr_matrix(data, dtype=float)
        if A.shape[0] != A.shape[1]:
            raise ValueError(f"the adjacency has shape {A.shape}; it must be square (n_spots, n_spots).")
        A = A.maximum(A.T)                               # triu(k=1) below drops the diagonal
    else:
        A = knn_adjacency(data, n_neighbors, weighting)
    A = sp.triu(A, k=1).tocoo()
    g = ig.Graph(n=A.shape[0], edges=np.column_stack([A.row, A.col]).tolist(), directed=False)
    g.es["weight"] = A.data.tolist()
    return g


def communities(g: ig.Graph, method: str = "leiden", resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden or Louvain communities of a :func:`community_graph` (labels by decreasing size)."""
    partition = leidenalg.RBConfigurationVertexPartition(g, weights="weight", resolution_parameter=resolution)
    optimiser = leidenalg.Optimiser()
    optimiser.set_rng_seed(seed)
    if method == "leiden":
        optimiser.optimise_partition(partition, n_iterations=2)
    elif method == "louvain":  # local moving, then aggregation, until no move helps (the louvain package / scanpy)
        coarse = partition.aggregate_partition()
        while optimiser.move_nodes(coarse) > 0:
            partition.from_coarse_partition(coarse)
            coarse = coarse.aggregate_partition()
    else:
        raise ValueError(f"method={method!r}; graph clustering is 'leiden' or 'louvain'.")
    return _by_size(partition.membership)


def leiden(data, resolution: float = 1.0, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """Leiden communities (``leidenalg``, RBConfigurationVertexPartition = modularity with a resolution).

    Two passes of the Leiden algorithm (``n_iterations=2``, scanpy's default for its igraph flavour); iterating
    to convergence (-1) usually changes little and can take minutes on 20k spots.

    Parameters
    ----------
    data : array (n, d) or scipy sparse (n, n)
        An embedding (a kNN graph is built with :func:`knn_adjacency`) or a weighted adjacency (symmetrised as
        max(A, A^T), diagonal dropped).
    resolution : float
        Higher gives more, smaller clusters.
    seed : int
        Makes the result repeat exactly.
    n_neighbors : int
        kNN size for an embedding (counts the spot itself, as in scanpy).

    Returns
    -------
    labels : int array (n,), 0 = the largest cluster.
    """
    return communities(community_graph(data, n_neighbors), "leiden", resolution, seed)


def louvain(data, resolution: float = 1.0, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """Louvain communities: local moving of nodes, then aggregation, repeated until no move improves the
    modularity (the algorithm of the ``louvain`` package behind ``scanpy.tl.louvain``, run with ``leidenalg``'s
    optimiser); arguments as :func:`leiden`."""
    return communities(community_graph(data, n_neighbors), "louvain", resolution, seed)


def search_resolution(data, n_clusters: int, method: str = "leiden", seed: int = 0, lo: float = 0.01,
                      hi: float = 3.0, max_iter: int = 30, n_neighbors: int = 15):
    """Find a resolution that gives exactly ``n_clusters`` communities.

    The number of communities grows (almost always) with the resolution. First a coarse scan of 8 resolutions
    spaced geometrically over [lo, hi]; if none gives K, bisection between the last resolution that gave fewer
    than K and the next one that gave more, for at most ``max_iter`` steps. The graph is built once.

    Returns
    -------
    (labels, resolution) : int array (n,) with exactly K distinct labels, and the resolution that gave it.

    Raises
    ------
    ValueError
        If no resolution in [lo, hi] gives exactly K (the message says what was found and what to try).
    """
    g = community_graph(data, n_neighbors)
    _check_k(n_clusters, g.vcount())
    if not 0 < lo < hi:
        raise ValueError(f"lo={lo}, hi={hi}; the resolution range needs 0 < lo < hi.")
    found = {}

    def count(res):
        labels = communities(g, method, res, seed)
        found[res] = labels.max() + 1
        return labels, found[res]

    for res in np.geomspace(lo, hi, 8):
        labels, n = count(float(res))
        if n == n_clusters:
            return labels, float(res)
    below = [r for r in found if found[r] < n_clusters]
    above = [r for r in found if found[r] > n_clusters and (not below or r > max(below))]
    if below and above:
        a, b = max(below), min(above)
        for _ in range(max_iter):
            mid = (a + b) / 2
            labels, n = count(mid)
            if n == n_clusters:
                return labels, mid
            a, b = (mid, b) if n < n_clusters else (a, mid)
    tried = ", ".join(f"{r:.4g}->{found[r]}" for r in sorted(found))
    raise ValueError(f"{method} found no resolution in [{lo}, {hi}] giving exactly {n_clusters} clusters "
                     f"(resolution->clusters: {tried}). Widen [lo, hi], try another seed or n_neighbors, or use "
                     "method='gmm'/'kmeans', which take K directly.")


# --------------------------------------------------------------------------------------------------------------
# model-based clustering


def kmeans(X, n_clusters: int, seed: int = 0) -> np.ndarray:
    """k-means (scikit-learn, k-means++ init, best of ``n_init=10`` restarts); int labels (n,)."""
    X = _check_X(X, n_clusters)
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(X)


def gmm(X, n_clusters: int, seed: int = 0, covariance_type: str = "tied") -> np.ndarray:
    """Gaussian mixture model clustering; int labels (n,) of the most probable component.

    Most spatial-domain papers (STAGATE, GraphST, ConGI, SpatialGlue, PRAGA ...) cluster their embedding with R's
    ``mclust(z, G=K, modelNames="EEE")``. EEE means one covariance matrix shared by all components (equal volume,
    shape and orientation); that is scikit-learn's ``covariance_type="tied"``, so no R is needed.

    Initialisation differs: mclust starts EM from a model-based hierarchical agglomeration (``hc``, O(N^2)
    memory); here EM starts from the means of a k-means fit (:func:`kmeans`, 10 restarts) and runs to a tight
    tolerance (1e-6 on the per-spot log-likelihood, up to 1000 iterations), so that it can leave a poor k-means
    start (k-means cuts elongated clusters across their long axis; EM then slowly rotates the split). Labels can
    therefore differ from mclust's on hard data, though the model is the same. Other ``covariance_type`` values ("full", "diag",
    "spherical") map to mclust's VVV, VVI and VII.
    """
    X = _check_X(X, n_clusters)
    labels = kmeans(X, n_clusters, seed)
    means = np.stack([X[labels == k].mean(0) for k in range(n_clusters)])
    model = GaussianMixture(n_components=n_clusters, covariance_type=covariance_type, means_init=means,
                            tol=1e-6, max_iter=1000, random_state=seed)
    return model.fit(X).predict(X)


# --------------------------------------------------------------------------------------------------------------
# refinement and the dispatcher


def refine(labels, coords=None, edge_index=None, k: int = 6) -> np.ndarray:
    """SpaGCN's majority-vote refinement of domain labels over the nearest spots (one synchronous pass).

    For each spot i take the window W_i = {i} + its k nearest spots (k = 6 on a Visium hexagon, 4 on a legacy ST
    square grid; ConGI uses 24). Count the labels in W_i (k + 1 spots, i itself included). Then

        relabel i to the most common label in W_i  if  count(label_i) < k/2  and  max count > k/2,

    otherwise keep label_i. With k = 6: a spot is relabelled when at most 2 of the 7 spots carry its label and
    one label holds at least 4. All spots are updated from the *original* labels (not sequentially).

    Parameters
    ----------
    labels : array (n,)
        Any hashable labels; the output has the same values.
    coords : array (n, 2), optional
        Positions (array coordinates or pixels: on a hexagon both give the same neighbours). Neighbours come from
        a cKDTree.
    edge_index : (2, E) int array or LongTensor, optional
        A spatial graph instead of ``coords``: W_i = {i} + the graph neighbours of i, and k is then each spot's
        own degree.
    k : int
        Number of neighbours when ``coords`` is given.

    Returns
    -------
    refined labels (n,)
    """
    values, codes = np.unique(np.asarray(labels), return_inverse=True)
    codes = codes.ravel()
    n = len(codes)
    if (coords is None) == (edge_index is None):
        raise ValueError("pass exactly one of coords (n, 2) or edge_index (2, E) to define the neighbours.")
    if coords is not None:
        coords = np.asarray(coords, dtype=float)
        if coords.ndim != 2 or len(coords) != n:
            raise ValueError(f"coords has shape {coords.shape} for {n} labels; pass one (x, y) row per spot.")
        nbrs = knn_indices(coords, k)
        rows, cols = np.repeat(np.arange(n), k), nbrs.ravel()
    else:
        ei = np.asarray(edge_index.cpu() if hasattr(edge_index, "cpu") else edge_index)
        if ei.ndim != 2 or ei.shape[0] != 2 or (ei.size and (ei.min() < 0 or ei.max() >= n)):
            raise ValueError(f"edge_index must be (2, E) with node ids in [0, {n}); got shape {ei.shape}.")
        rows, cols = ei[0], ei[1]
    off = rows != cols                                    # the window adds each spot itself once
    A = sp.csr_matrix((np.ones(off.sum()), (rows[off], cols[off])), shape=(n, n))
    A.data[:] = 1.0                                       # duplicate edges count once
    n_nbrs = np.asarray(A.sum(1)).ravel()                 # k, or each spot's degree
    window = A + sp.identity(n, format="csr")
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, len(values)))
    counts = (window @ onehot).toarray()                  # (n, n_labels) label counts in each window
    own = counts[np.arange(n), codes]
    relabel = (own < n_nbrs / 2) & (counts.max(1) > n_nbrs / 2)
    new = np.where(relabel, counts.argmax(1), codes)
    return values[new]


def cluster(X, n_clusters: int, method: str = "gmm", seed: int = 0, **kwargs) -> np.ndarray:
    """Cluster an embedding X (n, d) into ``n_clusters`` groups; int labels (n,).

    ``method``: ``"gmm"`` (mclust EEE equivalent, :func:`gmm`), ``"kmeans"``, or ``"leiden"``/``"louvain"``
    (resolution searched to give exactly K with :func:`search_resolution`). ``kwargs`` go to that function.
    """
    X = _check_X(X, n_clusters)
    if method == "gmm":
        return gmm(X, n_clusters, seed, **kwargs)
    if method == "kmeans":
        return kmeans(X, n_clusters, seed, **kwargs)
    if method in ("leiden", "louvain"):
        return search_resolution(X, n_clusters, method=method, seed=seed, **kwargs)[0]
    raise ValueError(f"method={method!r} is not one of {METHODS}.")
