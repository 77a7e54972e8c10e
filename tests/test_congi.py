"""ConGI on a synthetic slide with planted domains, where the image enters, and its losses and augmentations
checked by hand."""

import numpy as np
import pytest
import torch
from scipy import stats

from stcore import cluster, metrics
from stcore.data import synthetic
from stcore.methods import get_method
from stcore.nn import info_nce
from stcore.methods.congi import (
    ConGI,
    ConGIModel,
    congi_gene_features,
    cutout,
    gene_augment,
    mixup,
)


@pytest.fixture(scope="module")
def slide():
    return synthetic.toy_domains(n_spots=300, n_genes=120, n_domains=4, marker_strength=1.0, seed=0)


FAST = {"epochs": 12, "n_pcs": 30, "tile_fullres": 80.0, "tile_epochs": 1, "n_views": 2, "tile_latent": 16,
        "progress": False}


def reference_nt_xent(a, b, tau=1.0):
    """The official NT-Xent written out: 2n rows, positive = the partner, negatives = all others but itself."""
    z = np.concatenate([a, b]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    sim = z @ z.T / tau
    total = 0.0
    for i in range(n2):
        pos = sim[i, (i + n) % n2]
        others = [sim[i, j] for j in range(n2) if j != i]
        total += -pos + np.log(np.exp(others).sum())
    return total / n2


def test_recovers_planted_domains(slide):
    adata = slide.copy()
    method = get_method("congi")(n_domains=4, histology=False, seed=0, **FAST)
    assert method.task == "domains" and method.uses_image
    method.run(adata)
    assert adata.obs["domain_congi"].nunique() == 4
    assert metrics.ari(adata.obs["domain"], adata.obs["domain_congi"]) > 0.8
    assert adata.obsm["X_congi"].shape == (adata.n_obs, 64)
    assert list(method.history_.terms) == ["g2g"] and len(method.history_) == 12


def test_image_changes_the_embedding_and_histology_false_never_reads_it(slide):
    kwargs = {**FAST, "epochs": 2}
    method = ConGI(n_domains=4, seed=0, image_encoder="frozen", **kwargs)
    inputs = method.prepare(slide)
    assert inputs["tile_views"].shape == (3, slide.n_obs, 16)           # plain + 2 augmented views
    z = method.train_model(inputs).embed()
    assert set(method.history_.terms) == {"g2i", "g2g", "i2i"}
    flipped = slide.copy()
    img = flipped.uns["spatial"]["toy"]["images"]["hires"]
    flipped.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(img[::-1])
    z_flip = method.train_model(method.prepare(flipped)).embed()
    assert np.abs(z - z_flip).max() > 1e-3
    # the fused embedding is z = f_g(x) + 0.1 f_i(t)
    model = method.train_model(inputs)
    z, zg, zi = model.embed(parts=True)
    assert np.allclose(z, zg + 0.1 * zi, atol=1e-6)
    # without histology: no image needed, no image module
    bare = slide.copy()
    del bare.uns["spatial"]
    plain = ConGI(n_domains=4, histology=False, seed=0, **kwargs)
    inputs = plain.prepare(bare)
    assert set(inputs) == {"genes"}
    model = plain.train_model(inputs)
    assert not model.histology and not hasattr(model, "image_linear")
    # the default route fine-tunes the tile CNN with the losses; it depends on the image too
    tuned = ConGI(n_domains=4, seed=0, **{**kwargs, "epochs": 1})
    assert tuned.image_encoder == "finetune"
    z1 = tuned.train_model(tuned.prepare(slide)).embed()
    z2 = tuned.train_model(tuned.prepare(flipped)).embed()
    assert z1.shape == (slide.n_obs, 64) and np.abs(z1 - z2).max() > 1e-3


def test_info_nce_with_tau_1_matches_the_official_nt_xent():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = info_nce(torch.tensor(a), torch.tensor(b), tau=1.0).item()
    assert got == pytest.approx(reference_nt_xent(a, b), rel=1e-10)
    # a tiny case by hand: n = 1, the only "other" row is the positive, so the loss is 0
    orthogonal = info_nce(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), tau=1.0)
    assert orthogonal.item() == pytest.approx(0.0, abs=1e-7)
    # n = 2 orthogonal pairs matched: each row sees cos 1 (positive) and cos 0 twice -> log(e + 2) - 1
    e = torch.eye(2)
    assert info_nce(e, e, tau=1.0).item() == pytest.approx(np.log(np.e + 2) - 1, rel=1e-6)


