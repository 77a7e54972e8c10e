r"""TESLA: super-resolution gene expression on the histology image, then self-supervised segmentation by a CNN.

Hu J, Coleman K, *et al.* Deciphering tumor ecosystems at super resolution from
spatial transcriptomics with TESLA. *Cell Systems* 14, 404–417 (2023). doi:10.1016/j.cels.2023.03.008.
Official code: jianhuupenn/TESLA (package ``TESLAforST`` 1.2.x, files ``imputation.py``, ``annotation.py``,
``TESLA.py``, ``models.py``, ``contour_util.py``); the defaults below are those of its tutorial.

TESLA has two parts. Integration strategy: *fusion* at the input — the image enters twice, as a colour coordinate
that chooses which spots each super-pixel borrows from, and as a grey-level band stacked with the gene bands into
one multi-channel picture that a CNN segments.

Part 1 — super-resolution ("gene expression enhancement", :func:`impute_superpixels`)

1. Tissue mask from the image (:func:`tissue_mask`), or from the spot positions.
2. Super-pixels: a grid point every ``res`` = 50 full-resolution pixels, kept if it falls inside the tissue
   contour enlarged 1.05 times about its centroid (:func:`superpixel_grid`).
3. A colour coordinate (:func:`colour_z`). Super-pixel :math:`p`: the mean RGB of the ``res``-px window around it,
   channels combined with weights :math:`\operatorname{Var}(c_k)`; spot :math:`i`: the mean grey level of its
   window. Each is z-scored within its own set and multiplied by :math:`s \cdot \max(\operatorname{sd}(x_p),
   \operatorname{sd}(y_p))` (``s`` = 1, the super-pixels' spatial spread), giving points :math:`(x, y, z)`.
4. Imputation (:func:`superpixel_weights`): the ``num_nbs`` = 10 spots nearest to super-pixel :math:`p` in
   :math:`(x, y, z)`, minus those farther than the global distance quantile
   :math:`\tau = Q_{\text{num\_nbs}/N}(\{d_{pi}\})`, weighted by inverse distance with power ``k`` = 2:

   .. math:: \hat x_{pg} = \sum_{i \in \mathcal N(p)} w_{pi}\, \log(1 + x_{ig}), \qquad
             w_{pi} = \frac{(d_{pi} + 0.1)^{-k}}{\sum_{j \in \mathcal N(p)} (d_{pj} + 0.1)^{-k}},
             \qquad \mathcal N(p) = \{ i \in \text{kNN}(p) : d_{pi} \le \tau \}.

   (The official code divides :math:`d + 0.1` by its minimum first; for a power law this cancels.) A super-pixel
   with no neighbour left gets zeros, as in the official code.

Part 2 — annotation / domains (:func:`segment`, :class:`TESLA`)

5. Bands on the super-pixel raster: the min–max scaled grey level of the masked H&E, and gene bands. The official
   ``annotation`` uses one *meta-gene* band (:func:`meta_gene`: per super-pixel, min–max scale each marker, keep the
   top ``num_required`` and pool them by min, zero at or below :math:`\log(\text{min\_UMI} + 1)`).
6. CNN (:class:`TeslaCNN`): Conv5×5(C→100)–ReLU–BN, Conv5×5(100→100)–ReLU–BN, Conv1×1(100→100)–BN, giving a
   response map :math:`R \in \mathbb R^{100 \times H \times W}`.
7. Self-labelling (Kim et al. 2020): target :math:`t_p = \arg\max_c R_{cp}`, clusters smaller than ``threshold``
   pixels merged into the main cluster most common within ``radius`` of them; loss

   .. math:: \mathcal L = \operatorname{CE}(R, t) + \mu \left( \operatorname{mean}|R_{:, y+1, x} - R_{:, y, x}|
             + \operatorname{mean}|R_{:, y, x+1} - R_{:, y, x}| \right), \quad \mu = 5,

   SGD (lr 0.1, momentum 0.9) for at most 30 iterations, stopping once at most ``min_labels`` = 30 main clusters
   remain. Pixel labels: argmax of :math:`R`, clusters reordered by size and minor ones merged.
8. Target clusters of a meta-gene band (:func:`target_clusters`): clusters whose mean band value exceeds 1/2
   ("small") or 1/3 ("large") of the best cluster's.

For the ``domains`` task (:class:`TESLA`, registered as ``"tesla"``) the gene bands are the first ``n_bands``
principal components of the spots' log-counts, imputed to the super-pixels by the weights of step 4 (a weighted
mean commutes with a linear projection, so this equals projecting the imputed expression). The segmentation's own
labels are returned when ``n_domains=None``; with ``n_domains=K`` the super-pixels' response vectors are clustered
into K groups and each spot takes the majority domain of the super-pixels nearest to it.

Deliberate deviations from the official code
---------------------------------------------
* **Sparse and vectorised.** The official code fills a dense super-pixel × spot distance matrix with a Python
  double loop (minutes, O(M N) memory). Here a KD-tree gives each super-pixel its ``num_nbs`` nearest spots, and
  the global quantile :math:`\tau` is found *exactly* by counting pairs within a radius
  (``cKDTree.count_neighbors``, bisection on the order statistics that ``np.quantile`` interpolates), so memory is
  O(M · num_nbs). The weights are a sparse (M, N) matrix and imputation one sparse product.
* **Tissue mask without OpenCV.** The official contour is the largest Canny-edge contour (``cv2``), or a polygon
  scanned through the outermost spots. Here: distance of each pixel's colour from the background colour (median of
  the image border), Otsu threshold, closing, hole filling, only the connected pieces that hold spots (so several
  tissue pieces work, cf. official issue #11), completed by discs around the spots so that tissue as pale as the
  glass keeps its spots; ``mask="spots"`` uses the discs alone and never reads the image.
* **The CNN runs on the super-pixel raster** (one pixel per super-pixel, ``res`` full-resolution pixels) instead of
  the H&E resized to a 1000-pixel short side, which takes minutes per iteration on a CPU. ``threshold`` and
  ``radius`` are given in the official resized pixels and converted to raster cells.
* **Domains.** TESLA has no K-domain clustering; its segmentation returns "main clusters" (≤ 30) and marker-driven
  target clusters. For ``n_domains=K`` the 100-d response vectors are clustered (k-means by default). Without marker
  genes, the gene bands are imputed principal components rather than a meta-gene.
* **Official bugs not copied.** The minor-cluster merge swaps the row and column bounds of its window
  (``max_x = width`` used for rows); here the window is clipped to the raster correctly and computed with box
  filters. Prediction keeps batch-norm in training mode, as the official ``predict`` (which never calls
  ``eval``) does.
* ``tile_weights`` does not apply: TESLA puts no tile through a pretrained CNN (its CNN sees the whole
  grey-level image and is trained from scratch). The low-resolution image that many datasets ship is used at its
  scale factor; a window of ``res`` = 50 full-resolution pixels is then only a few image pixels wide.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import ndimage, sparse
from scipy.spatial import cKDTree
from torch import nn

from .. import cluster, images, preprocess
from ..train import fit, set_seed
from ..validation import check_image_covers, check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import embedding_to_domains, write_domains

__all__ = [
    "TESLA", "TeslaCNN", "TeslaSegmenter", "tissue_mask", "superpixel_grid", "colour_z", "distance_quantile",
    "superpixel_weights", "impute_superpixels", "meta_gene", "grid_raster", "merge_minor_clusters", "segment",
    "target_clusters", "annotate", "plot_superpixels",
]

_GREY = np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------------------------------- step 1: mask
def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a 1-D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[1:][np.argmax(between[:-1])]) if bins > 1 else float(values.mean())


def tissue_mask(adata, source: str = "image", *, library_id: str | None = None, res: float = 50,
                spot_radius: float | None = None):
    """Boolean tissue mask on a raster, and the raster's scale (raster pixels per full-resolution pixel).

    ``source="image"`` (step 1): each pixel's colour distance from the background colour (median of the image
    border), smoothed, thresholded by Otsu's rule, closed, holes filled, and only connected pieces that contain
    spots kept, then completed by discs of ``spot_radius`` around the spots (tissue as pale as the glass keeps
    its spots). ``source="spots"`` never reads the image: a raster of ``res / 2`` full-resolution pixels per cell
    where cells within ``spot_radius`` (default 0.6 × the median spot spacing) of a spot are tissue, holes filled.

    Returns
    -------
    mask : (H, W) bool
    scale : float, raster pixel = full-resolution pixel × scale
    """
    xy = spatial_coords(adata)
    if source == "spots":
        scale = 2.0 / res
        spot_radius = _spot_radius(xy, spot_radius, res)
        extent = xy.max(0) + 2 * spot_radius + res
        w, h = int(np.ceil(extent[0] * scale)) + 1, int(np.ceil(extent[1] * scale)) + 1
        rows, cols = np.mgrid[0:h, 0:w]
        pix = np.column_stack([cols.ravel(), rows.ravel()]) / scale
        dist, _ = cKDTree(xy).query(pix, distance_upper_bound=spot_radius)
        mask = ndimage.binary_fill_holes(np.isfinite(dist).reshape(h, w))
        return mask, scale
    if source != "image":
        raise ValueError(f"source={source!r}: use 'image' (threshold the H&E) or 'spots' (discs around spots).")
    img, scale = images.image_and_scale(adata, library_id, resolution=None)
    check_image_covers(img, xy, scale, tolerance=2.0)
    f = max(1, int(np.ceil(max(img.shape[:2]) / 800)))        # work on a <= 800-px copy (block means)
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    rgb = img[:h, :w].astype(np.float32).reshape(h // f, f, w // f, f, 3).mean((1, 3))
    scale = scale / f
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    score = np.sqrt(((rgb - np.median(border, 0)) ** 2).sum(-1))
    score = ndimage.gaussian_filter(score, sigma=max(1.0, 0.004 * max(rgb.shape[:2])))
    mask = score > _otsu(score.ravel())
    mask = ndimage.binary_closing(mask, iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    labels, _ = ndimage.label(mask)
    rc = np.clip(np.floor(xy[:, ::-1] * scale + 0.5).astype(int), 0, np.array(mask.shape) - 1)
    hit = labels[rc[:, 0], rc[:, 1]]
    if (hit > 0).mean() < 0.5:
        raise ValueError(f"Only {(hit > 0).mean():.0%} of the spots fall on tissue found in the image: the spot "
                         "coordinates probably do not match the image scale (check tissue_*_scalef), or the image "
                         "has too little contrast. Pass mask='spots' to build the mask from the spot positions.")
    mask = np.isin(labels, np.unique(hit[hit > 0]))
    # complete with discs around the spots, so that tissue as pale as the background still holds its spots
    centres = np.ones(mask.shape, dtype=bool)
    centres[rc[:, 0], rc[:, 1]] = False
    return mask | (ndimage.distance_transform_edt(centres) <= _spot_radius(xy, spot_radius, res) * scale), scale


def _spot_radius(xy: np.ndarray, spot_radius: float | None, res: float) -> float:
    """0.6 x the median nearest-spot distance (full-resolution pixels) unless given."""
    if spot_radius is not None:
        return float(spot_radius)
    if len(xy) < 2:
        return float(res)
    d, _ = cKDTree(xy).query(xy, k=2)
    return 0.6 * float(np.median(d[:, 1]))


# --------------------------------------------------------------------------------------------------- step 2: grid
def superpixel_grid(mask: np.ndarray, scale: float, res: float = 50, enlarge: float = 1.05) -> np.ndarray:
    """Super-pixel centres (M, 2) ``(x, y)`` in full-resolution pixels (step 2).

    Grid points sit at ``res, 2 res, ...`` full-resolution pixels along both axes of the raster's extent and are
    kept where the mask, enlarged ``enlarge`` times about its centroid, is set: point ``p`` is kept when the mask
    holds at ``c + (p - c) / enlarge`` (``c`` the centroid), exactly what scaling the contour does.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("the tissue mask is empty (or not 2-D); check the image or use mask='spots'.")
    if res <= 0 or enlarge <= 0:
        raise ValueError(f"res={res} and enlarge={enlarge} must be positive (res in full-resolution pixels).")
    h, w = mask.shape
    xs = np.arange(res, w / scale, res)
    ys = np.arange(res, h / scale, res)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    rr, cc = np.nonzero(mask)
    centre = np.array([cc.mean(), rr.mean()])                   # (x, y) raster pixels
    q = centre + (pts * scale - centre) / enlarge
    qi = np.floor(q + 0.5).astype(int)
    inside = (qi[:, 0] >= 0) & (qi[:, 0] < w) & (qi[:, 1] >= 0) & (qi[:, 1] < h)
    keep = np.zeros(len(pts), dtype=bool)
    keep[inside] = mask[qi[inside, 1], qi[inside, 0]]
    return pts[keep]


