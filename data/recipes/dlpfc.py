"""Human DLPFC 10x Visium slides 151673 and 151674 (Maynard et al. 2021) -> data/dlpfc_<sample>.h5ad.

Raw files (under ``--raw``, see data/README.md for their upstream URLs):

* ``dlpfc_visium_spatialLIBD/banksy_counts/dlpfc<sample>.rda``: list with ``expression`` (raw UMI counts of
  the 5,000 most variable genes, Ensembl IDs x in-tissue spots) and ``locations``.
* ``dlpfc_visium_spatialLIBD/humanpilot/<sample>/``: ``tissue_positions_list.txt`` (Space Ranger, no header),
  ``scalefactors_json.json``, ``tissue_lowres_image.png`` (600 x 600), ``tissue_spot_counts.csv`` (nuclei
  per spot).
* ``dlpfc_visium_spatialLIBD/humanpilot/barcode_level_layer_map.tsv``: manual layer per barcode and sample.
* ``dlpfc_visium_spatialLIBD/humanpilot/sig_genes.csv``: layer marker genes with Ensembl ID and symbol.

Outputs: ``dlpfc_<sample>.h5ad`` and ``dlpfc_<sample>_lowres.png`` (the upstream PNG, copied unchanged;
``stcore.data.load`` puts it at ``uns["spatial"][sample]["images"]["lowres"]``).
"""

from __future__ import annotations

import json
import shutil

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
import rdata
from PIL import Image
from scipy import sparse

SAMPLES = ("151673", "151674")
LAYERS = ["L1", "L2", "L3", "L4", "L5", "L6", "WM"]
ROOT = "dlpfc_visium_spatialLIBD"

META = {
    "citation": ("Maynard KR, Collado-Torres L, et al. Transcriptome-scale spatial gene expression in the human "
                 "dorsolateral prefrontal cortex. Nat Neurosci 24, 425-436 (2021). doi:10.1038/s41593-020-00787-0"),
    "licence": ("Artistic-2.0 (LieberInstitute/HumanPilot: positions, image, layers, nuclei counts); MIT "
                "(prabhakarlab/Banksy at the pinned commit: count matrix)"),
    "recipe": "data/recipes/dlpfc.py",
}


