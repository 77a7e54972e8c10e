"""gimVI: planted hidden genes, the per-modality decoder, the adversarial terms, the warm-up, outputs and bad input."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import sparse

from stcore import metrics
from stcore.cli import main
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods import gimvi as gv
from stcore.methods.gimvi import SEQ, SPATIAL, GimVI
from stcore.train import kl_warmup

#: A short, faster schedule for the tests (the defaults are the official 200 epochs at lr 1e-3).
SMALL = {"epochs": 40, "lr": 5e-3, "progress": False}
TINY = {"epochs": 2, "progress": False}


@pytest.fixture(scope="module")
def pair():
    """600 reference cells and 500 spatial cells of 60 genes, 8 of them hidden from the spatial data."""
    return synthetic.toy_pair(n_cells=600, n_spots=500, n_genes=60, n_types=4, n_hidden_genes=8, seed=1)


@pytest.fixture(scope="module")
def fitted(pair):
    reference, spatial = pair
    spatial = spatial.copy()
    method = GimVI(seed=0, **SMALL)
    method.run(spatial, reference)
    return method, spatial


def _median_pcc(spatial, pred: pd.DataFrame) -> float:
    truth = spatial.obsm["hidden_truth"][pred.columns]
    return float(metrics.gene_prediction_scores(truth.to_numpy(), pred.to_numpy(), list(pred.columns))["PCC"].median())


def test_registered_as_reference_imputation():
    cls = get_method("gimvi")
    assert cls is GimVI and cls.task == "impute" and cls.needs_reference


def test_official_defaults():
    m = GimVI()
    assert (m.n_latent, m.n_hidden, m.n_layers_individual, m.n_layers_shared, m.dropout_rate) == (10, 64, 1, 1, 0.2)
    assert m.generative_distributions == ["zinb", "nb"] and m.genes is None
    assert (m.epochs, m.batch_size, m.lr, m.weight_decay, m.n_epochs_kl_warmup) == (200, 128, 1e-3, 1e-6, 400)
    assert (m.kappa, m.train_size) == (5.0, 0.9)


def test_recovers_planted_hidden_genes(pair, fitted):
    """Median per-gene PCC on the hidden genes about 0.55 (seeds 0-3); an untrained model about 0.21 (the
    observed library alone explains that much), a shuffled prediction about 0."""
    _, spatial = fitted
    pred = spatial.obsm["imputed_gimvi"]
    assert _median_pcc(spatial, pred) > 0.4, _median_pcc(spatial, pred)
    shuffled = pd.DataFrame(pred.to_numpy()[np.random.default_rng(0).permutation(len(pred))], index=pred.index,
                            columns=pred.columns)
    assert _median_pcc(spatial, shuffled) < 0.1


def test_an_untrained_model_fails_the_bound(pair):
    reference, spatial = pair
    spatial = spatial.copy()
    GimVI(seed=0, **{**SMALL, "epochs": 1}).run(spatial, reference)
    assert _median_pcc(spatial, spatial.obsm["imputed_gimvi"]) < 0.35


def test_output_format(pair, fitted):
    reference, _ = pair
    method, spatial = fitted
    pred = spatial.obsm["imputed_gimvi"]
    hidden = spatial.uns["hidden_genes"]
    assert isinstance(pred, pd.DataFrame) and list(pred.index) == list(spatial.obs_names)
    assert list(pred.columns) == [g for g in reference.var_names if g in hidden]  # genes=None: all missing ones
    assert np.isfinite(pred.to_numpy()).all() and (pred.to_numpy() >= 0).all()
    assert spatial.obsm["X_gimvi"].shape == (spatial.n_obs, 10)
    info = spatial.uns["gimvi"]
    assert info["imputed_genes"] == list(pred.columns) and info["spatial_genes"] == list(spatial.var_names)
    assert info["modelled_genes"] == list(reference.var_names)
    assert len(method.history_) == SMALL["epochs"]
    assert set(method.history_.terms) == {"reconstruction (scRNA-seq)", "reconstruction (spatial)", "KL (weighted)",
                                          "adversarial (flipped labels)"}
    acc = method.classifier_history_["classifier accuracy"]
    assert len(acc) == SMALL["epochs"] and all(0 <= a <= 1 for a in acc)


def test_imputation_is_expected_counts_at_the_observed_library(fitted):
    """Decoded in the spatial modality, the expected counts of the measured genes add up to each cell's total."""
    method, spatial = fitted
    prep = method.prep_
    x = torch.from_numpy(prep["x_sp"].toarray())
    mu = method.model_.impute(x)
    assert torch.allclose(mu[:, method.model_.spatial_idx].sum(1), x.sum(1), rtol=1e-5)
    cols = [prep["modelled"].index(g) for g in prep["targets"]]
    assert np.allclose(spatial.obsm["imputed_gimvi"].to_numpy(), mu[:, cols].numpy(), rtol=1e-5)
    # decoding as scRNA-seq instead rescales each cell by the decoder's share of the spatial genes
    seq = method.model_.impute(x, decode_mode=SEQ)
    assert torch.allclose(seq.sum(1), x.sum(1), rtol=1e-5)
    ratio = mu / seq
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)