# ------------------------------------------------------------------------------------------ step 3: colour axis
def _window_rgb(adata, points, res, library_id):
    img, scale = images.image_and_scale(adata, library_id, resolution=None)
    return images.colour_features(img, points, scale=scale, radius=round(res / 2), tolerance=2.0)


def colour_z(adata, grid: np.ndarray, *, res: float = 50, s: float = 1.0, library_id: str | None = None):
    """The colour coordinate ``z`` of super-pixels (M,) and spots (N,) (step 3).

    Super-pixels: variance-weighted mean of the window's R, G, B; spots: the window's mean over all channels
    (the official "grey" value). Both are z-scored within their own set and scaled by
    ``s * max(sd(x_grid), sd(y_grid))``.
    """
    grid = np.asarray(grid, dtype=float)
    rgb = _window_rgb(adata, grid, res, library_id)
    var = rgb.var(0)
    c_grid = (rgb * var).sum(1) / var.sum() if var.sum() > 0 else rgb.mean(1)
    c_spot = _window_rgb(adata, spatial_coords(adata), res, library_id).mean(1)
    z_scale = s * max(grid[:, 0].std(), grid[:, 1].std())

    def zscore(c):
        sd = c.std()
        return (c - c.mean()) / sd * z_scale if sd > 0 else np.zeros_like(c)

    return zscore(c_grid), zscore(c_spot)


