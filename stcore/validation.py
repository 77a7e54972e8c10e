"""Input checks that fail early with a message saying what is wrong and how to fix it.

Methods call these before any tensor is built, so a user sees "obsm['spatial'] is missing" rather than a traceback
from deep inside torch.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import sparse

__all__ = [
    "rows_with_counts",
    "check_float",
    "check_int",
    "reference_cell_types",
    "check_coords",
    "check_finite",
    "check_counts",
    "check_n_clusters",
    "check_image_covers",
    "spatial_coords",
    "counts_matrix",
    "shared_genes",
    "cell_type_labels",
]


def check_finite(X, name: str = "X") -> None:
    """Raise if ``X`` (dense or sparse) holds NaN or infinite values."""
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values; remove or impute them "
                         "(e.g. fill missing counts with 0) before running.")


def check_coords(coords, *, n_obs: int | None = None, min_dim: int = 2, name: str = "coordinates") -> np.ndarray:
    """Return coordinates as a float (n, d) array, or raise a clear error."""
    if coords is None:
        raise KeyError(f"No {name} given. Put spot/cell positions in adata.obsm['spatial'] as an (n, 2) array.")
    arr = np.asarray(coords.to_numpy() if isinstance(coords, pd.DataFrame) else coords)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numbers, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] < min_dim or arr.shape[1] > 3:
        raise ValueError(f"{name} must have shape (n, 2) (x, y) or (n, 3), got {arr.shape}. "
                         "If you have separate x and y columns use np.column_stack([x, y]).")
    if n_obs is not None and arr.shape[0] != n_obs:
        raise ValueError(f"{name} has {arr.shape[0]} rows but the data has {n_obs} spots/cells.")
    check_finite(arr, name)
    return arr


def spatial_coords(adata, key: str = "spatial") -> np.ndarray:
    """``adata.obsm[key]`` as a checked (n, 2) float array."""
    if key not in adata.obsm:
        raise KeyError(f"adata.obsm[{key!r}] is missing: store spot/cell positions there as an (n, 2) array "
                       f"(scanpy/squidpy convention). Available obsm keys: {list(adata.obsm.keys())}.")
    return check_coords(adata.obsm[key], n_obs=adata.n_obs, name=f"obsm[{key!r}]")


def check_counts(X, name: str = "X") -> None:
    """Raise unless ``X`` holds non-negative integer counts (as stored floats or ints)."""
    check_finite(X, name)
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size == 0:
        return
    if values.min() < 0:
        raise ValueError(f"{name} has negative values, so it is not raw counts (it looks scaled or "
                         "log-transformed). Pass raw UMI counts, e.g. from adata.layers['counts'] or adata.raw.")
    sample = values[: min(values.size, 1_000_000)]
    if not np.allclose(sample, np.round(sample)):
        raise ValueError(f"{name} holds non-integer values, so it is not raw counts (it looks normalised or "
                         "log-transformed). This method needs raw counts: pass them with layer='counts', or "
                         "store them in adata.layers['counts'].")


def counts_matrix(adata, layer: str | None = None):
    """The raw-count matrix (``adata.X`` or ``adata.layers[layer]``), checked."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"adata.layers[{layer!r}] is missing; available layers: {list(adata.layers.keys())}.")
    X = adata.X if layer is None else adata.layers[layer]
    check_counts(X, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
    return X


def check_n_clusters(n_clusters: int, n_obs: int) -> None:
    """Raise unless ``1 <= n_clusters <= n_obs``."""
    if int(n_clusters) != n_clusters or n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters} must be a positive integer.")
    if n_clusters > n_obs:
        raise ValueError(f"n_clusters={n_clusters} is larger than the number of spots ({n_obs}); "
                         "ask for fewer domains.")


