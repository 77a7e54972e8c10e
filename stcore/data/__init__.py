"""The course's datasets: small real data in ``data/`` and synthetic simulators with planted answers.

>>> import stcore.data
>>> stcore.data.list_datasets()[["name", "shape"]]          # what there is
>>> adata = stcore.data.load("dlpfc_151673")                 # AnnData, checked against the registry
>>> stcore.data.upstream_files("dlpfc_151673")               # raw sources: pinned URLs + sha256
>>> raw = stcore.data.fetch_upstream("dlpfc_151673")         # download them (needs internet)

``stcore.data.synthetic`` (simulators) is imported on first use.
"""

from __future__ import annotations

import importlib

from .loaders import central_patch, fetch_upstream, info, list_datasets, load, names, upstream_files
from .pairs import hippocampus_pair, merfish_moffitt_pair, seqfish_embryo_pair

__all__ = ["central_patch", "fetch_upstream", "hippocampus_pair", "info", "list_datasets", "load",
           "merfish_moffitt_pair", "names", "seqfish_embryo_pair", "upstream_files"]


def __getattr__(attr: str):
    if attr == "synthetic":
        try:
            module = importlib.import_module(f"{__name__}.synthetic")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.synthetic":
                raise
            raise AttributeError(f"{__name__}.synthetic is not available in this installation "
                                 "(stcore/data/synthetic.py is missing)") from None
        globals()["synthetic"] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def __dir__():
    return sorted(set(globals()) | {"synthetic"})