# ------------------------------------------------------------------------------------------- step 4: imputation
def distance_quantile(points_a, points_b, q: float, *, guess: float | None = None) -> float:
    """``np.quantile`` (linear interpolation) of all |A| × |B| distances, without forming them all.

    The value sits between the order statistics ``j = floor(h)`` and ``j + 1`` of the sorted distances,
    ``h = q (|A||B| - 1)``. A radius ``r`` holding at least ``j + 2`` pairs is found by growing ``guess`` 1.25-fold
    (``cKDTree.count_neighbors``), then only the pairs within ``r`` are listed and partitioned, so memory is
    O(pairs within r), about ``q |A| |B|`` (10 per super-pixel for TESLA), never |A| × |B|.
    """
    a, b = np.asarray(points_a, dtype=float), np.asarray(points_b, dtype=float)
    if not 0 <= q <= 1:
        raise ValueError(f"q={q} must lie in [0, 1].")
    ta, tb = cKDTree(a), cKDTree(b)
    total = len(a) * len(b)
    h = q * (total - 1)
    j = int(np.floor(h))
    need = min(j + 2, total)
    if guess is None or not guess > 0:
        both = np.vstack([a, b])
        guess = 0.05 * float(np.linalg.norm(both.max(0) - both.min(0))) + 1e-9
    r = float(guess)
    while (count := int(ta.count_neighbors(tb, r))) < need:
        r *= 1.25
    d = ta.sparse_distance_matrix(tb, r, output_type="ndarray")["v"]
    d = np.concatenate([np.zeros(count - len(d)), d])   # in case pairs at distance 0 were left out
    part = np.partition(d, [j, min(j + 1, len(d) - 1)])
    lo_val, hi_val = part[j], part[min(j + 1, len(d) - 1)]
    return float(lo_val + (h - j) * (hi_val - lo_val))


