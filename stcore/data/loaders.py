"""Loaders of the course's real datasets (the files in ``data/``) and of their upstream raw files.

Every dataset is described in ``registry.yaml`` (next to this module): its file (relative to the data folder,
``stcore.config.get().data_dir``), the file's sha256, the shape ``[n_obs, n_vars]``, citation, licence,
description, the recipe that made it, optional ``parts`` (images and tiles kept as JPEG/PNG beside the h5ad) and
``upstream``: the raw files the recipe reads, each with its GitHub URL at a pinned commit and its sha256.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .. import config

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")

# (resolved path, size, mtime_ns) -> sha256 already checked in this process
_VERIFIED: dict[tuple[str, int, int], str] = {}


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    with open(REGISTRY_PATH) as fh:
        return yaml.safe_load(fh)["datasets"]


def names() -> list[str]:
    """Names of the datasets in the registry, sorted."""
    return sorted(_registry())


def info(name: str) -> dict:
    """The registry entry of ``name`` (a copy).

    Raises
    ------
    KeyError
        ``name`` is not a known dataset; the message lists the known names.
    """
    reg = _registry()
    if name not in reg:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(reg))} "
                       "(see stcore.data.list_datasets())")
    return yaml.safe_load(yaml.safe_dump(reg[name]))


def list_datasets() -> pd.DataFrame:
    """One row per dataset: ``name, shape, description, licence, citation, file``."""
    rows = [{"name": n, "shape": tuple(e["shape"]), "description": e["description"], "licence": e["licence"],
             "citation": e["citation"], "file": e["file"]} for n, e in sorted(_registry().items())]
    return pd.DataFrame(rows, columns=["name", "shape", "description", "licence", "citation", "file"])


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (shared with data/recipes)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checked_path(name: str, file: str, sha256: str, data_dir: Path, entry: dict) -> Path:
    path = data_dir / file
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset {name!r}: {path} does not exist. The course's data files come with the repository "
            f"(clone it with its data/ folder, or point STCORE_DATA_DIR at a folder that has them). With internet "
            f"you can rebuild the file: raw = stcore.data.fetch_upstream({name!r}), then "
            f"`python {entry.get('recipe', 'data/recipes/<recipe>.py')} --raw <raw> --out {data_dir}`.")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) != sha256:
        actual = file_sha256(path)
        if actual != sha256:
            raise ValueError(
                f"dataset {name!r}: {path} has sha256 {actual[:16]}..., the registry expects {sha256[:16]}...: the "
                f"file is damaged or from another version. Restore it from the repository (git checkout -- "
                f"data/{file}) or rebuild it with {entry.get('recipe', 'its recipe in data/recipes/')}.")
        _VERIFIED[key] = sha256
    return path


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _split_mosaic(mosaic: np.ndarray, n: int, tile_px: int, columns: int) -> np.ndarray:
    """(rows*tile_px, columns*tile_px, 3) mosaic -> (n, tile_px, tile_px, 3), tiles in row-major order."""
    rows = -(-n // columns)
    if mosaic.shape != (rows * tile_px, columns * tile_px, 3):
        raise ValueError(f"tile mosaic has shape {mosaic.shape}, expected {(rows * tile_px, columns * tile_px, 3)} "
                         f"for {n} tiles of {tile_px} px in {columns} columns: rebuild it with its recipe")
    tiles = mosaic.reshape(rows, tile_px, columns, tile_px, 3).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(tiles.reshape(rows * columns, tile_px, tile_px, 3)[:n])


def load(name: str):
    """Load a course dataset from the data folder as AnnData.

    The file's sha256 is checked against the registry once per process, and its shape after reading.
    Images stored beside the h5ad are put where scanpy/squidpy expect them,
    ``uns["spatial"][library_id]["images"]["lowres" | "hires"]`` (H x W x 3 uint8); per-spot tiles become
    ``obsm["tiles"]`` (n_spots x H x W x 3 uint8, in obs order). Every Visium/ST library gets an ``images``
    dict (empty when the dataset has no image).

    Parameters
    ----------
    name : a name from :func:`list_datasets`, e.g. ``"dlpfc_151673"``, ``"her2st_C2"``,
        ``"merfish_hypothalamus"``, ``"moffitt_scrna"``.

    Returns
    -------
    anndata.AnnData
        Raw counts in ``.X`` (CSR float32), coordinates in ``obsm["spatial"]`` (x, y), labels in ``obs``;
        data/README.md describes every field.

    Raises
    ------
    KeyError
        Unknown ``name`` (the message lists the known names).
    FileNotFoundError
        The file is not in the data folder (the message says how to get it).
    ValueError
        The file's sha256 or shape differs from the registry.
    """
    import anndata as ad
    from scipy import sparse

    entry = info(name)
    data_dir = Path(config.get().data_dir)
    path = _checked_path(name, entry["file"], entry["sha256"], data_dir, entry)
    parts = {key: _checked_path(name, spec["file"], spec["sha256"], data_dir, entry)
             for key, spec in (entry.get("parts") or {}).items()}

    adata = ad.read_h5ad(path)
    if list(adata.shape) != list(entry["shape"]):
        raise ValueError(f"dataset {name!r}: {path} has shape {adata.shape}, the registry says "
                         f"{tuple(entry['shape'])}; rebuild it with {entry.get('recipe', 'its recipe')}")
    if sparse.issparse(adata.X) and adata.X.format != "csr":
        adata.X = adata.X.tocsr()

    for lib in (adata.uns.get("spatial") or {}).values():
        lib.setdefault("images", {})
    for key, part_path in parts.items():
        spec = entry["parts"][key]
        if key in ("lowres_image", "hires_image"):
            lib = adata.uns["spatial"][str(spec["library_id"])]
            lib["images"][key.split("_")[0]] = _read_rgb(part_path)
        elif key == "tiles":
            adata.obsm["tiles"] = _split_mosaic(_read_rgb(part_path), adata.n_obs, int(spec["tile_px"]),
                                                int(spec["columns"]))
        else:  # pragma: no cover - the registry only holds the kinds above
            raise ValueError(f"dataset {name!r}: unknown part {key!r} in the registry")
    return adata


def upstream_files(name: str) -> list[dict]:
    """The raw upstream files of a dataset: dicts with ``path`` (relative to a raw-data folder), ``url``
    (GitHub raw URL at a pinned commit) and ``sha256`` (``None`` where the course's raw copy is not
    byte-identical to the upstream file; ``note`` says why)."""
    return info(name)["upstream"]


def fetch_upstream(name: str, dest: str | Path | None = None, progressbar: bool = False) -> Path:
    """Download the raw upstream files of ``name`` (needs internet; checks each sha256 with pooch).

    The files are laid out as the recipes expect (``dest/<path>``), so ``python data/recipes/<recipe>.py
    --raw <dest>`` rebuilds the dataset's file(s).

    Parameters
    ----------
    name : dataset name
    dest : folder for the raw files; default ``pooch.os_cache("stcore") / "upstream"``
    progressbar : show pooch's progress bars

    Returns
    -------
    pathlib.Path : the raw-data folder ``dest``
    """
    import pooch

    files = upstream_files(name)
    dest = Path(dest) if dest is not None else Path(pooch.os_cache("stcore")) / "upstream"
    for f in files:
        target = dest / f["path"]
        known = f"sha256:{f['sha256']}" if f.get("sha256") else None
        pooch.retrieve(f["url"], known_hash=known, fname=target.name, path=target.parent,
                       progressbar=progressbar)
    return dest


def central_patch(adata, n: int):
    """The ``n`` spots nearest the tissue's centre (median position): a contiguous patch, so spatial structure
    survives where a random subsample would thin it out. Used to shrink a slide in FAST mode."""
    if adata.n_obs <= n:
        return adata
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    order = np.argsort(((xy - np.median(xy, 0)) ** 2).sum(1))
    return adata[np.sort(order[:n])].copy()