def test_three_losses_by_hand():
    rng = np.random.default_rng(1)
    genes = rng.normal(size=(40, 12)).astype(np.float32)
    views = rng.normal(size=(4, 40, 6)).astype(np.float32)
    model = ConGIModel(genes, tile_views=views, n_latent=8, gene_hidden=(10,), seed=3, batch_size=16)
    model.train()
    model.epoch_batches()
    idx = torch.arange(3, 19)
    state = model.generator.get_state()
    terms = model.loss(idx)
    g = torch.Generator()
    g.set_state(state)
    ep = model._epoch
    with torch.no_grad():
        proj, fg = model.projector, model.gene_encoder
        hi_u = proj(model.image_linear(ep["t_u"][idx])).numpy()
        hi_v = proj(model.image_linear(ep["t_v"][idx])).numpy()
        x_mix, perm, lam = mixup(model.genes[idx], g, 0.2)
        hg = proj(fg(x_mix)).numpy()
        g2i = lam * reference_nt_xent(hg, hi_u) + (1 - lam) * reference_nt_xent(hg, hi_u[perm.numpy()])
        u_mix, perm2, lam2 = mixup(ep["xg_u"][idx], g, 0.2)
        hg_u, hg_v = proj(fg(u_mix)).numpy(), proj(fg(ep["xg_v"][idx])).numpy()
        g2g = lam2 * reference_nt_xent(hg_u, hg_v) + (1 - lam2) * reference_nt_xent(hg_u, hg_v[perm2.numpy()])
    assert terms["g2i"].item() == pytest.approx(g2i, rel=1e-5)
    assert terms["g2g"].item() == pytest.approx(0.1 * g2g, rel=1e-5)
    assert terms["i2i"].item() == pytest.approx(0.1 * reference_nt_xent(hi_u, hi_v), rel=1e-5)
    # the two image views of a spot are two different augmented rows of the bank
    same = [(ep["t_u"][i] == ep["t_v"][i]).all() for i in range(40)]
    assert not any(same)


def test_augmentation_rates():
    g = torch.Generator().manual_seed(0)
    n, d = 3000, 300
    ones = torch.ones(n, d)
    off = {"prob_mask": 0.0, "prob_noise": 0.0, "prob_swap": 0.0}
    masked = gene_augment(ones, g, **{**off, "prob_mask": 0.5})
    zeros = (masked == 0).sum(1)
    assert set(zeros.unique().tolist()) == {0, 60}                         # 20 % of 300, or nothing
    assert (zeros > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    noisy = gene_augment(ones, g, **{**off, "prob_noise": 0.5})
    changed = (noisy != 1).sum(1)
    assert set(changed.unique().tolist()) <= {0, 240}                      # 80 % of 300
    assert (changed > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert (noisy[noisy != 1] - 1).std().item() == pytest.approx(0.5, rel=0.02)
    ramp = torch.arange(d, dtype=torch.float32).expand(n, d)
    swapped = gene_augment(ramp, g, **{**off, "prob_swap": 0.5})
    moved = (swapped != ramp).sum(1)
    assert moved.max().item() <= 30 and (moved > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(swapped.sort(1).values[moved == 0], ramp[moved == 0])
    all_three = gene_augment(ones, g)                                      # defaults: untouched w.p. 1/2 * 1/2
    assert ((all_three == 1).all(1)).float().mean().item() == pytest.approx(0.25, abs=0.03)
    tiles = torch.full((3000, 3, 16, 16), 0.5)
    cut = cutout(tiles, g)
    area = (cut != 0.5).any(1).float().mean((1, 2))
    assert (area > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert area[area > 0].min().item() >= 1 / 256 and area.max().item() <= 0.45
    lams = [mixup(ones[:4], g)[2] for _ in range(500)]
    assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 0.01


def test_gene_input_and_refinement(slide):
    X = congi_gene_features(slide, 20, seed=0)
    exact = congi_gene_features(slide, 20, seed=0, exact=True)
    assert X.shape == (slide.n_obs, 20)
    corr = [abs(np.corrcoef(X[:, i], exact[:, i])[0, 1]) for i in range(5)]
    assert min(corr) > 0.99                                                # randomised = exact PCA up to sign
    method = ConGI(n_domains=4, refine=True, seed=0)
    z = np.random.default_rng(0).normal(size=(slide.n_obs, 5))
    coords = slide.obsm["spatial"]
    raw = method.domain_labels(z)
    assert np.array_equal(method.domain_labels(z, coords), cluster.refine(raw, coords=coords, k=4))  # < 1000 spots


def test_errors(slide):
    for kwargs, match in [({"n_domains": None}, "n_domains"), ({"epochs": 0}, "epochs"),
                          ({"image_encoder": "vit"}, "image_encoder"), ({"n_views": 1}, "n_views"),
                          ({"refine_k": 0}, "refine_k"), ({"prob_mask": 1.5}, "prob_mask"),
                          ({"batch_size": 1}, "batch_size"), ({"tau": 0}, "tau")]:
        with pytest.raises(ValueError, match=match):
            ConGI(**kwargs)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        ConGI(n_domains=5000, **FAST).run(slide.copy())
    bare = slide.copy()
    del bare.uns["spatial"]
    with pytest.raises(KeyError, match="image"):
        ConGI(n_domains=4, **FAST).run(bare)
    nocoords = slide.copy()
    del nocoords.obsm["spatial"]
    with pytest.raises((KeyError, ValueError), match="spatial"):
        ConGI(n_domains=4, histology=False, **FAST).run(nocoords)
    logged = slide.copy()
    logged.X = logged.X * 0.5
    with pytest.raises(ValueError, match="count"):
        ConGI(n_domains=4, histology=False, **FAST).run(logged)
    with pytest.raises(ValueError, match="tile_views"):
        ConGIModel(np.zeros((10, 4)), tile_views=np.zeros((2, 10, 3)))