def superpixel_weights(grid_points, spot_points, *, num_nbs: int = 10, k: int | str = 2):
    r"""Sparse imputation weights W (M, N) from super-pixels to spots (step 4).

    Parameters
    ----------
    grid_points, spot_points
        (M, d) and (N, d) points: ``(x, y, z)`` with histology, ``(x, y)`` without.
    num_nbs
        Nearest spots per super-pixel; also sets the global cut-off quantile ``num_nbs / N``.
    k
        Power of the inverse-distance weights (an int, official default 2), or ``"exp"`` for the official
        alternative :math:`w \propto \exp(-d / d_{\min})`.

    Returns
    -------
    W : scipy CSR (M, N), rows sum to 1 (or 0 where no neighbour survives the cut-off)
    tau : float, the distance cut-off
    """
    g, p = np.asarray(grid_points, dtype=float), np.asarray(spot_points, dtype=float)
    if g.ndim != 2 or p.ndim != 2 or g.shape[1] != p.shape[1]:
        raise ValueError(f"grid_points {g.shape} and spot_points {p.shape} must be (M, d) and (N, d) with the same d.")
    if not (isinstance(k, (int, np.integer)) and k > 0) and k != "exp":
        raise ValueError(f"k={k!r}: use a positive integer power (official 2) or 'exp'.")
    n = len(p)
    nbs = int(min(num_nbs, n))
    if nbs < 1:
        raise ValueError(f"num_nbs={num_nbs} must be at least 1.")
    dist, idx = cKDTree(p).query(g, k=min(nbs + 1, n))
    dist, idx = dist.reshape(len(g), -1), idx.reshape(len(g), -1)
    tau = distance_quantile(g, p, min(nbs / n, 1.0), guess=float(np.median(dist[:, nbs - 1])) + 1e-9)
    dist, idx = dist[:, :nbs], idx[:, :nbs]
    keep = dist <= tau
    shifted = dist + 0.1
    nearest = np.where(keep, shifted, np.inf).min(1, keepdims=True)
    rel = shifted / np.where(np.isfinite(nearest), nearest, 1.0)
    raw = np.where(keep, rel ** (-float(k)) if k != "exp" else np.exp(-rel), 0.0)
    total = raw.sum(1, keepdims=True)
    w = np.divide(raw, total, out=np.zeros_like(raw), where=total > 0)
    rows = np.repeat(np.arange(len(g)), nbs)
    W = sparse.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(len(g), n))
    W.eliminate_zeros()
    return W, tau


def _spot_points(adata, grid, histology, res, s, library_id):
    xy = spatial_coords(adata)
    if not histology:
        return np.asarray(grid, dtype=float), xy, None, None
    zg, zs = colour_z(adata, grid, res=res, s=s, library_id=library_id)
    return np.column_stack([grid, zg]), np.column_stack([xy, zs]), zg, zs


def impute_superpixels(adata, grid=None, genes=None, *, values=None, histology: bool = True, res: float = 50,
                       s: float = 1.0, k: int | str = 2, num_nbs: int = 10, mask: str | None = None,
                       library_id: str | None = None) -> ad.AnnData:
    """Super-resolution expression: one AnnData row per super-pixel (steps 1–4).

    Parameters
    ----------
    adata
        Spots with raw counts in ``.X``, ``obsm["spatial"]`` (full-resolution pixels) and, with ``histology``, an
        image in ``uns["spatial"]``.
    grid
        (M, 2) super-pixel centres; default: :func:`superpixel_grid` over :func:`tissue_mask`.
    genes
        Genes to impute (default all; the result stays sparse).
    values
        Instead of genes, any (N, d) spot matrix to impute (e.g. principal components); columns ``v0..``.
    histology
        Use the colour coordinate ``z``; ``False`` imputes from ``(x, y)`` only and never reads the image.
    res, s, k, num_nbs
        Official parameters (50, 1, 2, 10).
    mask
        ``"image"`` or ``"spots"`` for the tissue mask; default ``"image"`` with histology, else ``"spots"``.

    Returns
    -------
    AnnData (M, n_genes): ``X`` = W log1p(counts) (CSR, or dense for ``values``), ``obsm["spatial"]`` the
    centres, ``obs`` with ``x``, ``y``, ``z``, ``n_neighbours``; ``uns["spatial"]`` shared with ``adata`` so the
    super-pixels plot over the same image; ``uns["tesla"]`` with ``res``, ``tau`` and the weights ``W``.
    """
    if grid is None:
        m, scale = tissue_mask(adata, mask or ("image" if histology else "spots"), library_id=library_id, res=res)
        grid = superpixel_grid(m, scale, res)
    grid = np.asarray(grid, dtype=float)
    gpts, spts, zg, _ = _spot_points(adata, grid, histology, res, s, library_id)
    W, tau = superpixel_weights(gpts, spts, num_nbs=num_nbs, k=k)
    if values is not None:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) != adata.n_obs:
            raise ValueError(f"values has shape {values.shape}; pass one row per spot ({adata.n_obs}).")
        X, var = W @ values, pd.DataFrame(index=[f"v{j}" for j in range(values.shape[1])])
    else:
        counts = counts_matrix(adata)
        if genes is not None:
            genes = [genes] if isinstance(genes, str) else list(genes)
            missing = [g for g in genes if g not in adata.var_names]
            if missing:
                raise KeyError(f"{len(missing)} genes are not in adata.var_names (e.g. {missing[:3]}).")
            cols = adata.var_names.get_indexer(genes)
            counts, var = counts[:, cols], adata.var.iloc[cols].copy()
        else:
            var = adata.var.copy()
        logc = sparse.csr_matrix(counts, dtype=np.float32).log1p() if sparse.issparse(counts) \
            else sparse.csr_matrix(np.log1p(np.asarray(counts, dtype=np.float32)))
        X = sparse.csr_matrix(W.astype(np.float32) @ logc)
    obs = pd.DataFrame({"x": grid[:, 0], "y": grid[:, 1], "z": zg if zg is not None else 0.0,
                        "n_neighbours": np.diff(W.indptr)}, index=[f"sp{i}" for i in range(len(grid))])
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obsm["spatial"] = grid
    if "spatial" in adata.uns and histology:
        out.uns["spatial"] = adata.uns["spatial"]
    out.uns["tesla"] = {"res": float(res), "tau": float(tau), "W": W}
    return out


