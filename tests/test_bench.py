"""The benchmark runner: one process per run, metrics, time and memory, a leaderboard on disk (FAST mode)."""

import pandas as pd
import pytest

from stcore import bench


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setenv("STCORE_FAST", "1")


def test_domain_leaderboard(tmp_path):
    table = bench.run("domains", methods=["gmm"], seeds=[0], datasets=["dlpfc_151673"], out_dir=tmp_path,
                      progress=False)
    assert "error" not in table or table["error"].isna().all()
    row = table.iloc[0]
    assert row["method"] == "gmm" and row["n_obs"] == 800  # FAST mode: a contiguous crop
    assert 0.05 < row["ARI"] <= 1 and 0 < row["NMI"] <= 1
    assert 0.05 < row["ARI_refined"] <= 1 and row["ARI_refined"] != row["ARI"]  # the majority vote changed labels
    assert row["wall_s"] > 0 and row["peak_rss_mb"] > 100 and row["peak_delta_mb"] >= 0
    assert (tmp_path / "domains.csv").exists()
    assert "| gmm | dlpfc_151673 | 1 |" in (tmp_path / "domains.md").read_text()


def test_option_variants_are_separate_rows():
    table = bench.run("domains", methods=["spagcn", "gmm"], seeds=[0], datasets=["dlpfc_151673"],
                      options=[{}, {"histology": False, "epochs": 5}], out_dir=None, progress=False)
    assert "error" not in table or table["error"].isna().all()
    assert len(table) == 3  # gmm takes neither option: it runs once
    gmm_options = table.loc[table["method"] == "gmm", "options"].tolist()
    assert len(gmm_options) == 1 and "histology" not in gmm_options[0]  # options a method lacks are dropped
    spagcn_options = table.loc[table["method"] == "spagcn", "options"].tolist()
    assert '"histology": false' in spagcn_options[1] and '"histology"' not in spagcn_options[0]
    summary = bench.summarise(table)
    assert summary.index.names == ["method", "dataset", "options"] and len(summary) == 3


def test_graph_builders_are_timed(tmp_path):
    table = bench.run("graphs", methods=["knn_graph", "visium_hex_graph"], seeds=[0], out_dir=None,
                      progress=False)
    assert set(table["method"]) == {"knn_graph", "visium_hex_graph"}
    knn = table.set_index("method").loc["knn_graph"]
    assert knn["n_nodes"] == 10_000 and 6 * 10_000 <= knn["n_edges"] <= 12 * 10_000


def test_failed_runs_are_reported_not_hidden():
    table = bench.run("domains", methods=["gmm"], seeds=[0], datasets=["no_such_slide"], out_dir=None,
                      progress=False)
    assert table["error"].notna().all() and "no_such_slide" in table["error"].iloc[0]
    assert "FAILED gmm on no_such_slide" in bench.format_table(table)


def test_summarise_means_over_seeds():
    table = pd.DataFrame({"method": ["a", "a"], "dataset": ["d", "d"], "seed": [0, 1], "ARI": [0.2, 0.4]})
    summary = bench.summarise(table)
    assert summary.loc[("a", "d"), "ARI"] == pytest.approx(0.3)
    assert summary.loc[("a", "d"), "ARI_sd"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Unknown benchmark task"):
        bench.run("segmentation")
