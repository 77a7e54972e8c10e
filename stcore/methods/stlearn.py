"""stLearn SME: smooth each spot's expression with its morphologically and transcriptionally similar neighbours.

Pham D, Tan X, Balderson B, *et al.* Robust mapping of spatiotemporal trajectories and cell–cell interactions in
healthy and diseased tissues. *Nat Commun* 14, 7739 (2023) (first as Pham *et al.*, "stLearn: integrating spatial
location, tissue morphology and gene expression to find cell types, cell–cell interactions and spatial trajectories
within undissociated tissues", bioRxiv 2020). Official code: BiomedicalMachineLearning/stLearn
(``stlearn/spatial/sme``, ``stlearn/image_preprocessing``); defaults below are those of the stSME clustering tutorial.

Pipeline (integration strategy: *link* — the H&E tiles enter as similarities that weight an expression average;
no model is trained on expression):

1. Expression: drop genes seen in no spot, normalise each spot to the median library size, ``log1p``
   (:math:`x_i \\in \\mathbb{R}^G`); PCA to 15 components :math:`p_i` (``X_pca``).
2. Morphology: a tile of ``crop_size`` = 40 pixels of the high-resolution image around each spot goes through a
   CNN; the features are reduced by PCA to 50 components :math:`m_i` (``X_morphology``).
3. Weights, for spots :math:`i, j`:

   .. math::
      PD_{ij} = [d_{ij} < r\\,u], \\quad MD_{ij} = \\max(0, \\cos(m_i, m_j)), \\quad
      GD_{ij} = \\operatorname{corr}(p_i, p_j), \\quad W_{ij} = PD_{ij}\\, MD_{ij}\\, GD_{ij}

   with :math:`d_{ij}` the pixel distance, ``rate`` :math:`r` = 3 (Visium; 1.5 for legacy ST) and :math:`u` the
   lattice unit from a regression of pixel on array coordinates (:func:`sme_unit`). ``weights`` chooses the
   product (``"weights_matrix_all"`` = PD·MD·GD, ``"weights_matrix_pd_gd"``, ``"weights_matrix_pd_md"``,
   ``"physical_distance"``).
4. SME normalisation: with :math:`N_i` the 3 largest entries of row :math:`W_i` (6 for ``"physical_distance"``),

   .. math::
      \\tilde x_i = \\frac{\\sum_{j \\in N_i} W_{ij} x_j}{\\sum_{j \\in N_i} W_{ij}}, \\qquad
      x^{SME}_{ig} = \\tfrac12 (x_{ig} + \\tilde x_{ig}) \\;\\text{where}\\; \\tilde x_{ig} \\neq 0,
      \\text{ else } x_{ig}.

   The spot itself has :math:`W_{ii} = 1`, the largest possible weight, so it is always one of its own three.
5. Scale every gene to zero mean and unit variance, PCA to 30 components (``obsm["X_stlearn"]``), k-means with
   ``n_domains`` clusters (10 restarts) — or Louvain/Leiden (``clustering=``), as in the stLearn tutorials.

Official-code behaviour that is kept
------------------------------------
* The lattice unit :math:`u`: the official code fits one ``LinearRegression`` object twice, so both "row" and
  "column" slopes are the column fit and :math:`u = \\sqrt 2\\,|\\partial x / \\partial\\,\\mathrm{array\\_col}|`.
  On Visium this is :math:`d/\\sqrt 2` (d = centre-to-centre spacing), so the neighbourhood is the 18 spots closer
  than :math:`2.12\\,d` (three hexagonal rings minus the six at :math:`2.65 d`). ``unit="corrected"`` uses both
  slopes (:math:`u = d`: 30 neighbours within :math:`3d`).
* ``GD`` is the Pearson correlation of the 15 expression PCs and is not clipped; only positive weights can be
  among a spot's top three (as in the official ``argsort``, which meets the zero weights of non-neighbours first).
* SME smooths the log-normalised matrix (what the tutorial's ``use_data="raw"`` means at that point), all genes.

Deliberate deviations from the official code
---------------------------------------------
* **Sparse weights.** The official code builds four dense :math:`N \\times N` matrices (PD, MD, GD and their
  products) and ranks whole rows. Here the weights are computed only on the radius graph (plus self loops), so
  memory is O(N k); the result is the same, since :math:`W_{ij} = 0` outside the radius. The SME matrix stays
  sparse and the scaled PCA centres implicitly. The non-spatial variants (``"gene_expression_correlation"``,
  ``"morphological_distance"``, ``"weights_matrix_gd_md"``) rank all N spots and are not offered.
* **Tile CNN.** The official features come from an ImageNet ResNet-50 on tiles resized to 299 px; those weights
  cannot be downloaded here. :func:`stcore.images.slide_tile_features` trains the course's small TileCNN on the
  slide's own tiles (SimCLR, ``tile_epochs``) or loads local weights (``tile_weights``); its features then go through
  the same PCA to 50 components.
* **Ties.** With ``"physical_distance"`` all 18 neighbours weigh 1 and the official code keeps whichever six
  ``numpy.argsort`` happens to put last. Here ties are broken by distance (nearest first), so the six are the
  spot itself and its five nearest neighbours, independently of the numpy version.
* **Seeds.** The tutorial's k-means has no ``random_state``; here ``seed`` fixes it (and the tile CNN).
* ``histology=False`` drops the morphology term: ``"weights_matrix_all"`` becomes ``"weights_matrix_pd_gd"`` and
  ``"weights_matrix_pd_md"`` becomes ``"physical_distance"`` (the official advice for slides without H&E,
  stLearn issue #295); the image is then never read.
"""

