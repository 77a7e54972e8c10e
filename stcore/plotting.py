"""One house style for every figure of the course.

* :func:`spatial` — spots coloured by a label or a value, over the H&E image when there is one;
* :func:`domain_maps` — several label sets side by side (ground truth first), with their ARI;
* :func:`loss_curves` — the named terms of a :class:`stcore.train.History`;
* :func:`embedding` — a 2-D view (PCA or t-SNE) of a latent space;
* :func:`score_bars` — a metric table as grouped bars.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = ["set_style", "palette", "spatial", "domain_maps", "loss_curves", "embedding", "score_bars"]

_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]


def set_style() -> None:
    """Matplotlib defaults used by every chapter."""
    mpl.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
        "axes.spines.right": False, "legend.frameon": False, "image.cmap": "viridis",
    })


def palette(n: int) -> list[str]:
    """``n`` distinct colours for categories (cycled after 20)."""
    return [_PALETTE[i % len(_PALETTE)] for i in range(n)]


def _image(adata, library_id, resolution):
    spatial_uns = adata.uns.get("spatial", {})
    if not spatial_uns:
        return None, 1.0
    library_id = library_id or next(iter(spatial_uns))
    lib = spatial_uns[library_id]
    images = lib.get("images", {})
    for res in ([resolution] if resolution else ["hires", "lowres"]):
        if res in images:
            return np.asarray(images[res]), float(lib.get("scalefactors", {}).get(f"tissue_{res}_scalef", 1.0))
    return None, 1.0


def spatial(adata, color: str | None = None, *, ax=None, image: bool = True, library_id: str | None = None,
            resolution: str | None = None, basis: str = "spatial", size: float | None = None, title=None,
            cmap: str = "viridis", legend: bool = True, categories=None, alpha: float = 1.0, crop: bool = True,
            vmin: float | None = None, vmax: float | None = None, colours: dict | None = None):
    """Scatter the spots of ``adata`` coloured by ``adata.obs[color]`` (or a gene / ``None``), over its image.

    Categorical colours follow ``categories`` (default: the column's categories) so two panels of the same
    labels share colours; ``colours`` maps categories to colours explicitly. Missing labels are drawn in light
    grey. Continuous values are drawn lowest first, so
    high values stay visible; ``vmin``/``vmax`` clip the colour scale (e.g. ``vmax=np.percentile(v, 99)``).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    xy = np.asarray(adata.obsm[basis], dtype=float)[:, :2]
    img, scale = _image(adata, library_id, resolution) if image else (None, 1.0)
    xy = xy * scale
    if img is not None:
        ax.imshow(img, alpha=0.9)
    if size is None:
        size = max(1.0, 12000 / max(adata.n_obs, 1))
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="k", alpha=alpha, linewidths=0)
    else:
        values = adata.obs[color] if color in adata.obs else _gene(adata, color)
        if isinstance(values, pd.Series) and (values.dtype.name == "category" or values.dtype == object):
            cats = list(categories) if categories is not None else list(
                values.cat.categories if values.dtype.name == "category" else pd.unique(values.dropna()))
            colours = colours or dict(zip(cats, palette(len(cats))))
            missing = values.isna().to_numpy()
            ax.scatter(xy[missing, 0], xy[missing, 1], s=size, c="#dddddd", linewidths=0)
            for cat in cats:
                m = (values == cat).to_numpy()
                ax.scatter(xy[m, 0], xy[m, 1], s=size, c=colours[cat], label=str(cat), alpha=alpha, linewidths=0)
            if legend:
                ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=max(1, 12 / size ** 0.5),
                          fontsize=7, handletextpad=0.1)
        else:
            values = np.asarray(values, dtype=float)
            order = np.argsort(values, kind="stable")
            sc_ = ax.scatter(xy[order, 0], xy[order, 1], s=size, c=values[order], cmap=cmap, vmin=vmin, vmax=vmax,
                             alpha=alpha, linewidths=0)
            if legend:
                plt.colorbar(sc_, ax=ax, fraction=0.046, pad=0.02)
    if img is None or crop:
        pad = 0.03 * (np.ptp(xy[:, 0]) + np.ptp(xy[:, 1]))
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title if title is not None else (color or ""))
    return ax


def _gene(adata, gene):
    if gene not in adata.var_names:
        raise KeyError(f"{gene!r} is neither an obs column nor a gene of adata.")
    col = adata[:, gene].X
    return np.asarray(col.toarray() if hasattr(col, "toarray") else col).ravel()


