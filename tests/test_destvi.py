"""DestVI: planted proportions, the rate/shape NB, the VampPrior, the frozen decoder, the outputs and bad input."""


import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from scipy.stats import multivariate_normal

from stcore.data import synthetic
from stcore.methods import destvi as dv
from stcore.methods import get_method
from stcore.methods.destvi import DestVI
from stcore.train import kl_warmup

SMALL = {"sc_epochs": 300, "st_epochs": 300, "batch_size": 64, "vamp_prior_p": 5, "progress": False}


@pytest.fixture(scope="module")
def pair():
    """A reference (300 cells, 4 types, 40 genes) and 120 spots of 6-10 held-out cells of 1-3 types."""
    cells, _ = synthetic.toy_pair(n_cells=700, n_spots=20, n_genes=40, n_types=4, n_hidden_genes=5, seed=1)
    reference, other = cells[::2].copy(), cells[1::2].copy()
    spots = synthetic.pseudo_spots(other, n_spots=120, cells_per_spot=(6, 10), n_types_per_spot=(1, 3), seed=2)
    return reference, spots


@pytest.fixture(scope="module")
def fitted(pair):
    reference, spots = pair
    spots = spots.copy()
    method = DestVI(seed=0, **SMALL)
    method.run(spots, reference)
    return method, spots


def _rmse(pred, truth):
    return float(np.sqrt(((np.asarray(pred) - np.asarray(truth)) ** 2).mean()))


def test_registered_as_reference_deconvolution():
    cls = get_method("destvi")
    assert cls is DestVI and cls.task == "deconv" and cls.needs_reference


def test_official_defaults():
    m = DestVI()
    assert (m.n_latent, m.n_hidden, m.n_layers, m.dropout_rate, m.sc_epochs, m.sc_lr, m.sc_kl_warmup) == (
        5, 128, 2, 0.05, 300, 1e-3, 400)
    assert (m.st_epochs, m.st_lr, m.st_kl_warmup, m.batch_size, m.vamp_prior_p) == (2000, 3e-3, 200, 128, 15)
    assert (m.l1_reg, m.beta_reg, m.eta_reg, m.dropout_amortization) == (0.0, 5.0, 1e-4, 0.05)


def test_recovers_planted_proportions(pair, fitted):
    """NNLS on mean profiles: about 0.09 RMSE on this pair; the uniform guess about 0.33."""
    reference, _ = pair
    method, spots = fitted
    pred = spots.obsm["proportions_destvi"]
    truth = spots.obsm["proportions"][pred.columns].to_numpy()
    assert np.allclose(pred.sum(1), 1, atol=1e-5)
    assert _rmse(pred, truth) < 0.15, _rmse(pred, truth)
    assert np.corrcoef(pred.to_numpy().ravel(), truth.ravel())[0, 1] > 0.8


def test_an_untrained_spot_model_fails_the_bound(pair):
    reference, spots = pair
    spots = spots.copy()
    DestVI(seed=0, **{**SMALL, "st_epochs": 1}).run(spots, reference)
    truth = spots.obsm["proportions"][spots.obsm["proportions_destvi"].columns].to_numpy()
    assert _rmse(spots.obsm["proportions_destvi"], truth) > 0.15


def test_outputs_states_and_type_expression(fitted):
    method, spots = fitted
    info = spots.uns["destvi"]
    assert info["cell_types"] == ["type0", "type1", "type2", "type3"]
    for ctype, key in info["gamma_keys"].items():
        assert key == f"gamma_destvi_{ctype}"
        assert spots.obsm[key].shape == (spots.n_obs, 5) and list(spots.obsm[key].columns) == [
            f"gamma_{k}" for k in range(5)]
    noise = spots.obs["noise_destvi"].to_numpy()
    assert np.all((noise >= 0) & (noise <= 1))
    expr = method.expression(spots, "type1", genes=info["genes"][:3])
    assert expr.shape == (spots.n_obs, 3) and (expr.to_numpy() > 0).all()
    # the NB mean of each spot is its library times the beta-weighted type-specific expressions plus the noise type
    model = method.model_
    x = torch.from_numpy(method.prep_["x_spots"].toarray())
    with torch.no_grad():
        out = model(x)
        beta = model.abundances(x)
    mean = (out["r"] * torch.exp(model.px_o)).numpy()
    per_type = np.stack([method.expression(spots, t).to_numpy() for t in info["cell_types"]], 1)  # (n, C, G)
    noise_profile = (torch.nn.functional.softplus(model.eta) * torch.exp(model.px_o)).detach().numpy()
    lib = x.sum(1, keepdim=True).numpy()
    rebuilt = lib * ((beta[:, :-1, None].numpy() * per_type).sum(1) + beta[:, -1:].numpy() * noise_profile)
    assert np.allclose(rebuilt, mean, rtol=1e-4)


