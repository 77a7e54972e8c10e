"""seqFISH mouse embryo (Lohoff et al. 2022, embryo 2, as shipped with clustSIGNAL) -> data/seqfish_embryo.h5ad.

Raw file (under ``--raw``): ``seqfish_mouse_embryo_lohoff2022/clustSIGNAL_mEmbryo2.RData`` with ``me_expr``
(351 genes x 14,185 cells, log2-normalised counts, dgCMatrix) and ``me_data`` (``uniqueID``, ``pos`` = field of
view, ``celltype_mapped_refined`` = 23 cell types, ``X``/``Y`` = position). The cells come from two optical
sections (``_z2``: 7,661 cells, ``_z5``: 6,524 cells); a cell segmented in both keeps its number, so
``obs["cell_id"]`` (field of view + cell number) names the physical cell.

Counts: the matrix holds ``log2(1 + counts / s_c)`` with one size factor ``s_c`` per cell. Inverting gives
``counts / s_c``; assuming the smallest non-zero count of each cell is 1, ``s_c = 1 / min(2^x - 1)`` and the
counts are ``round((2^x - 1) / min)``. The recipe checks that this gives integers to 1e-6 (it does, to 1e-12),
so the stored counts are exact up to that one assumption.

Output: ``X`` (14,185 cells x 351 genes, CSR float32 counts), ``obs["cell_type"]``, ``obs["z"]`` (2 or 5),
``obs["cell_id"]``, ``obs["fov"]``, ``obsm["spatial"]`` (x, y in the units of the source; neighbouring cells are a median 0.035 apart).
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
import rdata
from scipy import sparse

REL = "seqfish_mouse_embryo_lohoff2022/clustSIGNAL_mEmbryo2.RData"
META = {
    "citation": ("Lohoff T, Ghazanfar S, Missarova A, et al. Integration of spatial and single-cell transcriptomic "
                 "data elucidates mouse organogenesis. Nat Biotechnol 40, 74-85 (2022). "
                 "doi:10.1038/s41587-021-01006-2; subset distributed with the clustSIGNAL R package"),
    "licence": "GPL-2.0 (SydneyBioX/clustSIGNAL)",
    "recipe": "data/recipes/seqfish_embryo.py",
}


def counts_from_log2(logX: sparse.csr_matrix) -> sparse.csr_matrix:
    """Integer counts from per-cell log2-normalised values, assuming each cell's smallest non-zero count is 1."""
    X = logX.tocsr(copy=True).astype(np.float64)
    X.data = np.exp2(X.data) - 1.0
    row_min = np.minimum.reduceat(X.data, X.indptr[:-1])  # every cell has non-zero counts (checked below)
    X.data /= np.repeat(row_min, np.diff(X.indptr))
    err = np.abs(X.data - np.round(X.data)).max()
    if err > 1e-6:
        raise ValueError(f"log2 values do not invert to integer counts (max error {err:.2g})")
    X.data = np.round(X.data)
    return X.astype(np.float32)


def build(raw, out, registry: bool = True) -> None:
    parsed = rdata.conversion.convert(rdata.parser.parse_file(raw / REL), default_encoding="utf8")
    expr, meta = parsed["me_expr"], parsed["me_data"]
    genes = np.asarray(expr.Dimnames[0]).astype(str)
    cells = np.asarray(expr.Dimnames[1]).astype(str)
    logX = sparse.csc_matrix((np.asarray(expr.x), np.asarray(expr.i), np.asarray(expr.p)),
                             shape=tuple(int(d) for d in expr.Dim)).T.tocsr()
    if np.any(np.diff(logX.indptr) == 0):
        raise ValueError("a cell has no detected gene")
    meta = meta.loc[cells]
    X = counts_from_log2(logX)

    obs = pd.DataFrame(index=pd.Index(cells, name=None))
    types = meta["celltype_mapped_refined"].astype(str).to_numpy()
    obs["cell_type"] = pd.Categorical(types, categories=sorted(set(types)))
    obs["z"] = np.where(pd.Series(cells).str.endswith("_z2"), 2, 5).astype(np.int8)
    obs["cell_id"] = pd.Series(cells).str.replace(r"_z\d$", "", regex=True).to_numpy()
    obs["fov"] = meta["pos"].astype(str).to_numpy()
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name=None)))
    adata.obsm["spatial"] = meta[["X", "Y"]].to_numpy(dtype=np.float64)

    file = "seqfish_embryo.h5ad"
    C.write_h5ad(adata, out / file)
    C.report(out, [file])
    print(f"  shape {adata.shape}, {obs['cell_type'].nunique()} types, z2 {int((obs['z'] == 2).sum())} cells")
    if registry:
        C.register(
            "seqfish_embryo", out, file, adata.shape,
            {**META, "description": ("seqFISH mouse embryo (8-12 somites, embryo 2, two optical sections): 14,185 "
                                     "cells x 351 genes, counts recovered from log2-normalised values, 23 mapped "
                                     "cell types, positions")},
            [C.upstream(raw, REL, "clustsignal", "data/mEmbryo2.RData")])


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    build(args.raw, args.out, registry=not args.no_registry)


if __name__ == "__main__":
    main()
