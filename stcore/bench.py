"""Benchmarks: every method of a task on the same data, protocol, seeds and metrics.

``stcore bench TASK`` (or :func:`run`) runs each (method, dataset, seed) in a fresh Python process so that wall time
and peak memory are measured per run, and writes ``<out>/<task>.csv`` (one row per run) and ``<out>/<task>.md``
(mean ± standard deviation over seeds).

============  ===========================================================================================
task          protocol
============  ===========================================================================================
domains       DLPFC 151673 and 151674, K = 7; ARI, NMI, homogeneity against the manual layers
              (unlabelled spots excluded), of the method's labels and of the same labels refined by a
              6-nearest-spot majority vote (``*_refined``). ``synthetic_100k`` (``--datasets``): a
              100,000-spot slide with planted domains and an H&E-like image, for time and memory at scale
deconv        MERFISH hypothalamus cells summed on a 100 µm grid (known composition) + the Moffitt
              scRNA-seq reference (cross-platform), and seqFISH mouse embryo cells of one half summed on a
              Visium-sized grid + the other half as the reference; Li et al. 2022 deconvolution metrics,
              averaged over cell types. ``synthetic_100k`` (``--datasets``): 100,000 pseudo-spots of the
              Moffitt reference on a hexagonal lattice, for time and memory at scale
impute        MERFISH hypothalamus + Moffitt reference, shared genes split in 5 folds, each fold hidden and
              predicted; Li et al. 2022 gene metrics, averaged over genes
locate        MERFISH hypothalamus, one section: a random half of the cells keeps its positions (the spatial
              reference), the other half is placed from expression alone; location error (µm) and
              neighbourhood preservation
graphs        graph builders on 100,000 random spots: time and memory
============  ===========================================================================================

Peak memory is the peak resident set size of the run's process while the method runs (``peak_rss_mb``, which
includes about 0.5 GB of libraries and the data; on Linux the peak reached while loading or simulating the data is
reset first) and its rise over the size after loading the data (``peak_delta_mb``, the method's own footprint).
In FAST mode (``STCORE_FAST=1``) datasets are subsampled and one seed is used, to check that the benchmark runs.
Method options (e.g. ``histology=False``) are passed with ``options``; each option set is its own row of the
leaderboard, so a method can be compared with and without the image.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import config

__all__ = ["TASK_DATASETS", "format_table", "impute_folds", "load_task_data", "run", "run_one", "summarise"]

TASK_DATASETS = {
    "domains": ["dlpfc_151673", "dlpfc_151674"],
    "deconv": ["merfish_grid100", "seqfish_embryo_grid"],
    "impute": ["merfish_moffitt"],
    "locate": ["merfish_half_section"],
    "graphs": ["random_100k"],
}
GRAPH_BUILDERS = ["knn_graph", "radius_graph", "visium_hex_graph", "feature_knn_graph"]

def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """Peak resident size since the last :func:`_reset_peak` (Linux ``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Forget the peak reached while loading or simulating the data, so the peak is the method's (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _subsample(adata, n: int, seed: int = 0):
    if adata.n_obs <= n:
        return adata
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n, replace=False))
    return adata[keep].copy()


def _merfish_pair(fast: bool):
    from .data import merfish_moffitt_pair

    cells, reference = merfish_moffitt_pair()
    return (_subsample(cells, 1500) if fast else cells), reference