def test_stage_two_keeps_the_reference_decoder_frozen(fitted):
    method, _ = fitted
    sc, st = method.sc_model_, method.model_
    for a, b in zip(sc.decoder.parameters(), st.decoder.parameters()):
        assert torch.equal(a, b) and not b.requires_grad
    assert torch.equal(sc.px_r.detach(), st.px_o)
    trainable = {n for n, p in st.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in {"eta", "log_alpha", "gamma_encoder", "beta_encoder"}
                             for n in trainable)


def test_deterministic_given_seed(pair):
    reference, spots = pair
    opts = {**SMALL, "sc_epochs": 3, "st_epochs": 3}
    a = DestVI(seed=3, **opts).run(spots.copy(), reference).obsm["proportions_destvi"]
    b = DestVI(seed=3, **opts).run(spots.copy(), reference).obsm["proportions_destvi"]
    c = DestVI(seed=4, **opts).run(spots.copy(), reference).obsm["proportions_destvi"]
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.to_numpy(), c.to_numpy())


# ---------------------------------------------------------------------------------------------- the pieces
def test_rate_shape_nb_matches_torch():
    x = torch.tensor([[0.0, 1.0, 7.0], [3.0, 0.0, 40.0]])
    r = torch.tensor([[0.3, 2.0, 5.0], [1.5, 0.01, 30.0]])
    logits = torch.tensor([-1.0, 0.2, 1.3])
    ref = torch.distributions.NegativeBinomial(total_count=r, logits=logits).log_prob(x)
    assert torch.allclose(dv.nb_rate_log_prob(x, r, logits), ref, atol=1e-4)
    # sums of cells with the same logits add their total counts: the mean is r * exp(logits)
    assert torch.allclose(torch.distributions.NegativeBinomial(total_count=r, logits=logits).mean,
                          r * torch.exp(logits))


def test_kl_warmup_is_linear_from_zero():
    assert [kl_warmup(e, 200) for e in (0, 50, 200, 500)] == [0.0, 0.25, 1.0, 1.0]
    assert kl_warmup(0, 0) == 1.0 and kl_warmup(0, None) == 1.0


def test_fclayers_inject_the_type_at_every_layer():
    torch.manual_seed(0)
    net = dv.FCLayers(3, 4, n_hidden=6, n_layers=2, n_cat=2).eval()
    assert [blk[0].in_features for blk in net.layers] == [5, 8]
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    h = x
    onehot = torch.nn.functional.one_hot(y, 2).float()
    for blk in net.layers:
        h = torch.relu(torch.nn.functional.layer_norm(blk[0](torch.cat([h, onehot], 1)), (blk[0].out_features,)))
    assert torch.allclose(net(x, y), h, atol=1e-6)