def test_genes_option(pair):
    reference, spatial = pair
    spatial = spatial.copy()
    wanted = spatial.uns["hidden_genes"][:2][::-1]
    method = GimVI(genes=wanted, **TINY)
    method.run(spatial, reference)
    assert list(spatial.obsm["imputed_gimvi"].columns) == wanted
    assert method.prep_["modelled"] == [g for g in reference.var_names if g in set(spatial.var_names) | set(wanted)]


def test_deterministic_given_seed(pair):
    reference, spatial = pair
    a = GimVI(seed=3, **TINY).run(spatial.copy(), reference).obsm["imputed_gimvi"]
    b = GimVI(seed=3, **TINY).run(spatial.copy(), reference).obsm["imputed_gimvi"]
    c = GimVI(seed=4, **TINY).run(spatial.copy(), reference).obsm["imputed_gimvi"]
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.to_numpy(), c.to_numpy())


def test_cli_runs_on_h5ad_files(pair, tmp_path):
    reference, spatial = pair
    reference.write_h5ad(tmp_path / "ref.h5ad")
    spatial.write_h5ad(tmp_path / "cells.h5ad")
    out = tmp_path / "out.h5ad"
    assert main(["run", "gimvi", str(tmp_path / "cells.h5ad"), "--reference", str(tmp_path / "ref.h5ad"), "-o",
                 str(out), "--epochs", "2", "--genes", ",".join(spatial.uns["hidden_genes"][:3]),
                 "--progress", "false"]) == 0
    assert list(ad.read_h5ad(out).obsm["imputed_gimvi"].columns) == spatial.uns["hidden_genes"][:3]


# ---------------------------------------------------------------------------------------------- the pieces
def _model(n_genes=6, spatial_idx=(4, 0, 2), kappa=5.0):
    torch.manual_seed(0)
    return gv.JVAE(n_genes, list(spatial_idx), (np.log(20.0), 0.3), n_latent=3, n_hidden=8, kappa=kappa)


def _batch():
    torch.manual_seed(1)
    return torch.poisson(torch.full((5, 6), 3.0)), torch.poisson(torch.full((4, 3), 4.0)) + 1


def test_decoder_renormalises_over_each_modalitys_genes():
    model = _model()
    z = torch.randn(4, 3)
    rho = torch.softmax(model.px_scale(z), -1)
    seq, sp = model.decode(z, SEQ), model.decode(z, SPATIAL)
    assert torch.allclose(seq, rho) and torch.allclose(seq.sum(1), torch.ones(4))
    assert torch.allclose(sp[:, [4, 0, 2]].sum(1), torch.ones(4))
    assert torch.allclose(sp, rho / rho[:, [4, 0, 2]].sum(1, keepdim=True))  # same profile, other normalisation


def test_spatial_likelihood_sees_only_the_measured_genes():
    """The spatial cells' NB uses the observed library and the spatial genes' columns of the decoder and of the
    spatial dispersion (column 1 of px_r)."""
    model = _model().eval()
    _, x_sp = _batch()
    torch.manual_seed(2)
    rec, kl, _ = model.elbo_terms(x_sp, SPATIAL)
    torch.manual_seed(2)
    out = model.inference(x_sp, SPATIAL)
    mu = model.decode(out["z"], SPATIAL)[:, [4, 0, 2]] * x_sp.sum(1, keepdim=True)
    theta = torch.exp(model.px_r[[4, 0, 2], 1])
    expected = -torch.distributions.NegativeBinomial(theta, logits=torch.log(mu) - torch.log(theta)).log_prob(x_sp)
    assert torch.allclose(rec, expected.sum(1), atol=1e-4)
    assert torch.allclose(kl, 0.5 * (out["qz_logvar"].exp() + out["qz_mean"] ** 2 - 1 - out["qz_logvar"]).sum(1))


