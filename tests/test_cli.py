"""The command line: list, show, run (on any AnnData in the conventions) and option parsing."""

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from stcore.cli import main, parse_method_options
from stcore.data import synthetic
from stcore.methods import available, get_method


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    slide = synthetic.toy_domains(n_spots=300, n_genes=60, n_domains=3, seed=0)
    slide.write_h5ad(d / "slide.h5ad")
    reference, spatial = synthetic.toy_pair(n_cells=300, n_spots=200, n_genes=40, n_types=3, n_hidden_genes=5)
    reference.write_h5ad(d / "ref.h5ad")
    spatial.write_h5ad(d / "cells.h5ad")
    return d


def test_list_and_show(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "domains:" in out and "gmm" in out and "nnls" in out and "[reference]" in out
    assert main(["show", "gmm"]) == 0
    out = capsys.readouterr().out
    assert "--n-domains (default: 7)" in out and "--refine (default: False)" in out


def test_run_domains_writes_output(files, capsys):
    out = files / "out.h5ad"
    assert main(["run", "gmm", str(files / "slide.h5ad"), "-o", str(out), "--n-domains", "3",
                 "--n-top-genes", "60", "--n-pcs", "8", "--refine"]) == 0
    result = ad.read_h5ad(out)
    assert result.obs["domain_gmm"].nunique() == 3
    assert result.obsm["X_gmm"].shape == (300, 8)
    assert "done in" in capsys.readouterr().out


def test_run_with_reference_and_cell_type_key(files, tmp_path):
    ref = ad.read_h5ad(files / "ref.h5ad")
    ref.obs["subclass"] = ref.obs.pop("cell_type")
    ref.write_h5ad(tmp_path / "ref2.h5ad")
    cells = ad.read_h5ad(files / "cells.h5ad")
    spots = synthetic.pseudo_spots(ref, n_spots=50, cell_type_key="subclass", seed=0)
    spots = spots[:, spots.var_names.isin(cells.var_names)].copy()
    spots.write_h5ad(tmp_path / "spots.h5ad")
    out = tmp_path / "prop.h5ad"
    assert main(["run", "nnls", str(tmp_path / "spots.h5ad"), "--reference", str(tmp_path / "ref2.h5ad"),
                 "-o", str(out), "--cell-type-key", "subclass"]) == 0
    props = ad.read_h5ad(out).obsm["proportions_nnls"]
    assert isinstance(props, pd.DataFrame) and np.allclose(props.sum(1), 1)


def test_run_on_a_scanpy_style_visium_file(tmp_path):
    """A file laid out as scanpy.read_visium / squidpy write it: int counts, gene_ids, images, scale factors."""
    slide = synthetic.toy_domains(n_spots=200, n_genes=40, n_domains=2, seed=1)
    adata = ad.AnnData(
        X=sparse.csr_matrix(slide.X.toarray().astype(np.int64)),
        obs=pd.DataFrame({"in_tissue": 1, "array_row": slide.obs["array_row"].to_numpy(),
                          "array_col": slide.obs["array_col"].to_numpy()},
                         index=[f"AAAC{i:06d}-1" for i in range(200)]),
        var=pd.DataFrame({"gene_ids": [f"ENSG{i:011d}" for i in range(40)], "feature_types": "Gene Expression",
                          "genome": "GRCh38"}, index=[f"GENE{i}" for i in range(40)]),
    )
    adata.obsm["spatial"] = np.round(slide.obsm["spatial"]).astype(np.int64)
    adata.uns["spatial"] = {"V1_Demo": {"images": {"hires": slide.uns["spatial"]["toy"]["images"]["hires"]},
                                        "scalefactors": slide.uns["spatial"]["toy"]["scalefactors"],
                                        "metadata": {"chemistry_description": "Spatial 3' v1"}}}
    adata.write_h5ad(tmp_path / "visium.h5ad")
    assert main(["run", "leiden", str(tmp_path / "visium.h5ad"), "-o", str(tmp_path / "o.h5ad"),
                 "--n-domains", "2", "--n-top-genes", "40", "--n-pcs", "5"]) == 0
    assert ad.read_h5ad(tmp_path / "o.h5ad").obs["domain_leiden"].nunique() == 2


def test_option_parsing_types():
    cls = get_method("knn_impute")
    assert parse_method_options(cls, ["--k", "5", "--genes", "A,B"]) == {"k": 5, "genes": ["A", "B"]}
    assert parse_method_options(get_method("gmm"), ["--refine", "--n-domains=4"]) == {"refine": True, "n_domains": 4}
    assert parse_method_options(get_method("leiden"), ["--n-domains", "none"]) == {"n_domains": None}
    with pytest.raises(ValueError, match="has no option --bogus. Its options: "):
        parse_method_options(cls, ["--bogus", "1"])
    with pytest.raises(ValueError, match="expects int"):
        parse_method_options(cls, ["--k", "many"])


def test_errors_exit_2_with_a_message(files, capsys):
    assert main(["run", "leidn", str(files / "slide.h5ad"), "-o", "x.h5ad"]) == 2
    assert "Unknown method 'leidn'. Did you mean leiden" in capsys.readouterr().err
    assert main(["run", "nnls", str(files / "cells.h5ad"), "-o", "x.h5ad"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["run", "gmm", str(files / "missing.h5ad"), "-o", "x.h5ad"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "gmm", str(files / "slide.h5ad"), "-o", "x.h5ad", "--n-domains", "5000"]) == 2
    assert "larger than the number of spots" in capsys.readouterr().err


def test_console_script():
    script = Path(sys.executable).with_name("stcore")
    assert script.exists(), "the stcore console script is installed with the package (pip install -e .)"
    proc = subprocess.run([str(script), "list", "--task", "domains"], capture_output=True, text=True)
    assert proc.returncode == 0 and "leiden" in proc.stdout and "nnls" not in proc.stdout


def test_bench_options_are_parsed():
    from stcore.cli import _parse_options

    assert _parse_options("histology=false,b=49,lr=0.05,name=x") == {"histology": False, "b": 49, "lr": 0.05,
                                                                      "name": "x"}
    assert _parse_options("") == {}
    with pytest.raises(ValueError, match="key=value"):
        _parse_options("histology")


@pytest.fixture(scope="module")
def foreign_pair(tmp_path_factory):
    """A spatial/reference pair as a user might bring it: a renamed type column, genes in another order, genes only
    one side has, spot names and positions of its own."""
    d = tmp_path_factory.mktemp("pair")
    reference, _ = synthetic.toy_pair(n_cells=240, n_spots=10, n_genes=40, n_types=3, n_hidden_genes=5, seed=3)
    reference.obs["subclass"] = reference.obs.pop("cell_type")
    spots = synthetic.pseudo_spots(reference, n_spots=120, cell_type_key="subclass", seed=1)
    spots.obsm["spatial"] = synthetic.hex_lattice(spots.n_obs)[2]
    spots.obs_names = [f"barcode-{i}" for i in range(spots.n_obs)]
    extra = ad.AnnData(sparse.csr_matrix(np.ones((spots.n_obs, 2), dtype=np.float32)), obs=spots.obs[[]],
                       var=pd.DataFrame(index=["OnlySpatial1", "OnlySpatial2"]))
    spots = ad.concat([spots[:, ::-1], extra], axis=1, merge="first")
    spots.obsm["spatial"] = synthetic.hex_lattice(spots.n_obs)[2]
    spots.write_h5ad(d / "spots.h5ad")
    reference.write_h5ad(d / "ref.h5ad")
    return d, sorted(reference.obs["subclass"].unique())


#: Small budgets given on the command line, as a user would shorten a run (the defaults are the official ones).
SHORT_RUNS = {
    "celldart": "--npseudo 500 --n-iterations 20 --init-train-epoch 2 --batch-size 64",
    "destvi": "--sc-epochs 5 --st-epochs 5",
    "dstg": "--n-pseudo 200 --epochs 10",
    "graphst_deconv": "--epochs 10 --sc-epochs 10 --map-epochs 10",
    "gtad": "--n-pseudo 200 --epochs 10",
    "sd2": "--n-pseudo 200 --epochs 10",
    "starfysh": "--epochs 3 --histology false",
}


@pytest.mark.parametrize("method", sorted(available("deconv")["method"]))
def test_every_deconvolution_method_runs_on_a_foreign_pair(foreign_pair, method):
    d, types = foreign_pair
    out = d / f"{method}.h5ad"
    assert main(["run", method, str(d / "spots.h5ad"), "--reference", str(d / "ref.h5ad"), "-o", str(out),
                 "--cell-type-key", "subclass",
                 *(f"{SHORT_RUNS[method]} --progress false".split() if method in SHORT_RUNS else [])]) == 0
    result = ad.read_h5ad(out)
    props = result.obsm[f"proportions_{method}"]
    assert sorted(props.columns) == types and list(props.index) == list(result.obs_names)
    assert np.isfinite(props.to_numpy()).all() and (props.to_numpy() >= 0).all()
    assert np.allclose(props.sum(1), 1, atol=1e-4)
