"""Evaluation metrics used across the course.

Four families, each defined the way the benchmark that made it popular defines it:

* **Spatial domains** (SDMBench, Yuan et al. 2024): agreement with the ground truth (ARI, NMI, homogeneity) and
  spatial continuity of a labelling (ASW, CHAOS, PAS).
* **Gene prediction** (Li et al. 2022, Nat Methods 19:662): PCC, SSIM, RMSE, JS per held-out gene.
* **Deconvolution** (Li et al. 2022, cell-type deconvolution notebook): PCC, SSIM, RMSE, JSD per cell type.
  The gene and deconvolution definitions of RMSE and JS differ on purpose (z-score or not; divergence or distance).
* **Accuracy score** (Li et al. 2022): rank-aggregate of the four metrics above over competing methods.
* **Location reconstruction** (STEM-style tasks): per-cell distance and neighbourhood preservation.

Everything is sparse: neighbour searches use ``scipy.spatial.cKDTree``, never a dense N x N distance matrix
(the silhouette is the one O(N^2)-time metric; see :func:`asw` for subsampling).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, zscore
from sklearn import metrics as skm

from .graphs import knn_indices

__all__ = [
    "FAILED",
    "accuracy_score",
    "ari",
    "asw",
    "chaos",
    "deconvolution_scores",
    "deconvolution_table",
    "domain_scores",
    "gene_prediction_scores",
    "homogeneity",
    "location_error",
    "neighbourhood_preservation",
    "nmi",
    "pas",
    "spot_jsd",
    "summarise_location_error",
]

# --------------------------------------------------------------------------------------------------------------
# helpers


@contextmanager
def _quiet():
    """Silence numpy/scipy warnings where an undefined metric is meant to come out as NaN."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _labels_coords(labels, coords):
    labels = np.asarray(labels)
    coords = np.asarray(coords, dtype=float)
    if coords.ndim != 2 or len(coords) != len(labels):
        raise ValueError(f"coords has shape {coords.shape} but there are {len(labels)} labels; pass one (x, y) "
                         "row per spot, e.g. adata.obsm['spatial'].")
    return pd.factorize(labels)[0], coords


# --------------------------------------------------------------------------------------------------------------
# clustering against a ground truth


def _valid(truth, pred):
    """Integer codes of truth and pred on the spots whose truth is known."""
    t = pd.Series(truth).reset_index(drop=True)
    p = pd.Series(pred).reset_index(drop=True)
    if len(t) != len(p):
        raise ValueError(f"truth has {len(t)} spots and pred has {len(p)}; pass one label per spot in the same order.")
    keep = ~t.isna().to_numpy()
    if not keep.any():
        raise ValueError("every truth label is missing (NaN/None); there is nothing to score.")
    if p[keep].isna().any():
        raise ValueError("pred has missing labels on spots with a known truth; give every spot a predicted label.")
    return pd.factorize(t[keep])[0], pd.factorize(p[keep])[0]


def ari(truth, pred) -> float:
    """Adjusted Rand index (``sklearn.metrics.adjusted_rand_score``).

    Spots whose truth is missing (NaN, None, ``pd.NA`` or an unset category) are excluded first, as every DLPFC
    pipeline does with its NA-labelled spots.
    """
    return float(skm.adjusted_rand_score(*_valid(truth, pred)))


def nmi(truth, pred) -> float:
    """Normalised mutual information (arithmetic mean normalisation, sklearn's default).

    Spots whose truth is missing (NaN, None, ``pd.NA`` or an unset category) are excluded.
    """
    return float(skm.normalized_mutual_info_score(*_valid(truth, pred)))


def homogeneity(truth, pred) -> float:
    """Homogeneity: 1 when each predicted cluster holds spots of a single true domain.

    Spots whose truth is missing (NaN, None, ``pd.NA`` or an unset category) are excluded.
    """
    return float(skm.homogeneity_score(*_valid(truth, pred)))


def domain_scores(truth, pred) -> dict:
    """``{"ARI": ..., "NMI": ..., "HOM": ...}``; spots with missing truth are excluded."""
    return {"ARI": ari(truth, pred), "NMI": nmi(truth, pred), "HOM": homogeneity(truth, pred)}


# --------------------------------------------------------------------------------------------------------------
# spatial continuity of a labelling


