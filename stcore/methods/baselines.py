"""Non-deep baselines, one per task: the yardsticks every deep method of the course is compared with.

* ``leiden`` / ``gmm`` (domains): expression only — HVGs -> log-normalise -> PCA -> clustering;
* ``nnls`` (deconv): non-negative least squares of each spot on the reference's mean cell-type profiles;
* ``knn_deconv`` (deconv): reference mapping — the cell types of each spot's most similar reference cells;
* ``knn_impute`` (impute): average of the missing genes over the most similar reference cells;
* ``knn_locate`` (locate): each reference cell placed at the mean position of its most similar spatial spots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import nnls
from scipy.spatial import cKDTree

from .. import preprocess
from ..validation import cell_type_labels, counts_matrix, shared_genes, spatial_coords
from . import Method, register
from ._common import coords_for_refinement, dense, embedding_to_domains, missing_genes, write_domains, write_frame


def _log_profiles(adata, genes, allow_empty: bool = False) -> np.ndarray:
    """log1p(CP10k) of ``genes``, normalised on those genes only (so both datasets are on one scale); rows without
    counts raise an error, or stay zero with ``allow_empty``."""
    X = dense(counts_matrix(adata[:, genes]))
    lib = X.sum(1, keepdims=True)
    if allow_empty:
        return np.log1p(X / np.maximum(lib, 1) * 1e4)
    if np.any(lib == 0):
        raise ValueError(f"{int((lib == 0).sum())} spots/cells have no counts on the shared genes; "
                         "filter them out first (e.g. sc.pp.filter_cells(adata, min_counts=1)).")
    return np.log1p(X / lib * 1e4)


def _cosine_neighbours(query, ref, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``ref`` most cosine-similar to each row of ``query``: ``(index, similarity)``, both
    (n_query, k). Exact, through a k-d tree on unit vectors (``cos = 1 - d^2 / 2``); no query x ref matrix."""
    unit = lambda A: A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)
    k = min(k, len(ref))
    dist, idx = cKDTree(unit(ref)).query(unit(query), k=k)
    return idx.reshape(len(query), k), np.clip(1 - dist.reshape(len(query), k) ** 2 / 2, 1e-6, None)


def _measured_cells(reference, genes) -> tuple[np.ndarray, np.ndarray]:
    """``(profiles, rows)``: :func:`_log_profiles` of the reference cells with counts on ``genes`` and their row
    indices; a cell without such counts resembles nothing and is left out."""
    cells = _log_profiles(reference, genes, allow_empty=True)
    rows = np.flatnonzero(cells.sum(1) > 0)
    if len(rows) == 0:
        raise ValueError("No reference cell has counts on the genes shared with the spatial data.")
    return cells[rows], rows


class _ExpressionDomains(Method):
    task = "domains"
    paper = "baseline"

    def __init__(self, n_domains: int | None = 7, *, n_top_genes: int = 3000, n_pcs: int = 30,
                 refine: bool = False, seed: int = 0, resolution: float = 1.0):
        self.n_domains, self.n_top_genes, self.n_pcs = n_domains, n_top_genes, n_pcs
        self.refine, self.seed, self.resolution = refine, seed, resolution

    def run(self, adata, reference=None):
        Z = preprocess.hvg_pca(adata, self.n_top_genes, self.n_pcs, seed=self.seed)
        labels = embedding_to_domains(Z, self.n_domains, clustering=self.clustering, seed=self.seed,
                                      resolution=self.resolution,
                                      refine_with=coords_for_refinement(adata, self.refine))
        write_domains(adata, self.key, labels, Z)
        return adata


@register
class LeidenBaseline(_ExpressionDomains):
    """Leiden on the PCA of expression (resolution searched to give ``n_domains``; ``None`` keeps
    ``resolution``)."""

    name = "leiden"
    clustering = "leiden"
    summary = "expression only: PCA + Leiden"


@register
class GMMBaseline(_ExpressionDomains):
    """Gaussian mixture with tied covariance (mclust EEE) on the PCA of expression."""

    name = "gmm"
    clustering = "gmm"
    summary = "expression only: PCA + Gaussian mixture (EEE)"