def load_task_data(task: str, dataset: str, fast: bool):
    """``(adata, reference, truth)`` for one benchmark dataset (see the module docstring)."""
    from . import data

    if task == "domains":
        if dataset == "synthetic_100k":
            n = 10_000 if fast else 100_000
            return data.synthetic.toy_domains(n_spots=n, n_genes=200, n_domains=7, seed=0), None, None
        adata = data.load(dataset)
        return (data.central_patch(adata, 800) if fast else adata), None, None
    if task == "deconv":
        return _deconv_data(dataset, fast)
    cells, reference = _merfish_pair(fast)
    if task == "impute":
        shared = cells.var_names[cells.var_names.isin(reference.var_names)]
        return cells[:, shared].copy(), reference, None
    if task == "locate":
        section = cells[cells.obs["z"] == cells.obs["z"].max()]
        half = np.random.default_rng(0).permutation(section.n_obs) < section.n_obs // 2
        spatial, query = section[half].copy(), section[~half].copy()
        truth = np.asarray(query.obsm["spatial"]).copy()
        del query.obsm["spatial"]
        return spatial, query, truth
    raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASK_DATASETS)}.")


#: Grid windows of the deconvolution datasets (units of ``obsm["spatial"]``: µm for MERFISH; for the seqFISH
#: embryo 0.2 source units, about 55 µm, the side of a Visium spot, holding a median 8 cells of one half).
DECONV_GRIDS = {"merfish_grid100": 100.0, "seqfish_embryo_grid": 0.2}


def _deconv_data(dataset: str, fast: bool):
    """``(spots, reference, true proportions)`` of one deconvolution dataset."""
    from . import data

    if dataset == "synthetic_100k":
        _, reference = data.merfish_moffitt_pair()
        n = 10_000 if fast else 100_000
        spots = data.synthetic.pseudo_spots(reference, n_spots=n, seed=0)
        rows, cols, coords = data.synthetic.hex_lattice(n)
        spots.obs["array_row"], spots.obs["array_col"] = rows, cols
        spots.obsm["spatial"] = coords
        return spots, reference, spots.obsm["proportions"]
    if dataset not in DECONV_GRIDS:
        raise ValueError(f"Unknown deconvolution dataset {dataset!r}; choose one of "
                         f"{sorted(DECONV_GRIDS) + ['synthetic_100k']}.")
    if dataset == "merfish_grid100":
        cells, reference = _merfish_pair(fast)
    else:
        cells, reference = data.seqfish_embryo_pair()
        cells = _subsample(cells, 1500) if fast else cells
    spots = data.synthetic.grid_spots(cells, spot_size=DECONV_GRIDS[dataset], cell_type_key="cell_type")
    spots = spots[:, spots.var_names.isin(reference.var_names)].copy()
    return spots, reference, spots.obsm["proportions"]


def _score_domains(result, method_name):
    from .cluster import refine
    from .metrics import domain_scores

    truth_key = "layer" if "layer" in result.obs else "domain"
    labels = np.asarray(result.obs[f"domain_{method_name}"])
    refined = refine(labels, coords=np.asarray(result.obsm["spatial"], dtype=float), k=6)
    raw = domain_scores(result.obs[truth_key], labels)
    return {**raw, **{f"{k}_refined": v for k, v in domain_scores(result.obs[truth_key], refined).items()}}


def _score_deconv(result, method_name, truth):
    from .metrics import deconvolution_scores

    pred = result.obsm[f"proportions_{method_name}"].reindex(columns=truth.columns, fill_value=0.0)
    return deconvolution_scores(truth.to_numpy(), pred.to_numpy(), list(truth.columns)).mean().to_dict()