def test_library_kl_against_the_empirical_prior():
    model = _model().eval()
    x_seq, _ = _batch()
    torch.manual_seed(3)
    _, kl, _ = model.elbo_terms(x_seq, SEQ)
    torch.manual_seed(3)
    out = model.inference(x_seq, SEQ)
    q = torch.distributions.Normal(out["ql_mean"], out["ql_var"].sqrt())
    prior = torch.distributions.Normal(torch.tensor(np.log(20.0)), torch.tensor(0.3).sqrt())
    kl_z = torch.distributions.kl_divergence(torch.distributions.Normal(out["qz_mean"], (0.5 * out["qz_logvar"]).exp()),
                                             torch.distributions.Normal(0.0, 1.0)).sum(1)
    assert torch.allclose(kl, kl_z + torch.distributions.kl_divergence(q, prior).sum(1), atol=1e-5)


class _Oracle(torch.nn.Module):
    """A modality classifier that is always right: logit +10 for the true modality of each row."""

    def __init__(self, n_seq: int, n_sp: int):
        super().__init__()
        self.labels = gv.JVAE.labels(n_seq, n_sp)

    def forward(self, z):
        return 10.0 * F.one_hot(self.labels, 2).float() + 0 * z[:, :1]


def test_adversarial_term_rewards_fooling_the_classifier():
    """The generator's term is kappa * CE with *flipped* labels: large when the classifier is right. The
    classifier's own loss (true labels) is then near 0."""
    model = _model(kappa=5.0)
    x_seq, x_sp = _batch()
    assert gv.JVAE.labels(2, 3).tolist() == [SEQ, SEQ, SPATIAL, SPATIAL, SPATIAL]
    model.classifier = _Oracle(len(x_seq), len(x_sp))
    terms = model.loss((x_seq, x_sp))
    expected = 5.0 * (10.0 + np.log1p(np.exp(-10.0)))  # -log softmax of the wrong class
    assert np.isclose(terms["adversarial (flipped labels)"].item(), expected, rtol=1e-6)
    z = torch.zeros(len(x_seq) + len(x_sp), 3)
    assert model.modality_ce(z, gv.JVAE.labels(len(x_seq), len(x_sp))).item() < 1e-4


def test_classifier_step_moves_only_the_classifier_and_learns_the_true_labels():
    model = _model()
    x_seq, x_sp = _batch()
    opt = gv.AlternatingSteps(model)
    assert {id(p) for g in opt.vae.param_groups for p in g["params"]}.isdisjoint(
        id(p) for p in model.classifier.parameters())
    model.loss((x_seq, x_sp))  # remembers the batch
    # separable latent codes (the BatchNorm of each encoder head makes an untrained model's codes of the two
    # datasets look alike)
    model.inference = lambda x, mode: {"z": torch.full((len(x), 3), 2.0 * mode - 1) + 0.3 * torch.randn(len(x), 3)}
    vae_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier.")}
    fast = torch.optim.Adam(model.classifier.parameters(), lr=1e-2)
    for _ in range(50):
        model.classifier_step(fast)
    assert all(torch.equal(p, vae_before[n]) for n, p in model.named_parameters() if n in vae_before)
    losses, accuracy = np.array(model.classifier_log).T
    assert losses[-5:].mean() < 0.5 * losses[:5].mean() and accuracy[-5:].mean() > 0.9, model.classifier_log
    no_adversary = _model(kappa=0.0)
    assert "adversarial (flipped labels)" not in no_adversary.loss((x_seq, x_sp))
    no_adversary.classifier_step(opt.classifier)
    assert no_adversary.classifier_log == []


def test_kl_warmup_reaches_half_after_the_default_epochs(pair):
    assert [kl_warmup(e, 400) for e in (0, 100, 200, 800)] == [0.0, 0.25, 0.5, 1.0]
    model = _model().eval()
    batch = _batch()
    model.kl_weight = 1.0
    torch.manual_seed(4)
    full = model.loss(batch)["KL (weighted)"]
    model.kl_weight = 0.25
    torch.manual_seed(4)
    assert torch.isclose(model.loss(batch)["KL (weighted)"], 0.25 * full)
    reference, spatial = pair
    method = GimVI(**{**TINY, "epochs": 3})
    method.run(spatial.copy(), reference)
    assert method.model_.kl_weight == 3 / 400  # the weight of the epoch after the last one


