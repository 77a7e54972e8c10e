"""Simulators with planted answers, for unit tests, method tests and exercises.

Every simulator is deterministic given ``seed`` and returns AnnData in the package conventions: raw integer
counts in ``.X`` (scipy CSR, float32) drawn from a negative binomial, coordinates in ``obsm["spatial"]`` as
(x = column, y = row), ground truth in ``obs`` / ``obsm``.

=================  ==============================================================  ===============================
simulator          what it plants                                                   used for
=================  ==============================================================  ===============================
:func:`toy_domains`   spatial domains on a Visium-like hex lattice, marker genes,   domain identification, with and
                      an H&E-like image whose colour/texture follows the domains     without histology
:func:`pseudo_spots`  spots mixed from labelled single cells (known proportions)     deconvolution
:func:`grid_spots`    Li et al. (2022) gridding of image-based single-cell ST         deconvolution (realistic truth)
:func:`toy_pair`      scRNA-seq reference + single-cell ST missing some genes,       imputation, location recovery
                      with true hidden counts and true reference positions
:func:`toy_multiome`  two modalities on the same spots, each blind to some domains   multi-omics integration
=================  ==============================================================  ===============================

Negative binomial convention: ``x ~ NB(mean=mu, Var = mu + noise * mu**2)`` (gamma-Poisson mixture with
shape ``1 / noise``).
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["grid_spots", "hex_lattice", "pseudo_spots", "toy_domains", "toy_multiome", "toy_pair"]

#: centre-to-centre distance of neighbouring toy spots, in "full-resolution pixels" (Visium: 100 µm).
SPOT_SPACING = 100.0
#: scale factors of the toy images (full-resolution pixel -> image pixel).
HIRES_SCALEF = 0.2
LOWRES_SCALEF = 0.05
#: library id under which :func:`toy_domains` stores its image.
LIBRARY_ID = "toy"

# H&E-like shades (RGB): eosin pinks to haematoxylin purples, one per domain (cycled with a lightness shift).
_PALETTE = np.array([
    [236, 168, 200],   # light pink (eosin-rich stroma)
    [176, 108, 176],   # mauve
    [214, 128, 160],   # rose
    [146, 96, 172],    # violet (cell-dense)
    [228, 196, 222],   # pale lavender (sparse)
    [196, 142, 200],   # lilac
    [244, 150, 178],   # salmon pink
    [128, 80, 140],    # dark purple
    [210, 170, 150],   # beige (fibrous)
    [170, 140, 210],   # blue-violet
], dtype=float)
_NEUTRAL = np.array([200.0, 140.0, 185.0])       # tissue colour when image_signal = 0
_NUCLEUS = np.array([92.0, 52.0, 120.0])          # haematoxylin-stained nuclei
_GLASS = np.array([244.0, 242.0, 246.0])          # background


# --------------------------------------------------------------------------------------------------- helpers
def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def _nb(rng: np.random.Generator, mu: np.ndarray, noise: float) -> np.ndarray:
    """Negative-binomial counts with mean ``mu`` and ``Var = mu + noise * mu**2`` (Poisson when noise=0)."""
    mu = np.asarray(mu, dtype=float)
    if noise <= 0:
        return rng.poisson(mu)
    shape = 1.0 / noise
    return rng.poisson(rng.gamma(shape, mu / shape))


def _counts_matrix(counts: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix(np.asarray(counts, dtype=np.float32))


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}.")
    return int(value)


def _check_range(name: str, value, minimum: int = 1) -> tuple[int, int]:
    if np.isscalar(value):
        value = (value, value)
    if len(value) != 2:
        raise ValueError(f"{name}={value!r}: give a (low, high) pair of integers, e.g. (2, 10).")
    lo, hi = (int(v) for v in value)
    if lo < minimum or hi < lo:
        raise ValueError(f"{name}={value!r}: need {minimum} <= low <= high.")
    return lo, hi


def hex_lattice(n_spots: int, spacing: float = SPOT_SPACING, margin: float | None = None):
    """Visium-like hexagonal lattice of ``n_spots`` spots filling a roughly square area.

    Rows are ``spacing * sqrt(3) / 2`` apart; odd rows are shifted by half a spacing, and ``array_col`` uses the
    Visium convention (even columns on even rows, odd columns on odd rows, neighbours in a row 2 columns apart).

    Returns
    -------
    array_row, array_col : (n_spots,) int
    coords : (n_spots, 2) float, ``(x, y) = (margin + array_col * spacing / 2, margin + array_row * spacing * sqrt(3)/2)``
    """
    n_spots = _check_positive_int("n_spots", n_spots)
    margin = 1.5 * spacing if margin is None else float(margin)
    n_rows = max(1, round(np.sqrt(n_spots / (np.sqrt(3) / 2))))
    per_row = int(np.ceil(n_spots / n_rows))
    idx = np.arange(n_spots)
    array_row = idx // per_row
    array_col = 2 * (idx % per_row) + (array_row % 2)
    coords = np.column_stack([margin + array_col * spacing / 2.0,
                              margin + array_row * spacing * np.sqrt(3) / 2.0])
    return array_row.astype(int), array_col.astype(int), coords


def _plant_domains(coords: np.ndarray, n_domains: int, layout: str, rng: np.random.Generator) -> np.ndarray:
    """Domain label per spot: curved parallel bands ("layers") or Voronoi regions ("blobs")."""
    if layout == "layers":
        x = (coords[:, 0] - coords[:, 0].min()) / max(np.ptp(coords[:, 0]), 1e-9)
        height = max(np.ptp(coords[:, 1]), 1e-9)
        phase = rng.uniform(0, 2 * np.pi)
        # depth below a gently curved "pial surface", as in a cortex section
        t = coords[:, 1] + 0.08 * height * np.sin(2 * np.pi * 0.8 * x + phase)
        edges = np.quantile(t, np.linspace(0, 1, n_domains + 1)[1:-1])
        return np.searchsorted(edges, t, side="right")
    if layout == "blobs":
        # Voronoi cells of well-spread seeds: k-means++ seeding then a few Lloyd steps (balanced, convex regions)
        seeds = [coords[rng.integers(len(coords))]]
        for _ in range(1, n_domains):
            d2 = np.min(((coords[:, None, :] - np.asarray(seeds)[None]) ** 2).sum(-1), axis=1)
            seeds.append(coords[rng.choice(len(coords), p=d2 / d2.sum())])
        seeds = np.asarray(seeds, dtype=float)
        for _ in range(10):
            labels = cKDTree(seeds).query(coords)[1]
            for k in range(n_domains):
                if np.any(labels == k):
                    seeds[k] = coords[labels == k].mean(0)
        labels = cKDTree(seeds).query(coords)[1]
        # order domains by their mean (y, x) so that labels read top-left to bottom-right
        order = np.lexsort((seeds[:, 0], seeds[:, 1]))
        return np.argsort(order)[labels]
    raise ValueError(f"layout={layout!r}: choose 'layers' (parallel bands) or 'blobs' (Voronoi regions).")


def _domain_palette(n_domains: int) -> np.ndarray:
    reps = int(np.ceil(n_domains / len(_PALETTE)))
    cols = [np.clip(_PALETTE + 18.0 * r * (-1) ** r, 0, 255) for r in range(reps)]
    return np.concatenate(cols)[:n_domains]


def _render_he(coords: np.ndarray, domain: np.ndarray, n_domains: int, image_signal: float,
               rng: np.random.Generator, scalef: float = HIRES_SCALEF) -> np.ndarray:
    """H&E-like RGB image (uint8) of the lattice at ``scalef`` image pixels per full-resolution pixel.

    Tissue covers every pixel within 0.8 spacings of a spot and takes the colour and nucleus density of the nearest
    spot's domain, blended with a neutral tissue look: ``colour = neutral + image_signal * (domain - neutral)``.
    Pixel noise, a smooth stain-intensity field and dark nuclei (discs of 1-2 px) make it look like tissue.
    """
    margin = 1.5 * SPOT_SPACING
    width = int(np.ceil((coords[:, 0].max() + margin) * scalef)) + 1
    height = int(np.ceil((coords[:, 1].max() + margin) * scalef)) + 1
    rows, cols = np.mgrid[0:height, 0:width]
    # pixel (row i, col j) is centred at full-resolution (x, y) = (j, i) / scalef
    pix = np.column_stack([cols.ravel(), rows.ravel()]) / scalef
    dist, nearest = cKDTree(coords).query(pix)
    tissue = (dist < 0.8 * SPOT_SPACING).reshape(height, width)
    dom = domain[nearest].reshape(height, width)

    palette = _domain_palette(n_domains)
    colours = _NEUTRAL + image_signal * (palette - _NEUTRAL)
    # nuclei density per domain (fraction of pixels seeding a nucleus): alternating sparse / dense tissues
    dense = np.linspace(0.004, 0.03, n_domains)[rng.permutation(n_domains)]
    density = 0.015 + image_signal * (dense - 0.015)

    img = np.where(tissue[..., None], colours[dom], _GLASS)
    # smooth stain-intensity variation (same for every domain) and pixel noise
    field = ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=12 * scalef / 0.2)
    field *= 6.0 / max(field.std(), 1e-9)
    img = img + np.where(tissue, field, 0.0)[..., None]
    seeds = (rng.random((height, width)) < np.clip(density[dom], 0, 1)) & tissue
    disc = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    nuclei = ndimage.binary_dilation(seeds, structure=disc)
    img = np.where(nuclei[..., None], 0.7 * _NUCLEUS + 0.3 * img, img)
    img = img + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _as_categorical(labels: np.ndarray, n: int, prefix: str = "") -> pd.Categorical:
    cats = [f"{prefix}{k}" for k in range(n)]
    return pd.Categorical([cats[k] for k in labels], categories=cats)


# --------------------------------------------------------------------------------------------------- toy_domains
def toy_domains(
    n_spots: int = 900,
    n_genes: int = 100,
    n_domains: int = 4,
    layout: str = "layers",
    image: bool = True,
    image_signal: float = 1.0,
    noise: float = 0.2,
    marker_strength: float | Sequence[float] = 1.5,
    n_markers: int | None = None,
    twins: Sequence[tuple[int, int]] | None = None,
    depth: float = 1500.0,
    seed: int = 0,
) -> ad.AnnData:
    """Visium-like spots with planted spatial domains, marker genes and an H&E-like image.

    Spot ``i`` in domain ``d`` has counts ``x_ig ~ NB(s_i * exp(b_g + m_dg), noise)``: ``b_g`` a gene baseline,
    ``s_i`` a log-normal library size (sd 0.2) and ``m_dg = marker_strength[d]`` for the ``n_markers`` marker
    genes of domain ``d`` (0 otherwise).

    Parameters
    ----------
    n_spots, n_genes, n_domains
        Sizes. Spots sit on a hexagonal lattice (:func:`hex_lattice`) 100 "full-resolution pixels" apart.
    layout
        ``"layers"``: parallel, gently curved bands of equal size (a cortex section); ``"blobs"``: Voronoi regions.
    image
        Add an H&E-like image in ``uns["spatial"]["toy"]`` (``hires`` at scale 0.2, ``lowres`` at 0.05).
    image_signal
        How strongly the image follows the domains, in [0, 1]: 1 gives each domain its own colour and nucleus
        density, 0 an image whose statistics are the same everywhere (uninformative).
    noise
        Negative-binomial over-dispersion ``Var = mu + noise * mu**2``.
    marker_strength
        Log fold-change of marker genes, one value or one per domain. Small values make a domain hard to tell
        from the rest by expression alone.
    n_markers
        Marker genes per domain; default ``n_genes // (2 * n_domains)`` (at least 1).
    twins
        Pairs ``(a, b)`` of domains with *identical* expression (``b`` uses ``a``'s markers): only the image can
        separate them, e.g. ``twins=[(2, 3)]``.
    depth
        Mean total counts per spot.
    seed
        Random seed.

    Returns
    -------
    AnnData (n_spots, n_genes)
        ``.X`` raw counts (CSR float32); ``obs["domain"]`` (categorical "0".."K-1"), ``obs["array_row"]``,
        ``obs["array_col"]``; ``obsm["spatial"]`` (full-resolution pixels); ``var["marker_of"]`` ("" for
        background genes); ``varm["domain_means"]`` (n_genes, n_domains) the true means at ``s_i = 1``;
        ``uns["spatial"]["toy"]`` with ``images`` and ``scalefactors`` when ``image``.
    """
    n_spots = _check_positive_int("n_spots", n_spots)
    n_genes = _check_positive_int("n_genes", n_genes)
    n_domains = _check_positive_int("n_domains", n_domains, minimum=2)
    if n_domains > n_spots:
        raise ValueError(f"n_domains={n_domains} is more than n_spots={n_spots}.")
    if image_signal < 0:
        raise ValueError(f"image_signal={image_signal}: must be >= 0 (0 = uninformative image, 1 = full signal).")
    if noise < 0:
        raise ValueError(f"noise={noise}: the over-dispersion must be >= 0.")
    strength = np.broadcast_to(np.asarray(marker_strength, dtype=float), (n_domains,)).copy() \
        if np.ndim(marker_strength) == 0 else np.asarray(marker_strength, dtype=float)
    if strength.shape != (n_domains,):
        raise ValueError(f"marker_strength has {strength.size} values for {n_domains} domains; give one or "
                         f"one per domain.")
    twins = [] if twins is None else [tuple(int(v) for v in pair) for pair in twins]
    source = np.arange(n_domains)            # domain whose marker programme each domain uses
    for pair in twins:
        if len(pair) != 2 or not all(0 <= v < n_domains for v in pair) or pair[0] == pair[1]:
            raise ValueError(f"twins entry {pair}: give pairs of two different domain indices in "
                             f"[0, {n_domains - 1}], e.g. twins=[(2, 3)].")
        source[pair[1]] = source[pair[0]]
        strength[pair[1]] = strength[pair[0]]
    programmes = np.unique(source)
    if n_markers is None:
        n_markers = max(1, n_genes // (2 * n_domains))
    n_markers = _check_positive_int("n_markers", n_markers)
    if n_markers * len(programmes) > n_genes:
        raise ValueError(f"{len(programmes)} domain programmes x n_markers={n_markers} marker genes need more "
                         f"than n_genes={n_genes}; lower n_markers or raise n_genes.")

    rng = _rng(seed)
    array_row, array_col, coords = hex_lattice(n_spots)
    domain = _plant_domains(coords, n_domains, layout, rng)

    # expression programme
    baseline = rng.normal(np.log(depth / n_genes), 0.6, size=n_genes)
    genes = rng.permutation(n_genes)
    marker_of = np.full(n_genes, "", dtype=object)
    logfc = np.zeros((n_domains, n_genes))
    for j, p in enumerate(programmes):
        idx = genes[j * n_markers:(j + 1) * n_markers]
        for d in np.flatnonzero(source == p):
            logfc[d, idx] = strength[d]
            marker_of[idx] = ",".join(str(k) for k in np.flatnonzero(source == p))
    # keep expected depth roughly constant across domains
    means = np.exp(baseline[None, :] + logfc)
    means *= depth / means.sum(1, keepdims=True)
    size = np.exp(rng.normal(-0.02, 0.2, size=n_spots))
    counts = _nb(rng, size[:, None] * means[domain], noise)

    obs_names = [f"spot{i:04d}" for i in range(n_spots)]
    var_names = [f"gene{j:03d}" for j in range(n_genes)]
    adata = ad.AnnData(
        X=_counts_matrix(counts),
        obs=pd.DataFrame({"domain": _as_categorical(domain, n_domains), "array_row": array_row,
                          "array_col": array_col}, index=obs_names),
        var=pd.DataFrame({"marker_of": marker_of.astype(str)}, index=var_names),
    )
    adata.obsm["spatial"] = coords
    adata.varm["domain_means"] = means.T.copy()
    adata.uns["simulation"] = {"simulator": "toy_domains", "layout": layout, "image_signal": float(image_signal),
                               "noise": float(noise), "twins": [list(t) for t in twins], "seed": int(seed)}
    if image:
        hires = _render_he(coords, domain, n_domains, float(image_signal), rng, HIRES_SCALEF)
        ratio = round(HIRES_SCALEF / LOWRES_SCALEF)
        # lowres pixel i is centred on hires pixel ratio*i: smooth, then subsample
        lowres = ndimage.gaussian_filter(hires.astype(float), sigma=(ratio / 2.5, ratio / 2.5, 0))[::ratio, ::ratio]
        adata.uns["spatial"] = {LIBRARY_ID: {
            "images": {"hires": hires, "lowres": np.clip(np.rint(lowres), 0, 255).astype(np.uint8)},
            "scalefactors": {"tissue_hires_scalef": HIRES_SCALEF, "tissue_lowres_scalef": LOWRES_SCALEF,
                             "spot_diameter_fullres": 0.55 * SPOT_SPACING,
                             "fiducial_diameter_fullres": 0.89 * SPOT_SPACING},
            "metadata": {"source": "stcore.data.synthetic.toy_domains"},
        }}
    return adata


# --------------------------------------------------------------------------------------------------- mixtures
def _cell_types(adata: ad.AnnData, key: str, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes and names of a cell-type column, with clear errors."""
    if key not in adata.obs:
        raise KeyError(f"{what} has no obs[{key!r}]; available columns: {list(adata.obs.columns)}. "
                       f"Pass cell_type_key= the column holding the cell-type labels.")
    labels = adata.obs[key]
    if labels.isna().any():
        raise ValueError(f"obs[{key!r}] has {int(labels.isna().sum())} missing labels; drop those cells first, "
                         f"e.g. adata = adata[adata.obs[{key!r}].notna()].copy().")
    if isinstance(labels.dtype, pd.CategoricalDtype):
        names = [str(c) for c in labels.cat.categories]
        codes = labels.cat.codes.to_numpy()
    else:
        names = sorted(str(v) for v in pd.unique(labels))
        lookup = {n: i for i, n in enumerate(names)}
        codes = np.array([lookup[str(v)] for v in labels])
    present = np.bincount(codes, minlength=len(names))
    empty = [n for n, c in zip(names, present) if c == 0]
    if empty:
        raise ValueError(f"cell type(s) {empty} of obs[{key!r}] have no cells; drop unused categories with "
                         f"adata.obs[{key!r}] = adata.obs[{key!r}].cat.remove_unused_categories().")
    return codes.astype(int), names


def _raw_counts(adata: ad.AnnData, what: str) -> sp.csr_matrix:
    X = sp.csr_matrix(adata.X) if not sp.issparse(adata.X) else adata.X.tocsr()
    data = X.data
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0 or np.any(data != np.round(data))):
        raise ValueError(f"{what}.X must hold raw counts (non-negative integers); it looks normalised or "
                         f"log-transformed. Put raw counts back in .X (e.g. adata.X = adata.layers['counts']).")
    return X.astype(np.float32)


