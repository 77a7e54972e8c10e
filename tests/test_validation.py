import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from stcore import validation as v


def test_coords_checks():
    assert v.check_coords([[0, 1], [2, 3]]).dtype == np.float64
    with pytest.raises(KeyError, match="obsm\\['spatial'\\]"):
        v.check_coords(None)
    with pytest.raises(ValueError, match="shape \\(n, 2\\)"):
        v.check_coords(np.zeros(5))
    with pytest.raises(ValueError, match="shape \\(n, 2\\)"):
        v.check_coords(np.zeros((5, 4)))
    with pytest.raises(ValueError, match="has 2 rows but the data has 3"):
        v.check_coords(np.zeros((2, 2)), n_obs=3)
    with pytest.raises(ValueError, match="NaN"):
        v.check_coords([[0, np.nan], [1, 1]])
    with pytest.raises(ValueError, match="numbers"):
        v.check_coords(np.array([["a", "b"]]))


def test_spatial_coords_from_anndata():
    a = ad.AnnData(np.ones((3, 2)))
    with pytest.raises(KeyError, match="missing"):
        v.spatial_coords(a)
    a.obsm["spatial"] = np.arange(6).reshape(3, 2)
    assert v.spatial_coords(a).shape == (3, 2)


@pytest.mark.parametrize("X", [np.array([[1, 0], [3, 5]]), sparse.csr_matrix(np.array([[1.0, 0], [3, 5]]))])
def test_counts_accepted(X):
    v.check_counts(X)


def test_counts_rejected_with_advice():
    with pytest.raises(ValueError, match="non-integer.*raw counts"):
        v.check_counts(np.log1p(np.array([[1.0, 2.0]])))
    with pytest.raises(ValueError, match="negative"):
        v.check_counts(np.array([[-1.0, 2.0]]))
    with pytest.raises(ValueError, match="NaN"):
        v.check_counts(sparse.csr_matrix(np.array([[np.nan, 2.0]])))
    a = ad.AnnData(np.ones((2, 2)))
    with pytest.raises(KeyError, match="layers"):
        v.counts_matrix(a, layer="counts")


def test_n_clusters():
    v.check_n_clusters(3, 10)
    with pytest.raises(ValueError, match="larger than the number of spots"):
        v.check_n_clusters(11, 10)
    with pytest.raises(ValueError, match="positive"):
        v.check_n_clusters(0, 10)


def test_image_covers():
    img = np.zeros((100, 200, 3))
    assert np.allclose(v.check_image_covers(img, np.array([[10, 10], [199, 99]]), 0.5), [[5, 5], [99.5, 49.5]])
    with pytest.raises(ValueError, match="1 of 2 spots fall outside the 200x100"):
        v.check_image_covers(img, np.array([[10, 10], [250, 50]]))
    with pytest.raises(ValueError, match="scale factor"):
        v.check_image_covers(img, np.array([[1000, 1000]]), scale=0.5)


def test_shared_genes_and_labels():
    a = ad.AnnData(np.ones((2, 3)), var=pd.DataFrame(index=["A", "B", "C"]))
    b = ad.AnnData(np.ones((2, 2)), var=pd.DataFrame(index=["C", "A"]),
                   obs=pd.DataFrame({"cell_type": ["t1", None]}, index=["c1", "c2"]))
    assert list(v.shared_genes(a, b)) == ["A", "C"]
    c = ad.AnnData(np.ones((2, 2)), var=pd.DataFrame(index=["ENSG1", "ENSG2"]))
    with pytest.raises(ValueError, match="share 0 genes.*same naming"):
        v.shared_genes(a, c)
    with pytest.raises(KeyError, match="--cell-type-key"):
        v.cell_type_labels(b, "subclass")
    with pytest.raises(ValueError, match="1 reference cells have no"):
        v.cell_type_labels(b)
