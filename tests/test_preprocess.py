"""stcore.preprocess: PCA solvers."""

import numpy as np
import pytest

from stcore import preprocess


@pytest.fixture(scope="module")
def low_rank():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(300, 5)) * [10, 8, 6, 4, 2]) @ rng.normal(size=(5, 80)) + rng.normal(size=(300, 80))


@pytest.mark.parametrize("scale", [False, True])
def test_randomized_pca_matches_exact_pca(low_rank, scale):
    exact = preprocess.pca(low_rank, 5, scale=scale)
    fast = preprocess.pca(low_rank, 5, scale=scale, solver="randomized")
    assert fast.shape == exact.shape == (300, 5)
    for k in range(5):                                   # the same components, up to sign
        assert abs(np.corrcoef(exact[:, k], fast[:, k])[0, 1]) > 0.999
    assert np.allclose(fast.mean(0), 0, atol=1e-3)       # centred even without scaling


def test_pca_rejects_unknown_solver(low_rank):
    with pytest.raises(ValueError, match="arpack"):
        preprocess.pca(low_rank, 5, solver="lobpcg")
