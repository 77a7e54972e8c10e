"""Shared helpers of the data recipes (not part of the ``stcore`` package).

Every recipe converts raw files (byte-for-byte copies of files in public repositories, laid out as in the
course's raw-data folder) into the small files under ``data/`` and records them in
``stcore/data/registry.yaml``: the output files with their sha256, the shape, the citation and licence, and the
upstream raw files with their pinned GitHub URL and sha256.

Run a recipe from the repository root, e.g.::

    python data/recipes/dlpfc.py --raw ../shared/data

``--raw`` defaults to ``../shared/data`` relative to the repository root. If you have no such folder,
``stcore.data.fetch_upstream(name)`` downloads the raw files of a dataset into a folder with that layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import yaml

from stcore.data.loaders import file_sha256 as sha256

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
REGISTRY = REPO / "stcore" / "data" / "registry.yaml"
DEFAULT_RAW = REPO.parent / "shared" / "data"

# Upstream repositories at the commits the raw files were taken from.
SOURCES = {
    "humanpilot": ("LieberInstitute/HumanPilot", "044446d6bd8fc154aa74f7be62ec67effb1ec376"),
    "banksy_dlpfc": ("prabhakarlab/Banksy", "2276ad331791d3894b055abf3478857dc69f5133"),
    "banksy_hypothalamus": ("prabhakarlab/Banksy", "3a310a384b1f553603c645df068c0efe1d40c280"),
    "her2st": ("almaan/her2st", "85df7411b987a7dec3feff9718b869a7a82091ec"),
    "spacexr": ("dmcable/spacexr", "744153c633da7ff70d0988308a160633fcf44af7"),
    "clustsignal": ("SydneyBioX/clustSIGNAL", "7a89b484f29dbd90045a790123e37646feb6312c"),
}


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """Common command line: ``--raw``, ``--out``, ``--no-registry``; ``extra(parser)`` adds a recipe's own."""
    parser = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(parser)
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW,
                        help="folder with the raw files (default: ../shared/data relative to the repository root)")
    parser.add_argument("--out", type=Path, default=DATA, help="output folder (default: the repository's data/)")
    parser.add_argument("--no-registry", action="store_true", help="do not update stcore/data/registry.yaml")
    args = parser.parse_args()
    if not args.raw.is_dir():
        parser.error(f"raw folder {args.raw} does not exist; pass --raw, or download the raw files with "
                     "stcore.data.fetch_upstream(name) and pass the folder it returns")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def upstream(raw: Path, rel: str, source: str, repo_path: str, note: str | None = None,
             byte_copy: bool = True) -> dict:
    """Describe one raw file: its path in the raw folder, its pinned GitHub URL and its sha256.

    ``byte_copy=False`` marks a raw file that is not a byte-for-byte copy of the upstream file (its upstream
    hash is then unknown and recorded as ``None``; the hash of the local copy is kept as ``local_sha256``).
    """
    repo, commit = SOURCES[source]
    entry = {
        "path": rel,
        "url": f"https://raw.githubusercontent.com/{repo}/{commit}/{repo_path}",
        "sha256": sha256(raw / rel) if byte_copy else None,
    }
    if not byte_copy:
        entry["local_sha256"] = sha256(raw / rel)
    if note:
        entry["note"] = note
    return entry


def check_integer(X, what: str) -> None:
    data = X.data if hasattr(X, "data") else np.asarray(X)
    if data.size and (data.min() < 0 or not np.array_equal(data, np.round(data))):
        raise ValueError(f"{what}: expected non-negative integer counts")


def register(name: str, out: Path, file: str, shape, meta: dict, upstream_files: list[dict],
             parts: dict | None = None) -> None:
    """Add or replace the entry ``name`` of ``stcore/data/registry.yaml`` (entries kept sorted by name)."""
    entry = {
        "file": file,
        "sha256": sha256(out / file),
        "shape": [int(shape[0]), int(shape[1])],
        **meta,
    }
    if parts:
        entry["parts"] = {key: {**spec, "sha256": sha256(out / spec["file"])} for key, spec in parts.items()}
    entry["upstream"] = upstream_files
    registry = {}
    if REGISTRY.exists():
        registry = yaml.safe_load(REGISTRY.read_text()) or {}
    datasets = registry.get("datasets", {})
    datasets[name] = entry
    registry = {"datasets": {k: datasets[k] for k in sorted(datasets)}}
    header = ("# Datasets of data/ (written by data/recipes/*.py; do not edit by hand).\n"
              "# file/parts: paths relative to the data folder; upstream: the raw files a recipe reads,\n"
              "# with their GitHub URL at a pinned commit (see data/README.md).\n")
    REGISTRY.write_text(header + yaml.safe_dump(registry, sort_keys=False, allow_unicode=True, width=110))


def write_h5ad(adata, path: Path) -> None:
    """Write ``adata`` as gzip-compressed h5ad, then repack every dataset with HDF5's byte-shuffle filter.

    ``adata.write_h5ad(path, compression="gzip")`` writes the file; the repack rewrites each array with
    ``shuffle=True, compression="gzip", compression_opts=9`` (filters built into every HDF5 library, so any
    h5ad reader opens the file), which makes sparse count matrices about 30 % smaller, and stores string arrays
    (gene and spot names, categories) as fixed-length ASCII, which HDF5 can compress (variable-length strings
    sit uncompressed in a heap: 15,000 gene names cost 0.4 MB). Objects, attributes and their order are kept,
    so the file is an ordinary h5ad that anndata reads back unchanged. The output is byte-for-byte
    deterministic.
    """
    path = Path(path)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp, compression="gzip")
    with h5py.File(tmp, "r") as src, h5py.File(path, "w", track_order=True) as dst:
        _copy_attrs(src, dst)
        _repack_group(src, dst)
    tmp.unlink()


def _copy_attrs(src, dst) -> None:
    for key, value in src.attrs.items():
        dst.attrs[key] = value


def _repack_group(src, dst) -> None:
    for name, obj in src.items():
        if isinstance(obj, h5py.Group):
            group = dst.create_group(name, track_order=True)
            _copy_attrs(obj, group)
            _repack_group(obj, group)
            continue
        data = obj[()]
        if obj.shape != () and obj.size and h5py.check_string_dtype(obj.dtype) is not None:
            data = _fixed_ascii(data)
        if obj.shape == () or obj.size == 0:
            out = dst.create_dataset(name, data=data, dtype=obj.dtype)
        else:
            out = dst.create_dataset(name, data=data, dtype=data.dtype if data.dtype.kind == "S" else obj.dtype,
                                     chunks=True, shuffle=True,
                                     compression="gzip", compression_opts=9)
        _copy_attrs(obj, out)


def _fixed_ascii(data: np.ndarray) -> np.ndarray:
    """Variable-length strings -> fixed-length ASCII bytes (which HDF5 compresses; vlen strings it does not).

    anndata reads fixed-length string arrays back as ``str``. Arrays with non-ASCII text are left as they are.
    """
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in data.ravel()]
    if not all(x.isascii() for x in items):
        return data
    width = max(1, max(len(x) for x in items))
    return np.array([x.encode() for x in items], dtype=f"S{width}").reshape(data.shape)


def report(out: Path, files: list[str]) -> None:
    for f in files:
        print(f"  {f}: {(out / f).stat().st_size / 1e6:.2f} MB  sha256 {sha256(out / f)[:12]}")