def check_image_covers(image, coords_px, scale: float = 1.0, *, tolerance: float = 0.0) -> np.ndarray:
    """Spot centres in image pixels, ``coords_px * scale`` (n, 2) = (x, y), after checking they lie on ``image``.

    Pixel ``(r, c)`` is centred at ``(x, y) = (c, r)``, so the image spans ``[-0.5, W - 0.5]`` horizontally;
    ``tolerance`` (image pixels) absorbs rounding of scale factors.
    """
    xy = np.asarray(coords_px, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords_px must be an (n, 2) array of (x, y) pixels, got shape {xy.shape}.")
    check_finite(xy, "coords_px")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale}: must be a positive scale factor (image pixels per full-res pixel).")
    xy = xy * scale
    h, w = np.asarray(image).shape[:2]
    lo = -0.5 - tolerance
    outside = (xy[:, 0] < lo) | (xy[:, 1] < lo) | (xy[:, 0] > w - 0.5 + tolerance) | (xy[:, 1] > h - 0.5 + tolerance)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} of {len(xy)} spots fall outside the {w}x{h} (W x H) image after scaling the "
            f"coordinates by scale={scale:g} (spot x spans {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y spans "
            f"{xy[:, 1].min():.0f}..{xy[:, 1].max():.0f}). Check the scale factor (tissue_hires_scalef for the "
            "hires image, tissue_lowres_scalef for lowres, 1 for the full-resolution image), that obsm['spatial'] "
            "is (x, y) in full-resolution pixels, and that the image belongs to this library_id."
        )
    return xy


def shared_genes(spatial, reference, *, min_genes: int = 1) -> pd.Index:
    """Genes present in both AnnData objects, in the spatial data's order."""
    genes = spatial.var_names[spatial.var_names.isin(reference.var_names)]
    if len(genes) < min_genes:
        example_a = ", ".join(map(str, spatial.var_names[:3]))
        example_b = ", ".join(map(str, reference.var_names[:3]))
        raise ValueError(
            f"The spatial data and the reference share {len(genes)} genes (need at least {min_genes}). "
            f"Spatial genes look like [{example_a}], reference genes like [{example_b}]: use the same naming "
            "(symbols vs Ensembl IDs, same case) in both var_names."
        )
    return genes


def cell_type_labels(reference, key: str = "cell_type") -> pd.Series:
    """``reference.obs[key]`` as strings, with a clear error when missing or incomplete."""
    if key not in reference.obs:
        raise KeyError(f"reference.obs[{key!r}] is missing: put cell-type labels there or name the column "
                       f"with --cell-type-key. Available columns: {list(reference.obs.columns)}.")
    labels = reference.obs[key]
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} reference cells have no {key!r}; drop them first.")
    return labels.astype(str)


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, with a clear error unless it is an integer >= ``minimum`` (``True``/``False`` refused)."""
    if isinstance(value, bool) or not float(value).is_integer() or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
    return int(value)


def check_float(name: str, value, *, positive: bool = False, below_one: bool = False) -> float:
    """``value`` as a finite float >= 0 (> 0 with ``positive``, < 1 with ``below_one``), else a clear error."""
    value = float(value)
    if not np.isfinite(value) or value < 0 or (positive and value == 0) or (below_one and value >= 1):
        kind = "in [0, 1)" if below_one else ("positive" if positive else "non-negative")
        raise ValueError(f"{name}={value!r} must be a finite {kind} number.")
    return value


def rows_with_counts(X, what: str, genes: str = "genes shared by the spatial data and the reference") -> np.ndarray:
    """Indices of the rows of the (sparse or dense) count matrix ``X`` with at least one count.

    Warns about the others (a model of counts cannot train on them: an NB or Poisson rate of 0 has no defined
    likelihood) and raises when no row has counts. ``what`` names the rows and ``genes`` the columns in the messages.
    """
    keep = np.flatnonzero(np.asarray(X.sum(1)).ravel() > 0)
    if len(keep) == 0:
        raise ValueError(f"No {what} has counts on the {genes}; check that both datasets hold raw counts of the "
                         "same genes.")
    if len(keep) < X.shape[0]:
        warnings.warn(f"{X.shape[0] - len(keep)} {what} have no counts on the {genes} and are left out of "
                      "training.", stacklevel=3)
    return keep


def reference_cell_types(reference, key: str = "cell_type") -> tuple[pd.Series, list[str]]:
    """The reference's labels (:func:`cell_type_labels`) and its sorted cell types, at least two of them
    (deconvolution has nothing to estimate with one)."""
    labels = cell_type_labels(reference, key)
    types = sorted(labels.unique())
    if len(types) < 2:
        raise ValueError(f"reference.obs[{key!r}] has {len(types)} cell type; deconvolution needs at least 2.")
    return labels, types