def asw(embedding, labels, sample_size: int | None = None, seed: int = 0, rescale: bool = True) -> float:
    """Average silhouette width of ``labels`` in ``embedding`` (n, d), Euclidean.

    ``rescale=True`` returns (s + 1) / 2 in [0, 1] (higher = better separated), the convention of scib and of the
    SDMBench paper's tables. SDMBench's code (``SDMBench.py::compute_ASW``) returns the raw silhouette s in
    [-1, 1] and computes it on the *spatial coordinates* (a continuity score): pass ``adata.obsm["spatial"]`` and
    ``rescale=False`` to reproduce that exactly; pass an embedding for the usual cluster-separation score.

    The silhouette needs all pairwise distances (O(N^2) time, computed in chunks by sklearn, so memory stays
    small); ``sample_size`` scores a random subset of spots instead.
    """
    labels = pd.factorize(np.asarray(labels))[0]
    if not 2 <= labels.max() + 1 < len(labels):
        raise ValueError(f"the silhouette needs between 2 and n - 1 clusters; got {labels.max() + 1} clusters "
                         f"for {len(labels)} spots.")
    s = skm.silhouette_score(np.asarray(embedding, dtype=float), labels, sample_size=sample_size,
                             random_state=seed)
    return float((s + 1) / 2) if rescale else float(s)


def chaos(labels, coords) -> float:
    """Spatial CHAOS score (Shang & Zhou 2022, SpatialPCA; as coded in SDMBench). Lower = more continuous.

    Coordinates are standardised per axis (zero mean, unit population variance). Within each cluster k, every spot
    is joined to its nearest spot of the same cluster (the 1-NN graph of cluster k), and

        CHAOS = (1 / N) * sum_k sum_{i in k} d(i, 1-NN_k(i)),

    where N counts *all* spots. Clusters with 2 spots or fewer contribute 0 (SDMBench skips them).
    """
    labels, coords = _labels_coords(labels, coords)
    z = (coords - coords.mean(0)) / np.where(coords.std(0) > 0, coords.std(0), 1.0)
    total = 0.0
    for k in np.unique(labels):
        zk = z[labels == k]
        if len(zk) > 2:
            total += cKDTree(zk).query(zk, k=2)[0][:, 1].sum()
    return float(total / len(labels))


def pas(labels, coords, k: int = 10) -> float:
    """Percentage of abnormal spots (PAS; SDMBench). Lower = more continuous.

    A spot is abnormal when its label differs from the labels of *more than* k/2 of its k nearest spots
    (raw coordinates, the spot itself excluded). PAS = fraction of abnormal spots.
    """
    labels, coords = _labels_coords(labels, coords)
    nbrs = knn_indices(coords, k)
    n_diff = (labels[nbrs] != labels[:, None]).sum(axis=1)
    return float(np.mean(n_diff > k / 2))


# --------------------------------------------------------------------------------------------------------------
# gene prediction and deconvolution (Li et al. 2022)

#: Li et al. 2022's placeholder for a method that failed on a dataset: it then ranks last on every metric.
FAILED = {"PCC": -2.0, "SSIM": -2.0, "RMSE": 10.0, "JS": 10.0}


def _dense(a) -> np.ndarray:
    a = a.toarray() if sp.issparse(a) else np.asarray(a, dtype=float)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def _paired(truth, pred, names):
    """(truth, pred, names) as float arrays (n_obs, n_features); DataFrames are matched by column name."""
    if isinstance(truth, pd.DataFrame) and isinstance(pred, pd.DataFrame):
        if not truth.index.equals(pred.index) and set(truth.index) == set(pred.index):
            pred = pred.loc[truth.index]
        names = list(truth.columns.intersection(pred.columns, sort=False)) if names is None else list(names)
        missing = [g for g in names if g not in truth.columns or g not in pred.columns]
        if missing or not names:
            raise KeyError(f"features {missing[:5] or names} are not columns of both truth and pred; "
                           "pass names present in both (or no names to use the shared columns).")
        truth, pred = truth[names], pred[names]
    elif names is None:
        names = list(truth.columns) if isinstance(truth, pd.DataFrame) else None
    t, p = _dense(truth), _dense(pred)
    if t.shape != p.shape:
        raise ValueError(f"truth has shape {t.shape} and pred {p.shape}; both must be (n_obs, n_features) with "
                         "rows and columns in the same order.")
    names = list(range(t.shape[1])) if names is None else list(names)
    if len(names) != t.shape[1]:
        raise ValueError(f"{len(names)} names given for {t.shape[1]} columns; give one name per column.")
    return t, p, names