# --------------------------------------------------------------------------------------------------- step 5: bands
def meta_gene(superpixels, genes, num_required: int = 1, pooling: str = "min") -> np.ndarray:
    """Meta-gene value per super-pixel (M,): min–max scale each gene, keep the top ``num_required``, pool."""
    genes = [genes] if isinstance(genes, str) else list(dict.fromkeys(genes))
    genes = [g for g in genes if g in superpixels.var_names]
    if not genes or num_required > len(genes) or num_required < 1:
        raise ValueError(f"num_required={num_required} needs at least that many of the marker genes among the "
                         f"super-pixels' genes ({len(genes)} found).")
    x = superpixels[:, genes].X
    x = x.toarray() if sparse.issparse(x) else np.asarray(x, dtype=float)
    span = x.max(0) - x.min(0)
    x = (x - x.min(0)) / np.where(span > 0, span, 1)
    top = np.partition(x, -num_required, axis=1)[:, -num_required:]
    if pooling not in ("min", "mean"):
        raise ValueError(f"pooling={pooling!r}: use 'min' (official default) or 'mean'.")
    return top.min(1) if pooling == "min" else top.mean(1)


def grid_raster(grid, values, res: float = 50):
    """Paint per-super-pixel values (M,) or (M, C) on the grid raster: cell ``(y/res - 1, x/res - 1)``.

    Returns ``(raster (C, H, W) float32 with zeros off-tissue, rows (M,), cols (M,))``.
    """
    grid = np.asarray(grid, dtype=float)
    v = np.asarray(values, dtype=np.float32)
    v = v[:, None] if v.ndim == 1 else v
    cols = np.rint(grid[:, 0] / res).astype(int) - 1
    rows = np.rint(grid[:, 1] / res).astype(int) - 1
    c0, r0 = cols.min(), rows.min()          # crop to the tissue's bounding box
    cols, rows = cols - c0, rows - r0
    raster = np.zeros((v.shape[1], rows.max() + 1, cols.max() + 1), dtype=np.float32)
    raster[:, rows, cols] = v.T
    return raster, rows, cols


