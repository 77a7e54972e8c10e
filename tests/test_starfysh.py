"""Starfysh: planted proportions, archetypal analysis, the product of experts and where the histology enters."""


import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from stcore import images
from stcore.methods import get_method
from stcore.methods import starfysh as sf
from stcore.methods.starfysh import Starfysh, StarfyshModel

FAST = {"epochs": 2, "n_repeats": 1, "lr": 1e-3, "progress": False, "n_hidden": 32}


def _toy(n=300, n_genes=60, k=3, seed=0, image=True):
    """Spots mixing k states (Dirichlet(0.5) proportions), 10 marker genes per state, NB-like counts; the H&E
    colour of a spot follows its dominant state."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.5, n_genes)
    prof = np.tile(base, (k, 1))
    markers = {}
    for j in range(k):
        idx = np.arange(10 * j, 10 * j + 10)
        prof[j, idx] *= 8
        markers[f"s{j}"] = [f"g{i}" for i in idx]
    prof /= prof.sum(1, keepdims=True)
    P = rng.dirichlet(np.full(k, 0.5), n)
    lib = rng.uniform(500, 2000, n)
    counts = rng.poisson(rng.gamma(5.0, (P @ prof) * lib[:, None] / 5.0)).astype(np.float32)
    adata = ad.AnnData(sparse.csr_matrix(counts), var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    side = int(np.ceil(np.sqrt(n)))
    adata.obsm["spatial"] = np.c_[np.arange(n) % side, np.arange(n) // side].astype(float) * 20 + 20
    if image:
        img = np.full((side * 20 + 40, side * 20 + 40, 3), 230, np.uint8)
        palette = np.array([[200, 60, 160], [120, 80, 200], [240, 170, 200]], np.uint8)
        for (x, y), s in zip(adata.obsm["spatial"].astype(int), P.argmax(1)):
            img[y - 10:y + 10, x - 10:x + 10] = palette[s % 3]
        adata.uns["spatial"] = {"toy": {"images": {"hires": img},
                                        "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 20}}}
    return adata, P, markers


@pytest.fixture(scope="module")
def toy():
    return _toy()


def test_registered_as_reference_free_deconvolution():
    cls = get_method("starfysh")
    assert cls is Starfysh and cls.task == "deconv"
    assert cls.needs_reference is False and cls.uses_image is True


def test_recovers_planted_proportions(toy):
    adata, P, markers = toy
    adata = adata.copy()
    Starfysh(signatures=markers, histology=False, epochs=20, n_repeats=1, lr=1e-3, progress=False).run(adata)
    pred = adata.obsm["proportions_starfysh"]
    assert list(pred.columns) == ["s0", "s1", "s2"] and np.allclose(pred.sum(1), 1, atol=1e-5)
    rmse = np.sqrt(((pred.to_numpy() - P) ** 2).mean())
    prior_rmse = np.sqrt(((adata.uns["starfysh"]["prior"].to_numpy() - P) ** 2).mean())
    print(f"RMSE {rmse:.3f}, prior {prior_rmse:.3f}")
    assert rmse < 0.12, rmse                      # uniform guess: ~0.33, prior alone: ~0.14
    assert rmse < prior_rmse - 0.01
    assert np.corrcoef(pred.to_numpy().ravel(), P.ravel())[0, 1] > 0.9


def test_archetypal_analysis_recovers_planted_archetypes():
    rng = np.random.default_rng(1)
    Z = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 1.0], [0.0, 10.0, -1.0], [5.0, 5.0, 8.0]])
    S = rng.dirichlet(np.full(4, 0.6), 400)
    S[:4] = np.eye(4)  # the corners are observed
    X = S @ Z + rng.normal(0, 0.05, (400, 3))
    out = sf.archetypal_analysis(X, 4, seed=0)
    found = out["archetypes"]
    dist = np.linalg.norm(found[:, None] - Z[None], axis=-1)
    assert np.all(dist.min(0) < 0.3), dist.min(0)            # every planted corner found
    assert len(set(dist.argmin(1))) == 4                      # one archetype per corner
    assert out["explained"] > 0.99
    assert np.allclose(out["S"].sum(1), 1) and np.allclose(out["C"].sum(1), 1)
    assert out["S"].min() >= 0 and out["C"].min() >= 0


def test_simplex_projection_hand_cases():
    assert np.allclose(sf.simplex_projection(np.array([0.6, 0.6, -1.0])), [0.5, 0.5, 0.0])
    assert np.allclose(sf.simplex_projection(np.array([2.0, 0.0])), [1.0, 0.0])
    assert np.allclose(sf.simplex_projection(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    V = np.random.default_rng(0).normal(size=(50, 4))
    out = sf.simplex_projection(V)
    assert np.allclose(out.sum(1), 1) and out.min() >= 0


def test_poe_equals_hand_formula_and_gaussian_product():
    m1, v1 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])
    m2, v2 = torch.tensor([3.0, 0.0]), torch.tensor([1.5, 0.25])
    m, logv = sf.poe(m1, v1.log(), m2, v2.log())
    v = 1 / (1 / v1 + 1 / v2)
    assert torch.allclose(logv.exp(), v) and torch.allclose(m, v * (m1 / v1 + m2 / v2))
    # by hand: (1/0.5 + 3/1.5) / (1/0.5 + 1/1.5) = 1.5 and (-2/2 + 0) / (1/2 + 1/0.25) = -2/9
    assert torch.allclose(m, torch.tensor([1.5, -2.0 / 9.0]), atol=1e-6)
    # N(t|m1,v1) N(t|m2,v2) is proportional to N(t|m,v): the log-ratio does not depend on t
    t = torch.linspace(-3, 3, 7)[:, None]
    normal = torch.distributions.Normal
    ratio = (normal(m1, v1.sqrt()).log_prob(t) + normal(m2, v2.sqrt()).log_prob(t)
             - normal(m, v.sqrt()).log_prob(t))
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-5)


def test_signature_prior_by_hand():
    logX = np.array([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    scores, prior = sf.signature_prior(logX, ["a", "b", "c"], {"A": ["a"], "B": ["b", "zzz"]})
    za = (logX[:, 0] - logX[:, 0].mean()) / logX[:, 0].std()
    zb = (logX[:, 1] - logX[:, 1].mean()) / logX[:, 1].std()
    assert np.allclose(scores, np.c_[za, zb])
    pos = np.clip(np.c_[za, zb], 0, None)
    expected = np.where(pos.sum(1, keepdims=True) > 0, pos / np.maximum(pos.sum(1, keepdims=True), 1e-12), 0.5)
    assert np.allclose(prior, expected) and np.allclose(prior.sum(1), 1)


def test_windowed_library_and_anchors_by_hand():
    coords = np.array([[0.0, 0], [1, 0], [10, 0], [11, 0]])
    lib = np.array([1.0, 3.0, 5.0, 9.0])
    assert np.allclose(sf.windowed_library(coords, lib, window_size=2), [2, 2, 7, 7])
    scores = np.array([[0.1, 3.0], [2.0, 0.0], [1.0, 1.0], [5.0, 2.0]])
    anchors = sf.anchor_spots(scores, lib, n_anchors=2, vlow=0, vhigh=100)
    assert anchors[:, 0].tolist() == [3, 1] and anchors[:, 1].tolist() == [0, 3]


def test_reference_markers_and_read_signatures():
    ref, P, markers = _toy(n=200, seed=3, image=False)
    ref.obs["cell_type"] = [f"s{j}" for j in P.argmax(1)]  # each spot labelled by its main state
    found = sf.reference_markers(ref, ref.var_names, n_markers=5)
    for state, genes in found.items():
        assert set(genes) <= set(markers[state]), (state, genes)
    table = pd.DataFrame({"A": ["x", "y", np.nan], "B": ["y", "z", "z"]})
    assert sf.read_signatures(table) == {"A": ["x", "y"], "B": ["y", "z"]}
    assert sf.read_signatures({"A": "x", "B": ["y"]}, genes=["x", "y"]) == {"A": ["x"], "B": ["y"]}


def test_signatures_from_the_course_data():
    import stcore.data

    sig = stcore.data.load("starfysh_breast_signatures")
    tnbc = sf.read_signatures(sig[sig.obs["signature_set"] == "tnbc"])
    assert list(tnbc) == ["CAFs", "Cancer Epithelial", "Myeloid", "Normal Epithelial", "T-cells"]
    assert tnbc["CAFs"][:3] == ["DCN", "COL1A1", "LUM"] and len(tnbc["T-cells"]) == 30
    assert len(sf.read_signatures(sig[sig.obs["signature_set"] == "full"])) == 25


def test_histology_changes_the_posterior(toy):
    adata = toy[0]
    method = Starfysh(signatures=toy[2], patch_r=4)
    y = method.patches(adata)
    assert y.shape == (adata.n_obs, 8 * 8)
    torch.manual_seed(0)
    model = StarfyshModel(adata.n_vars, 3, n_hidden=32, n_pixels=y.shape[1]).eval()
    x = torch.tensor(adata.X.toarray())
    a = model.encode(x, torch.tensor(y), sample=False)
    b = model.encode(x, torch.tensor(255 - y), sample=False)
    assert torch.allclose(a["z_m"], b["z_m"])  # the expression expert does not see the image
    assert not torch.allclose(a["zy_m"], b["zy_m"]) and not torch.allclose(a["zp_m"], b["zp_m"])
    # the joint mean lies between the two experts (precision-weighted average), coordinate-wise
    lo, hi = torch.minimum(a["z_m"], a["zy_m"]), torch.maximum(a["z_m"], a["zy_m"])
    assert torch.all(a["zp_m"] >= lo - 1e-5) and torch.all(a["zp_m"] <= hi + 1e-5)
    # and through training the image changes the proportions
    runs = []
    for img in (None, "flipped"):
        d = adata.copy()
        if img:
            im = d.uns["spatial"]["toy"]["images"]["hires"]
            d.uns["spatial"]["toy"]["images"]["hires"] = np.ascontiguousarray(255 - im)
        Starfysh(signatures=toy[2], patch_r=4, seed=0, **FAST).run(d)
        assert d.uns["starfysh"]["histology"] is True
        runs.append(d.obsm["proportions_starfysh"].to_numpy())
    assert np.abs(runs[0] - runs[1]).max() > 1e-4


def test_without_histology_the_image_is_never_read(toy, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the image was read")

    monkeypatch.setattr(images, "image_and_scale", boom)
    monkeypatch.setattr(images, "spot_tiles", boom)
    adata = toy[0].copy()
    Starfysh(signatures=toy[2], histology=False, **FAST).run(adata)
    assert adata.uns["starfysh"]["histology"] is False
    assert adata.obsm["proportions_starfysh"].shape == (adata.n_obs, 3)


def test_no_image_warns_and_runs_expression_only(toy):
    adata = toy[0].copy()
    del adata.uns["spatial"]
    with pytest.warns(UserWarning, match="no H&E image"):
        Starfysh(signatures=toy[2], **FAST).run(adata)
    assert adata.uns["starfysh"]["histology"] is False


def test_archetypes_without_signatures_and_deterministic(toy):
    adata = toy[0].copy()
    Starfysh(histology=False, n_archetypes=3, n_markers=8, **FAST).run(adata)
    assert adata.uns["starfysh"]["signature_source"] == "archetypes"
    assert list(adata.obsm["proportions_starfysh"].columns) == ["arch_0", "arch_1", "arch_2"]
    again = toy[0].copy()
    Starfysh(histology=False, n_archetypes=3, n_markers=8, **FAST).run(again)
    assert np.array_equal(adata.obsm["proportions_starfysh"].to_numpy(), again.obsm["proportions_starfysh"].to_numpy())


def test_bad_input_errors(toy):
    adata, _, markers = toy
    with pytest.raises(ValueError, match="share no gene"):
        Starfysh(signatures={"A": ["nope"], "B": ["g1"]}, histology=False, **FAST).run(adata.copy())
    with pytest.raises(ValueError, match="at least 2 cell states"):
        sf.read_signatures({"A": ["g1"]})
    with pytest.raises(ValueError, match="non-empty dict"):
        sf.read_signatures(42)
    with pytest.raises(ValueError, match="not a file"):
        sf.read_signatures("/no/such/file.csv")
    with pytest.raises(ValueError, match="alpha"):
        Starfysh(alpha=0)
    with pytest.raises(ValueError, match="BatchNorm"):
        Starfysh(batch_size=1)
    with pytest.raises(ValueError, match="at least 1"):
        Starfysh(epochs=0)
    with pytest.raises(ValueError, match="patch"):
        Starfysh(patch_r=0)
    empty = adata.copy()
    dense = empty.X.toarray()
    dense[0] = 0
    empty.X = sparse.csr_matrix(dense)
    with pytest.raises(ValueError, match="no counts"):
        Starfysh(signatures=markers, histology=False, **FAST).run(empty)
    nocoords = adata.copy()
    del nocoords.obsm["spatial"]
    with pytest.raises((KeyError, ValueError), match="spatial"):
        Starfysh(signatures=markers, histology=False, **FAST).run(nocoords)
    logged = adata.copy()
    logged.X = sparse.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(ValueError, match="count"):
        Starfysh(signatures=markers, histology=False, **FAST).run(logged)
    with pytest.raises(ValueError, match="shares no gene"):
        ref = ad.AnnData(sparse.csr_matrix(np.ones((4, 2), np.float32)), var=pd.DataFrame(index=["q1", "q2"]))
        ref.obs["cell_type"] = ["a", "a", "b", "b"]
        Starfysh(histology=False, **FAST).run(adata.copy(), ref)
    with pytest.raises(ValueError, match="archetypes"):
        sf.archetypal_analysis(np.zeros((3, 2)), 5)
