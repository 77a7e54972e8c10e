"""Tests of stcore.data's loaders and of the files in data/ (shapes and labels as documented upstream)."""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import sparse

import stcore.data
from stcore.data import loaders

DATA = Path(__file__).resolve().parents[1] / "data"
HER2ST = {"A1": (346, 15045), "B1": (295, 15109), "C1": (176, 15557), "C2": (187, 15706), "C3": (180, 15821),
          "D1": (306, 15661), "E1": (587, 15701), "F1": (691, 14861), "G2": (467, 15258), "H1": (613, 15029)}
HER2ST_LABELLED = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")
SPATIAL = ["dlpfc_151673", "dlpfc_151674", *(f"her2st_{s}" for s in HER2ST), "hippocampus_visium",
           "merfish_hypothalamus", "merfish_vignette", "seqfish_embryo"]
ALL = sorted(SPATIAL + ["hippocampus_dropseq", "moffitt_scrna", "starfysh_breast_signatures"])


@pytest.fixture(autouse=True, scope="module")
def _data_dir():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STCORE_DATA_DIR", str(DATA))
        yield


@functools.cache
def _load(name):
    return stcore.data.load(name)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- registry

def test_registry_has_every_dataset():
    assert stcore.data.names() == ALL
    table = stcore.data.list_datasets()
    assert list(table.columns[:5]) == ["name", "shape", "description", "licence", "citation"]
    assert table.set_index("name").loc["dlpfc_151673", "shape"] == (3639, 5000)
    assert table["citation"].str.len().min() > 40 and table["licence"].str.len().min() > 3


@pytest.mark.parametrize("name", ALL)
def test_registry_sha256_matches_files(name):
    entry = stcore.data.info(name)
    assert _sha256(DATA / entry["file"]) == entry["sha256"]
    for part in (entry.get("parts") or {}).values():
        assert _sha256(DATA / part["file"]) == part["sha256"]
    assert (DATA.parent / entry["recipe"]).is_file()


def test_upstream_files_are_pinned_github_urls():
    url = re.compile(r"^https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/[\w./-]+$")
    for name in ALL:
        files = stcore.data.upstream_files(name)
        assert files, name
        for f in files:
            assert url.match(f["url"]), f["url"]
            assert not f["path"].startswith("/") and ".." not in f["path"]
            if f["sha256"] is None:  # a raw copy that is not byte-identical to upstream must say why
                assert f["note"] and re.fullmatch(r"[0-9a-f]{64}", f["local_sha256"])
            else:
                assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"])
    urls = [f["url"] for f in stcore.data.upstream_files("dlpfc_151673")]
    assert ("https://raw.githubusercontent.com/prabhakarlab/Banksy/2276ad331791d3894b055abf3478857dc69f5133/"
            "data/dlpfc151673.rda") in urls


def test_fetch_upstream_builds_pooch_calls(monkeypatch, tmp_path):
    import pooch

    calls = []
    monkeypatch.setattr(pooch, "retrieve", lambda url, known_hash, fname, path, progressbar: calls.append(
        (url, known_hash, fname, Path(path))))
    dest = stcore.data.fetch_upstream("moffitt_scrna", dest=tmp_path)
    assert dest == tmp_path
    files = stcore.data.upstream_files("moffitt_scrna")
    assert [c[0] for c in calls] == [f["url"] for f in files]
    for (url, known, fname, path), f in zip(calls, files):
        assert known == "sha256:" + f["sha256"]
        assert path / fname == tmp_path / f["path"]


# ---------------------------------------------------------------- errors

def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError, match="unknown dataset 'dlpfc_999'.*dlpfc_151673.*moffitt_scrna"):
        stcore.data.load("dlpfc_999")


