"""Bad input gets an error that says what is wrong and how to fix it — one test per kind of mistake."""

import numpy as np
import pytest

from stcore import images
from stcore.data import synthetic
from stcore.methods import get_method


@pytest.fixture
def slide():
    return synthetic.toy_domains(n_spots=120, n_genes=40, n_domains=2, seed=0)


def _gmm(**kw):
    return get_method("gmm")(n_domains=2, n_top_genes=40, n_pcs=5, **kw)


def test_missing_coordinates(slide):
    del slide.obsm["spatial"]
    with pytest.raises(KeyError, match=r"obsm\['spatial'\] is missing: store spot/cell positions there"):
        _gmm(refine=True).run(slide)


def test_wrong_shaped_coordinates(slide):
    slide.obsm["spatial"] = np.zeros((slide.n_obs, 4))
    with pytest.raises(ValueError, match=r"must have shape \(n, 2\) \(x, y\)"):
        _gmm(refine=True).run(slide)


def test_non_count_data(slide):
    slide.X = np.log1p(slide.X.toarray())
    with pytest.raises(ValueError, match="not raw counts"):
        _gmm().run(slide)


def test_nans(slide):
    X = slide.X.toarray()
    X[0, 0] = np.nan
    slide.X = X
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        _gmm().run(slide)


def test_image_that_does_not_cover_the_spots(slide):
    image, scale = images.image_and_scale(slide)
    with pytest.raises(ValueError, match="spots fall outside the .* image .*Check the scale factor"):
        images.colour_features(image, slide.obsm["spatial"], scale=scale * 10)


def test_no_shared_genes(slide):
    reference, _ = synthetic.toy_pair(n_cells=100, n_spots=50, n_genes=20, n_types=2, n_hidden_genes=2)
    reference.var_names = [f"ENSG{i}" for i in range(reference.n_vars)]
    with pytest.raises(ValueError, match="share 0 genes .* same naming"):
        get_method("nnls")().run(slide, reference)


def test_unknown_method_name():
    with pytest.raises(KeyError, match="Unknown method 'spagnc'.*stcore list"):
        get_method("spagnc")


def test_more_domains_than_spots(slide):
    with pytest.raises(ValueError, match="n_clusters=500 is larger than the number of spots \\(120\\)"):
        get_method("gmm")(n_domains=500, n_top_genes=40, n_pcs=5).run(slide)