def _matched_colours(truth: pd.Series, pred: pd.Series) -> dict:
    """Colour of each predicted domain: that of the true domain it overlaps most (Hungarian matching on the
    contingency table), so matched domains share colours across panels; unmatched domains get unused colours."""
    from scipy.optimize import linear_sum_assignment

    t_cats = list(truth.cat.categories) if truth.dtype.name == "category" else sorted(truth.dropna().unique())
    p_cats = list(pred.cat.categories) if pred.dtype.name == "category" else sorted(pred.dropna().unique())
    table = pd.crosstab(pred, truth).reindex(index=p_cats, columns=t_cats, fill_value=0).to_numpy()
    rows, cols = linear_sum_assignment(-table)
    colours = palette(len(t_cats) + len(p_cats))
    mapping = {p_cats[r]: colours[c] for r, c in zip(rows, cols)}
    spare = iter(colours[len(t_cats):])
    return {cat: mapping.get(cat) or next(spare) for cat in p_cats}


def domain_maps(adata, keys, *, truth: str | None = None, titles=None, image: bool = True, size=None,
                ncols: int | None = None, panel_size: float = 3.2, match_colours: bool = True):
    """Label maps side by side; each panel after ``truth`` is titled with its ARI against ``truth``.

    With ``match_colours`` each predicted domain takes the colour of the true domain it overlaps most.
    Returns the figure.
    """
    from .metrics import ari

    keys = ([truth] if truth else []) + [k for k in keys if k != truth]
    ncols = ncols or len(keys)
    nrows = int(np.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols + 1.2, panel_size * nrows), squeeze=False)
    for i, key in enumerate(keys):
        ax = axes.flat[i]
        title = titles[i] if titles else key
        colours = None
        if truth and key != truth:
            title = f"{title}\nARI {ari(adata.obs[truth], adata.obs[key]):.3f}"
            if match_colours:
                colours = _matched_colours(adata.obs[truth], adata.obs[key])
        spatial(adata, key, ax=ax, image=image, size=size, title=title, colours=colours,
                legend=(i == len(keys) - 1) or key == truth)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def loss_curves(history, *, ax=None, log: bool = False, total: bool = True):
    """One line per named loss term of a :class:`stcore.train.History` (or a dict of lists)."""
    terms = history.terms if hasattr(history, "terms") else dict(history)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3))
    for name, values in terms.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    if total and hasattr(history, "total") and len(terms) > 1:
        ax.plot(np.arange(1, len(history.total) + 1), history.total, "k--", lw=1, label="total")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if log:
        values = np.concatenate([np.asarray(v, float) for v in terms.values()])
        ax.set_yscale("log" if np.all(values > 0) else "symlog")
    ax.legend(fontsize=7)
    return ax


def embedding(Z, labels=None, *, method: str = "pca", ax=None, seed: int = 0, size: float = 3, title: str = ""):
    """Scatter a latent space in 2-D (``method="pca"`` or ``"tsne"``), coloured by ``labels``."""
    Z = np.asarray(Z, dtype=np.float32)
    if method == "pca":
        from sklearn.decomposition import PCA

        Y = PCA(2, random_state=seed).fit_transform(Z)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        Y = TSNE(2, random_state=seed, init="pca").fit_transform(Z)
    else:
        raise ValueError(f"method={method!r}: use 'pca' or 'tsne'.")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    if labels is None:
        ax.scatter(Y[:, 0], Y[:, 1], s=size, c="k", linewidths=0)
    else:
        labels = pd.Series(np.asarray(labels, dtype=object))
        cats = [c for c in pd.unique(labels) if pd.notna(c)]
        try:
            cats = sorted(cats)
        except TypeError:
            pass
        for cat, colour in zip(cats, palette(len(cats))):
            m = (labels == cat).to_numpy()
            ax.scatter(Y[m, 0], Y[m, 1], s=size, c=colour, label=str(cat), linewidths=0)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title)
    return ax


def score_bars(table: pd.DataFrame, *, errors: pd.DataFrame | None = None, ax=None, ylabel: str = "score",
               title: str = ""):
    """Grouped bars: one group per row of ``table`` (methods), one bar per column (metrics)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.9 * len(table), 3))
    n_cols = table.shape[1]
    width = 0.8 / n_cols
    x = np.arange(len(table))
    for j, (col, colour) in enumerate(zip(table.columns, palette(n_cols))):
        yerr = None if errors is None else errors[col].to_numpy()
        ax.bar(x + (j - (n_cols - 1) / 2) * width, table[col].to_numpy(), width, yerr=yerr, label=str(col),
               color=colour, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(table.index, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return ax


set_style()