def test_missing_file_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("STCORE_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"fetch_upstream\('moffitt_scrna'\).*recipes/moffitt_scrna.py"):
        stcore.data.load("moffitt_scrna")


def test_damaged_file_fails_checksum(monkeypatch, tmp_path):
    target = tmp_path / "moffitt_scrna.h5ad"
    shutil.copyfile(DATA / "moffitt_scrna.h5ad", target)
    with open(target, "r+b") as fh:
        fh.seek(5000)
        byte = fh.read(1)
        fh.seek(5000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv("STCORE_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="sha256.*git checkout"):
        stcore.data.load("moffitt_scrna")


def test_checksum_computed_once_per_process(monkeypatch, tmp_path):
    shutil.copyfile(DATA / "moffitt_scrna.h5ad", tmp_path / "moffitt_scrna.h5ad")
    monkeypatch.setenv("STCORE_DATA_DIR", str(tmp_path))
    calls = []
    real = loaders.file_sha256
    monkeypatch.setattr(loaders, "file_sha256", lambda p: calls.append(p) or real(p))
    stcore.data.load("moffitt_scrna")
    stcore.data.load("moffitt_scrna")
    assert len(calls) == 1


def test_wrong_shape_is_reported(monkeypatch):
    registry = loaders._registry()
    patched = {**registry, "moffitt_scrna": {**registry["moffitt_scrna"], "shape": [1308, 135]}}
    monkeypatch.setattr(loaders, "_registry", lambda: patched)
    with pytest.raises(ValueError, match=r"shape \(1308, 134\).*\(1308, 135\)"):
        stcore.data.load("moffitt_scrna")


def test_synthetic_is_optional(monkeypatch):
    monkeypatch.delattr(stcore.data, "synthetic", raising=False)
    monkeypatch.setitem(sys.modules, "stcore.data.synthetic", None)  # as if the file were missing
    with pytest.raises(AttributeError, match="synthetic"):
        stcore.data.synthetic  # noqa: B018
    assert callable(stcore.data.load)


# ---------------------------------------------------------------- content shared by all datasets

@pytest.mark.parametrize("name", ALL)
def test_counts_are_nonnegative_integers(name):
    adata = _load(name)
    assert sparse.isspmatrix_csr(adata.X) or isinstance(adata.X, sparse.csr_array)
    assert adata.X.dtype == np.float32
    data = adata.X.data
    assert data.min() >= 0 and np.array_equal(data, np.round(data))
    assert adata.obs_names.is_unique and adata.var_names.is_unique


@pytest.mark.parametrize("name", SPATIAL)
def test_coordinates_finite_and_spots_on_image(name):
    adata = _load(name)
    xy = adata.obsm["spatial"]
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
    for lib in adata.uns.get("spatial", {}).values():
        for res, image in lib["images"].items():
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            p = xy * lib["scalefactors"][f"tissue_{res}_scalef"]
            assert p.min() >= 0 and (p[:, 0] < image.shape[1]).all() and (p[:, 1] < image.shape[0]).all()


def test_load_is_fast():
    start = time.perf_counter()
    stcore.data.load("dlpfc_151674")  # the largest file
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- DLPFC

def test_dlpfc_151673_layers():
    adata = _load("dlpfc_151673")
    assert adata.shape == (3639, 5000)
    layer = adata.obs["layer"]
    assert list(layer.cat.categories) == ["L1", "L2", "L3", "L4", "L5", "L6", "WM"]
    assert layer.notna().sum() == 3611
    assert layer.value_counts().to_dict() == {"L1": 273, "L2": 253, "L3": 989, "L4": 218, "L5": 673,
                                              "L6": 692, "WM": 513}


def test_dlpfc_151674_shape():
    adata = _load("dlpfc_151674")
    assert adata.shape == (3673, 5000)
    assert adata.obs["layer"].notna().sum() == 3635


@pytest.mark.parametrize("name", ["dlpfc_151673", "dlpfc_151674"])
def test_dlpfc_fields_and_spots_on_tissue(name):
    adata = _load(name)
    sample = name.split("_")[1]
    lib = adata.uns["spatial"][sample]
    image = lib["images"]["lowres"]
    assert image.shape == (600, 600, 3)
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    assert 90 < lib["scalefactors"]["spot_diameter_fullres"] < 100
    # spots sit on tissue: darker than the slide outside the capture area (the image's outer frame)
    xy = np.round(adata.obsm["spatial"] * lib["scalefactors"]["tissue_lowres_scalef"]).astype(int)
    grey = image.astype(float).mean(axis=2)
    frame = np.r_[grey[:40].ravel(), grey[-40:].ravel(), grey[:, :40].ravel(), grey[:, -40:].ravel()]
    assert grey[xy[:, 1], xy[:, 0]].mean() < frame.mean() - 30
    # Visium hex grid: array_row + array_col is even
    assert ((adata.obs["array_row"] + adata.obs["array_col"]) % 2 == 0).all()
    assert adata.var_names.str.startswith("ENSG").all()
    assert "PLP1" in set(adata.var["symbol"]) and (adata.var["symbol"] == "").sum() > 4000
    assert adata.obs["n_nuclei"].min() >= 0 and 3 < adata.obs["n_nuclei"].mean() < 6


# ---------------------------------------------------------------- HER2+ ST

@pytest.mark.parametrize("section", sorted(HER2ST))
def test_her2st_sections(section):
    adata = _load(f"her2st_{section}")
    assert adata.shape == HER2ST[section]
    obs = adata.obs
    assert list(adata.obs_names[:3]) == [f"{x}x{y}" for x, y in zip(obs["array_x"][:3], obs["array_y"][:3])]
    lib = adata.uns["spatial"][section]
    px_per_um = lib["metadata"]["px_per_um"]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100 * px_per_um)
    # neighbouring spots are 200 um apart
    step = np.median(np.abs(np.diff(adata.obsm["spatial"][np.argsort(obs["array_x"].to_numpy()
                                                                     + 1000 * obs["array_y"].to_numpy()), 0])))
    assert step == pytest.approx(200 * px_per_um, rel=0.03)
    if section in HER2ST_LABELLED:
        assert obs["label"].notna().all()
        assert list(obs["label"].cat.categories) == ["invasive cancer", "cancer in situ", "immune infiltrate",
                                                     "breast glands", "connective tissue", "adipose tissue",
                                                     "undetermined"]
    else:
        assert "label" not in obs


def test_her2st_a1_labels():
    counts = _load("her2st_A1").obs["label"].value_counts().to_dict()
    assert counts["invasive cancer"] == 282 and counts["cancer in situ"] == 21 and sum(counts.values()) == 346


@pytest.mark.parametrize("section", ["C2", "C3"])
def test_her2st_images_and_tiles(section):
    adata = _load(f"her2st_{section}")
    lib = adata.uns["spatial"][section]
    sf, meta = lib["scalefactors"], lib["metadata"]
    hires = lib["images"]["hires"]
    assert max(hires.shape[:2]) == 2000
    assert max(meta["fullres_image_shape"][:2]) * sf["tissue_hires_scalef"] == pytest.approx(2000)
    assert sf["spot_diameter_fullres"] == pytest.approx(145.4, abs=0.5)
    assert sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"] >= 25  # sub-spot work needs >= 25 px/spot
    tiles = adata.obsm["tiles"]
    assert tiles.shape == (adata.n_obs, 112, 112, 3) and tiles.dtype == np.uint8
    # each tile matches the hires image around its spot (and not around the next spot)
    crop = meta["tile_crop_fullres_px"] * sf["tissue_hires_scalef"]
    k = round(crop)

    def hires_crop(i):
        x, y = adata.obsm["spatial"][i] * sf["tissue_hires_scalef"]
        box = (x - crop / 2, y - crop / 2, x + crop / 2, y + crop / 2)
        return np.asarray(Image.fromarray(hires).resize((k, k), Image.Resampling.BILINEAR, box=box)).mean(2)

    def tile_small(i):
        return np.asarray(Image.fromarray(tiles[i]).resize((k, k), Image.Resampling.BILINEAR)).mean(2)

    idx = range(0, adata.n_obs - 1, 15)
    same = [np.corrcoef(hires_crop(i).ravel(), tile_small(i).ravel())[0, 1] for i in idx]
    other = [np.corrcoef(hires_crop(i).ravel(), tile_small(i + 1).ravel())[0, 1] for i in idx]
    assert min(same) > 0.9 and max(other) < 0.5


# ---------------------------------------------------------------- MERFISH and scRNA-seq

def test_merfish_hypothalamus():
    adata = _load("merfish_hypothalamus")
    assert adata.shape == (11162, 140)
    assert adata.var["blank"].sum() == 5 and adata.var_names[adata.var["blank"]].str.startswith("Blank_").all()
    classes = adata.obs["cell_class"].value_counts()
    assert len(classes) == 16 and classes["Inhibitory"] == 3409 and classes["OD Mature 2"] == 1794
    assert classes["Ambiguous"] == 1543 and classes["Astrocyte"] == 1402 and classes["Excitatory"] == 808
    assert sorted(adata.obs["z"].unique()) == [0.21, 0.26]
    assert adata.obsm["smfish_intensity"].shape == (11162, 21)
    ok = adata.obs["counts_recovered"].to_numpy()
    assert ok.sum() == 11160
    assert adata.X[~ok].nnz == 0
    # counts x unit gives back the released values
    rec = adata.X[ok].multiply(adata.obs["count_unit"].to_numpy()[ok, None]).tocsr()
    released = adata.layers["volume_normalised"][ok].tocsr()
    assert (rec != 0).sum() == released.nnz
    assert np.allclose(rec.toarray(), released.toarray(), rtol=1e-3, atol=0)
    assert 1500 < np.ptp(adata.obsm["spatial"][:, 0]) < 2000  # um


def test_moffitt_scrna():
    adata = _load("moffitt_scrna")
    assert adata.shape == (1308, 134)
    types = adata.obs["cell_type"].value_counts()
    assert len(types) == 14 and types["Inhibitory"] == 100 and types["Ependymal"] == 69
    assert (adata.obs["n_umi"].to_numpy() >= np.asarray(adata.X.sum(1)).ravel()).all()
    merfish = _load("merfish_hypothalamus")
    assert set(adata.var_names) <= set(merfish.var_names)


def test_merfish_vignette():
    adata = _load("merfish_vignette")
    assert adata.shape == (750, 134)
    assert list(adata.var_names) == list(_load("moffitt_scrna").var_names)


def test_seqfish_embryo_and_its_disjoint_pair():
    adata = _load("seqfish_embryo")
    assert adata.shape == (14185, 351)
    assert (adata.obs["z"] == 2).sum() == 7661 and adata.obs["cell_type"].nunique() == 23
    assert adata.X.min() >= 0 and (np.diff(adata.X.indptr) > 0).all()
    assert (np.minimum.reduceat(adata.X.data, adata.X.indptr[:-1]) == 1).all()  # the recipe's one assumption
    cells, reference = stcore.data.seqfish_embryo_pair()
    assert not set(cells.obs["cell_id"]) & set(reference.obs["cell_id"])  # no physical cell on both sides
    assert abs(cells.n_obs - reference.n_obs) < 0.05 * cells.n_obs and "spatial" not in reference.obsm
    assert set(cells.obs["cell_type"]) == set(reference.obs["cell_type"])
    assert reference.obs["cell_type"].nunique() == 16


def test_hippocampus_pair():
    spots, reference = stcore.data.hippocampus_pair()
    assert spots.shape == (313, 276) and reference.shape == (510, 307)
    assert (reference.obs["cell_type"].value_counts() == 30).all() and reference.obs["cell_type"].nunique() == 17
    assert len(spots.var_names.intersection(reference.var_names)) == 124


def test_central_patch_is_contiguous():
    from stcore.data import central_patch, synthetic

    adata = synthetic.toy_domains(n_spots=400, n_genes=10, n_domains=2, image=False, seed=0)
    patch = central_patch(adata, 100)
    xy = patch.obsm["spatial"]
    centre = np.median(adata.obsm["spatial"], 0)
    radius = np.sqrt(((xy - centre) ** 2).sum(1)).max()
    outside = np.sqrt(((adata.obsm["spatial"] - centre) ** 2).sum(1)) > radius
    assert patch.n_obs == 100 and outside.sum() == 300
    assert central_patch(adata, 1000) is adata