from __future__ import annotations

import numpy as np
import scanpy as sc
from scipy import sparse
from scipy.spatial import cKDTree
from sklearn.decomposition import PCA

from .. import images
from ..validation import check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import embedding_to_domains, write_domains

__all__ = ["STLearn", "sme_unit", "sme_neighbours", "sme_weights", "sme_top_weights", "sme_normalize",
           "stlearn_expression", "scaled_pca", "WEIGHTS"]

#: the spatial weighting schemes of the official ``SME_normalize`` and the factors each multiplies.
WEIGHTS = {
    "weights_matrix_all": ("pd", "md", "gd"),
    "weights_matrix_pd_gd": ("pd", "gd"),
    "weights_matrix_pd_md": ("pd", "md"),
    "physical_distance": ("pd",),
}
_WITHOUT_IMAGE = {"weights_matrix_all": "weights_matrix_pd_gd", "weights_matrix_pd_gd": "weights_matrix_pd_gd",
                  "weights_matrix_pd_md": "physical_distance", "physical_distance": "physical_distance"}
_RATE = {"Visium": 3.0, "Old_ST": 1.5}


# ----------------------------------------------------------------------------------------------------- step 1
def stlearn_expression(adata, n_pcs: int = 15, seed: int = 0) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Log-normalised expression (N, G') of the genes seen in at least one spot, and its first ``n_pcs`` PCs.

    ``normalize_total`` to the median library size, then ``log1p`` (step 1). Returns ``(X, pcs)`` with ``X`` a
    float32 CSR matrix and ``pcs`` (N, n_pcs).
    """
    counts = sparse.csr_matrix(counts_matrix(adata), dtype=np.float32)
    seen = np.asarray((counts > 0).sum(0)).ravel() >= 1
    if not seen.any():
        raise ValueError("Every gene has zero counts in every spot; there is no expression to normalise.")
    counts = counts[:, seen]
    totals = np.asarray(counts.sum(1)).ravel()
    if (totals == 0).any():
        raise ValueError(f"{int((totals == 0).sum())} spots have no counts at all; remove them first "
                         "(e.g. adata = adata[adata.X.sum(1).A1 > 0].copy()).")
    X = sparse.diags((np.median(totals) / totals).astype(np.float32)) @ counts
    X = X.tocsr()
    X.data = np.log1p(X.data)
    return X, scaled_pca(X, n_pcs, seed=seed, scale=False)


def scaled_pca(X, n_comps: int, *, seed: int = 0, scale: bool = True) -> np.ndarray:
    """PCA of X (N, G), genes optionally scaled to unit variance (``sc.pp.scale``), centred implicitly if sparse.

    Scaling a sparse matrix by columns keeps it sparse; scanpy's arpack PCA then subtracts the gene means inside
    the matrix–vector products, which equals PCA of the dense z-scored matrix without forming it.
    """
    X = sparse.csr_matrix(X, dtype=np.float32) if sparse.issparse(X) else np.asarray(X, dtype=np.float32)
    if scale:
        mean = np.asarray(X.mean(0)).ravel()
        sq = np.asarray(X.multiply(X).mean(0)).ravel() if sparse.issparse(X) else (X ** 2).mean(0)
        n = X.shape[0]
        sd = np.sqrt(np.maximum(sq - mean**2, 0) * n / max(n - 1, 1))
        sd[sd == 0] = 1.0
        X = X @ sparse.diags((1.0 / sd).astype(np.float32)) if sparse.issparse(X) else X / sd
        X = sparse.csr_matrix(X) if sparse.issparse(X) else X
    n_comps = int(min(n_comps, min(X.shape) - 1))
    return np.asarray(sc.pp.pca(X, n_comps=n_comps, zero_center=True, svd_solver="arpack", random_state=seed))


# ----------------------------------------------------------------------------------------------------- step 3
def sme_unit(adata, platform: str = "Visium", *, unit: str = "official") -> float:
    """The lattice unit u (full-resolution pixels) whose ``rate`` multiple bounds SME's neighbourhood.

    ``unit="official"`` reproduces the official code: :math:`u = \\sqrt 2\\,|b_{col}|`, with :math:`b_{col}` the
    slope of the pixel x-coordinate regressed on ``obs["array_col"]`` (the row fit is overwritten).
    ``"corrected"``: :math:`u = \\sqrt{b_{row}^2 + b_{col}^2}` with :math:`b_{row}` the slope of y on
    ``array_row``. Without array coordinates, the slopes are inferred from the median nearest-neighbour spacing
    d: Visium :math:`b_{col} = d/2,\\ b_{row} = d\\sqrt3/2`; legacy ST :math:`b_{col} = b_{row} = d`.
    """
    if platform not in _RATE:
        raise ValueError(f"platform={platform!r}: choose 'Visium' or 'Old_ST'.")
    if unit not in ("official", "corrected"):
        raise ValueError(f"unit={unit!r}: choose 'official' (the official code's lattice unit) or 'corrected'.")
    xy = spatial_coords(adata)
    b_row = b_col = None
    if "array_row" in adata.obs and "array_col" in adata.obs:
        rows = adata.obs["array_row"].to_numpy(dtype=float)
        cols = adata.obs["array_col"].to_numpy(dtype=float)
        if np.ptp(cols) > 0 and np.ptp(rows) > 0:
            b_col = np.polyfit(cols, xy[:, 0], 1)[0]
            b_row = np.polyfit(rows, xy[:, 1], 1)[0]
    if b_col is None:
        if len(xy) < 2:
            raise ValueError("SME needs at least 2 spots to find the lattice spacing.")
        d = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
        b_col, b_row = (d / 2, d * np.sqrt(3) / 2) if platform == "Visium" else (d, d)
    if unit == "official":
        return float(np.sqrt(2.0) * abs(b_col))
    return float(np.hypot(b_row, b_col))


def sme_neighbours(coords, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, d_ij)`` with :math:`d_{ij} <` ``radius`` (PD = 1), self pairs included, sorted by i then j."""
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    D = cKDTree(coords).sparse_distance_matrix(cKDTree(coords), radius, output_type="coo_matrix")
    keep = D.data < radius
    i = np.concatenate([D.row[keep], np.arange(n)])
    j = np.concatenate([D.col[keep], np.arange(n)])
    d = np.concatenate([D.data[keep], np.zeros(n)])
    key = i.astype(np.int64) * n + j
    key, first = np.unique(key, return_index=True)  # the self pairs appear once (distance 0)
    return (key // n).astype(np.int64), (key % n).astype(np.int64), d[first]


def _row_cosine(A: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(A, axis=1)
    norm[norm == 0] = np.inf  # a zero vector has similarity 0 (sklearn: cosine distance 1)
    U = A / norm[:, None]
    return np.einsum("ed,ed->e", U[i], U[j])


def sme_weights(i, j, *, morphology=None, pcs=None, weights: str = "weights_matrix_all") -> np.ndarray:
    """:math:`W_{ij}` on the neighbour pairs (E,) from :func:`sme_neighbours` (step 3).

    ``morphology`` (N, 50): :math:`MD = \\max(0, \\cos)`; ``pcs`` (N, 15): :math:`GD` = Pearson correlation of the
    rows (:math:`1 -` scipy's correlation distance). PD is 1 on every pair given.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {sorted(WEIGHTS)}.")
    w = np.ones(len(i))
    if "md" in WEIGHTS[weights]:
        if morphology is None:
            raise ValueError(f"weights={weights!r} needs morphology features (N, d) from the H&E tiles.")
        w = w * np.maximum(_row_cosine(np.asarray(morphology, dtype=np.float64), i, j), 0.0)
    if "gd" in WEIGHTS[weights]:
        if pcs is None:
            raise ValueError(f"weights={weights!r} needs expression PCs (N, 15).")
        P = np.asarray(pcs, dtype=np.float64)
        w = w * _row_cosine(P - P.mean(1, keepdims=True), i, j)
    return w


def sme_top_weights(i, j, w, d, n_spots: int, n_top: int) -> sparse.csr_matrix:
    """Row-normalised (N, N) matrix keeping each spot's ``n_top`` largest positive weights (step 4).

    Ties are broken by distance ``d`` (nearest first), then by index. A row whose kept weights sum to zero stays
    empty (its :math:`\\tilde x_i = 0`, so SME leaves the spot unchanged).
    """
    pos = w > 0
    i, j, w, d = i[pos], j[pos], w[pos], d[pos]
    order = np.lexsort((j, d, -w, i))
    i, j, w = i[order], j[order], w[order]
    start = np.searchsorted(i, i, side="left")
    keep = np.arange(len(i)) - start < n_top
    T = sparse.csr_matrix((w[keep], (i[keep], j[keep])), shape=(n_spots, n_spots))
    sums = np.asarray(T.sum(1)).ravel()
    return (sparse.diags(np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)) @ T).tocsr()


def sme_normalize(X, T) -> sparse.csr_matrix:
    """:math:`x^{SME} = (x + \\tilde x)/2` where :math:`\\tilde x = T X \\neq 0`, else x (step 4). Sparse in, out."""
    X = sparse.csr_matrix(X, dtype=np.float32)
    X_tilde = (sparse.csr_matrix(T, dtype=np.float32) @ X).tocsr()
    X_tilde.eliminate_zeros()
    support = X_tilde.copy()
    support.data[:] = 1.0
    untouched = X - X.multiply(support)  # x where x~ = 0
    return (0.5 * (X + X_tilde) + 0.5 * untouched).tocsr()


# ----------------------------------------------------------------------------------------------------- method
def _crop_fullres(adata, crop_size: float, library_id: str | None) -> float:
    """``crop_size`` pixels of the high-resolution image in full-resolution pixels (lowres if no hires factor)."""
    spatial = adata.uns["spatial"]
    lib = spatial[library_id if library_id is not None else next(iter(spatial))]
    factors = lib.get("scalefactors", {}) or {}
    scale = factors.get("tissue_hires_scalef", factors.get("tissue_lowres_scalef"))
    if not scale:
        raise KeyError("adata.uns['spatial'][...]['scalefactors'] has neither 'tissue_hires_scalef' nor "
                       "'tissue_lowres_scalef', so the 40-pixel crop cannot be placed; add the scale factors.")
    return float(crop_size) / float(scale)


@register
class STLearn(Method):
    """stLearn SME normalisation (Pham et al.) + PCA + k-means: expression averaged over similar neighbours.

    Options (official defaults): ``weights`` (the ``SME_normalize`` default ``"weights_matrix_all"``; the DLPFC
    tutorial uses ``"physical_distance"``, which ignores the image), ``platform`` (``"Visium"``: rate 3;
    ``"Old_ST"``: 1.5), ``n_pcs_expression`` = 15 (GD), ``n_morphology`` = 50 (PCA of tile features),
    ``crop_size`` = 40 (high-resolution image pixels), ``n_pcs`` = 30 (clustering), ``clustering`` = ``"kmeans"``
    (or ``"louvain"``/``"leiden"``, resolution searched to ``n_domains``, or ``resolution`` when
    ``n_domains=None``), ``unit`` (``"official"`` lattice unit or ``"corrected"``). The tile CNN:
    ``tile_latent``, ``tile_epochs`` (SimCLR on the slide), ``tile_weights`` (a local TileCNN state_dict instead).
    """

    name = "stlearn"
    task = "domains"
    summary = "SME: morphology x correlation weighted neighbour smoothing + k-means"
    paper = "Pham et al., Nat Commun 2023"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, weights: str = "weights_matrix_all",
                 platform: str = "Visium", n_pcs_expression: int = 15, n_morphology: int = 50,
                 crop_size: float = 40, n_pcs: int = 30, clustering: str = "kmeans",
                 resolution: float = 1.0, unit: str = "official", tile_latent: int = 64, tile_epochs: int = 30,
                 tile_weights: str | None = None, refine: bool = False, refine_k: int = 6, seed: int = 0,
                 library_id: str | None = None, progress: bool = True):
        if weights not in WEIGHTS:
            raise ValueError(f"weights={weights!r}: choose one of {sorted(WEIGHTS)} (the non-spatial official "
                             "variants are not offered; see the module docstring).")
        if platform not in _RATE:
            raise ValueError(f"platform={platform!r}: choose 'Visium' (rate 3) or 'Old_ST' (rate 1.5).")
        if clustering not in ("kmeans", "louvain", "leiden"):
            raise ValueError(f"clustering={clustering!r}: stLearn clusters with 'kmeans', 'louvain' or 'leiden'.")
        if n_domains is None and clustering == "kmeans":
            raise ValueError("k-means needs n_domains=K; or pass clustering='louvain' with a resolution.")
        if unit not in ("official", "corrected"):
            raise ValueError(f"unit={unit!r}: choose 'official' or 'corrected'.")
        for key, value in dict(n_pcs_expression=n_pcs_expression, n_morphology=n_morphology, n_pcs=n_pcs,
                               tile_epochs=tile_epochs, tile_latent=tile_latent).items():
            if int(value) != value or value < 1:
                raise ValueError(f"{key}={value} must be a positive integer.")
        self.n_domains, self.histology, self.weights, self.platform = n_domains, histology, weights, platform
        self.n_pcs_expression, self.n_morphology, self.crop_size = n_pcs_expression, n_morphology, crop_size
        self.n_pcs, self.clustering, self.resolution, self.unit = n_pcs, clustering, resolution, unit
        self.tile_latent, self.tile_epochs, self.tile_weights = tile_latent, tile_epochs, tile_weights
        self.refine, self.refine_k, self.seed, self.library_id = refine, refine_k, seed, library_id
        self.progress = progress

    @property
    def weights_used(self) -> str:
        """The weighting scheme actually applied (without histology the morphology factor is dropped)."""
        return self.weights if self.histology else _WITHOUT_IMAGE[self.weights]

    def morphology(self, adata) -> np.ndarray:
        """``X_morphology`` (N, n_morphology): tile CNN features of the ``crop_size`` crops, then PCA (step 2)."""
        images.image_and_scale(adata, self.library_id, resolution=None)  # clear error if there is no image
        feats = images.slide_tile_features(adata, _crop_fullres(adata, self.crop_size, self.library_id),
                                           n_latent=self.tile_latent, epochs=self.tile_epochs, seed=self.seed,
                                           weights=self.tile_weights, library_id=self.library_id,
                                           progress=self.progress)
        n_comp = int(min(self.n_morphology, feats.shape[1], feats.shape[0] - 1))
        return PCA(n_components=n_comp, random_state=self.seed).fit_transform(feats.astype(np.float64))

    def smoothing_matrix(self, adata, pcs: np.ndarray, morphology=None) -> sparse.csr_matrix:
        """The row-normalised top-k weights T (N, N) of steps 3–4."""
        radius = _RATE[self.platform] * sme_unit(adata, self.platform, unit=self.unit)
        i, j, d = sme_neighbours(spatial_coords(adata), radius)
        scheme = self.weights_used
        w = sme_weights(i, j, morphology=morphology, pcs=pcs, weights=scheme)
        n_top = 6 if scheme == "physical_distance" else 3
        return sme_top_weights(i, j, w, d, adata.n_obs, n_top)

    def run(self, adata, reference=None):
        coords = spatial_coords(adata)
        if self.n_domains is not None:
            check_n_clusters(self.n_domains, adata.n_obs)
        X, pcs = stlearn_expression(adata, self.n_pcs_expression, seed=self.seed)
        morph = self.morphology(adata) if "md" in WEIGHTS[self.weights_used] else None
        self.smoothing_ = self.smoothing_matrix(adata, pcs, morph)
        embedding = scaled_pca(sme_normalize(X, self.smoothing_), self.n_pcs, seed=self.seed)
        labels = embedding_to_domains(embedding, self.n_domains, clustering=self.clustering, seed=self.seed,
                                      resolution=self.resolution, refine_with=coords if self.refine else None,
                                      refine_k=self.refine_k)
        write_domains(adata, self.key, labels, embedding)
        return adata
