"""Collect the deconvolution comparison into ``book/results/`` (used by ``make bench-deconv``).

    python tools/deconv_results.py hippocampus nnls dstg gtad:epochs=150 ...   # stcore run each on the Visium pair
    python tools/deconv_results.py collect                     # merge the leaderboards and the hippocampus maps

``hippocampus`` runs ``stcore run METHOD data/hippocampus_visium.h5ad --reference data/hippocampus_dropseq.h5ad``
for each method (the command line a user would type), writing ``results/hippocampus/<method>.h5ad``.
``collect`` writes ``book/results/deconv_benchmark.csv`` (every run of ``results/deconv*/*/deconv.csv`` on the two
gridded datasets), ``deconv_100k.csv`` (the 100,000-spot runs), ``hippocampus_proportions.csv`` (one row per
method and spot, one column per cell type) and ``graphst_domains.csv`` (GraphST's spatial domains on DLPFC, from
``stcore bench domains --methods graphst``).
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


def hippocampus(runs: list[str]) -> None:
    """``runs``: ``method`` or ``method:key=value,...`` (the options become ``--key value`` flags)."""
    out = RESULTS / "hippocampus"
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        method, _, options = run.partition(":")
        flags = []
        for pair in filter(None, options.split(",")):
            key, value = pair.split("=")
            flags += [f"--{key.replace('_', '-')}", value]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "stcore.cli", "run", method, str(SPOTS), "--reference", str(REFERENCE),
                        "-o", str(out / f"{method}.h5ad"), *flags], check=True)
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
    domains = RESULTS / "graphst_domains" / "domains.csv"
    if domains.exists():
        pd.read_csv(domains).to_csv(BOOK / "graphst_domains.csv", index=False)
    print(f"{len(runs)} runs and {len(maps)} hippocampus maps written to {BOOK}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["hippocampus"] and len(sys.argv) > 2:
        hippocampus(sys.argv[2:])
    elif sys.argv[1:] == ["collect"]:
        collect()
    else:
        sys.exit(__doc__)
