r"""DSTG: deconvolution of spots with a graph convolutional network on a pseudo-spot + real-spot link graph.

Song Q, Su J. DSTG: deconvoluting spatial transcriptomics data through graph-based artificial intelligence.
*Brief Bioinform* 22(5):bbaa414 (2021). doi:10.1093/bib/bbaa414.
Official code: Su-informatics-lab/DSTG (R preprocessing ``R_utils.R`` + TensorFlow 1 ``gutils.py``, ``utils.py``,
``models.py``, ``train.py``); the defaults below are that code's.

Integration strategy: *graph* — labelled pseudo-spots (mixtures of reference cells) and unlabelled real spots are
nodes of one graph, and a semi-supervised GCN carries the known proportions across its edges.

Pipeline
--------
1. **Genes.** Genes shared by the spots and the reference; the ``n_genes = 2000`` with the smallest one-way ANOVA
   p-value of the reference's *raw counts* across cell types (:func:`anova_genes`).
2. **Pseudo-spots** (SPOTlight's ``test_spot_fun``, :func:`mix_pseudo_spots`): ``n_pseudo = 1000`` spots, each the
   sum of ``m ~ U{2, ..., 10}`` reference cells drawn at random regardless of type; a spot whose total exceeds
   25,000 counts is down-sampled to 20,000. The label :math:`y_i \in \Delta^{C-1}` is the fraction of its cells of
   each type.
3. **Graph features** (Seurat ``NormalizeData``/``FindVariableFeatures``/``ScaleData``): log CP10k per dataset,
   2,000 vst-variable genes per dataset merged by ``SelectIntegrationFeatures``' rule
   (:func:`integration_features`), each gene z-scored within its dataset and clipped at 10.
4. **Link graph** (:func:`link_pairs`). Each scaled cell vector is standardised over genes, then the canonical
   correlation embedding is the top ``n_cc = 30`` singular vectors of the cross-product

   .. math:: S_1 S_2^\top = U \Sigma V^\top, \qquad z^{(1)}_i = U_{i,:30} / \lVert U_{i,:30} \rVert,
             \; z^{(2)}_j = V_{j,:30} / \lVert V_{j,:30} \rVert .

   :math:`(i, j)` is an edge when they are mutual nearest neighbours within the top ``k_mnn = 5`` in that space and
   :math:`j` is also among the ``k_filter = 200`` nearest neighbours of :math:`i` in L2-normalised log expression
   of the genes with the largest CCA loadings (:func:`top_loading_genes`, at most 200 genes). Graph 1 links
   pseudo-spots to real spots; graph 2 links real spots to real spots (the same procedure between the real data and
   itself, ``k_filter = 100``), giving within-dataset links.
5. **Propagation matrix.** With :math:`A` the symmetric, unweighted edges of graph 1 + graph 2 (no diagonal), the
   official code puts :math:`I` into the adjacency and the GCN renormalisation adds :math:`I` once more, so
   :math:`\hat A = D^{-1/2}(A + wI)D^{-1/2}` with :math:`w = 2` (``self_loop_weight``) and :math:`D` the row sums
   of :math:`A + wI` (:func:`dstg_graph`).
6. **Model** (:class:`DSTGModel`). Features :math:`X` = counts of the ANOVA genes divided by their row sum. Two GCN
   layers without bias (Glorot initialisation):

   .. math:: H = \mathrm{ReLU}(\hat A X W_1), \qquad Z = \hat A H W_2, \qquad \hat y_i = \mathrm{softmax}(Z_i).

7. **Loss** — soft-label cross-entropy over the training pseudo-spots :math:`\mathcal T` (81 % train, 9 %
   validation, 10 % test; real spots are unlabelled):

   .. math:: \mathcal L = -\frac{1}{|\mathcal T|} \sum_{i \in \mathcal T} \sum_{c} y_{ic} \log \hat y_{ic}.

8. **Training.** Adam, ``lr = 0.01``, ``epochs = 200`` full-batch steps, ``dropout = 0``, ``weight_decay = 0``;
   stop when the validation loss exceeds the mean of the previous ``early_stopping = 10`` epochs. The output is
   :math:`\hat y` on the real spots.

Shapes: ``N = n_pseudo + n_spots`` nodes (pseudo-spots first), ``G`` ANOVA genes, ``C`` cell types;
X (N, G) · edge_index (2, E) · W1 (G, 32) · H (N, 32) · W2 (32, C) · Z (N, C).

Deliberate deviations from the official code
--------------------------------------------
* **Python instead of R/Seurat/SPOTlight/DropletUtils.** ANOVA p-values come from :func:`sklearn.feature_selection.f_classif`
  (the same one-way F-test as R's ``aov``); Seurat's vst selection is scanpy's ``flavor="seurat_v3"`` (the same
  loess-standardised variance); ``NormalizeData`` and ``ScaleData`` (centre, unit sd, clip at 10) are written in
  numpy; SPOTlight's pseudo-spot generator and DropletUtils' down-sampling (multivariate hypergeometric draw of
  exactly 20,000 counts) are re-implemented. Gene ties and random streams therefore differ. Features and weights
  are float32 (official float64 features).
* **Sparse, no N x N.** The official CCA forms the dense (N1 x N2) product and a full ``np.linalg.svd``, and the
  adjacency starts as a dense ``np.identity(N)`` turned into a networkx graph. Here the same singular vectors come
  from QR factors of each side, :math:`S_1 = Q_1R_1`, :math:`S_2 = Q_2R_2`, and the SVD of the small
  :math:`R_1R_2^\top` (memory O(N G)); the graph is an ``edge_index`` with normalised ``edge_weight``. The
  feature matrix X (N, G) is a dense tensor (the official code keeps it sparse). The expression
  filter's neighbour search is exact brute force (O(N1 N2 g) time, chunked memory), the slowest step at scale.
* **Mutual neighbours.** The official code searches 30 neighbours but tests mutuality within the first 5; here
  :func:`stcore.graphs.mutual_nn` with ``k = 5`` gives the same pairs (up to distance ties). The expression filter
  keeps a pair when its distance is at most the ``k_filter``-th neighbour distance (equal to the official rank test
  up to ties); when a dataset has fewer than ``k_filter`` spots every pair passes (the official KD-tree query fails).
* **Seeds.** One ``seed`` (default 0) drives the pseudo-spots, the 81/9/10 split (official: ``random_state=1``) and
  the weight initialisation (official: 123).
* **Gene count.** When fewer than ``n_genes`` genes are shared, all are used (the official ``order(p)[1:2000]``
  would produce missing names). Genes with no variance in the reference get p = 1 (ranked last).
* **Graph 2.** The real-real graph is added to the adjacency as in the official ``utils.load_data`` (both link
  graphs plus the identity); ``real_links=False`` keeps the pseudo-real graph alone, for versions or analyses
  without it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from .. import graphs
from ..nn import GCNStack
from ..train import fit, set_seed
from ..validation import counts_matrix, reference_cell_types, shared_genes
from . import Method, register
from ._common import dense, write_frame

__all__ = [
    "DSTG",
    "DSTGModel",
    "anova_genes",
    "cca_embed",
    "dstg_graph",
    "early_stop",
    "filter_pairs",
    "integration_features",
    "link_pairs",
    "log_normalize",
    "mix_pseudo_spots",
    "scale_data",
    "soft_cross_entropy",
    "top_loading_genes",
]


# ------------------------------------------------------------------------------------------- steps 1-3
def anova_genes(counts, codes, n_genes: int = 2000) -> np.ndarray:
    """Indices of the ``n_genes`` genes with the smallest one-way ANOVA p-value across cell types (step 1).

    ``counts`` (n_cells, G) raw counts, ``codes`` (n_cells,) integer cell types. Genes with no variance get p = 1.
    Ties are broken by the larger F, then by gene order.
    """
    from sklearn.feature_selection import f_classif

    X = dense(counts)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Features [...] are constant": handled below
        f, p = f_classif(X, np.asarray(codes))
    p = np.where(np.isfinite(p), p, 1.0)
    f = np.where(np.isfinite(f), f, 0.0)
    order = np.lexsort((np.arange(X.shape[1]), -f, p))
    return np.sort(order[: min(n_genes, X.shape[1])])


def mix_pseudo_spots(counts, codes, n_types: int, n_spots: int = 1000, cells_per_spot: tuple[int, int] = (2, 10),
                     max_counts: float = 25_000, target_counts: int = 20_000, seed: int = 0):
    """SPOTlight-style pseudo-spots (step 2): each spot sums ``m ~ U{cells_per_spot}`` distinct random cells.

    A spot with more than ``max_counts`` counts is down-sampled to exactly ``target_counts`` (hypergeometric
    draw without replacement, as DropletUtils' ``downsampleMatrix``).

    Returns
    -------
    X : (n_spots, G) float32 CSR counts; props : (n_spots, n_types) cell-type fractions (rows sum to 1).
    """
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    codes = np.asarray(codes)
    lo, hi = cells_per_spot
    rng = np.random.default_rng(seed)
    n_cells = counts.shape[0]
    rows, cols = [], []
    for s in range(n_spots):
        m = int(rng.integers(lo, hi + 1))
        chosen = rng.choice(n_cells, size=min(m, n_cells), replace=False)
        rows.append(np.full(len(chosen), s))
        cols.append(chosen)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    member = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_spots, n_cells))
    X = (member @ counts).toarray()
    props = np.zeros((n_spots, n_types))
    np.add.at(props, (rows, codes[cols]), 1.0)
    props /= props.sum(1, keepdims=True)
    for s in np.flatnonzero(X.sum(1) > max_counts):
        X[s] = rng.multivariate_hypergeometric(np.round(X[s]).astype(np.int64), target_counts)
    return sparse.csr_matrix(X.astype(np.float32)), props


def log_normalize(counts) -> np.ndarray:
    """Seurat ``NormalizeData``: :math:`\\log(1 + 10^4 x_{ig} / \\sum_g x_{ig})` (rows with no counts stay 0)."""
    X = dense(counts)
    lib = X.sum(1, keepdims=True)
    return np.log1p(np.divide(X, lib, out=np.zeros_like(X), where=lib > 0) * 1e4)


def scale_data(logX: np.ndarray, max_value: float = 10.0) -> np.ndarray:
    """Seurat ``ScaleData``: each gene centred and divided by its sd (n - 1) within the dataset, clipped at
    ``max_value``; genes with no variance become 0."""
    sd = logX.std(0, ddof=1) if logX.shape[0] > 1 else np.zeros(logX.shape[1])
    Z = np.divide(logX - logX.mean(0), sd, out=np.zeros_like(logX), where=sd > 0)
    return np.minimum(Z, max_value)


def _vst_ranks(counts, var_names) -> list[str]:
    """Genes ordered by Seurat's vst standardised variance (scanpy ``seurat_v3``), expressed genes only."""
    import anndata as ad
    import scanpy as sc

    X = sparse.csr_matrix(counts, dtype=np.float32)
    tmp = ad.AnnData(X, var=pd.DataFrame(index=pd.Index(var_names).astype(str)))
    sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=tmp.n_vars)
    var = tmp.var[tmp.var["means"] > 0]
    return list(var.sort_values("variances_norm", ascending=False, kind="stable").index)


