"""Reference implementations, one file per method, and the registry that finds them by name.

Every method is a subclass of :class:`Method` decorated with :func:`register`. Its constructor takes the method's
options (with the official defaults) and ``run`` writes the task's outputs into AnnData the scverse way:

===========  ======================================================  ==================================
task         output                                                  needs
===========  ======================================================  ==================================
domains      ``obs["domain_<name>"]`` (categorical), ``obsm["X_<name>"]``  spatial data (+ image)
deconv       ``obsm["proportions_<name>"]`` (DataFrame, types as columns)  spatial data + reference
impute       ``obsm["imputed_<name>"]`` (DataFrame, genes as columns)     spatial data + reference
locate       ``reference.obsm["spatial_<name>"]`` (returned AnnData)      spatial data + reference
multiomics   ``obs["domain_<name>"]``, ``obsm["X_<name>"]``               two modalities on the same spots
===========  ======================================================  ==================================

From Python::

    from stcore.methods import get_method
    adata = get_method("leiden")(n_domains=7).run(adata)

From the shell: ``stcore run leiden slide.h5ad -o out.h5ad --n-domains 7``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil

import pandas as pd

__all__ = ["TASKS", "Method", "register", "get_method", "available", "method_options"]

TASKS = {
    "domains": "spatial domain identification",
    "deconv": "cell-type deconvolution of spots",
    "impute": "missing-gene imputation",
    "locate": "spatial location reconstruction of dissociated cells",
    "multiomics": "integration of two modalities measured on the same spots",
}

_REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """Base class of every registered method.

    Subclasses set ``name``, ``task``, ``summary`` and ``paper``, take their options as keyword arguments in
    ``__init__`` (documented, with defaults) and implement :meth:`run`.
    """

    name: str = ""
    task: str = ""
    summary: str = ""
    paper: str = ""
    needs_reference: bool = False
    uses_image: bool = False

    def run(self, adata, reference=None):
        """Fit on ``adata`` (and ``reference``) and return the AnnData holding the outputs."""
        raise NotImplementedError

    def _check_reference(self, reference):
        if self.needs_reference and reference is None:
            raise ValueError(f"{self.name} needs a single-cell reference: pass reference=... "
                             "(command line: --reference REF.h5ad).")

    @property
    def key(self) -> str:
        """Suffix of the output keys, e.g. ``obs["domain_<key>"]``."""
        return self.name


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name or cls.task not in TASKS:
        raise ValueError(f"{cls.__name__} needs a name and a task among {sorted(TASKS)}.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"Two methods are registered as {cls.name!r}.")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> type[Method]:
    """The registered class called ``name`` (case-insensitive)."""
    _load_all()
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown method {name!r}.{hint} Run `stcore list` to see all {len(_REGISTRY)} methods.")
    return _REGISTRY[key]


def available(task: str | None = None) -> pd.DataFrame:
    """Table of the registered methods (optionally of one task)."""
    _load_all()
    if task is not None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}.")
    rows = [
        dict(method=c.name, task=c.task, summary=c.summary, image=c.uses_image, reference=c.needs_reference,
             paper=c.paper)
        for c in _REGISTRY.values() if task is None or c.task == task
    ]
    return pd.DataFrame(rows, columns=["method", "task", "summary", "image", "reference", "paper"]).sort_values(
        ["task", "method"], ignore_index=True)


def method_options(cls: type[Method]) -> dict[str, inspect.Parameter]:
    """The keyword options of a method's constructor (name -> ``inspect.Parameter``)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
