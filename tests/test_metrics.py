import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr
from sklearn import metrics as skm

from stcore import metrics as M


def grid(n=10):
    """(n*n, 2) unit square grid, x = column, y = row."""
    yy, xx = np.mgrid[0:n, 0:n]
    return np.column_stack([xx.ravel(), yy.ravel()]).astype(float)


# ---------------------------------------------------------------- clustering against a truth

def test_missing_truth_is_excluded_from_ari_nmi_hom():
    truth = np.array([0, 0, 1, 1, 2, 2, np.nan, np.nan])
    pred = np.array([5, 5, 7, 7, 9, 9, 5, 7])
    assert M.ari(truth, pred) == pytest.approx(1.0)
    assert M.nmi(truth, pred) == pytest.approx(1.0)
    assert M.homogeneity(truth, pred) == pytest.approx(1.0)
    # without the exclusion the score would be lower
    assert skm.adjusted_rand_score(np.nan_to_num(truth, nan=-1), pred) < 0.9


@pytest.mark.parametrize("missing", [None, np.nan, pd.NA])
def test_missing_truth_kinds(missing):
    truth = pd.Series(["L1", "L1", "L2", missing, "L2", "L3"], dtype=object)
    pred = [0, 0, 1, 0, 2, 2]
    keep = [0, 1, 2, 4, 5]
    expect = skm.adjusted_rand_score(np.array(truth)[keep], np.array(pred)[keep])
    assert M.ari(truth, pred) == pytest.approx(expect)


def test_unset_category_is_missing():
    truth = pd.Categorical(["a", "b", "zz", "a"], categories=["a", "b"])  # "zz" becomes NaN
    assert M.ari(truth, [1, 2, 1, 1]) == pytest.approx(1.0)


def test_domain_scores_match_sklearn():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 4, 200), rng.integers(0, 3, 200)
    s = M.domain_scores(truth, pred)
    assert set(s) == {"ARI", "NMI", "HOM"}
    assert s["ARI"] == pytest.approx(skm.adjusted_rand_score(truth, pred))
    assert s["NMI"] == pytest.approx(skm.normalized_mutual_info_score(truth, pred))
    assert s["HOM"] == pytest.approx(skm.homogeneity_score(truth, pred))


def test_clustering_errors():
    with pytest.raises(ValueError, match="one label per spot"):
        M.ari([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="missing"):
        M.ari([np.nan, np.nan], [0, 1])
    with pytest.raises(ValueError, match="pred has missing"):
        M.ari([0, 1, 1], [0, np.nan, 1])


# ---------------------------------------------------------------- spatial continuity

def test_asw_rescaled_and_raw():
    rng = np.random.default_rng(1)
    X = np.vstack([rng.normal(0, 1, (30, 2)), rng.normal(4, 1, (30, 2))])
    labels = np.repeat([0, 1], 30)
    s = skm.silhouette_score(X, labels)
    assert M.asw(X, labels) == pytest.approx((s + 1) / 2)
    assert M.asw(X, labels, rescale=False) == pytest.approx(s)
    assert 0 <= M.asw(X, rng.integers(0, 2, 60)) <= 1
    with pytest.raises(ValueError, match="clusters"):
        M.asw(X, np.zeros(60))


def test_chaos_half_split_vs_checkerboard():
    xy = grid(10)
    half = (xy[:, 0] >= 5).astype(int)
    checker = (xy.sum(1) % 2).astype(int)
    sd = np.sqrt(8.25)  # population std of 0..9: unit spacing becomes 1/sd after standardising
    # half split: every spot's nearest same-label spot is 1 step away; checkerboard: diagonal, sqrt(2) away
    assert M.chaos(half, xy) == pytest.approx(1 / sd)
    assert M.chaos(checker, xy) == pytest.approx(np.sqrt(2) / sd)
    assert M.chaos(half, xy) < M.chaos(checker, xy)


def test_chaos_skips_tiny_clusters_and_is_scale_free():
    xy = grid(10)
    labels = np.zeros(100, int)
    labels[[0, 99]] = 1  # a 2-spot cluster contributes 0 but still counts in N
    assert M.chaos(labels, xy) == pytest.approx(98 * (1 / np.sqrt(8.25)) / 100)
    assert M.chaos(labels, xy * 37 + 5) == pytest.approx(M.chaos(labels, xy))


def test_pas_half_split_checkerboard_and_one_outlier():
    xy = grid(10)
    half = (xy[:, 0] >= 5).astype(int)
    checker = (xy.sum(1) % 2).astype(int)
    assert M.pas(half, xy, k=4) == 0.0       # boundary spots: 1 of 4 neighbours differs
    # all 4 neighbours differ, except at the 4 corners: 2 edge neighbours differ, 2 diagonal ones agree
    assert M.pas(checker, xy, k=4) == pytest.approx(96 / 100)
    outlier = half.copy()
    outlier[22] = 1                          # an isolated wrong label deep inside domain 0
    assert M.pas(outlier, xy, k=4) == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="neighbours"):
        M.pas(half, xy, k=100)
    with pytest.raises(ValueError, match="coords"):
        M.pas(half, xy[:50])