def test_paired_batches_cycle_the_smaller_dataset():
    x_seq = sparse.csr_matrix(np.arange(10, dtype=np.float32)[:, None] + 1)
    x_sp = sparse.csr_matrix(np.arange(25, dtype=np.float32)[:, None] + 1)
    batches = list(gv._paired_batches(x_seq, x_sp, 4, torch.Generator().manual_seed(0))())
    assert [len(b[1]) for b in batches] == [4, 4, 4, 4, 4, 5]  # the larger dataset once (a lone last cell merged)
    assert sorted(torch.cat([b[1] for b in batches]).ravel().tolist()) == list(range(1, 26))
    seq_rows = [tuple(b[0].ravel().tolist()) for b in batches]
    assert seq_rows[3:] == seq_rows[:3] and sorted(sum(seq_rows[:3], ())) == list(range(1, 11))


def test_train_split_keeps_ninety_percent(pair):
    reference, spatial = pair
    prep = GimVI(**TINY).prepare(spatial.copy(), reference)
    assert len(prep["seq_train"]) == int(np.ceil(0.9 * reference.n_obs))
    assert len(prep["sp_train"]) == int(np.ceil(0.9 * spatial.n_obs))
    assert len(np.unique(prep["sp_train"])) == len(prep["sp_train"])
    lib = np.log(np.asarray(reference.X.sum(1)).ravel())
    assert np.allclose(prep["library_prior"], (lib.mean(), lib.var()), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_needs_a_reference(pair):
    with pytest.raises(ValueError, match="single-cell reference"):
        GimVI(**TINY).run(pair[1].copy(), None)


def test_no_shared_genes(pair):
    reference, spatial = pair
    other = spatial.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="share 0 genes"):
        GimVI(**TINY).run(other, reference)


def test_rejects_normalised_values_and_nans(pair):
    reference, spatial = pair
    bad = spatial.copy()
    bad.X = sparse.csr_matrix(np.log1p(bad.X.toarray()))
    with pytest.raises(ValueError, match="raw counts"):
        GimVI(**TINY).run(bad, reference)
    nan = reference.copy()
    X = nan.X.toarray()
    X[0, 0] = np.nan
    nan.X = X
    with pytest.raises(ValueError, match="NaN"):
        GimVI(**TINY).run(spatial.copy(), nan)


def test_nothing_to_impute_and_unknown_genes(pair):
    reference, spatial = pair
    with pytest.raises(ValueError, match="nothing is missing"):
        GimVI(**TINY).run(reference.copy(), reference)
    with pytest.raises(ValueError, match="not in the reference"):
        GimVI(genes=["no_such_gene"], **TINY).run(spatial.copy(), reference)


def test_duplicated_gene_names(pair):
    reference, spatial = pair
    dup = spatial.copy()
    dup.var_names = [dup.var_names[0]] + list(dup.var_names[:-1])
    with pytest.raises(ValueError, match="duplicated gene names"):
        GimVI(**TINY).run(dup, reference)


def test_empty_cells_are_left_out_and_imputed_as_zero(pair):
    reference, spatial = pair
    spatial, reference = spatial.copy(), reference.copy()
    X = spatial.X.toarray()
    X[0] = 0
    spatial.X = sparse.csr_matrix(X)
    R = reference.X.toarray()
    R[0] = 0
    reference.X = sparse.csr_matrix(R)
    method = GimVI(**TINY)
    with pytest.warns(UserWarning, match="no counts"):
        method.run(spatial, reference)
    assert 0 not in method.prep_["sp_train"] and 0 not in method.prep_["seq_train"]
    pred = spatial.obsm["imputed_gimvi"].to_numpy()
    assert np.isfinite(pred).all() and (pred[0] == 0).all()


def test_too_few_cells(pair):
    reference, spatial = pair
    with pytest.raises(ValueError, match="at least 2"):
        GimVI(**TINY).run(spatial[:1].copy(), reference)


@pytest.mark.parametrize("option", [{"n_latent": 0}, {"lr": -1.0}, {"dropout_rate": 1.0}, {"epochs": 2.5},
                                    {"kappa": float("nan")}, {"train_size": 1.5}, {"batch_size": 1},
                                    {"generative_distributions": ["zinb", "gaussian"]}])
def test_bad_options(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        GimVI(**option)
