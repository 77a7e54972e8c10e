"""Spatial data paired with a single-cell reference, with cell-type names made comparable."""

from __future__ import annotations

import numpy as np

from .loaders import load

__all__ = ["MERFISH_TO_SHARED", "REFERENCE_TO_SHARED", "hippocampus_pair", "merfish_moffitt_pair",
           "seqfish_embryo_pair"]

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


def seqfish_embryo_pair(min_cells: int = 50, seed: int = 0):
    """``(cells, reference)``: two disjoint halves of the seqFISH mouse embryo cells (optical section z2).

    The physical cells (``obs["cell_id"]``) are split at random into two halves: one half keeps its positions
    (``cells``, to be summed into grid spots), the other is the single-cell ``reference`` (its positions removed).
    Cell types with fewer than ``min_cells`` cells in the section are dropped from both (with the default 50:
    ``NMP``, ``Definitive endoderm``, ``Allantois``, ``ExE endoderm``, ``Blood progenitors``, 32 cells in all), so
    that every type has cells on both sides.
    """
    embryo = load("seqfish_embryo")
    section = embryo[embryo.obs["z"] == 2]
    counts = section.obs["cell_type"].value_counts()
    section = section[section.obs["cell_type"].isin(counts.index[counts >= min_cells])].copy()
    section.obs["cell_type"] = section.obs["cell_type"].astype(str)
    ids = np.unique(section.obs["cell_id"])
    ref_ids = np.random.default_rng(seed).choice(ids, len(ids) // 2, replace=False)
    in_ref = section.obs["cell_id"].isin(ref_ids).to_numpy()
    reference = section[in_ref].copy()
    del reference.obsm["spatial"]
    return section[~in_ref].copy(), reference


def hippocampus_pair():
    """``(spots, reference)``: the real mouse hippocampus Visium spots and the Drop-seq reference (no truth)."""
    return load("hippocampus_visium"), load("hippocampus_dropseq")
