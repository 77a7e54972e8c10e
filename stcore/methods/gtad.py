r"""GTAD: deconvolution of spots with a graph attention network on a random-projection-forest graph.

Zhang T, Zhang Z, Li L, Dong B, Wang G, Zhang D. GTAD: a graph-based approach for cell spatial composition
inference from integrated scRNA-seq and ST-seq data. *Brief Bioinform* 25(1):bbad469 (2024).
doi:10.1093/bib/bbad469. Official code: zzhjs/GTAD (``geneFilter.py`` in scanpy, ``makePseudo.R`` in R/Seurat,
``getGraph.py`` + ``RPTree.py`` for the graph, ``runModel.py`` in TensorFlow 2); the defaults below are that code's.

Integration strategy: *graph* — labelled pseudo-spots (mixtures of reference cells) and unlabelled real spots are
nodes of one graph built in an integrated expression space, and a semi-supervised GAT carries the known
proportions across its edges. GTAD follows DSTG (chapter 16) but changes the three pieces in the middle: marker
genes instead of ANOVA genes, a Seurat-integrated feature space, a random-projection-forest graph instead of CCA
mutual neighbours, and weighted attention instead of a fixed GCN propagation.

Pipeline
--------
1. **Markers.** The top ``n_markers = 30`` genes of each cell type by scanpy's Wilcoxon ``rank_genes_groups`` on
   the reference normalised to 10,000 counts, pooled, then kept if the spots measure them
   (:func:`stcore.methods.celldart.marker_genes`).
2. **Pseudo-spots** (SPOTlight's ``test_spot_fun``, :func:`stcore.methods.dstg.mix_pseudo_spots`):
   ``n_pseudo = 10,000`` spots, each the sum of ``m ~ U{2, ..., 10}`` random reference cells, down-sampled to
   20,000 counts when above 25,000; the label :math:`y_i \in \Delta^{C-1}` is the fraction of its cells per type.
3. **Integration** (:func:`integrate`, in place of Seurat ``FindIntegrationAnchors`` + ``IntegrateData``). Both
   datasets are log-normalised (CP10k); integration features are chosen by Seurat's rule; each dataset is scaled;
   a 30-dimensional CCA (:func:`stcore.methods.dstg.cca_embed`, L2-normalised) gives mutual-nearest-neighbour
   *anchors* (``k_anchor = 5``) that are filtered in expression space (``k_filter = 200``) and scored by shared
   neighbourhoods (``k_score = 30``). Each real spot :math:`r` is then moved by the anchor-weighted mean difference

   .. math:: \tilde x_r = x_r + \sum_a W_{ra}\,(x_{p(a)} - x_{r(a)}), \qquad
             W_{ra} \propto 1 - \exp\!\Big(-\tfrac{\mathrm{sd}^2}{2}\big(1 - d_{ra}/d_{r,(k)}\big)\,s_a\Big),

   over its ``k_weight = 100`` nearest anchors :math:`a` (distance :math:`d_{ra}` in a 30-PC space, :math:`s_a`
   the anchor score, ``sd_weight = 1``); the pseudo-spots are the reference and stay as they are.
4. **Node features.** The integrated matrix, each spot L2-normalised: :math:`x_i \leftarrow x_i/\lVert x_i\rVert`.
5. **Random-projection forest** (:func:`rp_tree_leaves`, :func:`rp_forest_graph`). Each of ``n_trees = 10`` trees
   splits a node by trying ``n_try = 3`` Gaussian projections :math:`R \in \mathbb R^{(D-1)\times D}`
   (:math:`R_{kl} \sim \mathcal N(0, 1/(D-1))`), keeping the one whose most dispersed coordinate has the largest
   standard deviation, and cutting that coordinate at a threshold drawn uniformly between its 25 % and 75 %
   quantiles (left: ``<``, right: ``>=``), until a leaf holds at most ``leaf_size = 20`` points. Two spots are
   joined when they share a leaf in at least one tree, with weight

   .. math:: w_{ij} = \frac{1}{T}\sum_{t=1}^{T} \mathbb 1[\mathrm{leaf}_t(i) = \mathrm{leaf}_t(j)] \in (0, 1],
             \qquad w_{ii} = 1 .

6. **Model** (:class:`GTADModel`). Two attention layers; in each head :math:`k`

   .. math:: e_{ij} = w_{ij}\,\mathrm{LeakyReLU}_{0.2}\big(a_1^\top W h_i + b_1 + a_2^\top W h_j + b_2\big),
             \qquad \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal N(i) \cup \{i\}}(e_{ij}),
             \qquad h_i' = \sum_j \alpha_{ij} W h_j + b

   (:class:`WeightedGATConv`). Layer 1: 8 heads × 64 units, ELU, concatenated; layer 2: 8 heads × C, averaged;
   :math:`\hat y_i = \mathrm{softmax}(z_i)`.
7. **Loss** — soft-label cross-entropy over the training pseudo-spots :math:`\mathcal T` (81 % train, 9 %
   validation, 10 % test; real spots are unlabelled nodes):
   :math:`\mathcal L = -\frac{1}{|\mathcal T|}\sum_{i\in\mathcal T}\sum_c y_{ic}\log\hat y_{ic}`.
8. **Training.** Full-batch Adam, no dropout, no weight decay, with the cosine schedule with warm restarts
   (:func:`cosine_warm_restart_lr`: 0.01 → 1e-6, first cycle 20 steps of which 5 linear warm-up, cycles ×1.25);
   the official early stopping (:func:`EarlyStopping`, patience on validation loss *or* accuracy, keeping the
   weights of the last epoch that improved both). The output is :math:`\hat y` on the real spots.

Shapes: ``N = n_pseudo + n_spots`` nodes (pseudo-spots first), ``D`` integration features (≤ markers), ``C`` cell
types, ``E`` directed RPF edges (+ N self loops); X (N, D) · edge_index (2, E) · edge_weight (E,) ·
layer 1 W (D, 8·64) · H (N, 512) · layer 2 W (512, 8·C) · Z (N, C).

Deliberate deviations from the official code
--------------------------------------------
* **Seurat integration (R) replaced by a Python re-implementation of its anchor steps** (:func:`integrate`):
  Seurat v4's ``FindIntegrationAnchors`` + ``IntegrateData`` have no Python port here. The substitute keeps their
  structure — per-dataset log-normalisation, vst features combined by ``SelectIntegrationFeatures``' rule, scaling,
  standardised CCA with 30 L2-normalised vectors, MNN anchors (k = 5), the expression filter (k = 200 on at most
  200 top-loading genes), shared-neighbour anchor scores rescaled between their 1 % and 90 % quantiles, and the
  Gaussian anchor weights over the 100 nearest anchors — but it is not Seurat: the weighting space is a 30-PC PCA
  of the jointly scaled data, the anchor score is the overlap of the two cells' 30 + 30 within/across-dataset
  neighbour sets in CCA space, and the pseudo-spots are always the reference (Seurat orders the pairwise merge
  itself). Numbers will differ from a Seurat run.
* **Markers.** :func:`stcore.methods.celldart.marker_genes` ranks on ``log1p`` of the normalised counts where the
  official script ranks the normalised counts; the Wilcoxon rank-sum statistic (and hence the ranking) is
  unchanged by a monotone transform, so the gene list is the same up to ties.
* **Sparse graph, no N × N.** The official code accumulates a dense N × N adjacency and runs dense attention with a
  −1e9 mask. Here the forest gives an edge list (co-leaf pairs encoded and counted with ``np.unique``), and the
  attention softmax runs over edges (``torch_geometric.utils.softmax``) with one sparse matrix product per head; the
  result is the same function (a masked entry contributes exp(−1e9) = 0).
* **RPF splits.** Trees are built with an explicit stack and one seeded numpy generator (official: recursion,
  global ``np.random`` and ``random``). Each trial projection is drawn in the eigenbasis of the node's covariance
  (:func:`_split`): by the rotation invariance of the Gaussian this has exactly the distribution of the official
  ``GaussianRandomProjection`` (to D − 1 dimensions), with one eigendecomposition per node instead of three
  N × D × (D − 1) products (about 10x faster here). A split that leaves one side
  empty (duplicated points) is replaced by a random halving, which the official recursion would never escape.
* **Learning-rate schedule.** One schedule step per optimizer step (= epoch), as the official schedule's comments
  intend. (TensorFlow/Keras may query a Python schedule object once per variable in eager mode, which would make
  the official cycles run faster; that is not reproduced.)
* **Epochs.** ``epochs = 1000``, ``patience = 500`` are the official values and the class defaults; on CPU the
  benchmark and chapter pass fewer epochs (stated where they do).
* **Seeds.** One ``seed`` drives the pseudo-spots, the forest, the 81/9/10 split (official ``random_state=1``) and
  the weight initialisation. Features and weights are float32.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn
from torch_geometric.utils import softmax as edge_softmax

from .. import graphs
from ..train import fit, set_seed
from ..validation import counts_matrix, reference_cell_types, shared_genes
from . import Method, register
from ._common import write_frame
from .celldart import marker_genes
from .dstg import (
    _l2_rows,
    _vst_ranks,
    cca_embed,
    filter_pairs,
    integration_features,
    log_normalize,
    mix_pseudo_spots,
    scale_data,
    soft_cross_entropy,
    top_loading_genes,
)

__all__ = [
    "GTAD",
    "GTADModel",
    "WeightedGATConv",
    "EarlyStopping",
    "anchor_scores",
    "anchor_weights",
    "cosine_warm_restart_lr",
    "find_anchors",
    "integrate",
    "l2_normalize",
    "marker_genes",
    "rp_forest_graph",
    "rp_tree_leaves",
]


# ----------------------------------------------------------------------------------------------- step 3
def find_anchors(S1: np.ndarray, S2: np.ndarray, N1: np.ndarray, N2: np.ndarray, *, n_cc: int = 30,
                 k_anchor: int = 5, k_filter: int = 200, max_genes: int = 200):
    """Seurat-style integration anchors between dataset 1 (reference) and dataset 2 (query).

    ``S1, S2`` (n1, g), (n2, g) scaled expression; ``N1, N2`` log-normalised expression of the same genes.
    Anchors are mutual nearest neighbours (``k_anchor``) in the L2-normalised CCA space, kept when they pass the
    expression filter (``k_filter`` on the top-loading genes, :func:`stcore.methods.dstg.filter_pairs`).

    Returns
    -------
    pairs : (2, P) int array (row 0 indexes dataset 1, row 1 dataset 2); Z1 (n1, n_cc), Z2 (n2, n_cc) the
    L2-normalised canonical vectors.
    """
    keep = (S1.var(0) > 0) & (S2.var(0) > 0)
    if keep.sum() < 2:
        raise ValueError(f"Only {int(keep.sum())} features vary in both the pseudo-spots and the spots, too few to "
                         "integrate them; check that the spots express the reference's marker genes.")
    S1, S2, N1, N2 = S1[:, keep], S2[:, keep], N1[:, keep], N2[:, keep]
    U, V, _ = cca_embed(S1, S2, n_cc)
    Z1, Z2 = _l2_rows(U), _l2_rows(V)
    pairs = graphs.mutual_nn(Z1, Z2, k=k_anchor, metric="cosine").numpy()
    genes = top_loading_genes(np.vstack([S1, S2]).T @ np.vstack([U, V]), max_genes=max_genes)
    mask = filter_pairs(pairs, _l2_rows(N1[:, genes]), _l2_rows(N2[:, genes]), k_filter)
    return pairs[:, mask], Z1, Z2


def _knn(data: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.neighbors import NearestNeighbors

    k = min(k, data.shape[0])
    dist, idx = NearestNeighbors(n_neighbors=k).fit(data).kneighbors(query)
    return dist, idx


def anchor_scores(pairs: np.ndarray, Z1: np.ndarray, Z2: np.ndarray, k_score: int = 30) -> np.ndarray:
    r"""Shared-neighbourhood score of each anchor, rescaled to [0, 1].

    The neighbourhood of a cell is its ``k_score`` nearest cells in dataset 1 and its ``k_score`` nearest cells in
    dataset 2 (CCA space, itself included); an anchor :math:`(i, j)` scores the size of the overlap of the two
    neighbourhoods, then :math:`s \leftarrow \mathrm{clip}((s - q_{0.01}) / (q_{0.9} - q_{0.01}), 0, 1)`.
    """
    pairs = np.asarray(pairs)
    if pairs.shape[1] == 0:
        return np.zeros(0)
    n1 = Z1.shape[0]
    u1, inv1 = np.unique(pairs[0], return_inverse=True)
    u2, inv2 = np.unique(pairs[1], return_inverse=True)

    def hood(points):  # (m, 2k) combined indices: dataset 1 first, dataset 2 offset by n1
        return np.hstack([_knn(Z1, points, k_score)[1], n1 + _knn(Z2, points, k_score)[1]])

    h1, h2 = hood(Z1[u1])[inv1], hood(Z2[u2])[inv2]
    score = np.array([len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(h1, h2)], dtype=float)
    lo, hi = np.quantile(score, 0.01), np.quantile(score, 0.9)
    score = (score - lo) / (hi - lo) if hi > lo else np.ones_like(score)
    return np.clip(score, 0.0, 1.0)


def anchor_weights(query_pts: np.ndarray, anchor_pts: np.ndarray, scores: np.ndarray, k_weight: int = 100,
                   sd_weight: float = 1.0) -> sparse.csr_matrix:
    r"""(n_query, n_anchors) row-stochastic weights of ``IntegrateData``.

    For each query point the ``k_weight`` nearest anchors (by their query-side cell) get
    :math:`\tilde d = 1 - d / d_{(k)}` and :math:`w = 1 - \exp(-\tilde d\, s_a / (2 / \mathrm{sd}^2))`; the row is
    divided by its sum (a row that sums to 0 stays 0: the point is not moved).
    """
    n_q, n_a = query_pts.shape[0], anchor_pts.shape[0]
    if n_a == 0:
        return sparse.csr_matrix((n_q, 0))
    dist, idx = _knn(anchor_pts, query_pts, k_weight)
    kth = dist[:, -1:]
    dw = np.divide(dist, kth, out=np.zeros_like(dist), where=kth > 0)
    dw = 1.0 - dw if n_a > 1 else np.ones_like(dist)
    w = 1.0 - np.exp(-dw * scores[idx] / (2.0 / sd_weight ** 2))
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    rows = np.repeat(np.arange(n_q), idx.shape[1])
    return sparse.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(n_q, n_a))


def integrate(pseudo, real, genes, *, n_features: int = 2000, n_cc: int = 30, k_anchor: int = 5,
              k_filter: int = 200, k_score: int = 30, k_weight: int = 100, sd_weight: float = 1.0,
              n_pcs: int = 30) -> tuple[np.ndarray, np.ndarray, dict]:
    """Integrate real spots onto the pseudo-spots (step 3; the substitute for Seurat's anchor integration).

    ``pseudo`` (n1, G), ``real`` (n2, G) raw counts on ``genes``. Returns ``(X1, X2, info)``: the log-normalised
    pseudo-spots and the corrected real spots on the integration features, both (n, D), and ``info`` with the
    ``features``, the ``anchors`` (2, P) and their ``scores``.
    """
    from sklearn.decomposition import PCA

    genes = np.asarray(genes, dtype=str)
    ranks = [_vst_ranks(m, genes)[:n_features] for m in (pseudo, real)]
    features = integration_features(ranks, n_features)
    h = pd.Index(genes).get_indexer(features)
    N1, N2 = log_normalize(pseudo)[:, h], log_normalize(real)[:, h]
    pairs, Z1, Z2 = find_anchors(scale_data(N1), scale_data(N2), N1, N2, n_cc=n_cc, k_anchor=k_anchor,
                                 k_filter=k_filter)
    if pairs.shape[1] == 0:
        raise ValueError("No integration anchors were found between the pseudo-spots and the spots; the reference "
                         "and the spatial data share too little signal on the marker genes.")
    scores = anchor_scores(pairs, Z1, Z2, k_score)
    joint = scale_data(np.vstack([N1, N2]))
    pcs = PCA(n_components=min(n_pcs, *joint.shape), svd_solver="full", random_state=0).fit_transform(joint)
    P2 = pcs[N1.shape[0]:]
    W = anchor_weights(P2, P2[pairs[1]], scores, k_weight, sd_weight)
    X2 = N2 + W @ (N1[pairs[0]] - N2[pairs[1]])
    return N1, X2, {"features": np.asarray(features, str), "anchors": pairs, "scores": scores}


def l2_normalize(X) -> np.ndarray:
    """Each row divided by its Euclidean norm (zero rows stay zero), step 4."""
    return _l2_rows(np.asarray(X, dtype=np.float64))


# ----------------------------------------------------------------------------------------------- step 5
def _split(X: np.ndarray, idx: np.ndarray, rng: np.random.Generator, n_try: int) -> np.ndarray:
    r"""Boolean "goes left" mask of one RP-tree split of the points ``X[idx]``.

    A trial projection :math:`X_c R^\top` (:math:`R_{kl} \sim \mathcal N(0, 1/k)`, :math:`k = D - 1`) is drawn
    in the eigenbasis of the node's covariance, :math:`X_c = B\,Q^\top` with :math:`B^\top B / n = \Lambda`:
    as :math:`Q^\top r \sim \mathcal N(0, I/k)` again, a coordinate is :math:`B g` with :math:`g \sim
    \mathcal N(0, I/k)` and its standard deviation is :math:`\sqrt{\lambda^\top g^2}` — the same distribution
    as projecting with :math:`R`, at the cost of one eigendecomposition per node instead of ``n_try`` products.
    """
    Xn = X[idx]
    n, D = Xn.shape
    k = max(D - 1, 1)
    Xc = Xn - Xn.mean(0)
    if n > D:
        lam, V = np.linalg.eigh(Xc.T @ Xc / n)
        basis = Xc @ V
    else:
        lam, U = np.linalg.eigh(Xc @ Xc.T / n)
        basis = U * np.sqrt(n * np.maximum(lam, 0.0))
    lam = np.maximum(lam, 0.0)
    best, best_g = -1.0, None
    for _ in range(n_try):
        G = rng.standard_normal(size=(len(lam), k), dtype=np.float32)
        sd = np.sqrt(lam @ np.square(G, dtype=np.float64) / k)
        j = int(np.argmax(sd))
        if sd[j] > best:
            best, best_g = float(sd[j]), G[:, j].astype(np.float64) / math.sqrt(k)
    proj = basis @ best_g
    lo, hi = np.quantile(proj, 0.25), np.quantile(proj, 0.75)
    left = proj < rng.uniform(lo, hi)
    if left.all() or not left.any():  # duplicated points: halve at random instead of recursing forever
        left = np.zeros(n, dtype=bool)
        left[rng.permutation(n)[: n // 2]] = True
    return left


def rp_tree_leaves(X, *, leaf_size: int = 20, n_try: int = 3, rng=None) -> list[np.ndarray]:
    """Leaves (lists of row indices) of one random-projection tree over the rows of ``X`` (N, D).

    A node with more than ``leaf_size`` points is split (see the module docstring, step 5); every leaf holds at
    most ``leaf_size`` points and the leaves partition ``range(N)``.
    """
    X = np.asarray(X, dtype=np.float64)
    rng = np.random.default_rng(rng)
    leaves, stack = [], [np.arange(X.shape[0])]
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf_size:
            leaves.append(idx)
            continue
        left = _split(X, idx, rng, n_try)
        stack += [idx[~left], idx[left]]
    return leaves


def rp_forest_graph(X, *, n_trees: int = 10, leaf_size: int = 20, n_try: int = 3,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Random-projection-forest graph as ``(edge_index (2, E), edge_weight (E,))``, sparse.

    :math:`(i, j)` is an edge (both directions, no self loops) when the two rows share a leaf in at least one of
    ``n_trees`` trees; its weight is the fraction of trees in which they do, in :math:`(0, 1]`. Edges are sorted
    by (source, target).
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    rng = np.random.default_rng(seed)
    codes = []
    for _ in range(n_trees):
        for leaf in rp_tree_leaves(X, leaf_size=leaf_size, n_try=n_try, rng=rng):
            if len(leaf) > 1:
                a, b = np.meshgrid(leaf, leaf, indexing="ij")
                off = a != b
                codes.append(a[off].astype(np.int64) * n + b[off])
    if not codes:
        return torch.zeros((2, 0), dtype=torch.long), torch.zeros(0)
    pairs, counts = np.unique(np.concatenate(codes), return_counts=True)
    edge_index = torch.from_numpy(np.stack([pairs // n, pairs % n]))
    return edge_index, torch.tensor(counts / n_trees, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- step 6
def _add_self_loops(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int):
    """Append ``(i, i)`` with weight 1 (the official ``fill_diagonal(adj, 1)``) and sort by (row, col)."""
    loops = torch.arange(n)
    ei = torch.cat([edge_index, torch.stack([loops, loops])], 1)
    w = torch.cat([edge_weight.float(), torch.ones(n)])
    order = torch.argsort(ei[0] * n + ei[1])
    return ei[:, order], w[order]


def _csr_structure(edge_index: torch.Tensor, n: int) -> dict:
    """CSR index arrays of a (row, col)-sorted edge list and of its transpose (``perm`` reorders the values)."""
    i, j = edge_index
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(i, minlength=n), 0)
    perm = torch.argsort(j * n + i)
    crow_t = torch.zeros(n + 1, dtype=torch.long)
    crow_t[1:] = torch.cumsum(torch.bincount(j, minlength=n), 0)
    return {"n": n, "crow": crow, "col": j.contiguous(), "perm": perm, "crow_t": crow_t, "col_t": i[perm]}


class _SparseAggregate(torch.autograd.Function):
    """``out = A h`` for a sparse ``A`` given by its CSR structure and ``values`` (E,), differentiable in both.

    Backward: ``dh = A^T g`` (the transposed CSR) and ``dvalues_e = g_i . h_j`` (``torch.sparse.sampled_addmm``),
    so nothing of size N x N is ever formed.
    """

    @staticmethod
    def forward(ctx, values, h, st):
        n = st["n"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            A = torch.sparse_csr_tensor(st["crow"], st["col"], values, (n, n), check_invariants=False)
            out = A @ h
        ctx.save_for_backward(values, h)
        ctx.st = st
        return out

    @staticmethod
    def backward(ctx, g):
        values, h = ctx.saved_tensors
        st, n = ctx.st, ctx.st["n"]
        g = g.contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            At = torch.sparse_csr_tensor(st["crow_t"], st["col_t"], values[st["perm"]], (n, n),
                                         check_invariants=False)
            dh = At @ g if ctx.needs_input_grad[1] else None
            dv = None
            if ctx.needs_input_grad[0]:
                pattern = torch.sparse_csr_tensor(st["crow"], st["col"], torch.zeros_like(values), (n, n),
                                                  check_invariants=False)
                dv = torch.sparse.sampled_addmm(pattern, g, h.t().contiguous(), beta=0.0).values()
        return dv, dh, None


class WeightedGATConv(nn.Module):
    r"""Multi-head graph attention whose logits are scaled by an edge weight before the softmax.

    ``e_ij = w_ij LeakyReLU(a1·Wh_i + b1 + a2·Wh_j + b2)``, ``alpha = softmax over j`` of the edges ``(i, j)``
    (``edge_index[0] = i`` receives, ``edge_index[1] = j`` sends), ``h'_i = sum_j alpha_ij W h_j + b`` per head;
    heads are concatenated (``concat=True``, output (N, heads·out)) or averaged (output (N, out)).
    ``edge_index`` must contain the self loops and be sorted by (i, j) (see :func:`_add_self_loops`).
    PyG's ``GATConv`` adds edge features to the logits instead of multiplying them, hence this layer.
    """

    def __init__(self, n_in: int, n_out: int, heads: int = 8, concat: bool = True, negative_slope: float = 0.2):
        super().__init__()
        self.heads, self.n_out, self.concat, self.negative_slope = heads, n_out, concat, negative_slope
        self.lin = nn.Linear(n_in, heads * n_out, bias=False)
        self.att_dst = nn.Parameter(torch.empty(heads, n_out))  # a1, applied to the receiving node i
        self.att_src = nn.Parameter(torch.empty(heads, n_out))  # a2, applied to the sending node j
        self.att_bias = nn.Parameter(torch.zeros(2, heads))     # b1, b2 (Conv1D biases in the official code)
        self.bias = nn.Parameter(torch.zeros(heads, n_out))
        nn.init.xavier_uniform_(self.lin.weight)
        bound = math.sqrt(6.0 / (n_out + 1))  # Glorot-uniform of a (n_out -> 1) projection
        nn.init.uniform_(self.att_dst, -bound, bound)
        nn.init.uniform_(self.att_src, -bound, bound)

    def attention(self, x, edge_index, edge_weight) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha (E, heads), Wh (N, heads, n_out))``."""
        n = x.shape[0]
        h = self.lin(x).view(n, self.heads, self.n_out)
        f1 = (h * self.att_dst).sum(-1) + self.att_bias[0]
        f2 = (h * self.att_src).sum(-1) + self.att_bias[1]
        i, j = edge_index
        e = F.leaky_relu(f1[i] + f2[j], self.negative_slope) * edge_weight[:, None]
        return edge_softmax(e, i, num_nodes=n), h

    def forward(self, x, edge_index, edge_weight, csr: dict | None = None):
        n = x.shape[0]
        alpha, h = self.attention(x, edge_index, edge_weight)
        st = _csr_structure(edge_index, n) if csr is None else csr
        out = torch.stack([_SparseAggregate.apply(alpha[:, k].contiguous(), h[:, k].contiguous(), st)
                           for k in range(self.heads)], 1) + self.bias
        return out.reshape(n, -1) if self.concat else out.mean(1)


class GTADModel(nn.Module):
    """Two weighted-GAT layers, ``X (N, D) -> ELU(concat of 8 x 64) -> mean of 8 x C`` logits.

    ``data`` is a dict with ``x`` (N, D), ``edge_index`` (2, E) and ``edge_weight`` (E,) including self loops
    (sorted), ``y`` (N, C) soft labels and ``train`` (n_train,) node indices.
    """

    def __init__(self, n_in: int, n_types: int, n_hidden: int = 64, heads: int = 8, out_heads: int = 8):
        super().__init__()
        self.gat1 = WeightedGATConv(n_in, n_hidden, heads, concat=True)
        self.gat2 = WeightedGATConv(heads * n_hidden, n_types, out_heads, concat=False)

    def forward(self, data: dict) -> torch.Tensor:
        csr = data.get("csr")
        h = F.elu(self.gat1(data["x"], data["edge_index"], data["edge_weight"], csr))
        return self.gat2(h, data["edge_index"], data["edge_weight"], csr)

    def loss(self, data: dict) -> dict[str, torch.Tensor]:
        """Soft-label cross-entropy on ``data["train"]``; the logits and the weights they came from are kept in
        ``last_`` (validation metrics need no second forward pass)."""
        z = self(data)
        self.last_ = (z.detach(), {k: v.detach().clone() for k, v in self.state_dict().items()})
        return {"cross_entropy": soft_cross_entropy(z[data["train"]], data["y"][data["train"]])}


# ----------------------------------------------------------------------------------------------- step 8
def cosine_warm_restart_lr(n_steps: int, lr: float = 0.01, min_lr: float = 1e-6, first_cycle: int = 20,
                           warmup: int = 5, multi: float = 0.25) -> np.ndarray:
    r"""Learning rate of each of ``n_steps`` optimizer steps (the official ``CosineWarmupDecay``).

    Within a cycle of ``T`` steps with ``T_w`` warm-up steps, step :math:`s = 0, 1, \dots`:
    :math:`\eta = \eta_{\min} + s(\eta_0 - \eta_{\min})/T_w` for :math:`s < T_w`, else
    :math:`\eta_{\min} + \tfrac12(\eta_0 - \eta_{\min})(1 + \cos(\pi (s - T_w)/(T - T_w)))`. When :math:`s`
    reaches :math:`T`, both :math:`T` and :math:`T_w` are multiplied by ``1 + multi`` and :math:`s` restarts at 0.
    """
    out = np.empty(n_steps)
    total, warm, s = float(first_cycle), float(warmup), 0
    for t in range(n_steps):
        if s >= total:
            warm, total, s = warm * (1 + multi), total * (1 + multi), 0
        if s < warm:
            out[t] = min_lr + (lr - min_lr) / warm * s
        else:
            out[t] = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        s += 1
    return out


class EarlyStopping:
    """The official rule on validation loss and accuracy.

    An epoch whose accuracy is ``>=`` the best or whose loss is ``<=`` the best resets the counter (and when both
    hold, its weights are kept); otherwise the counter grows, and at ``patience`` training stops and the kept
    weights are restored. ``patience = 0`` never stops.
    """

    def __init__(self, patience: int = 500):
        self.patience = patience
        self.best_loss, self.best_acc, self.wait, self.state, self.best_epoch = np.inf, 0.0, 0, None, -1

    def step(self, epoch: int, loss: float, acc: float, model: nn.Module | None = None) -> bool:
        """Record one epoch; ``True`` means stop (the kept weights are then loaded into ``model``)."""
        if acc >= self.best_acc or loss <= self.best_loss:
            if acc >= self.best_acc and loss <= self.best_loss:
                self.best_epoch = epoch
                if model is not None:
                    self.state = copy.deepcopy(model.state_dict())
            self.best_acc, self.best_loss, self.wait = max(acc, self.best_acc), min(loss, self.best_loss), 0
            return False
        self.wait += 1
        if self.patience > 0 and self.wait >= self.patience:
            if model is not None and self.state is not None:
                model.load_state_dict(self.state)
            return True
        return False


@register
class GTAD(Method):
    """GTAD (Zhang et al. 2024): a weighted GAT on pseudo-spots + spots joined by a random-projection forest.

    Options (official defaults): ``n_markers`` Wilcoxon markers per type (30), ``n_pseudo`` pseudo-spots (10,000),
    ``cells_per_spot`` ((2, 10)), integration ``n_features`` (2000), ``n_cc`` (30), ``k_anchor`` (5),
    ``k_filter`` (200), ``k_score`` (30), ``k_weight`` (100), ``n_trees`` (10), ``leaf_size`` (20), ``n_try`` (3),
    ``n_hidden`` (64), ``heads`` (8), ``out_heads`` (8), ``lr`` (0.01, peak of the schedule), ``min_lr`` (1e-6),
    ``epochs`` (1000), ``patience`` (500; 0 disables it). The result is ``obsm["proportions_gtad"]`` (spots x
    reference types); ``uns["gtad"]`` keeps the genes, anchor and edge counts, the per-epoch validation loss and
    learning rate, and the RMSE on the held-out pseudo-spots.
    """

    name = "gtad"
    task = "deconv"
    summary = "weighted GAT on a pseudo-spot + spot random-projection-forest graph"
    paper = "Zhang et al., Brief Bioinform 2024"
    needs_reference = True

    def __init__(self, *, n_markers: int = 30, n_pseudo: int = 10_000, cells_per_spot: tuple[int, int] = (2, 10),
                 n_features: int = 2000, n_cc: int = 30, k_anchor: int = 5, k_filter: int = 200, k_score: int = 30,
                 k_weight: int = 100, n_trees: int = 10, leaf_size: int = 20, n_try: int = 3, n_hidden: int = 64,
                 heads: int = 8, out_heads: int = 8, lr: float = 0.01, min_lr: float = 1e-6, epochs: int = 1000,
                 patience: int = 500, cell_type_key: str = "cell_type", seed: int = 0, progress: bool = True):
        for name, value, low in [("n_markers", n_markers, 1), ("n_pseudo", n_pseudo, 10),
                                 ("n_features", n_features, 2), ("n_cc", n_cc, 1), ("k_anchor", k_anchor, 1),
                                 ("k_filter", k_filter, 1), ("k_score", k_score, 1), ("k_weight", k_weight, 1),
                                 ("n_trees", n_trees, 1), ("leaf_size", leaf_size, 2), ("n_try", n_try, 1),
                                 ("n_hidden", n_hidden, 1), ("heads", heads, 1), ("out_heads", out_heads, 1),
                                 ("epochs", epochs, 1), ("patience", patience, 0)]:
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name}={value} must be an integer >= {low} (official defaults: "
                                 "help(stcore.methods.gtad.GTAD)).")
        cps = tuple(cells_per_spot) if np.ndim(cells_per_spot) else (cells_per_spot, cells_per_spot)
        if len(cps) != 2 or not 1 <= cps[0] <= cps[1]:
            raise ValueError(f"cells_per_spot={cells_per_spot}: give (low, high) with 1 <= low <= high "
                             "(official (2, 10)).")
        if not (lr > 0 and 0 < min_lr <= lr):
            raise ValueError(f"lr={lr} and min_lr={min_lr} must satisfy 0 < min_lr <= lr (official 0.01 and 1e-6).")
        self.n_markers, self.n_pseudo, self.cells_per_spot, self.n_features = n_markers, n_pseudo, cps, n_features
        self.n_cc, self.k_anchor, self.k_filter, self.k_score, self.k_weight = n_cc, k_anchor, k_filter, k_score, k_weight
        self.n_trees, self.leaf_size, self.n_try = n_trees, leaf_size, n_try
        self.n_hidden, self.heads, self.out_heads = n_hidden, heads, out_heads
        self.lr, self.min_lr, self.epochs, self.patience = lr, min_lr, epochs, patience
        self.cell_type_key, self.seed, self.progress = cell_type_key, seed, progress

    # -- steps 1-2 ------------------------------------------------------------------------------------------
    def prepare(self, adata, reference) -> dict:
        """Validate the inputs, pick the marker genes and mix the pseudo-spots. Returns a dict."""
        self._check_reference(reference)
        genes = shared_genes(adata, reference, min_genes=2)
        labels, types = reference_cell_types(reference, self.cell_type_key)
        markers = marker_genes(reference, self.cell_type_key, self.n_markers, genes=genes)
        if len(markers) < 2:
            raise ValueError(f"Only {len(markers)} of the top-{self.n_markers} marker genes per type are measured "
                             "in the spatial data; raise n_markers or use a spatial panel with the markers.")
        codes = pd.Categorical(labels, categories=types).codes
        ref = sparse.csr_matrix(counts_matrix(reference[:, markers]), dtype=np.float64)
        spots = sparse.csr_matrix(counts_matrix(adata[:, markers]), dtype=np.float64)
        empty = np.asarray(spots.sum(1)).ravel() <= 0
        if empty.any():
            raise ValueError(f"{int(empty.sum())} spots have no counts on the {len(markers)} marker genes; remove "
                             "them first (e.g. adata[adata[:, markers].X.sum(1) > 0]).")
        pseudo, props = mix_pseudo_spots(ref, codes, len(types), self.n_pseudo, self.cells_per_spot,
                                         seed=self.seed)
        return {"genes": np.asarray(markers, str), "types": types, "pseudo": pseudo, "props": props,
                "real": sparse.csr_matrix(spots, dtype=np.float32)}

    # -- steps 3-5 ------------------------------------------------------------------------------------------
    def build_graph(self, prep: dict) -> dict:
        """Integration, L2-normalised features and the random-projection-forest graph."""
        X1, X2, info = integrate(prep["pseudo"], prep["real"], prep["genes"], n_features=self.n_features,
                                 n_cc=self.n_cc, k_anchor=self.k_anchor, k_filter=self.k_filter,
                                 k_score=self.k_score, k_weight=self.k_weight)
        X = l2_normalize(np.vstack([X1, X2]))
        edge_index, edge_weight = rp_forest_graph(X, n_trees=self.n_trees, leaf_size=self.leaf_size,
                                                  n_try=self.n_try, seed=self.seed)
        return {"x": X, "edge_index": edge_index, "edge_weight": edge_weight, **info}

    def tensors(self, prep: dict, graph: dict) -> dict:
        """Features, soft labels, the graph with self loops and the 81/9/10 split of the pseudo-spots."""
        from sklearn.model_selection import train_test_split

        n_p, n_r = prep["pseudo"].shape[0], prep["real"].shape[0]
        y = np.vstack([prep["props"], np.zeros((n_r, prep["props"].shape[1]))])
        rest, test = train_test_split(np.arange(n_p), test_size=0.1, random_state=self.seed)
        train, val = train_test_split(rest, test_size=0.1, random_state=self.seed)
        ei, w = _add_self_loops(graph["edge_index"], graph["edge_weight"], n_p + n_r)

        def idx(a):
            return torch.as_tensor(np.sort(a), dtype=torch.long)

        return {"x": torch.tensor(graph["x"], dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32),
                "edge_index": ei, "edge_weight": w, "csr": _csr_structure(ei, n_p + n_r), "train": idx(train), "val": idx(val), "test": idx(test),
                "real": torch.arange(n_p, n_p + n_r)}

    # -- steps 6-8 ------------------------------------------------------------------------------------------
    def train_model(self, data: dict, epochs: int | None = None) -> GTADModel:
        """Full-batch Adam with the warm-restart schedule and the official early stopping; sets ``history_``,
        ``val_loss_``, ``val_acc_`` and ``lr_``.

        The validation metrics of the weights after step t are read from the forward pass of step t + 1 (the same
        weights, no dropout), so each epoch costs one forward pass; the last epoch's take one extra pass.
        """
        set_seed(self.seed)
        n_epochs = self.epochs if epochs is None else int(epochs)
        model = GTADModel(data["x"].shape[1], data["y"].shape[1], self.n_hidden, self.heads, self.out_heads)
        schedule = cosine_warm_restart_lr(n_epochs + 1, self.lr, self.min_lr)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(schedule[0]))
        stopper = EarlyStopping(self.patience)
        val_loss, val_acc, lrs = [], [], []
        yv, iv = data["y"][data["val"]], data["val"]

        def judge(z, state) -> bool:  # one official epoch: validation of the weights after its step
            val_loss.append(float(soft_cross_entropy(z[iv], yv)))
            val_acc.append(float((z[iv].argmax(1) == yv.argmax(1)).float().mean()))
            stop = stopper.step(len(val_loss) - 1, val_loss[-1], val_acc[-1])
            if stopper.best_epoch == len(val_loss) - 1:
                stopper.state = state
            return stop

        def check(epoch, terms):
            lrs.append(optimizer.param_groups[0]["lr"])
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[epoch + 1])
            return epoch > 0 and judge(*model.last_)  # last_ = weights after step epoch - 1

        self.history_ = fit(model, data, epochs=n_epochs, optimizer=optimizer, callback=check,
                            progress=self.progress, desc="GTAD")
        if self.history_.stopped_early:
            model.load_state_dict(stopper.state)  # the official rule restores the kept weights
            self.history_.terms["cross_entropy"].pop()  # the step after the stopping epoch is discarded
            self.history_.total.pop()
            lrs.pop()
        else:
            model.eval()
            with torch.no_grad():
                judge(model(data), None)
        del model.last_
        self.val_loss_, self.val_acc_, self.lr_, self.stopper_ = val_loss, val_acc, lrs, stopper
        return model

    @torch.no_grad()
    def predict(self, model: GTADModel, data: dict) -> np.ndarray:
        """Softmax of the GAT output on every node, (N, C)."""
        model.eval()
        return torch.softmax(model(data), dim=1).numpy()

    def run(self, adata, reference=None):
        prep = self.prepare(adata, reference)
        graph = self.build_graph(prep)
        data = self.tensors(prep, graph)
        model = self.train_model(data)
        P = self.predict(model, data)
        write_frame(adata, f"proportions_{self.key}", P[data["real"].numpy()], prep["types"])
        test = data["test"].numpy()
        n_p = prep["pseudo"].shape[0]
        ei = graph["edge_index"].numpy()
        adata.uns[self.key] = {
            "genes": prep["genes"], "features": graph["features"], "n_anchors": int(graph["anchors"].shape[1]),
            "n_edges": int(ei.shape[1]), "mean_degree": float(ei.shape[1] / data["x"].shape[0]),
            "pseudo_real_edge_fraction": float(((ei[0] < n_p) != (ei[1] < n_p)).mean()) if ei.size else 0.0,
            "epochs_run": len(self.history_), "val_loss": np.asarray(self.val_loss_),
            "val_accuracy": np.asarray(self.val_acc_), "lr": np.asarray(self.lr_),
            "pseudo_test_rmse": float(np.sqrt(((P[test] - prep["props"][test]) ** 2).mean())),
        }
        self.model_, self.prep_, self.graph_, self.data_ = model, prep, graph, data
        return adata