# ---------------------------------------------------------------- gene prediction

def test_gene_pcc_matches_scipy():
    rng = np.random.default_rng(2)
    t = rng.poisson(4, (40, 5)).astype(float)
    p = t + rng.normal(0, 2, (40, 5))
    got = M.gene_prediction_scores(t, p)["PCC"].to_numpy()
    assert np.allclose(got, [pearsonr(t[:, g], p[:, g])[0] for g in range(5)])


def test_ssim_by_hand():
    t = np.array([0.0, 1, 2, 3])
    p = np.array([1.0, 1, 2, 4])
    x, y = t / 3, p / 4  # each divided by its own max
    mx, my = x.mean(), y.mean()
    sx, sy = np.sqrt(((x - mx) ** 2).mean()), np.sqrt(((y - my) ** 2).mean())
    sxy = ((x - mx) * (y - my)).mean()
    c1, c2 = 1e-4, 9e-4
    expect = ((2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * sx * sy + c2) / (sx**2 + sy**2 + c2)
              * (sxy + c2 / 2) / (sx * sy + c2 / 2))
    assert M.gene_prediction_scores(t, p)["SSIM"].iloc[0] == pytest.approx(expect)
    assert M.gene_prediction_scores(t, 7 * t)["SSIM"].iloc[0] == pytest.approx(1.0)  # max-scaling removes 7


def test_gene_rmse_is_z_scored_but_deconvolution_rmse_is_raw():
    t = np.array([[0.1], [0.2], [0.3], [0.4]])
    p = 0.5 * t + 0.1                        # perfect up to an affine map
    assert M.gene_prediction_scores(t, p)["RMSE"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    raw = np.sqrt(((t - p) ** 2).mean())
    assert M.deconvolution_scores(t, p)["RMSE"].iloc[0] == pytest.approx(raw)
    assert raw > 0.01


def test_js_divergence_for_genes_distance_for_deconvolution():
    rng = np.random.default_rng(3)
    t, p = rng.random((30, 3)), rng.random((30, 3))
    js_div = M.gene_prediction_scores(t, p)["JS"].to_numpy()
    jsd = M.deconvolution_scores(t, p)["JSD"].to_numpy()
    ref = np.array([jensenshannon(t[:, g], p[:, g]) for g in range(3)])  # natural log
    assert np.allclose(jsd, ref)
    assert np.allclose(js_div, ref ** 2)     # the divergence is the squared distance
    # hand case: P = (1, 0), Q = (0, 1) -> JS divergence = log 2
    one = M.gene_prediction_scores(np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]]))
    assert one["JS"].iloc[0] == pytest.approx(np.log(2))


