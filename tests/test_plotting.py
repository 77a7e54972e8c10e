import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stcore import plotting, train  # noqa: E402
from stcore.data import synthetic  # noqa: E402


def _face_colours(ax):
    return [tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections if len(c.get_offsets())]


def test_spatial_draws_every_spot_over_the_image():
    adata = synthetic.toy_domains(n_spots=150, n_genes=20, n_domains=3, seed=0)
    ax = plotting.spatial(adata, "domain")
    assert sum(len(c.get_offsets()) for c in ax.collections) == 150
    assert len(ax.images) == 1  # the hires H&E
    hires_scale = adata.uns["spatial"]["toy"]["scalefactors"]["tissue_hires_scalef"]
    drawn = np.concatenate([c.get_offsets() for c in ax.collections])
    assert np.allclose(np.sort(drawn[:, 0]), np.sort(adata.obsm["spatial"][:, 0] * hires_scale))


def test_domain_maps_match_colours_to_truth():
    adata = synthetic.toy_domains(n_spots=150, n_genes=20, n_domains=3, seed=0)
    mapping = {"0": "b", "1": "c", "2": "a"}  # a relabelled copy of the truth
    adata.obs["pred"] = pd.Categorical(adata.obs["domain"].map(mapping).astype(str))
    fig = plotting.domain_maps(adata, ["pred"], truth="domain", image=False)
    truth_ax, pred_ax = fig.axes[0], fig.axes[1]
    assert "ARI 1.000" in pred_ax.get_title()
    truth_colours = dict(zip([t.get_text() for t in truth_ax.get_legend().get_texts()], _face_colours(truth_ax)))
    pred_colours = dict(zip([t.get_text() for t in pred_ax.get_legend().get_texts()], _face_colours(pred_ax)))
    for true_label, pred_label in mapping.items():
        assert pred_colours[pred_label] == truth_colours[true_label]


def test_loss_curves_one_line_per_term_plus_total():
    hist = train.History(terms={"recon": [3, 2, 1], "kl": [0.1, 0.2, 0.3]}, total=[3.1, 2.2, 1.3])
    ax = plotting.loss_curves(hist)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["recon", "kl", "total"]
    assert np.allclose(ax.get_lines()[2].get_ydata(), [3.1, 2.2, 1.3])


def test_palette_is_distinct():
    colours = plotting.palette(20)
    assert len({mcolors.to_hex(c) for c in colours}) == 20
