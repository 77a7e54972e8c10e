"""Collect the deconvolution comparison into ``book/results/`` (used by ``make bench-deconv``).

    python tools/deconv_results.py hippocampus nnls,dstg,...   # stcore run each method on the real Visium pair
    python tools/deconv_results.py collect                     # merge the leaderboards and the hippocampus maps

``hippocampus`` runs ``stcore run METHOD data/hippocampus_visium.h5ad --reference data/hippocampus_dropseq.h5ad``
for each method (the command line a user would type), writing ``results/hippocampus/<method>.h5ad``.
``collect`` writes ``book/results/deconv_benchmark.csv`` (every run of ``results/deconv*/*/deconv.csv`` on the two
gridded datasets), ``deconv_100k.csv`` (the 100,000-spot runs) and ``hippocampus_proportions.csv`` (one row per
method and spot, one column per cell type).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS, BOOK = REPO / "results", REPO / "book" / "results"
SPOTS, REFERENCE = REPO / "data" / "hippocampus_visium.h5ad", REPO / "data" / "hippocampus_dropseq.h5ad"


def hippocampus(methods: list[str]) -> None:
    out = RESULTS / "hippocampus"
    out.mkdir(parents=True, exist_ok=True)
    for method in methods:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stcore.cli", "run", method, str(SPOTS), "--reference", str(REFERENCE),
                        "-o", str(out / f"{method}.h5ad")], check=True)
        print(f"{method}: {time.perf_counter() - start:.0f} s")


def collect() -> None:
    BOOK.mkdir(parents=True, exist_ok=True)
    runs = pd.concat([pd.read_csv(f) for f in sorted(RESULTS.glob("deconv*/*/deconv.csv"))], ignore_index=True)
    runs = runs.drop_duplicates(["method", "dataset", "seed", "options"], keep="last")
    big = runs["dataset"] == "synthetic_100k"
    runs[~big].to_csv(BOOK / "deconv_benchmark.csv", index=False)
    runs[big].to_csv(BOOK / "deconv_100k.csv", index=False)
    maps = []
    for file in sorted((RESULTS / "hippocampus").glob("*.h5ad")):
        result = ad.read_h5ad(file)
        props = result.obsm[f"proportions_{file.stem}"].copy()
        props.insert(0, "spot", result.obs_names)
        props.insert(0, "method", file.stem)
        maps.append(props)
    pd.concat(maps, ignore_index=True).to_csv(BOOK / "hippocampus_proportions.csv", index=False, float_format="%.4g")
    print(f"{len(runs)} runs and {len(maps)} hippocampus maps written to {BOOK}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["hippocampus"] and len(sys.argv) == 3:
        hippocampus(sys.argv[2].split(","))
    elif sys.argv[1:] == ["collect"]:
        collect()
    else:
        sys.exit(__doc__)