def impute_folds(genes, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """The imputation protocol's gene folds: ``genes`` shuffled with ``seed`` and split into ``n_folds`` parts of
    (nearly) equal size; each fold in turn is hidden from the spatial data and predicted."""
    return np.array_split(np.random.default_rng(seed).permutation(np.asarray(genes)), n_folds)


def _run_impute(cls, options, spatial, reference, seed, n_folds):
    from .metrics import gene_prediction_scores

    folds = impute_folds(spatial.var_names, n_folds, seed)
    per_gene = []
    for fold in folds:
        visible = spatial[:, ~spatial.var_names.isin(fold)].copy()
        result = cls(**{**options, "genes": list(fold)}).run(visible, reference)
        pred = result.obsm[f"imputed_{cls.name}"][list(fold)].to_numpy()
        truth = spatial[:, list(fold)].X
        truth = truth.toarray() if hasattr(truth, "toarray") else np.asarray(truth)
        per_gene.append(gene_prediction_scores(truth, pred, list(fold)))
    return pd.concat(per_gene).mean().to_dict()


def _score_locate(result, method_name, truth):
    from .metrics import location_error, neighbourhood_preservation

    pred = np.asarray(result.obsm[f"spatial_{method_name}"])
    return {"location_error_um": float(np.median(location_error(truth, pred))),
            "neighbourhood_preservation": float(neighbourhood_preservation(truth, pred, k=10))}


def _run_graph_builder(name: str, fast: bool, seed: int):
    from . import graphs

    n = 10_000 if fast else 100_000
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n))
    if name == "visium_hex_graph":
        row = np.repeat(np.arange(side), side)
        col = np.tile(np.arange(side), side) * 2 + row % 2
        before = _rss_mb()
        start = time.perf_counter()
        ei = graphs.visium_hex_graph(row, col)
    else:
        coords = rng.random((n, 2)) * 100 * side  # about one spot per 100 x 100 px, like Visium
        X = rng.normal(size=(n, 30)) if name == "feature_knn_graph" else None
        before = _rss_mb()
        start = time.perf_counter()
        if name == "knn_graph":
            ei = graphs.knn_graph(coords, k=6)
        elif name == "radius_graph":
            ei = graphs.radius_graph(coords, r=150.0)
        else:
            ei = graphs.feature_knn_graph(X, k=15)
    elapsed = time.perf_counter() - start
    return {"n_nodes": n, "n_edges": int(ei.shape[1]), "seconds": elapsed, "rss_before_mb": before}


def run_one(task: str, method: str, dataset: str, seed: int, options: dict | None = None) -> dict:
    """Run one (method, dataset, seed) in this process and return its row of the leaderboard."""
    cfg = config.get()
    options = dict(options or {})
    if task == "graphs":
        row = _run_graph_builder(method, cfg.fast, seed)
        peak = _peak_mb()
        return {"task": task, "method": method, "dataset": dataset, "seed": seed, "wall_s": row.pop("seconds"),
                "peak_rss_mb": peak, "peak_delta_mb": peak - row.pop("rss_before_mb"), **row}
    from .methods import get_method, method_options

    cls = get_method(method)
    params = method_options(cls)
    options = {k: v for k, v in options.items() if k in params}  # e.g. histology=False skips the baselines
    if "seed" in params:
        options.setdefault("seed", seed)
    if task == "domains" and "n_domains" in params:
        options.setdefault("n_domains", 7)
    adata, reference, truth = load_task_data(task, dataset, cfg.fast)
    _reset_peak()
    before = _rss_mb()
    start = time.perf_counter()
    if task == "impute":
        scores = _run_impute(cls, options, adata, reference, seed, n_folds=2 if cfg.fast else 5)
    else:
        result = cls(**options).run(adata, reference)
    elapsed = time.perf_counter() - start
    peak = _peak_mb()
    if task == "domains":
        scores = _score_domains(result, cls.name)
    elif task == "deconv":
        scores = _score_deconv(result, cls.name, truth)
    elif task == "locate":
        scores = _score_locate(result, cls.name, truth)
    return {"task": task, "method": method, "dataset": dataset, "seed": seed, **scores, "wall_s": elapsed,
            "peak_rss_mb": peak, "peak_delta_mb": peak - before, "n_obs": adata.n_obs,
            "options": json.dumps({k: v for k, v in options.items() if k != "seed"}, sort_keys=True)}


