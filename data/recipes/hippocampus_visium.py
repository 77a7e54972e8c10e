"""Mouse hippocampus Visium spots + Drop-seq reference (as shipped with spacexr) -> two h5ad files.

Raw files (under ``--raw``, comma-separated, genes x cells/spots, first column = gene):
``rctd_spacexr_examples/SpatialRNA/VisiumVignette/{counts,coords,nUMI}.csv`` (313 Visium spots x 276 genes,
positions in full-resolution pixels) and ``rctd_spacexr_examples/Reference/Visium_Ref/{counts,cell_types,nUMI}.csv``
(mouse hippocampus Drop-seq of Saunders et al. 2018: 510 cells x 307 genes, 17 cell types, 30 cells each).

Outputs: ``hippocampus_visium.h5ad`` (``X`` counts, ``obsm["spatial"]`` (x, y) in pixels, ``obs["n_umi"]``, no
labels: the qualitative deconvolution example) and ``hippocampus_dropseq.h5ad`` (``X`` counts,
``obs["cell_type"]``, ``obs["n_umi"]``). The two share 124 genes. Cell-type names are kept as spacexr ships them
(including its spellings ``Denate`` and ``Entorihinal``).
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

SPOTS = "rctd_spacexr_examples/SpatialRNA/VisiumVignette"
REF = "rctd_spacexr_examples/Reference/Visium_Ref"
CITATION = ("Saunders A, Macosko EZ, Wysoker A, et al. Molecular diversity and specializations among the cells of "
            "the adult mouse brain. Cell 174, 1015-1030 (2018). doi:10.1016/j.cell.2018.07.028 (reference); "
            "Visium spots and reference subset distributed with Cable DM, et al. Robust decomposition of cell type "
            "mixtures in spatial transcriptomics. Nat Biotechnol 40, 517-526 (2022)")
META = {"citation": CITATION, "licence": "GPL-3.0 (dmcable/spacexr)", "recipe": "data/recipes/hippocampus_visium.py"}


def _read(raw, root: str, side: str):
    counts = pd.read_csv(raw / f"{root}/counts.csv", index_col=0)
    side_table = pd.read_csv(raw / f"{root}/{side}.csv", index_col=0)
    n_umi = pd.read_csv(raw / f"{root}/nUMI.csv", index_col=0)["x"]
    names = counts.columns.astype(str)
    if not (side_table.index.astype(str).equals(names) and n_umi.index.astype(str).equals(names)):
        raise ValueError(f"{root}: counts, {side} and nUMI list different cells or spots")
    X = sparse.csr_matrix(counts.to_numpy(dtype=np.float32).T)
    C.check_integer(X, f"{root} counts")
    obs = pd.DataFrame({"n_umi": n_umi.to_numpy().astype(np.int32)}, index=pd.Index(names, name=None))
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(counts.index.astype(str), name=None))), side_table


def build(raw, out, registry: bool = True) -> None:
    spots, coords = _read(raw, SPOTS, "coords")
    spots.obsm["spatial"] = coords[["x", "y"]].to_numpy(dtype=np.float64)
    ref, types = _read(raw, REF, "cell_types")
    labels = types["x"].astype(str).to_numpy()
    ref.obs["cell_type"] = pd.Categorical(labels, categories=sorted(set(labels)))

    files = {"hippocampus_visium": spots, "hippocampus_dropseq": ref}
    for name, adata in files.items():
        C.write_h5ad(adata, out / f"{name}.h5ad")
    C.report(out, [f"{n}.h5ad" for n in files])
    print(f"  spots {spots.shape}, reference {ref.shape}, shared genes {len(spots.var_names.intersection(ref.var_names))}")
    if not registry:
        return
    up = lambda root, keys: [C.upstream(raw, f"{root}/{k}.csv", "spacexr", f"inst/extdata/{root.split('/', 1)[1]}/{k}.csv")
                             for k in keys]
    C.register("hippocampus_visium", out, "hippocampus_visium.h5ad", spots.shape,
               {**META, "description": ("Mouse hippocampus 10x Visium: 313 spots x 276 genes, counts and positions "
                                        "(full-resolution pixels), no labels; pairs with hippocampus_dropseq")},
               up(SPOTS, ("counts", "coords", "nUMI")))
    C.register("hippocampus_dropseq", out, "hippocampus_dropseq.h5ad", ref.shape,
               {**META, "description": ("Mouse hippocampus Drop-seq reference (Saunders 2018): 510 cells x 307 "
                                        "genes, counts, 17 cell types (30 cells each)")},
               up(REF, ("counts", "cell_types", "nUMI")))


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    build(args.raw, args.out, registry=not args.no_registry)


if __name__ == "__main__":
    main()
