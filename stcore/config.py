"""Run-time settings, read from the environment in one place.

=====================  ==================================================  ===========================
variable               meaning                                             default
=====================  ==================================================  ===========================
``STCORE_FAST``        ``1`` shrinks epochs and data so a chapter runs     ``0`` (full budget)
                       in about a minute (CI, quick checks)
``STCORE_SEED``        global random seed                                  ``0``
``STCORE_DEVICE``      ``cpu``, ``cuda`` or ``mps``                        ``cpu``
``STCORE_DATA_DIR``    folder with the course data (``*.h5ad``, ...)       the repository's ``data/``
                                                                           if present, else
                                                                           ``~/.cache/stcore``
=====================  ==================================================  ===========================

Chapters call :func:`get` once and never hard-code epochs or devices::

    cfg = stcore.config.get()
    model.fit(..., epochs=cfg.epochs(full=600))   # 600 in full mode, a handful in FAST mode
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_DEVICES = {"cpu", "cuda", "mps"}


def _flag(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a yes/no value; use 1 or 0.")


def _default_data_dir() -> Path:
    repo_data = Path(__file__).resolve().parents[1] / "data"
    if repo_data.is_dir() and any(repo_data.glob("*.h5ad")):
        return repo_data
    return Path.home() / ".cache" / "stcore"


@dataclass(frozen=True)
class Config:
    """Settings of one run. Build it with :func:`get`, not by hand."""

    fast: bool
    seed: int
    device: str
    data_dir: Path

    @property
    def tier(self) -> str:
        """``"fast"`` or ``"full"``: the budget the run was given."""
        return "fast" if self.fast else "full"

    def epochs(self, full: int, fast: int = 3) -> int:
        """Number of training epochs: ``full`` normally, ``min(fast, full)`` in FAST mode."""
        if full < 1:
            raise ValueError(f"full={full}: the number of epochs must be at least 1.")
        return min(fast, full) if self.fast else full

    def pick(self, full, fast):
        """Any budgeted value (number of seeds, spots, genes ...): ``fast`` in FAST mode, else ``full``."""
        return fast if self.fast else full

    def __repr__(self) -> str:
        return (f"Config(tier={self.tier!r}, seed={self.seed}, device={self.device!r}, "
                f"data_dir='{self.data_dir}')")


def get() -> Config:
    """Read ``STCORE_FAST``, ``STCORE_SEED``, ``STCORE_DEVICE`` and ``STCORE_DATA_DIR``."""
    raw_seed = os.environ.get("STCORE_SEED", "0")
    try:
        seed = int(raw_seed)
    except ValueError:
        raise ValueError(f"STCORE_SEED={raw_seed!r} is not an integer.") from None
    device = os.environ.get("STCORE_DEVICE", "cpu").strip().lower() or "cpu"
    if device not in _DEVICES:
        raise ValueError(f"STCORE_DEVICE={device!r}: choose one of {sorted(_DEVICES)}.")
    data_dir = os.environ.get("STCORE_DATA_DIR")
    return Config(
        fast=_flag("STCORE_FAST"),
        seed=seed,
        device=device,
        data_dir=Path(data_dir).expanduser() if data_dir else _default_data_dir(),
    )