def _pearson(x, y):
    """Column-wise Pearson r; NaN where a column is constant (as scipy.stats.pearsonr)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    r = (xc * yc).sum(0) / np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum(0))
    return np.clip(r, -1.0, 1.0)


def _ssim(x, y):
    """Column-wise global SSIM of max-scaled vectors (Li et al. 2022's ``cal_ssim`` with L = 1).

    l = (2 mu1 mu2 + C1) / (mu1^2 + mu2^2 + C1),  c = (2 s1 s2 + C2) / (s1^2 + s2^2 + C2),
    s = (s12 + C3) / (s1 s2 + C3),  SSIM = l c s,  C1 = 0.01^2, C2 = 0.03^2, C3 = C2 / 2, population std.
    """
    x, y = x / x.max(0), y / y.max(0)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = x.std(0), y.std(0)
    s12 = ((x - mu1) * (y - mu2)).mean(0)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    c3 = c2 / 2
    lum = (2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1)
    con = (2 * s1 * s2 + c2) / (s1 ** 2 + s2 ** 2 + c2)
    struct = (s12 + c3) / (s1 * s2 + c3)
    return lum * con * struct


def gene_prediction_scores(truth, pred, genes=None) -> pd.DataFrame:
    """Li et al. 2022 gene-prediction metrics, one row per gene, each over the cells/spots.

    Parameters
    ----------
    truth, pred : array (n_obs, n_genes), sparse matrix or DataFrame
        Measured and predicted expression. Two DataFrames are matched by gene name (and by index when both hold
        the same obs names in another order); otherwise columns and rows are matched by position.
    genes : list, optional
        Genes to score (DataFrames) or the names of the columns (arrays).

    Returns
    -------
    DataFrame (n_genes, 4) with columns

    * ``PCC``: Pearson r of the raw vectors.
    * ``SSIM``: global SSIM (see ``_ssim``) after dividing each vector by its own max.
    * ``RMSE``: sqrt(mean((z_t - z_p)^2)) after z-scoring each gene (``scipy.stats.zscore``, ddof=0).
    * ``JS``: Jensen-Shannon *divergence*, natural log, after dividing each vector by its sum:
      JS = KL(P || M) / 2 + KL(Q || M) / 2 with M = (P + Q) / 2 (``scipy.stats.entropy``).

    NaN predictions are replaced by 1e-20 before every metric, as Li et al.'s script does. A metric that is
    undefined is returned as NaN instead of raising: PCC and RMSE when either vector is constant (zero variance),
    SSIM and JS when either vector is all zero. ``DataFrame.mean()`` skips those NaNs when averaging over genes.
    """
    t, p, names = _paired(truth, pred, genes)
    p = np.where(np.isnan(p), 1e-20, p)
    with _quiet():
        out = {"PCC": _pearson(t, p), "SSIM": _ssim(t, p),
               "RMSE": np.sqrt(((zscore(t, axis=0) - zscore(p, axis=0)) ** 2).mean(0))}
        P, Q = t / t.sum(0), p / p.sum(0)
        M = (P + Q) / 2
        out["JS"] = 0.5 * entropy(P, M, axis=0) + 0.5 * entropy(Q, M, axis=0)
    return pd.DataFrame(out, index=pd.Index(names, name="gene"))


def _clip_props(p):
    return np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)


def deconvolution_scores(truth, pred, cell_types=None) -> pd.DataFrame:
    """Li et al. 2022 deconvolution metrics, one row per cell type, each over the spots.

    ``truth`` and ``pred`` are proportions (n_spots, n_cell_types), arrays or DataFrames (matched as in
    :func:`gene_prediction_scores`). Predictions are first set to 0 where NaN and clipped to [0, 1].

    Columns: ``PCC`` (Pearson r), ``SSIM`` (as for genes: max-scaled, L = 1), ``RMSE`` on the *raw* proportions
    (no z-score, unlike the gene task) and ``JSD``, the Jensen-Shannon *distance*
    (``scipy.spatial.distance.jensenshannon``: square root of the divergence, natural log, vectors sum-normalised
    internally; unlike the gene task's divergence). Undefined values (a constant or all-zero vector) are NaN.
    """
    t, p, names = _paired(truth, pred, cell_types)
    p = _clip_props(p)
    with _quiet():
        out = {"PCC": _pearson(t, p), "SSIM": _ssim(t, p), "RMSE": np.sqrt(((t - p) ** 2).mean(0)),
               "JSD": jensenshannon(t, p, axis=0)}
    return pd.DataFrame(out, index=pd.Index(names, name="cell_type"))


def deconvolution_table(truth: pd.DataFrame, estimates: dict, *, per_spot_jsd: bool = False) -> pd.DataFrame:
    """One row per estimate: the :func:`deconvolution_scores` averaged over cell types.

    ``truth`` is a DataFrame (spots x cell types); each estimate is a DataFrame of proportions for the same spots,
    its columns matched to ``truth`` by name (a type it lacks counts as 0). With ``per_spot_jsd`` a column
    ``"JSD (per spot)"`` adds the mean of :func:`spot_jsd`.
    """
    rows = {}
    for name, est in estimates.items():
        pred = pd.DataFrame(est).reindex(columns=truth.columns, fill_value=0.0).to_numpy()
        row = deconvolution_scores(truth.to_numpy(), pred, list(truth.columns)).mean()
        if per_spot_jsd:
            row["JSD (per spot)"] = float(np.nanmean(spot_jsd(truth.to_numpy(), pred)))
        rows[name] = row
    return pd.DataFrame(rows).T


def spot_jsd(truth, pred, base: float | None = None) -> np.ndarray:
    """Extra (not one of Li et al. 2022's four): Jensen-Shannon distance per *spot* across cell types, (n_spots,).

    The spot-wise view used by e.g. Li H. et al. 2023 (who use ``base=2``). Same NaN -> 0 and [0, 1] clipping
    of the predictions as :func:`deconvolution_scores`; natural log unless ``base`` is given.
    """
    t, p, _ = _paired(truth, pred, None)
    with _quiet():
        return jensenshannon(t, _clip_props(p), axis=1, base=base)


def accuracy_score(table: pd.DataFrame, failed=()) -> pd.Series:
    """Li et al. 2022 accuracy score (AS) of each method on one dataset.

    Parameters
    ----------
    table : DataFrame (n_methods, 4)
        Per-method means over genes (or cell types) in columns ``PCC, SSIM, RMSE`` and ``JS`` (or ``JSD``), e.g.
        ``pd.DataFrame({m: scores[m].mean() for m in scores}).T``.
    failed : list of method names
        Methods that failed on this dataset; their rows are set (or added) to :data:`FAILED`
        (PCC = SSIM = -2, RMSE = JS = 10) so they rank last.

    Returns
    -------
    Series ``AS`` indexed by method. For each metric the N methods are ranked (PCC, SSIM: higher is better;
    RMSE, JS: lower is better); the best gets N, the worst 1, ties share the average rank. AS = mean over the four
    metrics of rank / N. Li et al. report the mean of AS over datasets.
    """
    table = table.copy()
    js = "JSD" if "JSD" in table.columns and "JS" not in table.columns else "JS"
    cols = ["PCC", "SSIM", "RMSE", js]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise KeyError(f"table lacks columns {missing}; it needs PCC, SSIM, RMSE and JS (or JSD).")
    for m in failed:
        table.loc[m, cols] = [FAILED["PCC"], FAILED["SSIM"], FAILED["RMSE"], FAILED["JS"]]
    if table[cols].isna().any().any():
        bad = list(table.index[table[cols].isna().any(axis=1)])
        raise ValueError(f"methods {bad} have NaN metric means; average with DataFrame.mean() (skips NaN) or "
                         "list them in failed=[...] to give them the failed-method placeholder.")
    ranks = pd.DataFrame({c: table[c].rank(ascending=c in ("PCC", "SSIM")) for c in cols})
    return (ranks / len(table)).mean(axis=1).rename("AS")


# --------------------------------------------------------------------------------------------------------------
# location reconstruction


def _coord_pair(true_coords, pred_coords):
    a, b = np.asarray(true_coords, dtype=float), np.asarray(pred_coords, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"true_coords {a.shape} and pred_coords {b.shape} must both be (n_cells, n_dims), "
                         "one row per cell in the same order.")
    return a, b


def location_error(true_coords, pred_coords) -> np.ndarray:
    """Euclidean distance between each cell's true and predicted position, (n_cells,), in coordinate units."""
    a, b = _coord_pair(true_coords, pred_coords)
    return np.linalg.norm(a - b, axis=1)


def summarise_location_error(errors) -> dict:
    """``{"mean", "median", "q90"}`` of per-cell location errors (from :func:`location_error`)."""
    e = np.asarray(errors, dtype=float)
    return {"mean": float(e.mean()), "median": float(np.median(e)), "q90": float(np.quantile(e, 0.9))}


def neighbourhood_preservation(true_coords, pred_coords, k: int = 10) -> float:
    """Mean over cells of |kNN_true(i) & kNN_pred(i)| / k (neighbours exclude the cell itself). 1 = perfect.

    Scale-free: a prediction that is right up to rotation, translation or scaling scores 1.
    """
    a, b = _coord_pair(true_coords, pred_coords)
    both = np.sort(np.hstack([knn_indices(a, k), knn_indices(b, k)]), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # each index appears at most once per list
    return float(np.mean(shared / k))