def _truth_frames(counts: np.ndarray, names: list[str], index) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = np.asarray(counts, dtype=np.int64)
    props = counts / counts.sum(1, keepdims=True)
    return (pd.DataFrame(props, index=index, columns=names),
            pd.DataFrame(counts, index=index, columns=names))


def pseudo_spots(
    reference: ad.AnnData,
    n_spots: int = 500,
    cells_per_spot: int | tuple[int, int] = (2, 10),
    n_types_per_spot: int | tuple[int, int] = (1, 4),
    cell_type_key: str = "cell_type",
    downsample: float | None = None,
    seed: int = 0,
) -> ad.AnnData:
    """Pseudo-spots made by summing the raw counts of randomly chosen single cells (known proportions).

    Each spot draws a number of cells ``n ~ U{cells_per_spot}`` and of cell types ``m ~ U{n_types_per_spot}``
    (capped at ``n`` and the number of types), picks ``m`` types uniformly, gives each one cell and shares the
    remaining ``n - m`` among them with Dirichlet(1) weights, then draws that many cells of each type from the
    reference (without replacement inside a spot when the type has enough cells). The spot's counts are the sum of
    its cells' counts, optionally thinned, ``x' ~ Binomial(x, downsample)`` (Li et al. 2022 used 0.1).

    Parameters
    ----------
    reference
        Single-cell AnnData with raw counts in ``.X`` and labels in ``obs[cell_type_key]``.
    n_spots
        Number of pseudo-spots.
    cells_per_spot, n_types_per_spot
        Inclusive ``(low, high)`` ranges (or one integer).
    cell_type_key
        Column of ``reference.obs`` with the cell types.
    downsample
        Fraction of counts kept, in (0, 1]; ``None`` keeps all.
    seed
        Random seed.

    Returns
    -------
    AnnData (n_spots, n_genes)
        Summed counts in ``.X``; ``obsm["proportions"]`` (DataFrame spots x types, rows sum to 1),
        ``obsm["cell_counts"]`` (integers), ``obs["n_cells"]``; ``uns["pseudo_spots"]["membership"]``, a CSR
        (n_spots, n_reference_cells) matrix: how many times each reference cell went into each spot.
    """
    n_spots = _check_positive_int("n_spots", n_spots)
    codes, names = _cell_types(reference, cell_type_key, "reference")
    X = _raw_counts(reference, "reference")
    c_lo, c_hi = _check_range("cells_per_spot", cells_per_spot)
    t_lo, t_hi = _check_range("n_types_per_spot", n_types_per_spot)
    if t_lo > len(names):
        raise ValueError(f"n_types_per_spot={n_types_per_spot} asks for at least {t_lo} types per spot but the "
                         f"reference has only {len(names)}: {names}.")
    if t_lo > c_hi:
        raise ValueError(f"n_types_per_spot={n_types_per_spot} needs more cells than cells_per_spot="
                         f"{cells_per_spot} allows (one cell per type at least).")
    if downsample is not None and not (0 < downsample <= 1):
        raise ValueError(f"downsample={downsample}: give the fraction of counts to keep, in (0, 1], or None.")

    rng = _rng(seed)
    pools = [np.flatnonzero(codes == k) for k in range(len(names))]
    spot_idx, cell_idx = [], []
    type_counts = np.zeros((n_spots, len(names)), dtype=np.int64)
    for s in range(n_spots):
        n_cells = int(rng.integers(max(c_lo, t_lo), c_hi + 1))
        m = int(rng.integers(t_lo, min(t_hi, n_cells, len(names)) + 1))
        types = rng.choice(len(names), size=m, replace=False)
        per_type = np.ones(m, dtype=np.int64) + rng.multinomial(n_cells - m, rng.dirichlet(np.ones(m)))
        for k, c in zip(types, per_type):
            pool = pools[k]
            chosen = rng.choice(pool, size=c, replace=c > len(pool))
            cell_idx.append(chosen)
            spot_idx.append(np.full(c, s))
            type_counts[s, k] += c
    rows, cols = np.concatenate(spot_idx), np.concatenate(cell_idx)
    membership = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                               shape=(n_spots, reference.n_obs))
    membership.sum_duplicates()
    Xs = (membership @ X).tocsr()
    if downsample is not None and downsample < 1:
        Xs.data = rng.binomial(Xs.data.astype(np.int64), downsample).astype(np.float32)
        Xs.eliminate_zeros()

    obs_names = [f"pseudo{s:04d}" for s in range(n_spots)]
    props, cnts = _truth_frames(type_counts, names, obs_names)
    out = ad.AnnData(X=Xs.astype(np.float32), obs=pd.DataFrame({"n_cells": type_counts.sum(1)}, index=obs_names),
                     var=reference.var.copy())
    out.obsm["proportions"] = props
    out.obsm["cell_counts"] = cnts
    out.uns["pseudo_spots"] = {"membership": membership, "cell_type_key": cell_type_key,
                               "downsample": 1.0 if downsample is None else float(downsample), "seed": int(seed)}
    return out