def test_nan_predictions_and_constant_vectors_do_not_crash():
    t = np.array([[1.0, 2, 0], [2, 2, 0], [3, 2, 0]])
    p = np.array([[1.0, 1, 1], [np.nan, 2, 1], [3, 3, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = M.gene_prediction_scores(t, p, genes=["a", "const", "zero"])
        d = M.deconvolution_scores(t / 3, p / 3)
    assert list(g.index) == ["a", "const", "zero"]
    filled = np.array([1.0, 1e-20, 3])       # NaN -> 1e-20 (Li et al.)
    assert g.loc["a", "PCC"] == pytest.approx(pearsonr(t[:, 0], filled)[0])
    assert np.isnan(g.loc["const", "PCC"]) and np.isnan(g.loc["const", "RMSE"])  # constant truth
    assert np.isfinite(g.loc["const", "SSIM"]) and np.isfinite(g.loc["const", "JS"])
    assert np.isnan(g.loc["zero", "SSIM"]) and np.isnan(g.loc["zero", "JS"])     # all-zero truth
    # deconvolution: NaN -> 0, so the first column is (1, 0, 3)/3 -> PCC with truth (1,2,3)/3
    assert d["PCC"].iloc[0] == pytest.approx(pearsonr([1, 2, 3], [1, 0, 3])[0])


def test_deconvolution_clips_predictions():
    t = np.array([[0.2, 0.8], [0.6, 0.4]])
    p = np.array([[-0.5, 1.7], [0.6, 0.4]])
    assert np.allclose(M.deconvolution_scores(t, p)["RMSE"], M.deconvolution_scores(t, [[0, 1], [0.6, 0.4]])["RMSE"])


def test_dataframes_are_matched_by_name():
    t = pd.DataFrame({"g1": [1.0, 2, 3, 4], "g2": [4.0, 1, 2, 2]}, index=list("abcd"))
    p = pd.DataFrame({"g2": [2.0, 2, 1, 4], "g1": [4.0, 3, 2, 1], "extra": 0.0}, index=list("dcba"))
    s = M.gene_prediction_scores(t, p)
    assert list(s.index) == ["g1", "g2"]
    assert s.loc["g1", "PCC"] == pytest.approx(1.0) and s.loc["g2", "PCC"] == pytest.approx(1.0)
    assert list(M.gene_prediction_scores(t, p, genes=["g2"]).index) == ["g2"]
    with pytest.raises(KeyError, match="columns of both"):
        M.gene_prediction_scores(t, p, genes=["nope"])
    with pytest.raises(ValueError, match="shape"):
        M.gene_prediction_scores(np.ones((4, 2)), np.ones((4, 3)))


def test_spot_jsd_is_per_spot():
    t = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    p = np.array([[0.5, 0.5, 0.0], [0.0, np.nan, 1.0]])
    assert np.allclose(M.spot_jsd(t, p), [0.0, jensenshannon([1, 0, 0], [0, 0, 1])])
    assert M.spot_jsd(t, p, base=2)[1] == pytest.approx(1.0)


# ---------------------------------------------------------------- accuracy score

def table3():
    return pd.DataFrame({"PCC": [0.8, 0.6, 0.7], "SSIM": [0.7, 0.75, 0.5],
                         "RMSE": [0.9, 0.95, 1.0], "JS": [0.2, 0.1, 0.3]}, index=["A", "B", "C"])


def test_accuracy_score_by_hand():
    # ranks (best = 3): PCC A3 B1 C2, SSIM A2 B3 C1, RMSE A3 B2 C1, JS A2 B3 C1
    a = M.accuracy_score(table3())
    assert a.to_dict() == pytest.approx({"A": 10 / 12, "B": 9 / 12, "C": 5 / 12})


def test_accuracy_score_failed_method_and_jsd_column():
    a = M.accuracy_score(table3(), failed=["D"])  # D ranks last everywhere, the others move up by one
    assert a.to_dict() == pytest.approx({"A": 14 / 16, "B": 13 / 16, "C": 9 / 16, "D": 4 / 16})
    t = table3().rename(columns={"JS": "JSD"})
    assert M.accuracy_score(t).equals(M.accuracy_score(table3()))
    assert M.FAILED == {"PCC": -2, "SSIM": -2, "RMSE": 10, "JS": 10}


def test_accuracy_score_ties_and_errors():
    t = table3()
    t.loc["B"] = t.loc["A"]
    a = M.accuracy_score(t)
    assert a["A"] == a["B"]
    t.loc["C", "PCC"] = np.nan
    with pytest.raises(ValueError, match="failed"):
        M.accuracy_score(t)
    with pytest.raises(KeyError, match="JS"):
        M.accuracy_score(table3().drop(columns="JS"))


# ---------------------------------------------------------------- location reconstruction

def test_location_error_by_hand():
    e = M.location_error([[0, 0], [1, 1], [2, 2]], [[3, 4], [1, 1], [2, 7]])
    assert np.allclose(e, [5, 0, 5])
    s = M.summarise_location_error(e)
    assert s["mean"] == pytest.approx(10 / 3) and s["median"] == 5.0
    with pytest.raises(ValueError, match="n_cells"):
        M.location_error(np.zeros((3, 2)), np.zeros((4, 2)))


def test_neighbourhood_preservation():
    rng = np.random.default_rng(4)
    xy = rng.random((300, 2))
    theta = 0.7
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert M.neighbourhood_preservation(xy, 3 * xy @ rot.T + 1, k=10) == pytest.approx(1.0)
    shuffled = xy[rng.permutation(300)]
    assert M.neighbourhood_preservation(xy, shuffled, k=10) < 0.15
    # hand case on a line, k = 1: cells 2 and 3 swap places
    true = np.array([[0.0, 0], [1, 0], [2.1, 0], [3.3, 0]])   # break ties: 1->0, 2->1, 3->2
    pred = np.array([[0.0, 0], [1, 0], [3.3, 0], [2.1, 0]])   # 0->1, 1->0, 2->3, 3->1
    assert M.neighbourhood_preservation(true, pred, k=1) == pytest.approx(2 / 4)


def test_deconvolution_table_averages_scores_over_types_and_matches_columns_by_name():
    rng = np.random.default_rng(0)
    truth = pd.DataFrame(rng.dirichlet(np.ones(3), 40), columns=["A", "B", "C"])
    good = truth + rng.normal(0, 0.02, truth.shape)
    shuffled = good[["C", "A"]]  # another column order, one type missing (counted as 0)
    table = M.deconvolution_table(truth, {"good": good, "partial": shuffled}, per_spot_jsd=True)
    assert list(table.index) == ["good", "partial"]
    assert list(table.columns) == ["PCC", "SSIM", "RMSE", "JSD", "JSD (per spot)"]
    expected = M.deconvolution_scores(truth.to_numpy(), good.to_numpy(), ["A", "B", "C"]).mean()
    np.testing.assert_allclose(table.loc["good", ["PCC", "SSIM", "RMSE", "JSD"]].to_numpy(float), expected.to_numpy())
    assert table.loc["partial", "RMSE"] > table.loc["good", "RMSE"]
