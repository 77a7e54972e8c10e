"""HER2+ breast cancer, legacy ST (Andersson et al. 2021) -> data/her2st_<section>.h5ad (+ images for C2, C3).

Raw files (under ``--raw``, folder ``her2st_breast_ST/``; upstream URLs in data/README.md):

* ``ST-cnts/<sec>.tsv.gz``: spots x genes raw counts; row names ``<x>x<y>`` are the spot's array coordinates.
* ``ST-spotfiles/<sec>_selection.tsv``: ``x y new_x new_y pixel_x pixel_y selected``; ``pixel_*`` are the spot
  centres in the section's full-resolution H&E JPEG, ``new_*`` the array coordinates refined by spot detection.
* ``ST-pat-lbl/<sec>_labeled_coordinates.tsv``: pathologist's label per spot (sections A1, B1, C1, D1, E1,
  F1, G2, H1); joined on the rounded array ``x, y`` (its ``pixel_*`` columns are in another image frame).
* ``ST-cluster-lbl/<sec>-cluster-annotation.tsv.gz``: the paper's expression clusters (per patient).
* ``ST-imgs/C2_5714_HE_BT_C2.jpg``, ``ST-imgs/C3_5714_HE_BT_D1.jpg``: full-resolution H&E of C2 and C3.

Scale. A legacy ST array has 100 um spots on a 200 um centre-to-centre grid. Regressing ``pixel_x`` on
``new_x`` and ``pixel_y`` on ``new_y`` (all spots of the selection file, residuals < 0.01 px) gives the pixels
per 200 um step; ``px_per_um`` is the mean of the two slopes / 200 and ``spot_diameter_fullres`` = 100 um x
``px_per_um`` (about 145 px for C2/C3: 1.45 px/um, 0.69 um/px).

Images (C2, C3). ``her2st_<sec>_hires.jpg``: the whole H&E resized (Lanczos) so its longest side is
``HIRES_LONG_SIDE`` px (JPEG quality ``JPEG_QUALITY``, no chroma subsampling); ``tissue_hires_scalef`` is the
resize factor, so a spot is about 29 px wide in it. ``her2st_<sec>_tiles.jpg``: one tile per spot (obs order,
row-major, ``TILE_COLUMNS`` tiles per row), each the square of side ``TILE_CROP_DIAMETERS`` x
``spot_diameter_fullres`` around the spot centre in the FULL-resolution image, resized to ``TILE_PX`` px
(``stcore.data.load`` returns them as ``obsm["tiles"]``, n x TILE_PX x TILE_PX x 3 uint8).
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

Image.MAX_IMAGE_PIXELS = None

ROOT = "her2st_breast_ST"
ALL_SECTIONS = ("A1", "B1", "C1", "C2", "C3", "C4", "C5", "C6", "D1", "E1", "F1", "G2", "H1")
# shipped in data/: the eight labelled sections and the two with a full-resolution image
SECTIONS = ("A1", "B1", "C1", "C2", "C3", "D1", "E1", "F1", "G2", "H1")
LABELLED = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")
IMAGES = {"C2": "C2_5714_HE_BT_C2.jpg", "C3": "C3_5714_HE_BT_D1.jpg"}
UPSTREAM_IMAGES = {"C2": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg", "C3": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg"}
LABELS = ["invasive cancer", "cancer in situ", "immune infiltrate", "breast glands", "connective tissue",
          "adipose tissue", "undetermined"]

SPOT_DIAMETER_UM = 100.0
SPOT_SPACING_UM = 200.0
HIRES_LONG_SIDE = 2000
JPEG_QUALITY = 90
TILE_PX = 112
TILE_CROP_DIAMETERS = 1.5
TILE_COLUMNS = 16

META = {
    "citation": ("Andersson A, Larsson L, Stenbeck L, et al. Spatial deconvolution of HER2-positive breast cancer "
                 "delineates tumor-associated cell type interactions. Nat Commun 12, 6012 (2021). "
                 "doi:10.1038/s41467-021-26271-2"),
    "licence": "none stated (almaan/her2st has no licence file)",
    "recipe": "data/recipes/her2st.py",
}


def _key(x, y) -> pd.Index:
    return pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(np.round(x), np.round(y))])


def pixel_scale(sel: pd.DataFrame) -> tuple[float, float, float]:
    """Pixels per array step along x and y (least squares on all spots) and the pixels per um."""
    steps = []
    for a, p in (("new_x", "pixel_x"), ("new_y", "pixel_y")):
        A = np.c_[sel[a].to_numpy(), np.ones(len(sel))]
        coef, *_ = np.linalg.lstsq(A, sel[p].to_numpy(), rcond=None)
        resid = sel[p].to_numpy() - A @ coef
        if np.sqrt(np.mean(resid ** 2)) > 1.0:
            raise ValueError(f"pixel coordinates are not linear in the array coordinates ({a})")
        steps.append(float(coef[0]))
    return steps[0], steps[1], float(np.mean(steps)) / SPOT_SPACING_UM


def cut_tiles(image: Image.Image, centres: np.ndarray, crop: float) -> np.ndarray:
    """(n, TILE_PX, TILE_PX, 3) uint8: squares of side ``crop`` px around each (x, y) centre, resized."""
    tiles = np.empty((len(centres), TILE_PX, TILE_PX, 3), np.uint8)
    half = crop / 2
    w, h = image.size
    for i, (x, y) in enumerate(centres):
        box = (x - half, y - half, x + half, y + half)
        if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
            raise ValueError(f"tile {i} at ({x:.0f}, {y:.0f}) leaves the image")
        tiles[i] = np.asarray(image.resize((TILE_PX, TILE_PX), Image.Resampling.LANCZOS, box=box))
    return tiles


def mosaic(tiles: np.ndarray, columns: int) -> np.ndarray:
    n, th, tw, _ = tiles.shape
    rows = -(-n // columns)
    out = np.full((rows * th, columns * tw, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        out[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[i]
    return out


def build(raw, out, sec: str, registry: bool = True) -> None:
    rel = {
        "counts": f"{ROOT}/ST-cnts/{sec}.tsv.gz",
        "selection": f"{ROOT}/ST-spotfiles/{sec}_selection.tsv",
        "clusters": f"{ROOT}/ST-cluster-lbl/{sec}-cluster-annotation.tsv.gz",
    }
    if sec in LABELLED:
        rel["labels"] = f"{ROOT}/ST-pat-lbl/{sec}_labeled_coordinates.tsv"
    if sec in IMAGES:
        rel["image"] = f"{ROOT}/ST-imgs/{IMAGES[sec]}"

    counts = pd.read_csv(raw / rel["counts"], sep="\t", index_col=0)
    if counts.index.duplicated().any() or counts.columns.duplicated().any():
        raise ValueError(f"{sec}: duplicated spot or gene names in the counts")
    X = sparse.csr_matrix(counts.to_numpy(dtype=np.float32))
    C.check_integer(X, f"{sec} counts")
    xy = counts.index.str.split("x", expand=True)
    array_x = np.array([int(a) for a, _ in xy])
    array_y = np.array([int(b) for _, b in xy])

    sel = pd.read_csv(raw / rel["selection"], sep="\t")
    step_x, step_y, px_per_um = pixel_scale(sel)
    sel = sel[sel["selected"] == 1]
    sel.index = _key(sel["x"], sel["y"])
    if sel.index.duplicated().any():
        raise ValueError(f"{sec}: two selected spots share array coordinates")
    keys = _key(array_x, array_y)
    if not keys.isin(sel.index).all():
        raise ValueError(f"{sec}: {(~keys.isin(sel.index)).sum()} counted spots are not selected spots")
    sel = sel.loc[keys]

    obs = pd.DataFrame(index=pd.Index(counts.index.astype(str), name=None))
    obs["array_x"] = array_x.astype(np.int32)
    obs["array_y"] = array_y.astype(np.int32)
    if "labels" in rel:
        lab = pd.read_csv(raw / rel["labels"], sep="\t").dropna(subset=["x", "y"])
        lab.index = _key(lab["x"], lab["y"])
        if lab.index.duplicated().any() or not set(lab["label"]).issubset(LABELS):
            raise ValueError(f"{sec}: unexpected pathologist labels")
        obs["label"] = pd.Categorical(lab["label"].reindex(keys).to_numpy(), categories=LABELS)
    clusters = pd.read_csv(raw / rel["clusters"], sep="\t", index_col=0)
    clusters.index = _key(clusters["x"], clusters["y"])
    cl = clusters["label"].reindex(keys)
    obs["paper_cluster"] = pd.Categorical(
        [str(int(v)) if pd.notna(v) else np.nan for v in cl],
        categories=[str(v) for v in sorted(clusters["label"].dropna().astype(int).unique())])

    spot_diameter = SPOT_DIAMETER_UM * px_per_um
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(counts.columns.astype(str), name=None)))
    adata.obsm["spatial"] = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    scalefactors = {"spot_diameter_fullres": spot_diameter}
    metadata = {"px_per_um": px_per_um, "px_per_array_step_x": step_x, "px_per_array_step_y": step_y,
                "source": "legacy ST (100 um spots, 200 um apart); pixel coordinates of the full-resolution H&E"}
    parts = {}
    files = []
    if sec in IMAGES:
        image = Image.open(raw / rel["image"]).convert("RGB")
        w, h = image.size
        s = HIRES_LONG_SIDE / max(w, h)
        hires = image.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
        scalefactors["tissue_hires_scalef"] = s
        crop = TILE_CROP_DIAMETERS * spot_diameter
        tiles = cut_tiles(image, adata.obsm["spatial"], crop)
        metadata.update({"fullres_image_shape": [h, w, 3], "hires_image_file": f"her2st_{sec}_hires.jpg",
                         "tiles_file": f"her2st_{sec}_tiles.jpg", "tile_px": TILE_PX,
                         "tile_crop_fullres_px": crop, "tile_columns": TILE_COLUMNS})
        hires_file, tiles_file = f"her2st_{sec}_hires.jpg", f"her2st_{sec}_tiles.jpg"
        hires.save(out / hires_file, quality=JPEG_QUALITY, subsampling=0)
        Image.fromarray(mosaic(tiles, TILE_COLUMNS)).save(out / tiles_file, quality=JPEG_QUALITY, subsampling=0)
        parts = {"hires_image": {"file": hires_file, "library_id": sec},
                 "tiles": {"file": tiles_file, "tile_px": TILE_PX, "columns": TILE_COLUMNS}}
        files += [hires_file, tiles_file]
    adata.uns["spatial"] = {sec: {"scalefactors": scalefactors, "metadata": metadata}}

    file = f"her2st_{sec}.h5ad"
    C.write_h5ad(adata, out / file)
    C.report(out, [file] + files)
    msg = f"  shape {adata.shape}, px/um {px_per_um:.4f}, spot diameter {spot_diameter:.1f} px"
    if "label" in obs:
        msg += f", labelled {obs['label'].notna().sum()}"
    print(msg)

    if registry:
        ups = [C.upstream(raw, rel["counts"], "her2st", f"data/ST-cnts/{sec}.tsv.gz"),
               C.upstream(raw, rel["selection"], "her2st", f"data/ST-spotfiles/{sec}_selection.tsv"),
               C.upstream(raw, rel["clusters"], "her2st", f"res/ST-cluster/lbl/{sec}-cluster-annotation.tsv.gz")]
        if "labels" in rel:
            ups.append(C.upstream(raw, rel["labels"], "her2st", f"data/ST-pat/lbl/{sec}_labeled_coordinates.tsv"))
        if "image" in rel:
            ups.append(C.upstream(raw, rel["image"], "her2st", UPSTREAM_IMAGES[sec]))
        what = [f"HER2+ breast cancer legacy ST section {sec} (patient {sec[0]}): raw counts of all genes"]
        if sec in LABELLED:
            what.append("pathologist region labels")
        if sec in IMAGES:
            what.append(f"H&E downsampled to {HIRES_LONG_SIDE} px and {TILE_PX} px per-spot tiles from the "
                        "full-resolution image")
        what.append("the paper's expression clusters")
        C.register(f"her2st_{sec}", out, file, adata.shape, {**META, "description": ", ".join(what)}, ups,
                   parts=parts or None)


def main() -> None:
    def extra(parser):
        parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=ALL_SECTIONS,
                            help="sections to build (default: the ten shipped in data/; C4-C6 are unlabelled "
                                 "and have no image)")
    args = C.parse_args(__doc__.splitlines()[0], extra)
    for sec in args.sections:
        build(args.raw, args.out, sec, registry=not args.no_registry)


if __name__ == "__main__":
    main()