def plot_superpixels(superpixels, values, *, ax=None, image: bool = True, cmap="viridis", alpha: float = 0.85,
                     title: str = "", colours: dict | None = None, legend: bool = True, vmax: float | None = None):
    """Draw per-super-pixel values as a picture over the H&E (one ``res``-px square per super-pixel).

    ``values`` is an obs column / gene name or an (M,) array; categorical values get a legend (``colours`` maps
    categories to colours). Super-pixels without neighbouring spots (``n_neighbours == 0``) are left transparent.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    if isinstance(values, str):
        values = superpixels.obs[values] if values in superpixels.obs else np.asarray(
            superpixels[:, values].X.toarray() if sparse.issparse(superpixels.X) else superpixels[:, values].X).ravel()
    values = pd.Series(np.asarray(values) if not isinstance(values, pd.Series) else values.to_numpy())
    res = superpixels.uns["tesla"]["res"]
    grid = superpixels.obsm["spatial"]
    categorical = values.dtype == object or isinstance(values.dtype, pd.CategoricalDtype)
    codes, cats = pd.factorize(values, sort=True) if categorical else (values.to_numpy(float), None)
    raster, rows, cols = grid_raster(grid, np.asarray(codes, dtype=float) + 1.0, res)
    picture = np.where(raster[0] > 0, raster[0] - 1.0, np.nan)
    if "n_neighbours" in superpixels.obs:
        picture[rows[superpixels.obs["n_neighbours"].to_numpy() == 0],
                cols[superpixels.obs["n_neighbours"].to_numpy() == 0]] = np.nan
    scale = 1.0
    if image and "spatial" in superpixels.uns:
        img, scale = images.image_and_scale(superpixels, resolution=None)
        ax.imshow(img)
    x0, y0 = (grid[:, 0].min() - res / 2) * scale, (grid[:, 1].min() - res / 2) * scale
    extent = (x0, x0 + picture.shape[1] * res * scale, y0 + picture.shape[0] * res * scale, y0)
    if categorical:
        from ..plotting import palette
        colours = colours or dict(zip(cats, palette(len(cats))))
        ax.imshow(picture, extent=extent, cmap=ListedColormap([colours[c] for c in cats]), vmin=-0.5,
                  vmax=len(cats) - 0.5, alpha=alpha, interpolation="nearest")
        if legend:
            for c in cats:
                ax.scatter([], [], c=colours[c], label=str(c), s=20)
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, handletextpad=0.1)
    else:
        shown = ax.imshow(picture, extent=extent, cmap=cmap, alpha=alpha, interpolation="nearest", vmax=vmax)
        if legend:
            plt.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    pad = 2 * res * scale
    ax.set_xlim(extent[0] - pad, extent[1] + pad)
    ax.set_ylim(extent[2] + pad, extent[3] - pad)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return ax


def _minmax(v: np.ndarray) -> np.ndarray:
    span = v.max(0) - v.min(0)
    return (v - v.min(0)) / np.where(span > 0, span, 1)


# ---------------------------------------------------------------------------------------------- steps 6-7: CNN
class TeslaCNN(nn.Module):
    """TESLA's segmentation CNN: (1, C, H, W) -> response map (1, n_channels, H, W) (step 6)."""

    def __init__(self, n_in: int, n_channels: int = 100, n_conv: int = 2, kernel_size: int = 5):
        super().__init__()
        layers, width = [], n_in
        for _ in range(n_conv):
            layers += [nn.Conv2d(width, n_channels, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                       nn.BatchNorm2d(n_channels)]
            width = n_channels
        layers += [nn.Conv2d(n_channels, n_channels, 1), nn.BatchNorm2d(n_channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def merge_minor_clusters(labels: np.ndarray, threshold: int, radius: int) -> np.ndarray:
    """Merge each cluster of fewer than ``threshold`` pixels into the main cluster seen most often around it.

    For a minor cluster c the votes for a main cluster m are the number of m-pixels in the
    ``(2 radius + 1)^2`` windows centred on c's pixels, counted with multiplicity (as the official loop does);
    a minor cluster with no main cluster in reach is kept. ``labels`` is (H, W) int.
    """
    labels = np.asarray(labels)
    ids, sizes = np.unique(labels, return_counts=True)
    main, minor = ids[sizes >= threshold], ids[sizes < threshold]
    if len(minor) == 0 or len(main) == 0:
        return labels.copy()
    codes = np.searchsorted(ids, labels)
    votes = np.zeros((len(ids), len(main)))
    size = 2 * radius + 1
    for j, m in enumerate(main):                       # box sums of each main cluster's indicator
        box = ndimage.uniform_filter((labels == m).astype(np.float64), size=size, mode="constant") * size ** 2
        votes[:, j] = np.bincount(codes.ravel(), weights=box.ravel(), minlength=len(ids))
    mapping = ids.copy()
    for c in minor:
        i = np.searchsorted(ids, c)
        if votes[i].max() > 0.5:
            mapping[i] = main[int(np.argmax(votes[i]))]
    return mapping[codes]


class TeslaSegmenter(nn.Module):
    """The self-labelling objective of step 7 around a :class:`TeslaCNN`, for :func:`stcore.train.fit`."""

    def __init__(self, cnn: TeslaCNN, *, threshold: int = 1000, radius: int = 3, mu: float = 5.0,
                 sim_weight: float = 1.0, train_refine: bool = True):
        super().__init__()
        self.cnn, self.threshold, self.radius, self.mu = cnn, threshold, radius, mu
        self.sim_weight, self.train_refine = sim_weight, train_refine
        self.n_labels, self.main_labels = None, None

    def loss(self, x: torch.Tensor) -> dict:
        out = self.cnn(x)[0]                                   # (C, H, W)
        c, h, w = out.shape
        dy = (out[:, 1:, :] - out[:, :-1, :]).abs().mean()
        dx = (out[:, :, 1:] - out[:, :, :-1]).abs().mean()
        flat = out.reshape(c, -1).T                            # (H W, C)
        target = flat.detach().argmax(1).numpy()
        ids, sizes = np.unique(target, return_counts=True)
        self.n_labels, self.main_labels = len(ids), int((sizes >= self.threshold).sum())
        if self.train_refine:
            target = merge_minor_clusters(target.reshape(h, w), self.threshold, self.radius).ravel()
        ce = nn.functional.cross_entropy(flat, torch.as_tensor(target, dtype=torch.long))
        return {"similarity": self.sim_weight * ce, "continuity": self.mu * (dx + dy)}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Response map (C, H, W), batch-norm in training mode as the official ``predict``."""
        self.cnn.train()
        out = self.cnn(x)[0]
        self.cnn.eval()
        return out


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    ids, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.empty(len(ids), dtype=int)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(ids))
    return rank[inverse].reshape(labels.shape)


def segment(bands: np.ndarray, *, n_channels: int = 100, lr: float = 0.1, max_iter: int = 30,
            min_labels: int = 30, threshold: int = 1000, radius: int = 3, mu: float = 5.0, seed: int = 100,
            progress: bool = True):
    """Self-supervised segmentation of a (C, H, W) band image (steps 6–7).

    Returns ``(labels (H, W) int, response (n_channels, H, W) float32, history)``; labels are numbered by size
    (0 the largest) with minor clusters merged, as the official ``refine_clusters``.
    """
    bands = np.asarray(bands, dtype=np.float32)
    if bands.ndim != 3:
        raise ValueError(f"bands must be (C, H, W), got shape {bands.shape}.")
    set_seed(seed)
    x = torch.as_tensor(bands)[None]
    model = TeslaSegmenter(TeslaCNN(bands.shape[0], n_channels), threshold=threshold, radius=radius, mu=mu)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = fit(model, x, epochs=max_iter, optimizer=optimizer, progress=progress, desc="TESLA",
                  callback=lambda epoch, terms: model.main_labels <= min_labels)
    response = model.predict(x)
    labels = _relabel_by_size(response.argmax(0).numpy())
    labels = _relabel_by_size(merge_minor_clusters(labels, threshold, radius))
    return labels, response.numpy(), history


def target_clusters(labels: np.ndarray, band: np.ndarray, target_size: str = "small"):
    """Clusters whose mean band value exceeds 1/2 ("small") or 1/3 ("large") of the best cluster's (step 8).

    Returns ``(targets list, means pd.Series sorted decreasing)``.
    """
    ratios = {"small": 1 / 2, "large": 1 / 3}
    if target_size not in ratios:
        raise ValueError(f"target_size={target_size!r}: use 'small' or 'large'.")
    means = pd.Series(np.asarray(band, dtype=float).ravel()).groupby(np.asarray(labels).ravel()).mean()
    means = means.sort_values(ascending=False)
    return list(means.index[means > means.iloc[0] * ratios[target_size]]), means


def _raster_scale(mask, scale, res, resize_short):
    """Edge of one raster cell in the official resized pixels (short side of the slide -> ``resize_short``)."""
    short = min(mask.shape) / scale                    # full-resolution pixels
    return res * resize_short / short


def _grey_values(adata, grid, mask, scale, res, library_id):
    """Grey level (luma of the window mean) per super-pixel; 0 outside the (unenlarged) tissue mask."""
    grey = _window_rgb(adata, grid, res, library_id) @ _GREY
    rc = np.floor(np.asarray(grid)[:, ::-1] * scale + 0.5).astype(int)
    inside = (rc >= 0).all(1) & (rc[:, 0] < mask.shape[0]) & (rc[:, 1] < mask.shape[1])
    on = np.zeros(len(grid), dtype=bool)
    on[inside] = mask[rc[inside, 0], rc[inside, 1]]
    return np.where(on, grey, 0.0)


def annotate(adata, superpixels, genes, *, num_required: int = 1, pooling: str = "min", min_umi: int = 1,
             target_size: str = "small", res: float = 50, resize_short: float = 1000, threshold: int = 1000,
             radius: int = 3, library_id: str | None = None, tissue=None, progress: bool = True,
             **segment_options):
    """TESLA's marker-driven region annotation (steps 5–8) on the super-pixels of :func:`impute_superpixels`.

    ``tissue`` is the ``(mask, scale)`` pair of :func:`tissue_mask` if already computed. Returns a DataFrame over
    the super-pixels with ``meta`` (the gene band), ``cluster`` and ``target`` (bool), plus the segmentation history
    in ``.attrs["history"]``.
    """
    grid = superpixels.obsm["spatial"]
    mask, scale = tissue if tissue is not None else tissue_mask(adata, "image", library_id=library_id, res=res)
    cell = _raster_scale(mask, scale, res, resize_short)
    grey = _minmax(_grey_values(adata, grid, mask, scale, res, library_id))
    meta = meta_gene(superpixels, genes, num_required, pooling)
    meta = _minmax(np.where(meta <= np.log(min_umi + 1), 0.0, meta))
    raster, rows, cols = grid_raster(grid, np.column_stack([grey, meta]), res)
    labels, _, history = segment(raster, threshold=max(1, round(threshold / cell ** 2)),
                                 radius=max(1, round(radius / cell)), progress=progress, **segment_options)
    targets, _ = target_clusters(labels, raster[1], target_size)
    frame = pd.DataFrame({"meta": meta, "cluster": labels[rows, cols]}, index=superpixels.obs_names)
    frame["target"] = frame["cluster"].isin(targets)
    frame.attrs["history"] = history
    return frame


# ------------------------------------------------------------------------------------------------ the method
@register
class TESLA(Method):
    """TESLA (Hu et al. 2023): super-pixel imputation in (x, y, colour) space, then a self-labelling CNN on
    [grey H&E, imputed expression] images.

    Options (official defaults): ``res`` (super-pixel size, full-resolution px), ``s`` (colour scale), ``k``
    (inverse-distance power), ``num_nbs`` (nearest spots), ``n_channels``, ``lr``, ``epochs`` (maxIter),
    ``min_labels``, ``threshold`` and ``radius`` (in the official resized pixels), ``mu`` (continuity weight),
    ``seed``. Domain options: ``n_bands`` imputed principal components as gene bands, ``clustering`` of the
    response vectors into ``n_domains`` (``None``: the segmentation's own labels). With ``histology=False`` the
    mask comes from the spots, the imputation uses (x, y) only and the grey band is dropped.
    """

    name = "tesla"
    task = "domains"
    summary = "super-pixel imputation + self-labelling CNN on gene/H&E images"
    paper = "Hu et al., Cell Syst 2023"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, res: float = 50, s: float = 1.0,
                 k: int = 2, num_nbs: int = 10, n_bands: int = 10, n_channels: int = 100, lr: float = 0.1,
                 epochs: int = 30, min_labels: int = 30, threshold: int = 1000, radius: int = 3, mu: float = 5.0,
                 resize_short: float = 1000, clustering: str = "kmeans", refine: bool = False, refine_k: int = 6,
                 seed: int = 100, mask: str | None = None, library_id: str | None = None, progress: bool = True):
        if n_bands < 1:
            raise ValueError(f"n_bands={n_bands}: need at least one expression band.")
        if epochs < 1:
            raise ValueError(f"epochs={epochs} must be at least 1.")
        self.n_domains, self.histology, self.res, self.s, self.k, self.num_nbs = n_domains, histology, res, s, k, num_nbs
        self.n_bands, self.n_channels, self.lr, self.epochs = n_bands, n_channels, lr, epochs
        self.min_labels, self.threshold, self.radius, self.mu = min_labels, threshold, radius, mu
        self.resize_short, self.clustering, self.refine, self.refine_k = resize_short, clustering, refine, refine_k
        self.seed, self.mask, self.library_id, self.progress = seed, mask, library_id, progress

    # -- steps 1-5 ---------------------------------------------------------------------------------------------
    def bands(self, adata):
        """The CNN input (C, H, W) and the super-pixel AnnData (imputed principal components in ``X``)."""
        counts = counts_matrix(adata)
        logc = counts.log1p() if sparse.issparse(counts) else np.log1p(np.asarray(counts, dtype=np.float64))
        pcs = preprocess.pca(logc, self.n_bands, seed=0)
        source = self.mask or ("image" if self.histology else "spots")
        mask, scale = tissue_mask(adata, source, library_id=self.library_id, res=self.res)
        grid = superpixel_grid(mask, scale, self.res)
        sp = impute_superpixels(adata, grid, values=pcs, histology=self.histology, res=self.res, s=self.s, k=self.k,
                                num_nbs=self.num_nbs, library_id=self.library_id)
        sp = sp[sp.obs["n_neighbours"] > 0].copy()
        columns = [_minmax(np.asarray(sp.X))]
        if self.histology:
            columns.insert(0, _minmax(_grey_values(adata, sp.obsm["spatial"], mask, scale, self.res,
                                                   self.library_id))[:, None])
        raster, rows, cols = grid_raster(sp.obsm["spatial"], np.hstack(columns), self.res)
        sp.obs["row"], sp.obs["col"] = rows, cols
        self.cell_ = _raster_scale(mask, scale, self.res, self.resize_short)
        return raster, sp

    def run(self, adata, reference=None):
        if self.n_domains is not None:
            check_n_clusters(self.n_domains, adata.n_obs)
        raster, sp = self.bands(adata)
        self.raster_ = raster
        threshold = max(1, round(self.threshold / self.cell_ ** 2))
        radius = max(1, round(self.radius / self.cell_))
        labels_img, response, self.history_ = segment(
            raster, n_channels=self.n_channels, lr=self.lr, max_iter=self.epochs, min_labels=self.min_labels,
            threshold=threshold, radius=radius, mu=self.mu, seed=self.seed, progress=self.progress)
        rows, cols = sp.obs["row"].to_numpy(), sp.obs["col"].to_numpy()
        z = response[:, rows, cols].T                                      # (M, n_channels)
        if self.n_domains is None:
            sp_labels = labels_img[rows, cols]
        else:
            check_n_clusters(self.n_domains, len(sp))
            sp_labels = embedding_to_domains(z, self.n_domains, clustering=self.clustering, seed=self.seed)
        sp.obs["domain"] = pd.Categorical(sp_labels.astype(str))
        self.superpixels_, self.labels_image_ = sp, labels_img
        # spots: majority over the super-pixels nearest to each spot (its Voronoi cell), embedding = their mean
        xy = spatial_coords(adata)
        _, owner = cKDTree(xy).query(sp.obsm["spatial"])
        codes, uniques = pd.factorize(sp_labels)
        votes = sparse.csr_matrix((np.ones(len(sp)), (owner, codes)), shape=(adata.n_obs, len(uniques))).toarray()
        n_own = votes.sum(1)
        _, nearest = cKDTree(sp.obsm["spatial"]).query(xy)
        spot_labels = np.where(n_own > 0, uniques[votes.argmax(1)], sp_labels[nearest])
        pooled = sparse.csr_matrix((np.ones(len(sp)), (owner, np.arange(len(sp)))), shape=(adata.n_obs, len(sp)))
        embedding = np.where(n_own[:, None] > 0, (pooled @ z) / np.maximum(n_own, 1)[:, None], z[nearest])
        if self.refine:
            spot_labels = cluster.refine(spot_labels, coords=xy, k=self.refine_k)
        write_domains(adata, self.key, spot_labels, embedding)
        return adata