def grid_spots(cells: ad.AnnData, spot_size: float, cell_type_key: str = "cell_type",
               origin: Sequence[float] | None = None) -> ad.AnnData:
    """Spots made by tiling single-cell ST with square windows (the gridding protocol of Li et al. 2022).

    Window ``(r, c)`` covers ``[x0 + c * spot_size, x0 + (c + 1) * spot_size) x [y0 + r * spot_size, ...)``;
    windows holding at least one cell become spots whose counts are the sum of their cells' raw counts and whose
    truth is the number of cells of each type. Vectorised: one sparse (windows x cells) product.

    Parameters
    ----------
    cells
        Single cells with raw counts in ``.X``, positions in ``obsm["spatial"]`` and ``obs[cell_type_key]``.
    spot_size
        Window side, in the units of ``obsm["spatial"]`` (Li et al.: 500 px for seqFISH+, 750 px for STARmap).
    cell_type_key
        Column of ``cells.obs`` with the cell types.
    origin
        ``(x0, y0)`` of the grid; default the minimum of the coordinates.

    Returns
    -------
    AnnData (n_windows, n_genes)
        ``.X`` summed counts; ``obsm["spatial"]`` window centres; ``obs["n_cells"]``, ``obs["grid_row"]``,
        ``obs["grid_col"]``; ``obsm["proportions"]`` and ``obsm["cell_counts"]`` (DataFrames, spots x types);
        ``uns["grid_spots"]["cell_spot"]``: the spot index of each input cell.
    """
    if "spatial" not in cells.obsm:
        raise KeyError("cells has no obsm['spatial']; store the cell positions there as an (n, 2) array.")
    coords = np.asarray(cells.obsm["spatial"], dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.all(np.isfinite(coords)):
        raise ValueError(f"obsm['spatial'] must be a finite (n, 2) array of (x, y); got shape {coords.shape}.")
    if not np.isfinite(spot_size) or spot_size <= 0:
        raise ValueError(f"spot_size={spot_size}: must be a positive length in the units of obsm['spatial'].")
    codes, names = _cell_types(cells, cell_type_key, "cells")
    X = _raw_counts(cells, "cells")
    x0, y0 = coords.min(0) if origin is None else (float(origin[0]), float(origin[1]))
    if coords[:, 0].min() < x0 or coords[:, 1].min() < y0:
        raise ValueError(f"origin={origin} lies right of / below some cells; choose an origin <= min coordinates.")
    gcol = np.floor((coords[:, 0] - x0) / spot_size).astype(np.int64)
    grow = np.floor((coords[:, 1] - y0) / spot_size).astype(np.int64)
    key = grow * (gcol.max() + 1) + gcol
    windows, cell_spot = np.unique(key, return_inverse=True)
    n_win = len(windows)
    M = sp.csr_matrix((np.ones(cells.n_obs, dtype=np.float32), (cell_spot, np.arange(cells.n_obs))),
                      shape=(n_win, cells.n_obs))
    onehot = sp.csr_matrix((np.ones(cells.n_obs), (np.arange(cells.n_obs), codes)),
                           shape=(cells.n_obs, len(names)))
    type_counts = np.asarray((M @ onehot).todense()).round().astype(np.int64)
    w_row, w_col = windows // (gcol.max() + 1), windows % (gcol.max() + 1)
    centres = np.column_stack([x0 + (w_col + 0.5) * spot_size, y0 + (w_row + 0.5) * spot_size])

    obs_names = [f"grid{r}_{c}" for r, c in zip(w_row, w_col)]
    props, cnts = _truth_frames(type_counts, names, obs_names)
    out = ad.AnnData(X=(M @ X).tocsr().astype(np.float32),
                     obs=pd.DataFrame({"n_cells": type_counts.sum(1), "grid_row": w_row, "grid_col": w_col},
                                      index=obs_names),
                     var=cells.var.copy())
    out.obsm["spatial"] = centres
    out.obsm["proportions"] = props
    out.obsm["cell_counts"] = cnts
    out.uns["grid_spots"] = {"spot_size": float(spot_size), "origin": [float(x0), float(y0)],
                             "cell_spot": cell_spot.astype(np.int64), "cell_type_key": cell_type_key}
    return out


# --------------------------------------------------------------------------------------------------- toy_pair
def toy_pair(
    n_cells: int = 800,
    n_spots: int = 600,
    n_genes: int = 80,
    n_types: int = 5,
    n_hidden_genes: int = 10,
    noise: float = 0.2,
    size: float = 1000.0,
    seed: int = 0,
) -> tuple[ad.AnnData, ad.AnnData]:
    """A scRNA-seq reference and a single-cell ST sample from one tissue, for imputation and location tasks.

    Cells are drawn from one spatial process on a ``size x size`` µm square: a position ``p`` uniform, then a type
    ``t`` with ``P(t = k | p) ∝ exp(-d_k(p)^2 / (2 (size/8)^2))``, ``d_k`` the distance to the nearest of two
    seeds of type ``k`` (patterned, mixed at the borders). Every gene follows shared programmes,
    ``log mu_g = b_g + W_tg + G_g · (2 p / size - 1)`` (type programme ``W ~ N(0, 1)``, spatial gradients
    ``G ~ N(0, 0.5^2)``), so a hidden gene is predictable from the measured ones. Counts are
    ``NB(s · e_g · mu_g, noise)`` with a log-normal library size ``s`` and a platform effect ``e_g``
    (log-normal, sd 0.3) and lower depth (x 0.5) on the spatial side.

    Parameters
    ----------
    n_cells
        Reference cells.
    n_spots
        Spatial cells ("spots" of single-cell resolution).
    n_genes, n_types
        Genes (in the reference) and cell types.
    n_hidden_genes
        Genes the spatial data does not measure (chosen at random).
    noise
        Negative-binomial over-dispersion.
    size
        Side of the tissue square, in µm.
    seed
        Random seed.

    Returns
    -------
    reference : AnnData (n_cells, n_genes)
        ``obs["cell_type"]``, ``obsm["spatial_truth"]`` (true µm positions), ``var["measured_in_spatial"]``.
    spatial : AnnData (n_spots, n_genes - n_hidden_genes)
        ``obsm["spatial"]`` (µm), ``obs["cell_type"]`` (truth), ``obsm["hidden_truth"]`` (DataFrame of the hidden
        genes' true counts), ``uns["hidden_genes"]``.
    """
    n_cells = _check_positive_int("n_cells", n_cells)
    n_spots = _check_positive_int("n_spots", n_spots)
    n_genes = _check_positive_int("n_genes", n_genes, minimum=2)
    n_types = _check_positive_int("n_types", n_types)
    n_hidden_genes = _check_positive_int("n_hidden_genes", n_hidden_genes, minimum=0)
    if n_hidden_genes >= n_genes:
        raise ValueError(f"n_hidden_genes={n_hidden_genes} leaves no measured gene out of n_genes={n_genes}.")
    rng = _rng(seed)
    seeds = rng.uniform(0.1 * size, 0.9 * size, size=(n_types, 2, 2))   # two seeds per type
    sigma = size / 8.0
    baseline = rng.normal(np.log(4.0), 0.6, size=n_genes)
    W = rng.normal(0.0, 1.0, size=(n_types, n_genes))
    G = rng.normal(0.0, 0.5, size=(2, n_genes))
    platform = np.exp(rng.normal(0.0, 0.3, size=n_genes))

    def draw(n, depth):
        pos = rng.uniform(0, size, size=(n, 2))
        d2 = ((pos[:, None, None, :] - seeds[None]) ** 2).sum(-1).min(-1)       # (n, n_types)
        logits = -d2 / (2 * sigma ** 2)
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        types = (prob.cumsum(1) > rng.random((n, 1))).argmax(1)
        mu = np.exp(baseline[None] + W[types] + (2 * pos / size - 1) @ G)
        lib = np.exp(rng.normal(0.0, 0.25, size=(n, 1)))
        return pos, types, _nb(rng, depth * lib * mu, noise)

    pos_r, type_r, counts_r = draw(n_cells, 1.0)
    pos_s, type_s, counts_s = draw(n_spots, 0.5 * platform[None])
    genes = np.array([f"gene{j:03d}" for j in range(n_genes)])
    hidden = np.sort(rng.choice(n_genes, size=n_hidden_genes, replace=False))
    measured = np.setdiff1d(np.arange(n_genes), hidden)

    reference = ad.AnnData(
        X=_counts_matrix(counts_r),
        obs=pd.DataFrame({"cell_type": _as_categorical(type_r, n_types, "type")},
                         index=[f"cell{i:04d}" for i in range(n_cells)]),
        var=pd.DataFrame({"measured_in_spatial": np.isin(np.arange(n_genes), measured)}, index=genes),
    )
    reference.obsm["spatial_truth"] = pos_r
    sp_names = [f"spot{i:04d}" for i in range(n_spots)]
    spatial = ad.AnnData(
        X=_counts_matrix(counts_s[:, measured]),
        obs=pd.DataFrame({"cell_type": _as_categorical(type_s, n_types, "type")}, index=sp_names),
        var=pd.DataFrame(index=genes[measured]),
    )
    spatial.obsm["spatial"] = pos_s
    spatial.obsm["hidden_truth"] = pd.DataFrame(counts_s[:, hidden].astype(np.int64), index=sp_names,
                                                columns=genes[hidden])
    spatial.uns["hidden_genes"] = list(genes[hidden])
    return reference, spatial


# --------------------------------------------------------------------------------------------------- toy_multiome
def toy_multiome(
    n_spots: int = 900,
    n_domains: int = 5,
    dims: tuple[int, int] = (50, 30),
    layout: str = "blobs",
    separation: float = 4.0,
    seed: int = 0,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Two modalities on the same spots, each blind to part of the domains.

    With ``m = ceil(n_domains / 2)``, modality A gives domains ``0 .. m-1`` their own centroid and merges domains
    ``m .. K-1`` into one; modality B merges ``0 .. m-1`` and separates ``m .. K-1``. So A alone cannot tell the
    last domains apart, B alone the first ones, and only the two together recover all ``K`` domains. Features are
    continuous (like PCA / LSI embeddings): ``x = mu_group + eps``, ``eps ~ N(0, I)``, with random centroids of
    norm about ``separation`` and a decaying variance profile over the dimensions, like principal components.

    Parameters
    ----------
    n_spots, n_domains
        Sizes (hex lattice as in :func:`toy_domains`; ``n_domains >= 3``).
    dims
        Feature dimensions of A and B.
    layout
        Domain layout, ``"blobs"`` or ``"layers"``.
    separation
        Distance scale between group centroids (noise sd is 1 per dimension).
    seed
        Random seed.

    Returns
    -------
    adata_a, adata_b : AnnData
        Same ``obs_names``, ``obs["domain"]``, ``obs["array_row"/"array_col"]`` and ``obsm["spatial"]``;
        ``.X`` dense float32 features; ``uns["modality"]`` ("A" or "B") and ``uns["separates"]`` (domains it
        resolves on their own).
    """
    n_spots = _check_positive_int("n_spots", n_spots)
    n_domains = _check_positive_int("n_domains", n_domains, minimum=3)
    if len(dims) != 2:
        raise ValueError(f"dims={dims}: give the two feature dimensions, e.g. (50, 30).")
    dims = tuple(_check_positive_int("dims", d) for d in dims)
    rng = _rng(seed)
    array_row, array_col, coords = hex_lattice(n_spots)
    domain = _plant_domains(coords, n_domains, layout, rng)
    m = (n_domains + 1) // 2
    group_a = np.where(np.arange(n_domains) < m, np.arange(n_domains), m)           # A: 0..m-1 own, rest merged
    group_b = np.where(np.arange(n_domains) < m, 0, np.arange(n_domains) - m + 1)   # B: 0..m-1 merged, rest own
    obs = pd.DataFrame({"domain": _as_categorical(domain, n_domains), "array_row": array_row,
                        "array_col": array_col}, index=[f"spot{i:04d}" for i in range(n_spots)])
    out = []
    for name, groups, d in (("A", group_a, dims[0]), ("B", group_b, dims[1])):
        n_groups = groups.max() + 1
        scale = np.sqrt(np.linspace(2.0, 0.2, d))                 # PC-like decaying spread of the signal
        centroids = rng.normal(size=(n_groups, d)) * scale
        centroids *= separation / np.sqrt((scale ** 2).sum())
        X = centroids[groups[domain]] + rng.normal(size=(n_spots, d))
        a = ad.AnnData(X=X.astype(np.float32), obs=obs.copy(),
                       var=pd.DataFrame(index=[f"{name}{j:02d}" for j in range(d)]))
        a.obsm["spatial"] = coords.copy()
        a.uns["modality"] = name
        a.uns["separates"] = [int(k) for k in range(n_domains) if np.sum(groups == groups[k]) == 1]
        out.append(a)
    return out[0], out[1]
