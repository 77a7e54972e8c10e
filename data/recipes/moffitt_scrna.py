"""Moffitt 2018 hypothalamic preoptic 10x scRNA-seq reference (as shipped with spacexr) -> data/moffitt_scrna.h5ad.

Raw files (under ``--raw``, folder ``rctd_spacexr_examples/Reference/Merfish_Ref/``, comma-separated):
``counts.csv`` (134 MERFISH-panel genes x 1,308 cells, integer UMI counts, first column = gene),
``cell_types.csv`` (cell -> one of 14 types), ``nUMI.csv`` (cell -> total UMIs over the whole transcriptome).

Output: ``X`` (1,308 cells x 134 genes, CSR float32 counts), ``obs["cell_type"]`` (categorical, 14 types),
``obs["n_umi"]`` (total UMIs of the cell over all genes, not only the 134 here; RCTD uses it as the library
size).
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

ROOT = "rctd_spacexr_examples/Reference/Merfish_Ref"
META = {
    "citation": ("Moffitt JR, Bambah-Mukku D, Eichhorn SW, et al. Molecular, spatial, and functional single-cell "
                 "profiling of the hypothalamic preoptic region. Science 362, eaau5324 (2018). "
                 "doi:10.1126/science.aau5324; subset distributed with Cable DM, et al. Robust decomposition of "
                 "cell type mixtures in spatial transcriptomics. Nat Biotechnol 40, 517-526 (2022)"),
    "licence": "GPL-3.0 (dmcable/spacexr)",
    "recipe": "data/recipes/moffitt_scrna.py",
}


def build(raw, out, registry: bool = True) -> None:
    rel = {k: f"{ROOT}/{k}.csv" for k in ("counts", "cell_types", "nUMI")}
    counts = pd.read_csv(raw / rel["counts"], index_col=0)
    types = pd.read_csv(raw / rel["cell_types"], index_col=0)["x"]
    n_umi = pd.read_csv(raw / rel["nUMI"], index_col=0)["x"]
    cells = counts.columns.astype(str)
    if not (types.index.equals(cells) and n_umi.index.equals(cells)):
        raise ValueError("counts, cell_types and nUMI list different cells")
    X = sparse.csr_matrix(counts.to_numpy(dtype=np.float32).T)
    C.check_integer(X, "Merfish_Ref counts")
    if np.any(n_umi.to_numpy() < np.asarray(X.sum(1)).ravel()):
        raise ValueError("nUMI is smaller than the counts of the 134 genes")

    obs = pd.DataFrame(index=pd.Index(cells, name=None))
    obs["cell_type"] = pd.Categorical(types.astype(str).to_numpy(), categories=sorted(types.unique()))
    obs["n_umi"] = n_umi.to_numpy().astype(np.int32)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(counts.index.astype(str), name=None)))

    file = "moffitt_scrna.h5ad"
    C.write_h5ad(adata, out / file)
    C.report(out, [file])
    print(f"  shape {adata.shape}, {obs['cell_type'].nunique()} types")
    if registry:
        C.register(
            "moffitt_scrna", out, file, adata.shape,
            {**META, "description": ("Mouse hypothalamic preoptic 10x scRNA-seq reference (Moffitt 2018): 1,308 cells "
                                     "x the 134 MERFISH-panel genes, UMI counts, 14 cell types")},
            [C.upstream(raw, rel[k], "spacexr", f"inst/extdata/{rel[k].split('/', 1)[1]}")
             for k in ("counts", "cell_types", "nUMI")])


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    build(args.raw, args.out, registry=not args.no_registry)


if __name__ == "__main__":
    main()
