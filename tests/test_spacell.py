"""SpaCell on synthetic slides: planted domains, the official layer sizes and inputs by hand, histology's role."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import minmax_scale

from stcore import images, metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.methods.spacell import SpaCell, SpaCellAE, SpaCellCombinedAE, spacell_expression


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=400, n_genes=100, n_domains=4, marker_strength=1.0, seed=0)


def test_recovers_planted_domains(slide, tile_weights):
    adata = slide.copy()
    model = get_method("spacell")(n_domains=4, epochs=50, tile_weights=tile_weights, progress=False)
    model.run(adata)
    assert adata.obs["domain_spacell"].nunique() == 4
    assert adata.obsm["X_spacell"].shape == (adata.n_obs, 40)  # two 20-d latents
    assert metrics.ari(adata.obs["domain"], adata.obs["domain_spacell"]) > 0.8
    for history in model.histories_.values():  # both autoencoders learn
        assert history.terms["reconstruction"][-1] < history.terms["reconstruction"][0]


def test_expression_input_by_hand(slide):
    counts = slide.X.toarray().astype(float)
    keep = (counts > 0).mean(0) >= 0.01
    props = counts[:, keep] / counts.sum(1, keepdims=True)
    top = np.sort(np.argsort(-props.var(0), kind="stable")[:50])
    expected = minmax_scale(PCA(n_components=min(props.shape[0], 50)).fit_transform(props[:, top]), axis=0)
    got = spacell_expression(slide, n_genes=50)
    assert got.shape == (slide.n_obs, 50) and got.min() == 0 and got.max() == 1
    # PCA components are defined up to sign: compare column by column
    for k in range(10):
        assert min(np.abs(got[:, k] - expected[:, k]).max(), np.abs(got[:, k] - (1 - expected[:, k])).max()) < 1e-4


def test_official_layer_sizes_and_loss():
    ae = SpaCellAE(300)
    sizes = [m.in_features for m in ae.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [300, 512, 256, 64, 20, 64, 256, 512]
    x = torch.rand(8, 300)
    x_hat = ae(x)
    bce = -(x * torch.log(x_hat) + (1 - x) * torch.log(1 - x_hat)).mean()
    assert torch.allclose(ae.loss(x)["reconstruction"], bce, atol=1e-5)
    comb = SpaCellCombinedAE(300, 64)
    assert comb.encoder((x, torch.rand(8, 64))).shape == (8, 20)
    assert comb.inverse[0].out_features == 512 and comb.enc_ge[0].out_features == 256
    assert set(comb.loss((x, torch.rand(8, 64)))) == {"expression", "image"}


def test_histology_enters_through_tile_features(slide, tile_weights, monkeypatch):
    method = SpaCell(n_domains=4, tile_weights=tile_weights, progress=False)
    other = slide.copy()
    img = other.uns["spatial"]["toy"]["images"]["hires"]
    other.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])
    t1, t2 = method.tile_features(slide), method.tile_features(other)
    assert t1.shape == (slide.n_obs, 64) and not np.allclose(t1, t2)
    bare = slide.copy()
    del bare.uns["spatial"]
    monkeypatch.setattr(images, "slide_tile_features", lambda *a, **k: pytest.fail("image read"))
    SpaCell(n_domains=4, histology=False, epochs=2, progress=False).run(bare)
    assert bare.obsm["X_spacell"].shape == (bare.n_obs, 20)


def test_combined_model_runs(slide, tile_weights):
    adata = slide.copy()
    model = SpaCell(n_domains=4, model="combined", epochs=2, tile_weights=tile_weights, progress=False)
    model.run(adata)
    assert adata.obsm["X_spacell"].shape == (adata.n_obs, 20)
    assert set(model.histories_["combined"].terms) == {"expression", "image"}


def test_errors(slide):
    with pytest.raises(ValueError, match="n_domains"):
        SpaCell(n_domains=None)
    with pytest.raises(ValueError, match="model="):
        SpaCell(model="vae")
    with pytest.raises(ValueError, match="loss="):
        SpaCell(loss="kl")
    with pytest.raises(ValueError, match="scale=True"):
        SpaCell(scale=False)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        SpaCell(n_domains=5000, histology=False).run(slide.copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="uns\\['spatial'\\]"):
        SpaCell(n_domains=4).run(bare)
    logged = slide.copy()
    logged.X = np.log1p(logged.X.toarray())
    with pytest.raises(ValueError, match="raw counts"):
        SpaCell(n_domains=4, histology=False).run(logged)