def integration_features(rankings: list[list[str]], n_features: int = 2000) -> list[str]:
    """Seurat ``SelectIntegrationFeatures``: genes listed by most datasets first, then by their median rank.

    ``rankings`` are per-dataset gene lists (each already cut to its top ``n_features``, best first).
    """
    count: dict[str, int] = {}
    ranks: dict[str, list[int]] = {}
    for lst in rankings:
        for r, g in enumerate(lst):
            count[g] = count.get(g, 0) + 1
            ranks.setdefault(g, []).append(r + 1)
    order = sorted(count, key=lambda g: (-count[g], float(np.median(ranks[g]))))
    return order[:n_features]


# ----------------------------------------------------------------------------------------------- step 4
def cca_embed(S1: np.ndarray, S2: np.ndarray, n_cc: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical correlation embedding of two scaled datasets on the same genes.

    Each row (spot) is first standardised over genes (mean 0, population sd 1), then
    :math:`S_1 S_2^\\top = U \\Sigma V^\\top` is computed without forming the (n1, n2) product: with QR
    factors :math:`S_1 = Q_1 R_1` and :math:`S_2 = Q_2 R_2`, the SVD of the small
    :math:`R_1 R_2^\\top = \\tilde U \\Sigma \\tilde V^\\top` gives :math:`U = Q_1 \\tilde U`,
    :math:`V = Q_2 \\tilde V`. Column signs are fixed so that the first spot of dataset 1 is non-negative.

    Returns
    -------
    U (n1, n_cc), V (n2, n_cc), d (n_cc,) singular values.
    """

    def standardise(S):
        sd = S.std(1, keepdims=True)
        return np.divide(S - S.mean(1, keepdims=True), sd, out=np.zeros_like(S), where=sd > 0)

    A, B = standardise(np.asarray(S1, float)), standardise(np.asarray(S2, float))
    Q1, R1 = np.linalg.qr(A)  # A = Q1 R1, Q1 (n1, r1) orthonormal columns
    Q2, R2 = np.linalg.qr(B)
    Ut, d, Vt = np.linalg.svd(R1 @ R2.T)  # A B^T = Q1 (R1 R2^T) Q2^T
    k = min(n_cc, len(d))
    U, V = Q1 @ Ut[:, :k], Q2 @ Vt.T[:, :k]
    sign = np.where(U[0] < 0, -1.0, 1.0)
    return U * sign, V * sign, d[:k]


def _top_by_loading(loadings: np.ndarray, num_g: int) -> set[int]:
    """Union over CCA dimensions of the ``round(num_g / 2)`` most positive and most negative genes."""
    num = int(np.round(num_g / 2))
    out: set[int] = set()
    if num == 0:
        return out
    for col in loadings.T:
        order = np.argsort(-col, kind="stable")
        out.update(order[:num].tolist())
        out.update(order[::-1][:num].tolist())
    return out


def top_loading_genes(loadings: np.ndarray, dim_genes: int = 100, max_genes: int = 200) -> np.ndarray:
    """Genes used to filter the MNN pairs (the official ``TopGenes``).

    ``loadings`` (G, n_cc) = scaled expression times CCA vectors. For ``i = 1 .. dim_genes`` the union of the top
    ``round(i / 2)`` positive and negative genes of every dimension is formed; the smallest ``i`` that reaches the
    largest union still below ``max(2 n_cc, max_genes)`` genes is used. Returns sorted gene indices.
    """
    loadings = np.asarray(loadings, dtype=np.float64)
    cap = max(2 * loadings.shape[1], max_genes)
    sizes = np.array([len(_top_by_loading(loadings, i)) for i in range(1, dim_genes + 1)])
    valid = sizes[sizes < cap]
    best = int(np.argmax(valid)) + 1 if len(valid) else 1
    return np.array(sorted(_top_by_loading(loadings, best)), dtype=np.int64)


def _l2_rows(X: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norm, out=np.zeros_like(X), where=norm > 0)


def filter_pairs(pairs: np.ndarray, E1: np.ndarray, E2: np.ndarray, k_filter: int = 200) -> np.ndarray:
    """Boolean mask over the columns of ``pairs`` (2, P): keep ``(i, j)`` when ``E2[j]`` is among the
    ``k_filter`` nearest rows of ``E2`` to ``E1[i]`` (its distance is at most the ``k_filter``-th one).
    With ``k_filter >= len(E2)`` every pair passes."""
    pairs = np.asarray(pairs)
    if pairs.shape[1] == 0 or k_filter >= E2.shape[0]:
        return np.ones(pairs.shape[1], dtype=bool)
    from sklearn.neighbors import NearestNeighbors

    rows, inverse = np.unique(pairs[0], return_inverse=True)
    dist, _ = NearestNeighbors(n_neighbors=k_filter).fit(E2).kneighbors(E1[rows])
    kth = dist[:, -1][inverse]
    d = np.linalg.norm(E1[pairs[0]] - E2[pairs[1]], axis=1)
    return d <= kth + 1e-9


def link_pairs(S1: np.ndarray, S2: np.ndarray, N1: np.ndarray, N2: np.ndarray, *, n_cc: int = 30, k_mnn: int = 5,
               k_filter: int = 200, max_genes: int = 200) -> tuple[np.ndarray, dict]:
    """Filtered mutual-nearest-neighbour pairs between two datasets (step 4, the official ``Link_graph``).

    Parameters
    ----------
    S1, S2 : (n1, g), (n2, g) Seurat-scaled expression of the variable genes.
    N1, N2 : (n1, g), (n2, g) log-normalised expression of the same genes.

    Returns
    -------
    pairs : (2, P) int array, row 0 indexes dataset 1, row 1 dataset 2;
    info : dict with ``n_mnn`` (pairs before filtering), ``filter_genes`` and ``singular_values``.
    """
    keep = (S1.var(0) > 0) & (S2.var(0) > 0)
    if keep.sum() < 2:
        raise ValueError(f"Only {int(keep.sum())} genes vary in both datasets, too few for the CCA link graph; "
                         "use more genes (n_genes / n_hvg) or check that the spots have counts.")
    S1, S2, N1, N2 = S1[:, keep], S2[:, keep], N1[:, keep], N2[:, keep]
    U, V, d = cca_embed(S1, S2, n_cc)
    pairs = graphs.mutual_nn(U, V, k=k_mnn, metric="cosine").numpy()
    loadings = np.vstack([S1, S2]).T @ np.vstack([U, V])
    genes = top_loading_genes(loadings, max_genes=max_genes)
    mask = filter_pairs(pairs, _l2_rows(N1[:, genes]), _l2_rows(N2[:, genes]), k_filter)
    info = {"n_mnn": int(pairs.shape[1]), "filter_genes": np.flatnonzero(keep)[genes], "singular_values": d}
    return pairs[:, mask], info


# ----------------------------------------------------------------------------------------------- step 5
def dstg_graph(pseudo_real, real_real, n_pseudo: int, n_real: int, *,
               self_loop_weight: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Normalised propagation matrix :math:`\hat A = D^{-1/2}(A + wI)D^{-1/2}` as ``(edge_index, edge_weight)``.

    Nodes are the ``n_pseudo`` pseudo-spots followed by the ``n_real`` real spots. ``pseudo_real`` (2, P1) holds
    (pseudo, real) pairs, ``real_real`` (2, P2) (real, real) pairs (or ``None``); every pair becomes an
    unweighted edge in both directions, and every node gets a self loop of weight ``w = self_loop_weight``
    (2 in the official code: the identity put into the adjacency plus the one the GCN renormalisation adds).
    """
    n = n_pseudo + n_real
    p1 = np.asarray(pseudo_real, dtype=np.int64).reshape(2, -1)
    src, dst = [p1[0]], [n_pseudo + p1[1]]
    if real_real is not None:
        p2 = np.asarray(real_real, dtype=np.int64).reshape(2, -1)
        off = p2[0] != p2[1]
        src.append(n_pseudo + p2[0][off])
        dst.append(n_pseudo + p2[1][off])
    ei = graphs.to_undirected(torch.from_numpy(np.stack([np.concatenate(src), np.concatenate(dst)])), n)
    A = graphs.to_scipy(ei, n)
    A.data[:] = 1.0
    A = (A + self_loop_weight * sparse.identity(n, format="csr", dtype=np.float32)).tocsr()
    d = 1.0 / np.sqrt(np.asarray(A.sum(1)).ravel())
    return graphs.from_scipy((sparse.diags(d) @ A @ sparse.diags(d)).tocsr())


# ------------------------------------------------------------------------------------------- steps 6-8
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Mean over rows of :math:`-\sum_c y_c \log \mathrm{softmax}(z)_c` (TensorFlow's
    ``softmax_cross_entropy_with_logits`` with soft labels)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def early_stop(val_loss: list[float], patience: int = 10) -> bool:
    """The official rule: after more than ``patience + 1`` epochs, stop when the last validation loss exceeds the
    mean of the ``patience`` before it (``patience = 0`` never stops)."""
    if patience <= 0 or len(val_loss) <= patience + 1:
        return False
    return bool(val_loss[-1] > np.mean(val_loss[-(patience + 1):-1]))


class DSTGModel(nn.Module):
    r"""Two bias-free GCN layers, ``X (N, G) -> H (N, n_hidden) -> Z (N, C)``, on a pre-normalised graph.

    ``data`` is a dict with ``x`` (N, G), ``edge_index`` (2, E), ``edge_weight`` (E,) (already
    :math:`\hat A`), ``y`` (N, C) soft labels and ``train`` (n_train,) node indices. Dropout (official 0) is
    applied to the input of each layer.
    """

    def __init__(self, n_genes: int, n_types: int, n_hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        self.dropout = float(dropout)
        self.gcn = GCNStack([n_genes, n_hidden, n_types], dropout=dropout, bias=False, normalize=False)

    def forward(self, data: dict) -> torch.Tensor:
        x = F.dropout(data["x"], p=self.dropout, training=self.training)
        return self.gcn(x, data["edge_index"], data["edge_weight"])

    def loss(self, data: dict) -> dict[str, torch.Tensor]:
        z = self(data)
        return {"cross_entropy": soft_cross_entropy(z[data["train"]], data["y"][data["train"]])}


@register
class DSTG(Method):
    """DSTG (Song & Su 2021): a GCN on pseudo-spots linked to real spots by CCA mutual nearest neighbours.

    Options (official defaults): ``n_genes`` ANOVA genes (2000), ``n_pseudo`` pseudo-spots (1000),
    ``cells_per_spot`` ((2, 10)), ``n_hvg`` variable genes per dataset for the graph (2000), ``n_cc`` canonical
    vectors (30), ``k_mnn`` (5), ``k_filter`` (200, pseudo-real) and ``k_filter_real`` (100, real-real),
    ``real_links`` (graph 2, True), ``self_loop_weight`` (2), ``n_hidden`` (32), ``dropout`` (0), ``lr`` (0.01),
    ``epochs`` (200), ``weight_decay`` (0), ``early_stopping`` (10; 0 disables it). The result is
    ``obsm["proportions_dstg"]`` (spots x reference types); ``uns["dstg"]`` keeps the genes, graph sizes, the
    per-epoch validation loss and the RMSE on the held-out pseudo-spots.
    """

    name = "dstg"
    task = "deconv"
    summary = "GCN on a pseudo-spot + spot CCA-MNN graph"
    paper = "Song & Su, Brief Bioinform 2021"
    needs_reference = True

    def __init__(self, *, n_genes: int = 2000, n_pseudo: int = 1000, cells_per_spot: tuple[int, int] = (2, 10),
                 n_hvg: int = 2000, n_cc: int = 30, k_mnn: int = 5, k_filter: int = 200, k_filter_real: int = 100,
                 real_links: bool = True, self_loop_weight: float = 2.0, n_hidden: int = 32, dropout: float = 0.0,
                 lr: float = 0.01, epochs: int = 200, weight_decay: float = 0.0, early_stopping: int = 10,
                 cell_type_key: str = "cell_type", seed: int = 0, progress: bool = True):
        for name, value, low in [("n_genes", n_genes, 2), ("n_pseudo", n_pseudo, 10), ("n_hvg", n_hvg, 2),
                                 ("n_cc", n_cc, 1), ("k_mnn", k_mnn, 1), ("k_filter", k_filter, 1),
                                 ("k_filter_real", k_filter_real, 1), ("n_hidden", n_hidden, 1),
                                 ("epochs", epochs, 1), ("early_stopping", early_stopping, 0)]:
            if int(value) != value or value < low:
                raise ValueError(f"{name}={value} must be an integer >= {low} (official defaults: "
                                 "help(stcore.methods.dstg.DSTG)).")
        cps = tuple(cells_per_spot) if np.ndim(cells_per_spot) else (cells_per_spot, cells_per_spot)
        if len(cps) != 2 or not 1 <= cps[0] <= cps[1]:
            raise ValueError(f"cells_per_spot={cells_per_spot}: give (low, high) with 1 <= low <= high "
                             "(official (2, 10)).")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must lie in [0, 1) (official 0).")
        if not lr > 0 or weight_decay < 0 or not self_loop_weight > 0:
            raise ValueError(f"lr={lr} and self_loop_weight={self_loop_weight} must be positive and "
                             f"weight_decay={weight_decay} non-negative (official 0.01, 2 and 0).")
        self.n_genes, self.n_pseudo, self.cells_per_spot, self.n_hvg = n_genes, n_pseudo, cps, n_hvg
        self.n_cc, self.k_mnn, self.k_filter, self.k_filter_real = n_cc, k_mnn, k_filter, k_filter_real
        self.real_links, self.self_loop_weight = real_links, self_loop_weight
        self.n_hidden, self.dropout, self.lr, self.epochs = n_hidden, dropout, lr, epochs
        self.weight_decay, self.early_stopping = weight_decay, early_stopping
        self.cell_type_key, self.seed, self.progress = cell_type_key, seed, progress

    # -- steps 1-2 ------------------------------------------------------------------------------------------
    def prepare(self, adata, reference) -> dict:
        """Validate the inputs, pick the ANOVA genes and mix the pseudo-spots. Returns a dict."""
        self._check_reference(reference)
        genes = shared_genes(adata, reference, min_genes=2)
        labels, types = reference_cell_types(reference, self.cell_type_key)
        codes = pd.Categorical(labels, categories=types).codes
        ref = sparse.csr_matrix(counts_matrix(reference[:, genes]), dtype=np.float64)
        spots = sparse.csr_matrix(counts_matrix(adata[:, genes]), dtype=np.float64)
        empty = np.asarray(spots.sum(1)).ravel() <= 0
        if empty.any():
            raise ValueError(f"{int(empty.sum())} spots have no counts on the {len(genes)} genes shared with the "
                             "reference; remove them first (e.g. sc.pp.filter_cells(adata, min_counts=1)).")
        sel = anova_genes(ref, codes, self.n_genes)
        pseudo, props = mix_pseudo_spots(ref[:, sel], codes, len(types), self.n_pseudo, self.cells_per_spot,
                                         seed=self.seed)
        return {"genes": genes[sel], "types": types, "pseudo": pseudo, "props": props,
                "real": sparse.csr_matrix(spots[:, sel], dtype=np.float32)}

    # -- steps 3-5 ------------------------------------------------------------------------------------------
    def build_graph(self, prep: dict) -> dict:
        """Variable genes, scaling, CCA + MNN link graphs and the normalised propagation matrix."""
        genes = np.asarray(prep["genes"], dtype=str)
        ranks = [_vst_ranks(prep[k], genes)[: self.n_hvg] for k in ("pseudo", "real")]
        hvg = integration_features(ranks, self.n_hvg)
        h = pd.Index(genes).get_indexer(hvg)
        norm_p, norm_r = log_normalize(prep["pseudo"])[:, h], log_normalize(prep["real"])[:, h]
        S_p, S_r = scale_data(norm_p), scale_data(norm_r)
        opts = {"n_cc": self.n_cc, "k_mnn": self.k_mnn}
        pr, info1 = link_pairs(S_p, S_r, norm_p, norm_r, k_filter=self.k_filter, **opts)
        rr = (link_pairs(S_r, S_r, norm_r, norm_r, k_filter=self.k_filter_real, **opts)[0]
              if self.real_links else None)
        n_p, n_r = prep["pseudo"].shape[0], prep["real"].shape[0]
        edge_index, edge_weight = dstg_graph(pr, rr, n_p, n_r, self_loop_weight=self.self_loop_weight)
        return {"edge_index": edge_index, "edge_weight": edge_weight, "pseudo_real": pr, "real_real": rr,
                "hvg": hvg, "n_mnn": info1["n_mnn"]}

    def tensors(self, prep: dict, graph: dict) -> dict:
        """Row-normalised features, soft labels and the 81/9/10 split of the pseudo-spots (step 6)."""
        from sklearn.model_selection import train_test_split

        X = sparse.vstack([prep["pseudo"], prep["real"]]).tocsr().astype(np.float64)
        row = np.asarray(X.sum(1)).ravel()
        X = sparse.diags(np.divide(1.0, row, out=np.zeros_like(row), where=row > 0)) @ X
        n_p, n_r = prep["pseudo"].shape[0], prep["real"].shape[0]
        y = np.vstack([prep["props"], np.zeros((n_r, prep["props"].shape[1]))])
        rest, test = train_test_split(np.arange(n_p), test_size=0.1, random_state=self.seed)
        train, val = train_test_split(rest, test_size=0.1, random_state=self.seed)

        def idx(a):
            return torch.as_tensor(np.sort(a), dtype=torch.long)

        return {"x": torch.tensor(X.toarray(), dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32),
                "edge_index": graph["edge_index"], "edge_weight": graph["edge_weight"],
                "train": idx(train), "val": idx(val), "test": idx(test), "real": torch.arange(n_p, n_p + n_r)}

    # -- steps 6-8 ------------------------------------------------------------------------------------------
    def build_model(self, data: dict) -> nn.Module:
        """The untrained GCN for the node features and labels of ``data``."""
        return DSTGModel(data["x"].shape[1], data["y"].shape[1], self.n_hidden, self.dropout)

    def train_model(self, data: dict, epochs: int | None = None) -> nn.Module:
        """Full-batch Adam with the official early-stopping rule; sets ``history_`` and ``val_loss_``."""
        set_seed(self.seed)
        model = self.build_model(data)
        val_loss: list[float] = []
        patience = self.early_stopping

        def check(epoch, terms):
            model.eval()
            with torch.no_grad():
                val_loss.append(float(soft_cross_entropy(model(data)[data["val"]], data["y"][data["val"]])))
            return early_stop(val_loss, patience)

        self.history_ = fit(model, data, epochs=self.epochs if epochs is None else epochs, lr=self.lr,
                            weight_decay=self.weight_decay, callback=check, progress=self.progress,
                            desc=type(self).__name__)
        self.val_loss_ = val_loss
        return model

    @torch.no_grad()
    def predict(self, model: DSTGModel, data: dict) -> np.ndarray:
        """Softmax of the GCN output on every node, (N, C)."""
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
        adata.uns[self.key] = {
            "genes": np.asarray(prep["genes"], str), "graph_genes": np.asarray(graph["hvg"], str),
            "n_pseudo_real_edges": int(graph["pseudo_real"].shape[1]),
            "n_real_real_edges": 0 if graph["real_real"] is None else int(graph["real_real"].shape[1]),
            "n_mnn_unfiltered": int(graph["n_mnn"]),
            "real_spots_linked": float(np.isin(np.arange(adata.n_obs), graph["pseudo_real"][1]).mean()),
            "epochs_run": len(self.history_), "val_loss": np.asarray(self.val_loss_),
            "pseudo_test_rmse": float(np.sqrt(((P[test] - prep["props"][test]) ** 2).mean())),
        }
        self.model_, self.prep_, self.graph_, self.data_ = model, prep, graph, data
        return adata
