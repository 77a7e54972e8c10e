"""Pieces every method of a task shares: turning an embedding into K domains, and writing outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse

from .. import cluster
from ..validation import check_n_clusters, spatial_coords

__all__ = ["dense", "embedding_to_domains", "write_domains", "write_frame", "missing_genes"]


def dense(X) -> np.ndarray:
    """A dense float64 copy of a matrix that may be scipy-sparse."""
    return np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float64)


def embedding_to_domains(embedding, n_domains: int | None, *, clustering: str = "gmm", seed: int = 0,
                         resolution: float = 1.0, refine_with=None, refine_k: int = 6) -> np.ndarray:
    """Cluster an embedding (n, d) into domains; optionally refine them by a spatial majority vote.

    ``clustering`` is ``"gmm"`` (tied covariance, mclust's EEE), ``"kmeans"``, ``"leiden"`` or ``"louvain"``.
    With ``n_domains`` given, graph clusterings search their resolution until they return exactly K clusters;
    with ``n_domains=None`` they use ``resolution`` as is. ``refine_with`` is ``None`` (no refinement) or the
    (n, 2) coordinates over which the ``refine_k``-neighbour majority vote runs.
    """
    embedding = np.asarray(embedding, dtype=np.float64)
    if clustering in ("leiden", "louvain"):
        if n_domains is None:
            fn = cluster.leiden if clustering == "leiden" else cluster.louvain
            labels = fn(embedding, resolution=resolution, seed=seed)
        else:
            check_n_clusters(n_domains, embedding.shape[0])
            labels, _ = cluster.search_resolution(embedding, n_domains, method=clustering, seed=seed)
    elif clustering in ("gmm", "kmeans"):
        if n_domains is None:
            raise ValueError(f"clustering={clustering!r} needs the number of domains: pass n_domains=K "
                             "(command line: --n-domains K), or use clustering='leiden'.")
        check_n_clusters(n_domains, embedding.shape[0])
        labels = cluster.cluster(embedding, n_domains, method=clustering, seed=seed)
    else:
        raise ValueError(f"clustering={clustering!r}: use 'gmm', 'kmeans', 'leiden' or 'louvain'.")
    if refine_with is not None:
        labels = cluster.refine(labels, coords=np.asarray(refine_with), k=refine_k)
    return np.asarray(labels)


def write_domains(adata, name: str, labels, embedding=None) -> None:
    """``obs["domain_<name>"]`` as a categorical of strings (sorted numerically) and ``obsm["X_<name>"]``."""
    labels = np.asarray(labels)
    cats = [str(c) for c in sorted(pd.unique(labels))]
    adata.obs[f"domain_{name}"] = pd.Categorical([str(v) for v in labels], categories=cats)
    if embedding is not None:
        adata.obsm[f"X_{name}"] = np.asarray(embedding, dtype=np.float32)


def write_frame(adata, key: str, values, columns) -> pd.DataFrame:
    """Store an (n_obs, m) table in ``adata.obsm[key]`` as a DataFrame indexed by ``obs_names``."""
    frame = pd.DataFrame(np.asarray(values, dtype=np.float32), index=adata.obs_names, columns=[str(c) for c in columns])
    adata.obsm[key] = frame
    return frame


def missing_genes(spatial, reference, genes=None) -> list[str]:
    """Genes to impute: ``genes`` if given (all must be in the reference), else every reference gene that the
    spatial data lacks."""
    if genes is None:
        out = [g for g in reference.var_names if g not in spatial.var_names]
        if not out:
            raise ValueError("Every reference gene is already measured in the spatial data, so nothing is missing. "
                             "Name genes to predict with genes=[...] (command line: --genes A,B,C).")
        return out
    genes = [genes] if isinstance(genes, str) else list(genes)
    absent = [g for g in genes if g not in reference.var_names]
    if absent:
        raise ValueError(f"{len(absent)} requested genes are not in the reference (e.g. {absent[:3]}); "
                         "they cannot be predicted from it.")
    return genes


def coords_for_refinement(adata, refine: bool):
    """The spatial coordinates when ``refine`` is set, else ``None``."""
    return spatial_coords(adata) if refine else None
