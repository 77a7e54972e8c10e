"""Spatial data paired with a single-cell reference, with cell-type names made comparable."""

from __future__ import annotations

from .loaders import load

__all__ = ["MERFISH_TO_SHARED", "REFERENCE_TO_SHARED", "merfish_moffitt_pair"]

#: MERFISH cell classes of Moffitt et al. (2018) -> the classes the scRNA-seq reference also has.
MERFISH_TO_SHARED = {
    "Astrocyte": "Astrocyte", "Endothelial 1": "Endothelial", "Endothelial 2": "Endothelial",
    "Endothelial 3": "Endothelial", "Ependymal": "Ependymal", "Excitatory": "Excitatory", "Inhibitory": "Inhibitory",
    "Microglia": "Microglia", "OD Immature 1": "OD Immature", "OD Immature 2": "OD Immature",
    "OD Mature 1": "OD Mature", "OD Mature 2": "OD Mature", "OD Mature 3": "OD Mature", "OD Mature 4": "OD Mature",
    "Pericytes": "Mural",
}
#: Cell types of the Moffitt scRNA-seq reference -> the same shared classes.
REFERENCE_TO_SHARED = {
    "Astrocytes": "Astrocyte", "Endothelial": "Endothelial", "Ependymal": "Ependymal", "Excitatory": "Excitatory",
    "Inhibitory": "Inhibitory", "Microglia": "Microglia", "Immature oligodendrocyte": "OD Immature",
    "Newly formed oligodendrocyte": "OD Immature", "Mature oligodendrocyte": "OD Mature", "Mural": "Mural",
}


def merfish_moffitt_pair():
    """``(cells, reference)``: MERFISH hypothalamus cells and the Moffitt scRNA-seq reference, restricted to the
    cell classes both share and labelled with them in ``obs["cell_type"]``.

    Classes only one side has (``Ambiguous``, ``Unstable``, ``Fibroblast``, ``Macrophage``) are dropped; the
    MERFISH sub-classes (``OD Mature 1``–``4``, ``Endothelial 1``–``3``) are merged as the reference has them.
    The MERFISH cells keep their original class in ``obs["cell_class"]``.
    """
    cells = load("merfish_hypothalamus")
    cells = cells[cells.obs["cell_class"].isin(list(MERFISH_TO_SHARED))].copy()
    cells.obs["cell_type"] = cells.obs["cell_class"].map(MERFISH_TO_SHARED).astype(str)
    reference = load("moffitt_scrna")
    reference = reference[reference.obs["cell_type"].isin(list(REFERENCE_TO_SHARED))].copy()
    reference.obs["cell_type"] = reference.obs["cell_type"].map(REFERENCE_TO_SHARED).astype(str)
    return cells, reference