def test_vamp_prior_by_hand():
    mu = np.array([[0.0, 0.0], [0.2, 0.0], [10.0, 10.0], [10.0, 10.4], [10.0, 10.2], [5.0, 5.0]])
    var = np.array([[0.1, 0.1], [0.3, 0.1], [0.2, 0.2], [0.2, 0.2], [0.2, 0.2], [0.5, 0.5]])
    labels = np.array([0, 0, 0, 0, 0, 1])
    means, variances, weights = dv.vamp_prior(mu, var, labels, 2, p=2, seed=0)
    order = np.argsort(means[0, :, 0])
    assert np.allclose(means[0, order], [[0.1, 0.0], [10.0, 10.2]])
    assert np.allclose(weights[0, order], [0.4, 0.6])
    # law of total variance: mean of the posterior variances + variance of the posterior means
    assert np.allclose(variances[0, order[0]], [0.2 + 0.01, 0.1])
    assert np.allclose(variances[0, order[1]], [0.2, 0.2 + np.var([10.0, 10.4, 10.2])])
    # a type with fewer cells than p: one component per cell, the others unused
    assert np.allclose(means[1, 0], [5.0, 5.0]) and np.allclose(variances[1, 0], [0.5, 0.5])
    assert np.allclose(weights[1], [1.0, 0.0]) and np.allclose(variances[1, 1], 1.0)


def test_vamp_log_prob_matches_a_mixture_density():
    rng = np.random.default_rng(0)
    means, variances = rng.normal(size=(2, 3, 2)), rng.uniform(0.5, 2, size=(2, 3, 2))
    weights = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    gamma = rng.normal(size=(4, 2, 2))
    got = dv.vamp_log_prob(*(torch.tensor(a, dtype=torch.float64) for a in (gamma, means, variances, weights)))
    for s in range(4):
        for c in range(2):
            dens = sum(weights[c, k] * multivariate_normal.pdf(gamma[s, c], means[c, k],
                                                               np.diag((np.sqrt(variances[c, k]) + 1e-4) ** 2))
                       for k in range(3))
            assert np.isclose(got[s, c].item(), np.log(dens), atol=1e-6)


def test_global_prior_term_by_hand():
    torch.manual_seed(0)
    sc = dv.CondSCVIModel(6, 2, n_latent=2, n_hidden=8)
    prior = (np.zeros((2, 1, 2)), np.ones((2, 1, 2)), np.ones((2, 1)))
    model = dv.DestVIModel(sc, n_obs=10, prior=prior, beta_reg=5.0, eta_reg=1e-4)
    terms = model.loss(torch.poisson(torch.full((3, 6), 5.0)))
    eta, a = model.eta.detach().numpy(), model.log_alpha.detach().numpy()
    expected = 10 * (1e-4 * 0.5 * np.sum(eta**2 + np.log(2 * np.pi)) + 5.0 * np.var(a, ddof=1))
    assert np.isclose(terms["eta and alpha priors"].item(), expected, rtol=1e-5)


def test_input_standardisation():
    X = sparse.csr_matrix(np.array([[0.0, 3.0], [1.0, 3.0], [7.0, 3.0]], dtype=np.float32))
    mean, scale = dv._input_standardisation(X)
    logx = np.log1p(X.toarray())
    assert np.allclose(mean.numpy(), logx.mean(0), atol=1e-6)
    assert np.allclose(scale.numpy(), [logx[:, 0].std(), 0.1], atol=1e-6)  # constant gene: floored


# ---------------------------------------------------------------------------------------------- bad input
def test_needs_a_reference(pair):
    with pytest.raises(ValueError, match="single-cell reference"):
        DestVI(**SMALL).run(pair[1].copy(), None)


def test_needs_two_cell_types(pair):
    reference, spots = pair
    one = reference[reference.obs["cell_type"] == "type0"].copy()
    with pytest.raises(ValueError, match="at least 2"):
        DestVI(**SMALL).run(spots.copy(), one)


def test_missing_cell_type_column(pair):
    reference, spots = pair
    with pytest.raises(KeyError, match="cell_type_key|cell-type-key"):
        DestVI(cell_type_key="label", **SMALL).run(spots.copy(), reference)


def test_no_shared_genes(pair):
    reference, spots = pair
    other = spots.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(ValueError, match="share 0 genes"):
        DestVI(**SMALL).run(other, reference)


def test_rejects_normalised_values(pair):
    reference, spots = pair
    bad = spots.copy()
    bad.X = sparse.csr_matrix(np.log1p(bad.X.toarray()))
    with pytest.raises(ValueError, match="raw counts"):
        DestVI(**SMALL).run(bad, reference)


