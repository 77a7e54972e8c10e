from pathlib import Path

import pytest

from stcore import config


def test_defaults(monkeypatch):
    for var in ("STCORE_FAST", "STCORE_SEED", "STCORE_DEVICE", "STCORE_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    cfg = config.get()
    assert (cfg.fast, cfg.seed, cfg.device, cfg.tier) == (False, 0, "cpu", "full")
    assert cfg.epochs(full=600) == 600
    assert cfg.data_dir == Path(__file__).resolve().parents[1] / "data"


def test_fast_mode_shrinks_budgets(monkeypatch):
    monkeypatch.setenv("STCORE_FAST", "1")
    cfg = config.get()
    assert cfg.tier == "fast"
    assert cfg.epochs(full=600) == 3
    assert cfg.epochs(full=600, fast=10) == 10
    assert cfg.epochs(full=2) == 2
    assert cfg.pick(full=[0, 1, 2], fast=[0]) == [0]


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("STCORE_SEED", "42")
    monkeypatch.setenv("STCORE_DEVICE", "CUDA")
    monkeypatch.setenv("STCORE_DATA_DIR", str(tmp_path))
    cfg = config.get()
    assert (cfg.seed, cfg.device, cfg.data_dir) == (42, "cuda", tmp_path)


@pytest.mark.parametrize("var,value,match", [
    ("STCORE_FAST", "maybe", "yes/no"),
    ("STCORE_SEED", "abc", "not an integer"),
    ("STCORE_DEVICE", "tpu", "choose one of"),
])
def test_bad_values_are_explained(monkeypatch, var, value, match):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=match):
        config.get()


def test_epochs_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        config.get().epochs(full=0)
