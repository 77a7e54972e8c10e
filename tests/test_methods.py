"""The method registry and the baselines of each task, on synthetic data with planted answers."""

import numpy as np
import pytest

from stcore import metrics
from stcore.data import synthetic
from stcore.methods import TASKS, Method, available, get_method, register


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=600, n_genes=100, n_domains=4, seed=0)


@pytest.fixture(scope="module")
def pair():
    return synthetic.toy_pair(n_cells=600, n_spots=500, n_genes=60, n_types=4, n_hidden_genes=8, seed=1)


def test_registry_lists_one_baseline_per_task():
    table = available()
    assert {"leiden", "gmm", "nnls", "knn_deconv", "knn_impute", "knn_locate"} <= set(table["method"])
    assert set(table["task"]) <= set(TASKS)
    assert set(available("deconv")["method"]) >= {"nnls"}
    with pytest.raises(ValueError, match="Unknown task"):
        available("segmentation")


def test_unknown_method_suggests_a_name():
    with pytest.raises(KeyError, match="Did you mean leiden"):
        get_method("leidn")


def test_register_rejects_bad_classes():
    class NoTask(Method):
        name = "x"

    with pytest.raises(ValueError, match="task"):
        register(NoTask)


@pytest.mark.parametrize("name", ["gmm", "leiden"])
def test_expression_baselines_recover_planted_domains(slide, name):
    adata = slide.copy()
    get_method(name)(n_domains=4, n_top_genes=100, n_pcs=10).run(adata)
    pred = adata.obs[f"domain_{name}"]
    assert pred.nunique() == 4
    assert adata.obsm[f"X_{name}"].shape == (adata.n_obs, 10)
    assert metrics.ari(adata.obs["domain"], pred) > 0.8


def test_refinement_smooths_domains(slide):
    noisy = synthetic.toy_domains(n_spots=600, n_genes=100, n_domains=4, marker_strength=0.5, seed=3)
    raw = get_method("gmm")(n_domains=4, n_top_genes=100, n_pcs=10).run(noisy.copy())
    refined = get_method("gmm")(n_domains=4, n_top_genes=100, n_pcs=10, refine=True).run(noisy.copy())
    truth = noisy.obs["domain"]
    assert metrics.ari(truth, refined.obs["domain_gmm"]) > metrics.ari(truth, raw.obs["domain_gmm"])
    assert metrics.pas(refined.obs["domain_gmm"], noisy.obsm["spatial"]) < metrics.pas(
        raw.obs["domain_gmm"], noisy.obsm["spatial"])


def test_nnls_recovers_planted_proportions(pair):
    reference, _ = pair
    spots = synthetic.pseudo_spots(reference, n_spots=200, cells_per_spot=(4, 10), seed=2)
    get_method("nnls")().run(spots, reference)
    pred = spots.obsm["proportions_nnls"]
    truth = spots.obsm["proportions"][pred.columns]
    assert np.allclose(pred.sum(1), 1)
    rmse = np.sqrt(((pred.to_numpy() - truth.to_numpy()) ** 2).mean())
    uniform = np.sqrt(((1 / truth.shape[1] - truth.to_numpy()) ** 2).mean())
    assert rmse < 0.15 and rmse < 0.5 * uniform


def test_knn_deconvolution_maps_pure_spots_and_beats_uniform(pair):
    reference, _ = pair
    pure = synthetic.pseudo_spots(reference, n_spots=60, cells_per_spot=(3, 6), n_types_per_spot=1, seed=4)
    get_method("knn_deconv")(k=10).run(pure, reference)
    pred = pure.obsm["proportions_knn_deconv"]
    truth = pure.obsm["proportions"][pred.columns]
    assert np.allclose(pred.sum(1), 1)
    assert (pred.to_numpy().argmax(1) == truth.to_numpy().argmax(1)).mean() > 0.9
    mixed = synthetic.pseudo_spots(reference, n_spots=200, cells_per_spot=(4, 10), seed=2)
    get_method("knn_deconv")().run(mixed, reference)
    err = mixed.obsm["proportions_knn_deconv"].to_numpy() - mixed.obsm["proportions"][pred.columns].to_numpy()
    uniform = 1 / truth.shape[1] - mixed.obsm["proportions"].to_numpy()
    assert np.sqrt((err ** 2).mean()) < 0.8 * np.sqrt((uniform ** 2).mean())
    with pytest.raises(ValueError, match="positive number"):
        get_method("knn_deconv")(k=0)
    silent = reference.copy()
    X = silent.X.toarray() if hasattr(silent.X, "toarray") else np.array(silent.X)
    X[0] = 0  # a reference cell without counts is left out, not an error
    silent.X = X
    out = get_method("knn_deconv")(k=10).run(pure.copy(), silent).obsm["proportions_knn_deconv"]
    assert np.isfinite(out.to_numpy()).all() and np.allclose(out.sum(1), 1)


def test_knn_imputation_predicts_hidden_genes(pair):
    reference, spatial = pair
    get_method("knn_impute")(k=20).run(spatial, reference)
    pred = spatial.obsm["imputed_knn_impute"]
    truth = spatial.obsm["hidden_truth"][pred.columns]
    assert list(pred.columns) == list(spatial.obsm["hidden_truth"].columns)
    scores = metrics.gene_prediction_scores(truth.to_numpy(), pred.to_numpy(), list(pred.columns))
    assert scores["PCC"].median() > 0.5


def test_knn_location_places_cells_near_their_origin(pair):
    reference, spatial = pair
    out = get_method("knn_locate")(k=10).run(spatial, reference)
    err = metrics.location_error(reference.obsm["spatial_truth"], out.obsm["spatial_knn_locate"])
    shuffled = metrics.location_error(reference.obsm["spatial_truth"],
                                      np.random.default_rng(0).permutation(out.obsm["spatial_knn_locate"]))
    assert np.median(err) < 0.6 * np.median(shuffled)
    assert "spatial_knn_locate" not in reference.obsm  # the input is left untouched


def test_genes_option_and_nothing_missing(pair):
    reference, spatial = pair
    wanted = list(spatial.obsm["hidden_truth"].columns[:2])
    get_method("knn_impute")(genes=wanted).run(spatial, reference)
    assert list(spatial.obsm["imputed_knn_impute"].columns) == wanted
    full = reference.copy()
    with pytest.raises(ValueError, match="nothing is missing"):
        get_method("knn_impute")().run(full, reference)
    with pytest.raises(ValueError, match="not in the reference"):
        get_method("knn_impute")(genes=["no_such_gene"]).run(spatial, reference)


def test_reference_methods_require_a_reference(pair):
    _, spatial = pair
    with pytest.raises(ValueError, match="--reference"):
        get_method("nnls")().run(spatial)


def test_knn_imputation_leaves_out_reference_cells_without_shared_counts(pair):
    reference, spatial = pair
    shared = [g for g in spatial.var_names if g in reference.var_names]
    silent = reference.copy()
    X = silent.X.toarray() if hasattr(silent.X, "toarray") else np.array(silent.X)
    X[0, silent.var_names.get_indexer(shared)] = 0
    silent.X = X
    out = get_method("knn_impute")(k=10).run(spatial.copy(), silent).obsm["imputed_knn_impute"]
    assert np.isfinite(out.to_numpy()).all()