@pytest.mark.parametrize("option", [{"n_latent": 0}, {"st_lr": -1.0}, {"dropout_rate": 1.0}, {"vamp_prior_p": 0},
                                    {"st_epochs": 2.5}, {"beta_reg": float("nan")}])
def test_bad_options(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        DestVI(**option)


def test_empty_spots_and_cells_are_left_out_of_training(pair):
    reference, spots = pair
    spots, reference = spots.copy(), reference.copy()
    X = spots.X.toarray()
    X[0] = 0
    spots.X = sparse.csr_matrix(X)
    R = reference.X.toarray()
    R[0] = 0
    reference.X = sparse.csr_matrix(R)
    with pytest.warns(UserWarning, match="no counts"):
        method = DestVI(**{**SMALL, "sc_epochs": 2, "st_epochs": 2})
        method.run(spots, reference)
    assert method.model_.n_obs == spots.n_obs - 1
    assert np.isfinite(spots.obsm["proportions_destvi"].to_numpy()).all()


def test_expression_errors(fitted):
    method, spots = fitted
    with pytest.raises(KeyError, match="Unknown cell type"):
        method.expression(spots, "neuron")
    with pytest.raises(KeyError, match="not fitted"):
        method.expression(spots, "type0", genes=["nope"])
    with pytest.raises(RuntimeError, match="run"):
        DestVI().expression(spots, "type0")


def test_recovers_a_planted_within_type_state():
    """Type A varies along a state t (a gene programme scaled by t); each spot holds A cells of one state s. The
    spots' inferred A states must order the spots by s (first principal component, |r| > 0.8), and the A-specific
    expression at each spot must follow the planted programme on its strongest genes (log scale: r > 0.9 and a
    slope near 1 against the true log means)."""
    rng = np.random.default_rng(0)
    n_genes, programme = 40, rng.normal(0.0, 1.0, 40)
    base = rng.normal(np.log(3.0), 0.5, (2, n_genes)) + rng.normal(0.0, 1.0, (2, n_genes))

    def log_mean(t, kind):
        return base[kind] + (1.5 * (t[:, None] - 0.5) * programme if kind == 0 else 0.0)

    def cells(t, kind):
        return rng.poisson(np.exp(log_mean(t, kind)) * rng.lognormal(0.0, 0.2, (len(t), 1)))

    genes = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    X_ref = np.vstack([cells(rng.uniform(0, 1, 400), 0), cells(np.zeros(300), 1)])
    reference = ad.AnnData(sparse.csr_matrix(X_ref.astype(np.float32)), var=genes,
                           obs=pd.DataFrame({"cell_type": ["A"] * 400 + ["B"] * 300},
                                            index=[f"c{i}" for i in range(700)]))
    s = rng.uniform(0, 1, 150)
    X_spots = np.stack([cells(np.clip(si + rng.normal(0, 0.03, 6), 0, 1), 0).sum(0) + cells(np.zeros(3), 1).sum(0)
                        for si in s])
    spots = ad.AnnData(sparse.csr_matrix(X_spots.astype(np.float32)), var=genes.copy(),
                       obs=pd.DataFrame(index=[f"s{i}" for i in range(150)]))
    method = DestVI(seed=0, **SMALL)
    method.run(spots, reference)
    g = spots.obsm["gamma_destvi_A"].to_numpy()
    g = g - g.mean(0)
    pc1 = g @ np.linalg.svd(g, full_matrices=False)[2][0]
    assert abs(np.corrcoef(pc1, s)[0, 1]) > 0.8
    np.testing.assert_allclose(spots.obsm["proportions_destvi"]["A"].mean(), 6 / 9, atol=0.15)
    pred, true = np.log(method.expression(spots, "A").to_numpy()), log_mean(s, 0)
    strong = np.flatnonzero(np.abs(programme) > 1)
    r = [np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in strong]
    slope = [np.polyfit(true[:, j], pred[:, j], 1)[0] for j in strong]
    assert len(strong) >= 5 and min(r) > 0.9 and 0.6 < np.median(slope) < 1.5, (r, slope)
