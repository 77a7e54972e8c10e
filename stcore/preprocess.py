"""Standard expression pre-processing, written once for every method.

Thin wrappers over scanpy that never modify the caller's AnnData and always start from raw counts:
library-size normalisation, ``log1p``, highly variable genes and PCA.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
from scipy import sparse

from .validation import counts_matrix

__all__ = ["log_normalize", "highly_variable", "pca", "hvg_pca"]


def log_normalize(adata: ad.AnnData, *, target_sum: float | None = 1e4, layer: str | None = None) -> ad.AnnData:
    r"""Copy of ``adata`` with :math:`\log(1 + s\, x_{ig} / \sum_g x_{ig})` in ``.X`` and raw counts in
    ``layers["counts"]``; ``s = target_sum`` (``None``: the median library size, scanpy's ``normalize_per_cell``)."""
    counts = counts_matrix(adata, layer)
    out = ad.AnnData(X=counts.astype(np.float32).copy(), obs=adata.obs.copy(), var=adata.var.copy())
    out.obsm = adata.obsm.copy()
    out.layers["counts"] = out.X.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def highly_variable(adata: ad.AnnData, n_top_genes: int = 3000, *, flavor: str = "seurat_v3",
                    layer: str | None = None) -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes (``seurat_v3`` works on raw counts)."""
    counts = counts_matrix(adata, layer)
    n_top_genes = min(n_top_genes, adata.n_vars)
    tmp = ad.AnnData(X=counts.astype(np.float32))
    if flavor == "seurat_v3":
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat_v3")
    else:
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor=flavor)
    return tmp.var["highly_variable"].to_numpy()


def pca(X, n_comps: int = 50, *, seed: int = 0, scale: bool = False, solver: str = "arpack") -> np.ndarray:
    """First ``n_comps`` principal components of ``X`` (n, g) (genes optionally scaled to unit variance).

    ``solver="arpack"`` is the exact PCA scanpy uses; ``"randomized"`` is a seeded randomised SVD with 4 power
    iterations, whose leading components match the exact ones closely (correlation > 0.98 for the first 50 on a
    DLPFC slide) in a fraction of the time when hundreds of components of thousands of genes are asked for.
    """
    if solver not in ("arpack", "randomized"):
        raise ValueError(f"solver={solver!r}; use 'arpack' (exact) or 'randomized'.")
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    X = X.astype(np.float32)
    if scale:
        sd = X.std(0)
        X = (X - X.mean(0)) / np.where(sd > 0, sd, 1)
    n_comps = min(n_comps, min(X.shape) - 1)
    if solver == "randomized":
        from sklearn.utils.extmath import randomized_svd

        U, S, _ = randomized_svd(X if scale else X - X.mean(0), n_comps, n_iter=4, random_state=seed)
        return U * S
    return sc.pp.pca(X, n_comps=n_comps, random_state=seed, svd_solver="arpack")


def hvg_pca(adata: ad.AnnData, n_top_genes: int = 3000, n_comps: int = 50, *, seed: int = 0,
            layer: str | None = None, scale: bool = False) -> np.ndarray:
    """The usual expression embedding: HVGs (seurat_v3) -> normalise -> log1p -> PCA. Returns (n, n_comps)."""
    mask = highly_variable(adata, n_top_genes, layer=layer)
    norm = log_normalize(adata[:, mask], layer=layer)
    return pca(norm.X, n_comps, seed=seed, scale=scale)