def build(raw, out, sample: str, registry: bool = True) -> None:
    rel = {
        "rda": f"{ROOT}/banksy_counts/dlpfc{sample}.rda",
        "positions": f"{ROOT}/humanpilot/{sample}/tissue_positions_list.txt",
        "scalefactors": f"{ROOT}/humanpilot/{sample}/scalefactors_json.json",
        "image": f"{ROOT}/humanpilot/{sample}/tissue_lowres_image.png",
        "nuclei": f"{ROOT}/humanpilot/{sample}/tissue_spot_counts.csv",
        "layers": f"{ROOT}/humanpilot/barcode_level_layer_map.tsv",
        "symbols": f"{ROOT}/humanpilot/sig_genes.csv",
    }

    # counts: genes x spots in the .rda -> spots x genes CSR
    obj = rdata.conversion.convert(rdata.parser.parse_file(raw / rel["rda"]))[f"dlpfc{sample}"]
    expr = obj["expression"]
    genes = np.asarray(expr.coords[expr.dims[0]].values).astype(str)
    barcodes = np.asarray(expr.coords[expr.dims[1]].values).astype(str)
    X = sparse.csr_matrix(np.asarray(expr.values, dtype=np.float32).T)
    C.check_integer(X, f"dlpfc{sample} expression")

    # positions: join on barcode
    pos = pd.read_csv(raw / rel["positions"], header=None, index_col=0,
                      names=["barcode", "in_tissue", "array_row", "array_col",
                             "pxl_row_in_fullres", "pxl_col_in_fullres"])
    missing = set(barcodes) - set(pos.index)
    if missing:
        raise ValueError(f"{len(missing)} barcodes of the counts are not in tissue_positions_list.txt")
    in_tissue = set(pos.index[pos["in_tissue"] == 1])
    if set(barcodes) != in_tissue:
        raise ValueError("the counts' barcodes are not exactly the in-tissue spots")
    pos = pos.loc[barcodes]

    with open(raw / rel["scalefactors"]) as fh:
        scalefactors = {k: float(v) for k, v in sorted(json.load(fh).items())}

    # the .rda's own locations are lowres-image coordinates (y flipped): use them as a check of the join
    loc = obj["locations"].loc[barcodes]
    s = scalefactors["tissue_lowres_scalef"]
    if not np.allclose(loc["sdimx"], pos["pxl_col_in_fullres"] * s, atol=1e-3):
        raise ValueError("sdimx of the .rda does not match pxl_col_in_fullres x tissue_lowres_scalef")
    flipped = loc["sdimy"] + pos["pxl_row_in_fullres"] * s
    if np.ptp(flipped) > 1e-3:
        raise ValueError("sdimy of the .rda is not a flipped pxl_row_in_fullres x tissue_lowres_scalef")

    layer_map = pd.read_csv(raw / rel["layers"], sep="\t", header=None, names=["barcode", "sample", "layer"],
                            dtype=str)
    layer_map = layer_map[layer_map["sample"] == sample].set_index("barcode")["layer"]
    if layer_map.index.duplicated().any() or not set(layer_map).issubset(LAYERS):
        raise ValueError("unexpected content in barcode_level_layer_map.tsv")

    nuclei = pd.read_csv(raw / rel["nuclei"], index_col=0)
    if not np.array_equal(nuclei.loc[barcodes, "imagerow"].to_numpy(), pos["pxl_row_in_fullres"].to_numpy()):
        raise ValueError("tissue_spot_counts.csv does not match tissue_positions_list.txt")

    obs = pd.DataFrame(index=pd.Index(barcodes, name=None))
    obs["array_row"] = pos["array_row"].to_numpy().astype(np.int32)
    obs["array_col"] = pos["array_col"].to_numpy().astype(np.int32)
    obs["layer"] = pd.Categorical(layer_map.reindex(barcodes).to_numpy(), categories=LAYERS)
    obs["n_nuclei"] = nuclei.loc[barcodes, "count"].to_numpy().astype(np.int32)

    sig = pd.read_csv(raw / rel["symbols"], usecols=["gene", "ensembl"]).drop_duplicates()
    if sig["ensembl"].duplicated().any():
        raise ValueError("sig_genes.csv maps an Ensembl ID to two symbols")
    symbol = sig.set_index("ensembl")["gene"]
    var = pd.DataFrame(index=pd.Index(genes, name=None))
    var["symbol"] = symbol.reindex(genes).fillna("").to_numpy().astype(str)

    image = np.asarray(Image.open(raw / rel["image"]).convert("RGB"))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    adata.uns["spatial"] = {sample: {
        "scalefactors": scalefactors,
        "metadata": {"source": "10x Visium, Space Ranger output of LIBD HumanPilot",
                     "lowres_image_file": f"dlpfc_{sample}_lowres.png",
                     "lowres_image_shape": list(image.shape)},
    }}

    # spots on tissue: in the lowres image the tissue is darker than the background
    xy = np.round(adata.obsm["spatial"] * s).astype(int)
    if xy.min() < 0 or xy[:, 0].max() >= image.shape[1] or xy[:, 1].max() >= image.shape[0]:
        raise ValueError("spots fall outside the lowres image")
    grey = image.mean(axis=2)
    on = grey[xy[:, 1], xy[:, 0]]
    print(f"  {sample}: mean grey under spots {on.mean():.1f}, whole image {grey.mean():.1f}, "
          f"fraction of spots on near-white pixels (>230): {(on > 230).mean():.3f}")

    file = f"dlpfc_{sample}.h5ad"
    png = f"dlpfc_{sample}_lowres.png"
    C.write_h5ad(adata, out / file)
    shutil.copyfile(raw / rel["image"], out / png)
    C.report(out, [file, png])
    print(f"  shape {adata.shape}, labelled {obs['layer'].notna().sum()}: "
          f"{obs['layer'].value_counts(sort=False).to_dict()}")

    if registry:
        ups = [
            C.upstream(raw, rel["rda"], "banksy_dlpfc", f"data/dlpfc{sample}.rda"),
            C.upstream(raw, rel["positions"], "humanpilot", f"10X/{sample}/tissue_positions_list.txt"),
            C.upstream(raw, rel["scalefactors"], "humanpilot", f"10X/{sample}/scalefactors_json.json"),
            C.upstream(raw, rel["image"], "humanpilot", f"10X/{sample}/tissue_lowres_image.png"),
            C.upstream(raw, rel["nuclei"], "humanpilot", f"Analysis/Histology/{sample}/tissue_spot_counts.csv"),
            C.upstream(raw, rel["layers"], "humanpilot", "10X/barcode_level_layer_map.tsv", byte_copy=False,
                       note="the upstream file holds all 12 slides; the course's raw copy keeps the rows of "
                            "151673 and 151674 only (same format), so the upstream hash is not recorded"),
            C.upstream(raw, rel["symbols"], "humanpilot", "Analysis/Layer_Guesses/sig_genes.csv"),
        ]
        C.register(
            f"dlpfc_{sample}", out, file, adata.shape,
            {**META,
             "description": (f"Human DLPFC 10x Visium slide {sample}: raw UMI counts of 5,000 HVGs in all "
                             "in-tissue spots, manual cortical layers (L1-L6, WM), nuclei per spot, 600 px "
                             "lowres H&E")},
            ups, parts={"lowres_image": {"file": png, "library_id": sample}})


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    for sample in SAMPLES:
        build(args.raw, args.out, sample, registry=not args.no_registry)


if __name__ == "__main__":
    main()
