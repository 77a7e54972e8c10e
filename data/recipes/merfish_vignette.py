"""The 750 MERFISH cells of spacexr's vignette (Moffitt 2018 hypothalamus) -> data/merfish_vignette.h5ad.

Raw files (under ``--raw``, folder ``rctd_spacexr_examples/SpatialRNA/MerfishVignette/``, comma-separated):
``counts.csv`` (the 134 genes of the scRNA-seq reference x 750 cells, integer counts, first column = gene),
``coords.csv`` (cell -> x, y in um), ``nUMI.csv`` (cell -> total counts as given by spacexr).

Output: ``X`` (750 cells x 134 genes, CSR float32 counts), ``obsm["spatial"]`` (x, y in um),
``obs["n_umi"]``. Gene order matches ``moffitt_scrna``. No cell-type labels.
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

ROOT = "rctd_spacexr_examples/SpatialRNA/MerfishVignette"
META = {
    "citation": ("Moffitt JR, Bambah-Mukku D, Eichhorn SW, et al. Molecular, spatial, and functional single-cell "
                 "profiling of the hypothalamic preoptic region. Science 362, eaau5324 (2018). "
                 "doi:10.1126/science.aau5324; subset distributed with Cable DM, et al. Robust decomposition of "
                 "cell type mixtures in spatial transcriptomics. Nat Biotechnol 40, 517-526 (2022)"),
    "licence": "GPL-3.0 (dmcable/spacexr)",
    "recipe": "data/recipes/merfish_vignette.py",
}


def build(raw, out, registry: bool = True) -> None:
    rel = {k: f"{ROOT}/{k}.csv" for k in ("counts", "coords", "nUMI")}
    counts = pd.read_csv(raw / rel["counts"], index_col=0)
    coords = pd.read_csv(raw / rel["coords"], index_col=0)
    n_umi = pd.read_csv(raw / rel["nUMI"], index_col=0)["x"]
    cells = counts.columns.astype(str)
    if not (coords.index.equals(cells) and n_umi.index.equals(cells)):
        raise ValueError("counts, coords and nUMI list different cells")
    X = sparse.csr_matrix(counts.to_numpy(dtype=np.float32).T)
    C.check_integer(X, "MerfishVignette counts")

    obs = pd.DataFrame(index=pd.Index(cells, name=None))
    obs["n_umi"] = n_umi.to_numpy().astype(np.int32)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(counts.index.astype(str), name=None)))
    adata.obsm["spatial"] = coords[["x", "y"]].to_numpy(dtype=np.float64)

    file = "merfish_vignette.h5ad"
    C.write_h5ad(adata, out / file)
    C.report(out, [file])
    print(f"  shape {adata.shape}")
    if registry:
        C.register(
            "merfish_vignette", out, file, adata.shape,
            {**META, "description": ("750 MERFISH cells of the mouse hypothalamic preoptic region (Moffitt 2018) x "
                                     "the 134 genes of moffitt_scrna, counts and positions in um, no labels")},
            [C.upstream(raw, rel[k], "spacexr", f"inst/extdata/{rel[k].split('/', 1)[1]}")
             for k in ("counts", "coords", "nUMI")])


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    build(args.raw, args.out, registry=not args.no_registry)


if __name__ == "__main__":
    main()
