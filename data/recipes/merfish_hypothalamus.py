"""MERFISH mouse hypothalamic preoptic region (Moffitt et al. 2018) -> data/merfish_hypothalamus.h5ad.

Raw file: ``merfish_hypothalamus_moffitt2018/banksy_hypothalamus.rda`` (list ``hypothalamus`` with
``expression``: 161 features x 11,162 cells, ``locations``: ``sdimx, sdimy, sdimz``, ``metadata``), the cells
of animal 1 (naive female) in two sections.

Counts. The released values are counts divided by the cell's volume (times a constant), so they are not
integers. Of the 161 features, 135 genes and 5 ``Blank_*`` barcodes were read out combinatorially (molecules
counted); the last 21 (``Adcyap1`` ... ``Vgf``) were imaged by sequential single-molecule FISH and released as
volume-normalised total intensities, which are not counts at all. For each cell, every nonzero value of the
140 combinatorial features is a multiple of one per-cell unit (the value of a single molecule): the recipe
takes the cell's smallest nonzero value as the unit (or a half, third, ... of it when the ratios ask for that),
divides and rounds, and accepts the result when every value is within ``REL_TOL`` (relative) of an integer.
The largest relative deviation seen is 2.4e-4 (the release's rounding), so the counts are recovered exactly
for all cells with any combinatorial molecule; the two cells with none get a row of zeros and
``counts_recovered = False`` (no unit). Any cell that failed would keep its row of zeros in ``X`` as well and
its released values in ``layers["volume_normalised"]``.

Output: ``X`` (cells x 140 features, CSR float32 integer counts), ``layers["volume_normalised"]`` (the released
values of the same 140 features), ``obsm["smfish_intensity"]`` (DataFrame, the 21 sequential-smFISH genes'
released values), ``obs``: ``cell_id``, ``cell_class``, ``neuron_cluster``, ``z``, ``count_unit``,
``counts_recovered``; ``obsm["spatial"]`` = (sdimx, sdimy) in um.
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
import rdata
from scipy import sparse

RAW = "merfish_hypothalamus_moffitt2018/banksy_hypothalamus.rda"
N_COMBINATORIAL = 140  # 135 genes + 5 Blank_* barcodes, in the .rda's order; then 21 sequential-smFISH genes
REL_TOL = 1e-3
MAX_DIVISOR = 4

META = {
    "citation": ("Moffitt JR, Bambah-Mukku D, Eichhorn SW, et al. Molecular, spatial, and functional single-cell "
                 "profiling of the hypothalamic preoptic region. Science 362, eaau5324 (2018). "
                 "doi:10.1126/science.aau5324 (data: Dryad doi:10.5061/dryad.8t8s248)"),
    "licence": ("MIT (prabhakarlab/Banksy at the pinned commit, which redistributes the authors' Dryad release; "
                "Dryad data are CC0)"),
    "recipe": "data/recipes/merfish_hypothalamus.py",
}


def recover_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer counts from volume-normalised values, per cell.

    Parameters
    ----------
    values : (n_cells, n_features) array of non-negative floats, each row = counts x (per-cell unit).

    Returns
    -------
    counts : (n_cells, n_features) float32, integer-valued (zeros where recovery failed)
    unit : (n_cells,) the per-cell unit, NaN where there is none
    ok : (n_cells,) bool, True where every nonzero value is within REL_TOL of an integer multiple of the unit
    """
    n = values.shape[0]
    counts = np.zeros(values.shape, np.float32)
    unit = np.full(n, np.nan)
    ok = np.zeros(n, bool)
    for i in range(n):
        row = values[i]
        nz = row > 0
        if not nz.any():
            continue
        smallest = row[nz].min()
        for k in range(1, MAX_DIVISOR + 1):
            q = row[nz] / (smallest / k)
            r = np.round(q)
            if np.all(np.abs(q - r) <= REL_TOL * r):
                counts[i, nz] = r
                unit[i] = smallest / k
                ok[i] = True
                break
    return counts, unit, ok


def build(raw, out, registry: bool = True) -> None:
    obj = rdata.conversion.convert(rdata.parser.parse_file(raw / RAW))["hypothalamus"]
    expr = obj["expression"]
    features = np.asarray(expr.coords[expr.dims[0]].values).astype(str)
    cells = np.asarray(expr.coords[expr.dims[1]].values).astype(str)
    values = np.asarray(expr.values, dtype=np.float64).T
    if values.shape != (11162, 161) or features[N_COMBINATORIAL] != "Adcyap1":
        raise ValueError("unexpected layout of the hypothalamus expression matrix")
    comb, seq = values[:, :N_COMBINATORIAL], values[:, N_COMBINATORIAL:]
    counts, unit, ok = recover_counts(comb)

    loc = obj["locations"].loc[cells]
    meta = obj["metadata"].set_index("cell_ID").loc[cells]
    obs = pd.DataFrame(index=pd.Index(cells, name=None))
    obs["cell_id"] = meta["Cell_ID"].astype(str).to_numpy()
    obs["cell_class"] = pd.Categorical(meta["Cell_class"].astype(str).to_numpy())
    nc = meta["Neuron_cluster_ID"].astype(str).to_numpy()
    nc_levels = sorted({c for c in nc if c}, key=lambda c: (c.split("-")[0], int(c.split("-")[1])))
    obs["neuron_cluster"] = pd.Categorical(np.where(nc == "", None, nc), categories=nc_levels)
    obs["z"] = loc["sdimz"].to_numpy(dtype=np.float64)
    obs["count_unit"] = unit
    obs["counts_recovered"] = ok

    var = pd.DataFrame(index=pd.Index(features[:N_COMBINATORIAL], name=None))
    var["blank"] = var.index.str.startswith("Blank_")
    adata = ad.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)
    adata.layers["volume_normalised"] = sparse.csr_matrix(comb.astype(np.float32))
    adata.obsm["spatial"] = loc[["sdimx", "sdimy"]].to_numpy(dtype=np.float64)
    adata.obsm["smfish_intensity"] = pd.DataFrame(seq.astype(np.float32), index=obs.index,
                                                  columns=features[N_COMBINATORIAL:])
    adata.uns["counts_recovery"] = {
        "rel_tol": REL_TOL, "n_recovered": int(ok.sum()), "n_failed": int((~ok).sum()),
        "note": "X = round(volume_normalised / count_unit) per cell; see data/README.md",
    }

    file = "merfish_hypothalamus.h5ad"
    C.write_h5ad(adata, out / file)
    C.report(out, [file])
    print(f"  shape {adata.shape}, recovered {ok.sum()} / {len(ok)} cells, "
          f"median molecules per cell {np.median(counts.sum(1)):.0f}")

    if registry:
        C.register(
            "merfish_hypothalamus", out, file, adata.shape,
            {**META,
             "description": ("MERFISH mouse hypothalamic preoptic region, animal 1, two sections: 11,162 cells x "
                             "135 genes + 5 blank barcodes (integer counts recovered from the volume-normalised "
                             "release), 16 cell classes, neuron clusters, positions in um; the 21 "
                             "sequential-smFISH genes as intensities in obsm")},
            [C.upstream(raw, RAW, "banksy_hypothalamus", "data/hypothalamus.rda")])


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    build(args.raw, args.out, registry=not args.no_registry)


if __name__ == "__main__":
    main()