def _spawn(task, method, dataset, seed, options) -> dict:
    payload = json.dumps(dict(task=task, method=method, dataset=dataset, seed=seed, options=options))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "stcore.bench", payload], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {"task": task, "method": method, "dataset": dataset, "seed": seed, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def run(task: str, *, methods: list[str] | None = None, seeds: list[int] | None = None,
        datasets: list[str] | None = None, options: dict | list[dict] | None = None,
        out_dir: str | Path | None = "results", progress: bool = True) -> pd.DataFrame:
    """Benchmark ``methods`` (default: all registered for ``task``) and write the leaderboard to ``out_dir``.

    ``options`` is one dict of method options or a list of them (one leaderboard row per method and option set,
    e.g. ``[{}, {"histology": False}]``); a method receives only the options its constructor takes.
    """
    from tqdm.auto import tqdm

    cfg = config.get()
    if task not in TASK_DATASETS:
        raise ValueError(f"Unknown benchmark task {task!r}; choose one of {sorted(TASK_DATASETS)}.")
    if methods is None:
        if task == "graphs":
            methods = GRAPH_BUILDERS
        else:
            from .methods import available

            methods = available(task)["method"].tolist()
    seeds = seeds if seeds is not None else cfg.pick([0, 1, 2], [0])
    datasets = datasets or TASK_DATASETS[task]
    variants = options if isinstance(options, list) else [options or {}]
    jobs = [(m, d, s, o) for m in methods for o in _distinct_options(task, m, variants) for d in datasets
            for s in seeds]
    rows = [_spawn(task, m, d, s, o) for m, d, s, o in tqdm(jobs, desc=f"bench {task}", disable=not progress)]
    table = pd.DataFrame(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / f"{task}.csv", index=False)
        (out / f"{task}.md").write_text(format_table(table) + "\n")
    return table


def _distinct_options(task: str, method: str, variants: list[dict]) -> list[dict]:
    """The option sets that differ for ``method`` once the options it does not take are dropped."""
    if task == "graphs":
        return variants[:1]
    from .methods import get_method, method_options

    params = method_options(get_method(method))
    seen, out = set(), []
    for options in variants:
        key = json.dumps({k: v for k, v in options.items() if k in params}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(options)
    return out


def _group_keys(table: pd.DataFrame) -> list[str]:
    """Rows are grouped per method and dataset, and per option set when several were run."""
    keys = ["method", "dataset"]
    if "options" in table and table["options"].fillna("{}").nunique() > 1:
        keys.append("options")
    return keys


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every numeric column, per method, dataset (and option set)."""
    if "error" in table and table["error"].notna().any():
        table = table[table["error"].isna()]
    numeric = [c for c in table.columns if c not in ("seed",) and pd.api.types.is_numeric_dtype(table[c])]
    grouped = table.groupby(_group_keys(table), sort=False)[numeric]
    return grouped.mean().join(grouped.std(ddof=0), rsuffix="_sd")


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 and float(value).is_integer() else f"{value:.3g}"


def format_table(table: pd.DataFrame) -> str:
    """A markdown leaderboard: mean ± sd over seeds, and any failed runs."""
    lines = []
    failed = table[table["error"].notna()] if "error" in table else table.iloc[:0]
    ok = table.drop(failed.index)
    if len(ok):
        numeric = [c for c in ok.columns if c not in ("seed",) and pd.api.types.is_numeric_dtype(ok[c])]
        keys = _group_keys(ok)
        g = ok.groupby(keys, sort=False)[numeric]
        mean, sd, n = g.mean(), g.std(ddof=0).fillna(0), g.size()
        header = keys + ["seeds"] + numeric
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in mean.index:
            cells = [_fmt(mean.loc[key, c]) + (f" ± {sd.loc[key, c]:.2g}" if n[key] > 1 else "") for c in numeric]
            lines.append("| " + " | ".join([str(k) for k in key] + [str(n[key])] + cells) + " |")
    for _, row in failed.iterrows():
        lines.append(f"\nFAILED {row['method']} on {row['dataset']} (seed {row['seed']}): {row['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(json.dumps(run_one(job["task"], job["method"], job["dataset"], job["seed"], job.get("options"))))
