"""stcore: the tested core of the course *Deep learning for integrating spatial transcriptomics with other
modalities*.

Submodules are imported on first use, so ``import stcore`` stays light::

    import stcore
    cfg = stcore.config.get()
    adata = stcore.data.load("dlpfc_151673")
    edge_index = stcore.graphs.knn_graph(adata.obsm["spatial"], k=6)
"""

from __future__ import annotations

import importlib
import os

# numba (used by scanpy) resets the OpenMP thread count that torch shares to its own default, all cores. Keep it
# at the user's OMP_NUM_THREADS so that `OMP_NUM_THREADS=1` still means one thread per process after a scanpy call.
if "OMP_NUM_THREADS" in os.environ:
    os.environ.setdefault("NUMBA_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

__version__ = "0.1.0"

_SUBMODULES = (
    "bench", "cli", "cluster", "config", "data", "graphs", "images", "methods", "metrics", "nn", "plotting",
    "preprocess", "strategies", "train", "validation",
)
__all__ = list(_SUBMODULES) + ["show_versions"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'stcore' has no attribute {name!r}")


def show_versions() -> dict:
    """Versions of Python and the main libraries, and the settings of this run (for bug reports and the book)."""
    import platform
    from importlib import metadata

    info = {"python": platform.python_version(), "platform": platform.platform(), "stcore": __version__}
    for pkg in ("torch", "torch-geometric", "numpy", "scipy", "scanpy", "anndata", "scikit-learn", "leidenalg"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    info["config"] = repr(importlib.import_module(f"{__name__}.config").get())
    return info