@register
class NNLSDeconvolution(Method):
    r"""Proportions from non-negative least squares on mean reference profiles.

    With :math:`S \in \mathbb{R}^{C \times G}` the mean normalised profile of each cell type and :math:`x_s` a
    spot's normalised counts, :math:`\hat w_s = \arg\min_{w \ge 0} \lVert S^\top w - x_s \rVert^2`, and the
    proportions are :math:`\hat w_s / \sum_c \hat w_{sc}`.
    """

    name = "nnls"
    task = "deconv"
    summary = "NNLS on mean cell-type profiles"
    paper = "baseline"
    needs_reference = True

    def __init__(self, *, cell_type_key: str = "cell_type"):
        self.cell_type_key = cell_type_key

    def run(self, adata, reference=None):
        self._check_reference(reference)
        genes = shared_genes(adata, reference)
        types = cell_type_labels(reference, self.cell_type_key)
        ref = dense(counts_matrix(reference[:, genes]))
        ref = ref / np.maximum(ref.sum(1, keepdims=True), 1)
        onehot = pd.get_dummies(types).astype(float)
        signatures = (onehot.to_numpy().T @ ref) / onehot.to_numpy().sum(0)[:, None]  # (C, G)
        spots = dense(counts_matrix(adata[:, genes]))
        spots = spots / np.maximum(spots.sum(1, keepdims=True), 1)
        weights = np.stack([nnls(signatures.T, s)[0] for s in spots])
        total = weights.sum(1, keepdims=True)
        props = np.divide(weights, total, out=np.full_like(weights, 1.0 / weights.shape[1]), where=total > 0)
        write_frame(adata, f"proportions_{self.key}", props, onehot.columns)
        return adata


@register
class KNNDeconvolution(Method):
    r"""Reference mapping: a spot's proportions are the similarity-weighted cell-type shares of its ``k`` most
    similar reference cells (cosine similarity of log-normalised shared genes),
    :math:`\hat p_{sc} = \sum_{j \in N_k(s)} \cos(x_s, r_j)\,[t_j = c] / \sum_{j \in N_k(s)} \cos(x_s, r_j)`.

    The simplest way of transferring labels from a reference: no model of mixing, so a spot of two types is
    mapped to cells of whichever type it resembles more. A spot without counts on the shared genes gets uniform
    proportions; reference cells without counts on them are left out.
    """

    name = "knn_deconv"
    task = "deconv"
    summary = "reference mapping: types of the k most similar cells"
    paper = "baseline"
    needs_reference = True

    def __init__(self, *, k: int = 20, cell_type_key: str = "cell_type"):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}: give a positive number of reference cells.")
        self.k, self.cell_type_key = int(k), cell_type_key

    def run(self, adata, reference=None):
        self._check_reference(reference)
        genes = shared_genes(adata, reference)
        onehot = pd.get_dummies(cell_type_labels(reference, self.cell_type_key)).astype(float)
        spots = _log_profiles(adata, genes, allow_empty=True)
        cells, rows = _measured_cells(reference, genes)
        idx, weight = _cosine_neighbours(spots, cells, self.k)
        types = onehot.to_numpy()[rows]
        props = np.einsum("sk,skc->sc", weight, types[idx]) / weight.sum(1, keepdims=True)
        props[spots.sum(1) == 0] = 1.0 / props.shape[1]  # a spot without counts: uniform, as NNLS gives it
        write_frame(adata, f"proportions_{self.key}", props, onehot.columns)
        return adata


@register
class KNNImputation(Method):
    """Each spatial cell/spot takes the similarity-weighted mean of its ``k`` most similar reference cells
    (cosine similarity of log-normalised shared genes) for every gene it lacks; reference cells without counts on
    the shared genes are left out."""

    name = "knn_impute"
    task = "impute"
    summary = "kNN regression on shared genes"
    paper = "baseline"
    needs_reference = True

    def __init__(self, *, k: int = 20, genes: list[str] | None = None):
        self.k, self.genes = k, genes

    def run(self, adata, reference=None):
        self._check_reference(reference)
        shared = shared_genes(adata, reference)
        targets = missing_genes(adata, reference, self.genes)
        cells, rows = _measured_cells(reference, shared)
        idx, weight = _cosine_neighbours(_log_profiles(adata, shared), cells, self.k)
        target_counts = dense(counts_matrix(reference[rows][:, targets]))
        lib = np.maximum(dense(counts_matrix(reference[rows])).sum(1, keepdims=True), 1)
        target_expr = target_counts / lib * 1e4
        pred = (target_expr[idx] * weight[..., None]).sum(1) / weight.sum(1, keepdims=True)
        write_frame(adata, f"imputed_{self.key}", pred, targets)
        return adata


@register
class KNNLocation(Method):
    """Each reference cell is placed at the similarity-weighted mean position of its ``k`` most similar spatial
    spots/cells (cosine similarity of log-normalised shared genes)."""

    name = "knn_locate"
    task = "locate"
    summary = "kNN in expression space, mean position"
    paper = "baseline"
    needs_reference = True

    def __init__(self, *, k: int = 10):
        self.k = k

    def run(self, adata, reference=None):
        self._check_reference(reference)
        coords = spatial_coords(adata)
        shared = shared_genes(adata, reference)
        idx, weight = _cosine_neighbours(_log_profiles(reference, shared), _log_profiles(adata, shared), self.k)
        out = reference.copy()
        out.obsm[f"spatial_{self.key}"] = (coords[idx] * weight[..., None]).sum(1) / weight.sum(1, keepdims=True)
        return out
