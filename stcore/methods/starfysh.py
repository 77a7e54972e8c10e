"""Starfysh: reference-free deconvolution with signature (or archetype) priors and a histology product of experts.

He S, Jin Y, Nazaret A, *et al.* Starfysh integrates spatial transcriptomic and histologic data to reveal
heterogeneous tumor-immune hubs. *Nat Biotechnol* (2024). doi:10.1038/s41587-024-02173-8.
Official code: azizilab/starfysh (v1.2.0); defaults below are those of ``run_starfysh`` and its tutorial.

Pipeline (integration strategy: *fusion* — the expression and histology posteriors of the same latent variable are
multiplied, a product of experts):

1. Expression: drop ``MT-`` and ribosomal (``RPS``/``RPL``) genes, normalise each spot to the median library size,
   ``log1p``, keep the 2,000 most variable genes (scanpy ``seurat`` flavour) **united with every signature gene**.
   The model reads the raw counts of those genes; its library prior is :math:`\\log(1 + \\sum_g x_{ig})` averaged
   over the ``window_size`` nearest spots (the official windowed library).
2. Signatures -> prior and anchors (:func:`signature_prior`): for each cell state k the mean log-expression of its
   signature genes, z-scored over spots, negative values set to 0 and each spot normalised to sum 1:
   :math:`p_i \\in \\Delta^{K-1}`. Anchor spots are the ``n_anchors`` spots with the highest score of each state
   (among spots whose library lies between the ``vlow``-th and ``vhigh``-th percentiles).
3. Archetypal analysis (:func:`archetypal_analysis`, a PCHA written here): the spots' PCA coordinates
   :math:`X \\approx S\\,C\\,X` with the rows of S and the columns of C on the simplex; the archetypes
   :math:`Z = C X` are the corners of the data cloud. Without signatures (and without a reference) the archetypes
   *are* the cell states: their ``r`` nearest spots form each state's community, whose top marker genes become
   the signature. With ``refine_anchors=True`` the archetype communities are matched one-to-one to the anchor
   sets (stable matching on their overlap) and the top markers of each matched archetype are added to that
   state's signature, as the official ``refine_anchors`` step does.
4. Generative model (per spot i; K states, latent dimension D = 10):
   :math:`u_k \\sim \\mathcal N(0, 10^2 I)` (learnable state means), :math:`c_i \\sim \\mathrm{Dir}(\\alpha p_i)`,
   :math:`z_i \\mid c_i \\sim \\mathcal N(\\sum_k c_{ik} u_k, (\\sum_k c_{ik} \\sigma_k)^2)`,
   :math:`l_i \\sim \\mathcal N(\\tilde l_i, 1)`,
   :math:`x_{ig} \\sim \\mathrm{NB}(e^{l_i} \\rho_g(z_i), \\theta_g)` with :math:`\\rho = \\mathrm{softmax}(f(z))`.
5. Inference: :math:`q(c_i \\mid x_i) = \\mathrm{Dir}(\\alpha \\lambda(x_i))` with :math:`\\lambda` a softmax MLP
   and :math:`\\alpha = 50`; :math:`q(z_i \\mid x_i, c_i)` mixes per-state means and log-variances with the sampled
   :math:`c_i`; :math:`q(l_i \\mid x_i)` Gaussian. Networks: width 256, BatchNorm (momentum 0.01, eps 1e-3), ReLU,
   input :math:`\\log(1 + x)`. Loss: NB reconstruction + KL_u + KL_z + KL_c + KL_l. The proportions are the
   posterior mean :math:`\\mathbb E[c_i] = \\lambda(x_i)`.
6. Histology (``histology=True``): a 32 x 32 px patch of the H&E around each spot (``patch_r = 16``), as the
   inverse hematoxylin channel (0-255, high = nuclei; :func:`hematoxylin`) or raw RGB pixels
   (``image_channels="rgb"``), :math:`\\log(1 + y)`, flattened into an MLP encoder
   :math:`q(z \\mid y) = \\mathcal N(m_y, v_y)` and a Gaussian decoder. The joint posterior is the
   precision-weighted product of experts (:func:`poe`)

   .. math:: v = (v_x^{-1} + v_y^{-1})^{-1}, \\qquad m = v\\,(m_x / v_x + m_y / v_y),

   decoded back into both counts and pixels. Loss = expression ELBO + image ELBO
   + 0.2 [NB(x | z_poe) + Gauss(y | z_poe) + KL(q_poe || p(z | c))].
7. Training: Adam (lr 1e-4), ExponentialLR (gamma 0.98 per epoch), gradient norm clipped at 5, mini-batches of
   32 (last incomplete batch dropped), ``n_repeats = 3`` restarts; the restart whose lowest epoch KL_c is smallest
   is kept.

Deliberate deviations from the official code
---------------------------------------------
* **Training budget.** The defaults are the official ones (``epochs=100``, ``n_repeats=3``, ``lr=1e-4``; the
  tutorial uses 200 epochs). On 2 CPU cores the course chapter trains 30 epochs with one restart at ``lr=1e-3``
  (the default of earlier official releases), i.e. about 10x fewer gradient steps, and says so.
* **Signature scores from log-normalised data.** The official ``_get_sig_mean`` averages the signature genes'
  counts (``sig_version="raw"``); here the log-normalised values are averaged (less dominated by a few
  high-count genes and by library size). The z-score / ReLU / row-normalisation that follows is the official one.
* **Own archetypal analysis.** The official code calls ``py_pcha`` and estimates the number of archetypes with
  ``scikit-dimension``'s Fisher-separability intrinsic dimension; here PCHA is re-implemented
  (:func:`archetypal_analysis`: furthest-sum initialisation, projected-gradient updates of S and C with
  step-size search) and the number of archetypes is an option (``n_archetypes``, default = the number of states).
  Markers of an archetype community are ranked by the difference of mean log-expression in versus out of the
  community, not by scanpy's Wilcoxon test.
* **Quirks not copied.** The official NB uses :math:`\\theta = \\exp(\\mathrm{softplus}(r))` (a softplus and then an
  exponential); here :math:`\\theta = \\mathrm{softplus}(r)`. The official PoE returns :math:`\\log(1 + v)` as the
  joint log-variance and the image KL uses a standard deviation of :math:`\\exp(\\log v / 4)`; here both use the
  variance itself. The official PoE count decoder ends in a ReLU (a zero rate is possible); here it is a softmax
  like the expression decoder. Within a restart the official loop stores a *reference* to the model at the epoch
  of lowest KL_c, so the returned weights are those of the last epoch; this is kept (last-epoch weights, restart
  chosen by its lowest KL_c).
* **Numerical guard.** The sampled log library is clamped at 20 (5e8 counts) before :math:`e^{l}`; early in training
  its encoder's variance can be large enough to overflow (the official code skips batches whose parameters became
  NaN instead).
* **No HistomicsTK.** The official code takes the hematoxylin channel from HistomicsTK's colour deconvolution;
  here the same Ruifrok-Johnston deconvolution is written in numpy with the standard H&E stain vectors
  (:func:`hematoxylin`); ``image_channels="rgb"`` gives the official 3-channel alternative.
* **No image, no image branch.** ``histology=True`` on data without an H&E image (e.g. pseudo-spots) warns and
  runs the expression model; ``uns["starfysh"]["histology"]`` records what was used.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import sparse
from scipy.spatial import cKDTree
from torch import nn
from torch.distributions import Dirichlet, kl_divergence

from .. import images
from ..nn.likelihoods import nb_log_prob
from ..nn.losses import normal_kl
from ..train import fit, set_seed
from ..validation import cell_type_labels, check_finite, counts_matrix, spatial_coords
from . import Method, register
from ._common import write_frame

__all__ = [
    "Starfysh",
    "StarfyshModel",
    "anchor_spots",
    "archetypal_analysis",
    "archetype_signatures",
    "hematoxylin",
    "poe",
    "read_signatures",
    "reference_markers",
    "signature_prior",
    "simplex_projection",
    "starfysh_genes",
    "windowed_library",
]

_EPS = 1e-5
_L_MAX = 20.0


# ----------------------------------------------------------------------------------------------- signatures
def read_signatures(signatures, genes=None) -> dict[str, list[str]]:
    """Normalise the ways of giving signatures into ``{state: [genes ...]}`` (order kept, duplicates dropped).

    ``signatures`` is a dict of gene lists, a DataFrame with one column of genes per state (the official
    ``gene_sig`` layout; NaN/empty cells ignored), a path to such a CSV, or an AnnData with states as
    observations and a gene's rank in the list as the value (``stcore.data.load("starfysh_breast_signatures")``,
    optionally subset to one ``obs["signature_set"]``). With ``genes`` given, genes outside it are dropped and a
    state left with none is an error.
    """
    if isinstance(signatures, (str, Path)):
        path = Path(signatures)
        if not path.is_file():
            raise ValueError(f"signatures={str(signatures)!r} is not a file; give a CSV with one column of genes "
                             "per cell state, a DataFrame, or a dict {state: [genes]}.")
        signatures = pd.read_csv(path, index_col=0)
    if hasattr(signatures, "obs") and hasattr(signatures, "var_names"):  # AnnData of ranks
        X = signatures.X.toarray() if sparse.issparse(signatures.X) else np.asarray(signatures.X)
        names = signatures.obs.get("state", pd.Series(signatures.obs_names))
        out = {}
        for name, row in zip(names.astype(str), X):
            nz = np.flatnonzero(row > 0)
            out[name] = list(signatures.var_names[nz[np.argsort(row[nz])]])
        signatures = out
    if isinstance(signatures, pd.DataFrame):
        signatures = {str(c): [g for g in signatures[c].tolist() if isinstance(g, str) and g.strip()]
                      for c in signatures.columns}
    if not isinstance(signatures, dict) or not signatures:
        raise ValueError(f"signatures must be a non-empty dict {{state: [genes]}}, a DataFrame (one column of "
                         f"genes per state), a CSV path or an AnnData of ranks; got {type(signatures).__name__}.")
    out = {}
    for state, gs in signatures.items():
        gs = [gs] if isinstance(gs, str) else list(gs)
        out[str(state)] = list(dict.fromkeys(str(g) for g in gs))
    if genes is not None:
        genes = set(map(str, genes))
        kept = {k: [g for g in v if g in genes] for k, v in out.items()}
        empty = [k for k, v in kept.items() if not v]
        if empty:
            example = next(iter(out[empty[0]]), "?")
            raise ValueError(f"{len(empty)} signature(s) share no gene with the data, e.g. {empty[:3]} (first "
                             f"gene {example!r}). Check that the gene names match adata.var_names (symbols vs "
                             f"Ensembl IDs, human vs mouse capitalisation) or drop those states.")
        out = kept
    if len(out) < 2:
        raise ValueError(f"Starfysh needs at least 2 cell states; got {len(out)} signature(s).")
    return out


def _log_norm(counts) -> np.ndarray:
    """log1p of counts normalised to the median library size (scanpy ``normalize_total(target_sum=None)``)."""
    X = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
    X = X.astype(np.float64)
    lib = X.sum(1, keepdims=True)
    target = np.median(lib[lib > 0]) if np.any(lib > 0) else 1.0
    return np.log1p(X / np.maximum(lib, 1e-12) * target)


def signature_prior(logX: np.ndarray, var_names, signatures: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Signature scores and the prior proportions :math:`p_i` (step 2).

    Parameters
    ----------
    logX : (n_spots, n_genes) log-normalised expression
    var_names : the genes of the columns of ``logX``
    signatures : ``{state: [genes]}`` (genes absent from ``var_names`` are ignored)

    Returns
    -------
    scores : (n_spots, K) z-scored mean signature expression
    prior : (n_spots, K) ``max(scores, 0)`` normalised to sum 1 per spot (uniform where all scores are <= 0)
    """
    index = {g: j for j, g in enumerate(map(str, var_names))}
    means = []
    for state, gs in signatures.items():
        cols = [index[g] for g in gs if g in index]
        if not cols:
            raise ValueError(f"signature {state!r} has no gene in the data.")
        means.append(logX[:, cols].mean(1))
    M = np.stack(means, 1)
    sd = M.std(0)
    scores = (M - M.mean(0)) / np.where(sd > 0, sd, 1.0)
    pos = np.clip(scores, 0.0, None)
    total = pos.sum(1, keepdims=True)
    prior = np.divide(pos, total, out=np.full_like(pos, 1.0 / pos.shape[1]), where=total > 0)
    return scores, prior


def anchor_spots(scores: np.ndarray, log_lib: np.ndarray, n_anchors: int = 40, vlow: float = 10,
                 vhigh: float = 95) -> np.ndarray:
    """(n_anchors, K) indices of each state's anchor spots: the highest scores among spots whose library lies
    between the ``vlow``-th and ``vhigh``-th percentiles (the official filter against empty and doublet-like spots).
    """
    lo, hi = np.percentile(log_lib, [vlow, vhigh])
    ok = np.flatnonzero((log_lib >= lo) & (log_lib <= hi))
    if len(ok) < 1:
        ok = np.arange(len(log_lib))
    n = min(n_anchors, len(ok))
    order = np.argsort(-scores[ok], axis=0, kind="stable")[:n]
    return ok[order]


def windowed_library(coords: np.ndarray, log_lib: np.ndarray, window_size: int = 30) -> np.ndarray:
    """Each spot's log library averaged over its ``window_size`` nearest spots (itself included): (n_spots,)."""
    k = int(min(max(window_size, 1), len(log_lib)))
    _, idx = cKDTree(coords).query(coords, k=k)
    idx = np.asarray(idx).reshape(len(log_lib), k)
    return log_lib[idx].mean(1)


def reference_markers(reference, genes, n_markers: int | None = None, cell_type_key: str = "cell_type"):
    """Top markers per cell type of a single-cell reference (largest mean log-expression in the type minus the
    largest mean among the other types), among ``genes``: ``{type: [genes]}``. ``n_markers=None`` takes
    ``min(30, len(genes) // n_types)``."""
    types = cell_type_labels(reference, cell_type_key)
    ref = reference[:, list(genes)]
    logR = _log_norm(counts_matrix(ref))
    names = sorted(pd.unique(types.astype(str)))
    means = np.stack([logR[np.asarray(types.astype(str) == t)].mean(0) for t in names])
    if n_markers is None:
        n_markers = max(2, min(30, len(genes) // len(names)))
    out = {}
    for k, t in enumerate(names):
        other = np.delete(means, k, axis=0).max(0) if len(names) > 1 else 0
        out[t] = list(ref.var_names[np.argsort(-(means[k] - other), kind="stable")[:n_markers]])
    return out


# ------------------------------------------------------------------------------------- archetypal analysis
def simplex_projection(V: np.ndarray, axis: int = -1) -> np.ndarray:
    """Euclidean projection of each vector along ``axis`` onto the probability simplex (sort-based algorithm)."""
    V = np.moveaxis(np.asarray(V, dtype=np.float64), axis, -1)
    U = -np.sort(-V, axis=-1)
    css = np.cumsum(U, axis=-1) - 1.0
    ks = np.arange(1, V.shape[-1] + 1)
    cond = U - css / ks > 0
    rho = cond.shape[-1] - 1 - np.argmax(cond[..., ::-1], axis=-1)
    tau = np.take_along_axis(css, rho[..., None], -1) / (rho[..., None] + 1)
    return np.moveaxis(np.maximum(V - tau, 0.0), -1, axis)


def _furthest_sum(X: np.ndarray, k: int, seed: int) -> list[int]:
    """Furthest-sum initialisation (Mørup & Hansen 2012): from a random point, repeatedly add the point with the
    largest summed distance to the points chosen so far; the random start is then dropped for one more point."""
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(X)))
    chosen, total = [start], np.linalg.norm(X - X[start], axis=1)
    for _ in range(k):
        d = total.copy()
        d[chosen] = -np.inf
        j = int(np.argmax(d))
        chosen.append(j)
        total += np.linalg.norm(X - X[j], axis=1)
    return chosen[1:]


def archetypal_analysis(X, k: int, *, n_iter: int = 500, tol: float = 1e-6, seed: int = 0) -> dict:
    """Principal convex hull analysis: archetypes :math:`Z = C X` with :math:`X \\approx S Z` (step 3).

    Minimises :math:`\\lVert X - S C X \\rVert_F^2` over S (n, k) and C (k, n) whose rows lie on the simplex, by
    alternating projected-gradient steps with a step-size search (as PCHA; Mørup & Hansen, Neurocomputing 2012).

    Parameters
    ----------
    X : (n, d) points (e.g. PCA coordinates of spots)
    k : number of archetypes

    Returns
    -------
    dict with ``archetypes`` (k, d), ``S`` (n, k), ``C`` (k, n), ``explained`` (1 - SSE / total sum of squares
    about the mean) and ``n_iter``.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} archetypes: choose 1 <= k <= the number of points ({n}).")
    C = np.zeros((k, n))
    C[np.arange(k), _furthest_sum(X, k, seed)] = 1.0
    Z = C @ X
    S = simplex_projection(np.full((n, k), 1.0 / k))
    sst = ((X - X.mean(0)) ** 2).sum()

    def sse(S_, Z_):
        return ((X - S_ @ Z_) ** 2).sum()

    err, mu_s, mu_c = sse(S, Z), 1.0, 1.0
    it = 0
    for it in range(1, n_iter + 1):
        start = err
        # S step: gradient of ||X - S Z||^2 is 2 (S Z Z^T - X Z^T)
        ZZ, XZ = Z @ Z.T, X @ Z.T
        grad = (S @ ZZ - XZ) / max(sst, 1e-12)
        while True:
            S_new = simplex_projection(S - mu_s * grad)
            e = sse(S_new, Z)
            if e <= err or mu_s < 1e-12:
                break
            mu_s /= 2
        S, err, mu_s = S_new, e, mu_s * 1.2
        # C step: gradient of ||X - S C X||^2 w.r.t. C is 2 S^T (S C X - X) X^T
        grad_c = S.T @ ((S @ Z - X) @ X.T) / max(sst, 1e-12)
        while True:
            C_new = simplex_projection(C - mu_c * grad_c)
            Z_new = C_new @ X
            e = sse(S, Z_new)
            if e <= err or mu_c < 1e-12:
                break
            mu_c /= 2
        C, Z, err, mu_c = C_new, Z_new, e, mu_c * 1.2
        if start - err < tol * max(sst, 1e-12):
            break
    return {"archetypes": Z, "S": S, "C": C, "explained": 1 - err / max(sst, 1e-12), "n_iter": it}


def _stable_matching(overlap: np.ndarray) -> dict[int, int]:
    """Rows (anchor sets) -> columns (archetypes), each row proposing in decreasing overlap (Gale-Shapley)."""
    free = list(range(overlap.shape[0]))[::-1]
    match: dict[int, int] = {}  # column -> row
    nxt = [0] * overlap.shape[0]
    prefs = [list(np.argsort(-overlap[i], kind="stable")) for i in range(overlap.shape[0])]
    while free:
        i = free.pop()
        if nxt[i] >= overlap.shape[1]:
            continue
        j = prefs[i][nxt[i]]
        nxt[i] += 1
        if j not in match:
            match[j] = i
        elif overlap[i, j] > overlap[match[j], j]:
            free.append(match[j])
            match[j] = i
        else:
            free.append(i)
    return {i: j for j, i in match.items()}


def _community_markers(logX: np.ndarray, var_names, members: np.ndarray, n_markers: int) -> list[str]:
    inside = np.zeros(len(logX), bool)
    inside[members] = True
    diff = logX[inside].mean(0) - logX[~inside].mean(0)
    return list(np.asarray(var_names)[np.argsort(-diff, kind="stable")[:n_markers]])


def archetype_signatures(logX: np.ndarray, var_names, k: int, *, r: int = 30, n_markers: int = 30,
                         n_pcs: int = 30, seed: int = 0) -> tuple[dict[str, list[str]], dict]:
    """Cell states without prior knowledge (step 3): PCA (``n_pcs``) -> :func:`archetypal_analysis` with ``k``
    archetypes -> the ``r`` spots nearest each archetype (its community) -> their top ``n_markers`` genes.

    Returns ``({"arch_0": [genes], ...}, info)``; ``info`` has ``pcs``, ``aa`` (the AA result) and
    ``communities`` (k, r) spot indices."""
    from .. import preprocess

    pcs = preprocess.pca(logX, n_pcs, seed=seed)
    aa = archetypal_analysis(pcs, k, seed=seed)
    r = min(r, len(logX))
    _, comm = cKDTree(pcs).query(aa["archetypes"], k=r)
    comm = np.asarray(comm).reshape(k, r)
    sigs = {f"arch_{j}": _community_markers(logX, var_names, comm[j], n_markers) for j in range(k)}
    return sigs, {"pcs": pcs, "aa": aa, "communities": comm}


# --------------------------------------------------------------------------------------------- histology
#: Ruifrok & Johnston (2001) optical densities of haematoxylin, eosin and DAB (rows), RGB columns.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def hematoxylin(tiles) -> np.ndarray:
    """Inverse hematoxylin channel of RGB tiles, (..., H, W, 3) uint8 -> (..., H, W) float in [0, 255].

    Colour deconvolution: optical density :math:`OD = -\\ln((I + 1) / 256)` per channel, stain amounts
    :math:`OD \\, M^{-1}` with M the stain matrix :data:`RGB_FROM_HED`; the hematoxylin amount h becomes the
    intensity :math:`255 (1 - e^{-h})`, high where nuclei are (HistomicsTK's inverted 8-bit channel).
    """
    rgb = np.asarray(tiles, dtype=np.float64)
    if rgb.shape[-1] != 3:
        raise ValueError(f"tiles must end with 3 RGB channels; got shape {rgb.shape}.")
    od = -np.log((rgb + 1.0) / 256.0)
    h = np.clip(od @ np.linalg.inv(RGB_FROM_HED)[:, 0], 0.0, None)
    return 255.0 * (1.0 - np.exp(-h))


# ------------------------------------------------------------------------------------------------ the model
def poe(m_x: torch.Tensor, logv_x: torch.Tensor, m_y: torch.Tensor, logv_y: torch.Tensor):
    """Precision-weighted product of two Gaussian experts: returns the joint ``(mean, log-variance)``.

    .. math:: v = (v_x^{-1} + v_y^{-1})^{-1}, \\quad m = v (m_x / v_x + m_y / v_y)
    """
    prec_x, prec_y = torch.exp(-logv_x), torch.exp(-logv_y)
    var = 1.0 / (prec_x + prec_y)
    return var * (m_x * prec_x + m_y * prec_y), torch.log(var)


def _bn(n: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(n, momentum=0.01, eps=1e-3)


def _block(n_in: int, n_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), _bn(n_hidden), nn.ReLU())


def _reparam(m: torch.Tensor, logv: torch.Tensor) -> torch.Tensor:
    return m + torch.randn_like(m) * torch.exp(0.5 * logv)


class StarfyshModel(nn.Module):
    """The auxiliary VAE (AVAE) of Starfysh, with the histology expert and product of experts when ``n_pixels``
    is given (AVAE_PoE).

    ==================  ===================  ==============================================
    tensor              shape                meaning
    ==================  ===================  ==============================================
    ``x``               (B, G)               raw counts of the selected genes
    ``prior``           (B, K)               signature prior :math:`p_i`
    ``lib``             (B, 1)               windowed log library :math:`\\tilde l_i`
    ``y``               (B, C * 32 * 32)     patch pixels, C = 1 or 3 (histology only)
    ``qc_m``            (B, K)               :math:`\\lambda(x)`, the proportions
    ``z``               (B, D = 10)          latent state of the spot
    ``u``               (K, D)               per-state latent means
    ==================  ===================  ==============================================
    """

    def __init__(self, n_genes: int, n_states: int, *, n_latent: int = 10, n_hidden: int = 256,
                 alpha: float = 50.0, n_pixels: int | None = None, lambda_poe: float = 0.2):
        super().__init__()
        G, K, D, H = n_genes, n_states, n_latent, n_hidden
        self.n_states, self.n_latent, self.alpha, self.lambda_poe = K, D, float(alpha), lambda_poe
        self.qu_m = nn.Parameter(torch.randn(K, D))
        self.qu_logv = nn.Parameter(torch.zeros(K, D))
        self.qs_logm = nn.Parameter(torch.zeros(K, D))
        self.c_enc = nn.Sequential(_block(G, H), nn.Linear(H, K), _bn(K), nn.Softmax(dim=-1))
        self.l_enc = _block(G + (n_pixels or 0), H)
        self.l_m, self.l_logv = nn.Linear(H, 1), nn.Linear(H, 1)
        self.z_enc = _block(G, H)
        self.z_m, self.z_logv = nn.Linear(H, K * D), nn.Linear(H, K * D)
        self.decoder = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, G), nn.Softmax(dim=-1))
        self.px_r = nn.Parameter(torch.randn(G))
        self.n_pixels = n_pixels
        if n_pixels:
            P = n_pixels
            self.img_enc = _block(P, H)
            self.img_m, self.img_logv = nn.Linear(H, D), nn.Linear(H, D)
            self.img_hidden = nn.Linear(D, H)
            self.py_m = nn.Sequential(nn.Linear(H, P), _bn(P), nn.ReLU())
            self.py_logv = nn.Sequential(nn.Linear(H, P), nn.ReLU())
            self.poe_hidden = nn.Linear(D, H)
            self.poe_x = nn.Sequential(nn.Linear(H, G), nn.Softmax(dim=-1))
            self.px_r_poe = nn.Parameter(torch.randn(G))
            self.poe_py_m = nn.Sequential(nn.Linear(H, P), _bn(P), nn.ReLU())
            self.poe_py_logv = nn.Sequential(nn.Linear(H, P), nn.ReLU())
        for m in self.modules():  # the official init_weights
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight)

    @staticmethod
    def theta(raw: torch.Tensor) -> torch.Tensor:
        """Per-gene NB inverse dispersion :math:`\\mathrm{softplus}(r) + \\epsilon`."""
        return nn.functional.softplus(raw) + _EPS

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None, sample: bool = True) -> dict:
        """The expression posteriors q(l | x[, y]), q(c | x), q(z | x, c) (and q(z | y) with an image)."""
        xn = torch.log1p(x)
        yn = torch.log1p(y) if y is not None else None
        h = self.l_enc(xn if yn is None else torch.cat([xn, yn], 1))
        out = {"l_m": self.l_m(h), "l_logv": self.l_logv(h)}
        l = _reparam(out["l_m"], out["l_logv"]) if sample else out["l_m"]
        out["l"] = l.clamp(max=_L_MAX)  # numerical guard: e^20 ~ 5e8 counts per spot
        qc_m = self.c_enc(xn)
        c = Dirichlet(qc_m * self.alpha + _EPS).rsample() if sample else qc_m
        h = self.z_enc(xn)
        K, D = self.n_states, self.n_latent
        z_m = (c[:, :, None] * self.z_m(h).view(-1, K, D)).sum(1)
        z_logv = (c[:, :, None] * self.z_logv(h).view(-1, K, D)).sum(1)
        out.update(qc_m=qc_m, c=c, z_m=z_m, z_logv=z_logv, z=_reparam(z_m, z_logv) if sample else z_m)
        if yn is not None:
            h = self.img_enc(yn)
            out["zy_m"], out["zy_logv"] = self.img_m(h), self.img_logv(h)
            out["zy"] = _reparam(out["zy_m"], out["zy_logv"]) if sample else out["zy_m"]
            out["zp_m"], out["zp_logv"] = poe(z_m, z_logv, out["zy_m"], out["zy_logv"])
            out["zp"] = _reparam(out["zp_m"], out["zp_logv"]) if sample else out["zp_m"]
        return out

    def loss(self, batch: dict) -> dict:
        x, prior, lib, y = batch["x"], batch["prior"], batch["lib"], batch.get("y")
        q = self.encode(x, y)
        qu = _reparam(self.qu_m, self.qu_logv)
        c = q["c"]
        pz_m = c @ qu
        pz_logv = 2 * torch.log(c @ torch.exp(self.qs_logm / 2))
        rate = torch.exp(q["l"]) * self.decoder(q["z"]) + _EPS
        terms = {
            "nb": -nb_log_prob(x, rate, self.theta(self.px_r)).sum(-1).mean(),
            "kl_u": normal_kl(self.qu_m, self.qu_logv, torch.zeros_like(self.qu_m),
                              torch.full_like(self.qu_logv, 2 * np.log(10.0))).mean(),
            "kl_z": normal_kl(q["z_m"], q["z_logv"], pz_m, pz_logv).mean(),
            "kl_c": kl_divergence(Dirichlet(q["qc_m"] * self.alpha + _EPS),
                                  Dirichlet((prior + _EPS) * self.alpha)).mean(),
            "kl_l": normal_kl(q["l_m"], q["l_logv"], lib, torch.zeros_like(lib)).mean(),
        }
        if y is not None:
            yn = torch.log1p(y)
            hy = self.img_hidden(q["zy"])
            terms["image"] = (_gauss_nll(yn, self.py_m(hy), self.py_logv(hy))
                              + normal_kl(q["zy_m"], q["zy_logv"], pz_m, pz_logv).mean())
            hp = self.poe_hidden(q["zp"])
            rate_p = torch.exp(q["l"]) * self.poe_x(hp) + _EPS
            terms["poe"] = self.lambda_poe * (
                -nb_log_prob(x, rate_p, self.theta(self.px_r_poe)).sum(-1).mean()
                + _gauss_nll(yn, self.poe_py_m(hp), self.poe_py_logv(hp))
                + normal_kl(q["zp_m"], q["zp_logv"], pz_m, pz_logv).mean())
        return terms


def _gauss_nll(y: torch.Tensor, m: torch.Tensor, logv: torch.Tensor) -> torch.Tensor:
    """-log N(y | m, exp(logv)), summed over pixels, averaged over spots."""
    return (0.5 * (np.log(2 * np.pi) + logv + (y - m) ** 2 * torch.exp(-logv))).sum(-1).mean()


# ------------------------------------------------------------------------------------------------ the method
def _drop_special(var_names) -> np.ndarray:
    """True for genes to keep: not mitochondrial (``MT-``) nor ribosomal (``RPS``/``RPL``), any capitalisation."""
    up = pd.Index(var_names).astype(str).str.upper()
    return ~np.asarray(up.str.startswith("MT-") | up.str.startswith("RPS") | up.str.startswith("RPL"))


def starfysh_genes(adata, signature_genes, n_top_genes: int = 2000) -> pd.Index:
    """Step 1's gene set: HVGs (seurat flavour on log-normalised data, MT-/RP genes dropped) united with the
    signature genes present in ``adata``."""
    import anndata as ad
    import scanpy as sc

    keep = _drop_special(adata.var_names)
    counts = counts_matrix(adata)[:, keep]
    names = adata.var_names[keep]
    if len(names) <= n_top_genes:
        hvg = names
    else:
        tmp = ad.AnnData(X=sparse.csr_matrix(counts, dtype=np.float32))
        sc.pp.normalize_total(tmp)
        sc.pp.log1p(tmp)
        sc.pp.highly_variable_genes(tmp, n_top_genes=n_top_genes, flavor="seurat")
        hvg = names[tmp.var["highly_variable"].to_numpy()]
    chosen = set(hvg) | set(signature_genes)
    return pd.Index([g for g in adata.var_names if g in chosen])


@register
class Starfysh(Method):
    """Starfysh (He et al. 2024): signature-primed Dirichlet VAE, fused with H&E patches by a product of experts.

    Options follow the official code: ``alpha`` (``alpha_mul``, confidence of the signature prior), ``n_hvg``,
    ``n_anchors``, ``window_size``, ``patch_r`` (patch = 2 patch_r pixels of the image), ``lr``, ``epochs``,
    ``batch_size``, ``n_repeats``, ``gamma`` (ExponentialLR), ``image_channels``. ``signatures``: dict /
    DataFrame / CSV path / AnnData of ranks; without them, the top ``n_markers`` markers per type of
    ``reference`` are used, and without a reference ``n_archetypes`` (default 8) archetypes found by archetypal
    analysis. ``refine_anchors=True`` adds the markers of the matched archetypes to the signatures.
    ``histology=False`` runs the expression model and never reads the image. The result is
    ``obsm["proportions_starfysh"]`` (spots x states); ``uns["starfysh"]`` keeps the prior,
    the anchors and the signatures used.
    """

    name = "starfysh"
    task = "deconv"
    summary = "signature-primed Dirichlet VAE + H&E product of experts"
    paper = "He et al., Nat Biotechnol 2024"
    needs_reference = False
    uses_image = True

    def __init__(self, *, signatures=None, histology: bool = True, alpha: float = 50.0, n_hvg: int = 2000,
                 n_anchors: int = 40, window_size: int = 30, patch_r: int = 16, n_latent: int = 10,
                 n_hidden: int = 256, lr: float = 1e-4, epochs: int = 100, batch_size: int = 32,
                 n_repeats: int = 3, gamma: float = 0.98, n_markers: int | None = None,
                 n_archetypes: int | None = None, refine_anchors: bool = False, cell_type_key: str = "cell_type",
                 image_channels: str = "hematoxylin", library_id: str | None = None, seed: int = 0,
                 progress: bool = True):
        if alpha <= 0:
            raise ValueError(f"alpha={alpha}: the Dirichlet concentration multiplier must be positive (official 50).")
        if epochs < 1 or n_repeats < 1:
            raise ValueError(f"epochs={epochs}, n_repeats={n_repeats}: both must be at least 1.")
        if batch_size < 2:
            raise ValueError(f"batch_size={batch_size}: BatchNorm needs at least 2 spots per batch (official 32).")
        if image_channels not in ("hematoxylin", "rgb"):
            raise ValueError(f"image_channels={image_channels!r}: choose 'hematoxylin' (official default) or 'rgb'.")
        if patch_r < 1:
            raise ValueError(f"patch_r={patch_r}: the patch half-width must be a positive number of pixels.")
        self.signatures, self.histology, self.alpha, self.n_hvg = signatures, histology, alpha, n_hvg
        self.n_anchors, self.window_size, self.patch_r = n_anchors, window_size, patch_r
        self.n_latent, self.n_hidden, self.lr, self.epochs = n_latent, n_hidden, lr, epochs
        self.batch_size, self.n_repeats, self.gamma = batch_size, n_repeats, gamma
        self.n_markers, self.n_archetypes, self.refine_anchors = n_markers, n_archetypes, refine_anchors
        self.cell_type_key, self.library_id, self.seed, self.progress = cell_type_key, library_id, seed, progress
        self.image_channels = image_channels

    # -- steps 1-3 ------------------------------------------------------------------------------------------
    def patches(self, adata) -> np.ndarray:
        """(n_spots, C (2 patch_r)^2) pixels of the patch around each spot (hires image if present): the inverse
        hematoxylin channel (C = 1) or RGB (C = 3)."""
        image, scale = images.image_and_scale(adata, self.library_id, resolution=None)
        tiles = images.spot_tiles(image, spatial_coords(adata), 2 * self.patch_r, scale)
        if self.image_channels == "hematoxylin":
            tiles = hematoxylin(tiles)
        return tiles.reshape(len(tiles), -1).astype(np.float32)

    def _has_image(self, adata) -> bool:
        try:
            images.image_and_scale(adata, self.library_id, resolution=None)
        except (KeyError, ValueError):
            return False
        return True

    def prepare(self, adata, reference=None) -> dict:
        """Steps 1-3: genes, signatures, prior, anchors, windowed library (and patches). Returns a dict."""
        counts = counts_matrix(adata)
        check_finite(counts.data if sparse.issparse(counts) else counts, "adata.X")
        coords = spatial_coords(adata)
        lib_all = np.asarray(counts.sum(1)).ravel()
        if np.any(lib_all <= 0):
            raise ValueError(f"{int((lib_all <= 0).sum())} spots have no counts; remove them first "
                             "(e.g. sc.pp.filter_cells(adata, min_counts=1)).")
        keep = _drop_special(adata.var_names)
        logX_all = _log_norm(counts[:, keep])
        names_all = adata.var_names[keep]
        info: dict = {}
        if self.signatures is not None:
            sigs = read_signatures(self.signatures, names_all)
            source = "given"
        elif reference is not None:
            shared = names_all[names_all.isin(reference.var_names)]
            if len(shared) == 0:
                raise ValueError("The reference shares no gene with the spatial data; check the gene names "
                                 "(symbols vs Ensembl IDs) or pass signatures= instead.")
            sigs = reference_markers(reference, shared, self.n_markers, self.cell_type_key)
            source = "reference"
        else:
            k = self.n_archetypes or 8
            sigs, info = archetype_signatures(logX_all, names_all, k, n_markers=self.n_markers or 30,
                                              seed=self.seed)
            source = "archetypes"
        genes = starfysh_genes(adata, [g for v in sigs.values() for g in v], self.n_hvg)
        sub = adata[:, genes]
        X = counts_matrix(sub)
        logX = _log_norm(X)
        scores, prior = signature_prior(logX, genes, sigs)
        log_lib = np.log1p(np.asarray(X.sum(1)).ravel())
        anchors = anchor_spots(scores, log_lib, self.n_anchors)
        if self.refine_anchors:
            sigs, info = self._refine(logX, genes, sigs, anchors)
            scores, prior = signature_prior(logX, genes, sigs)
            anchors = anchor_spots(scores, log_lib, self.n_anchors)
        return {"genes": genes, "X": X, "signatures": sigs, "source": source, "scores": scores, "prior": prior,
                "anchors": anchors, "log_lib": log_lib,
                "win_lib": windowed_library(coords, log_lib, self.window_size), "aa": info}

    def _refine(self, logX, genes, sigs, anchors, n_genes: int = 5):
        """Official ``refine_anchors``: archetype communities matched 1-1 to anchor sets; each matched state gains
        the top ``n_genes`` markers of its archetype."""
        k = self.n_archetypes or len(sigs)
        _, info = archetype_signatures(logX, genes, k, r=anchors.shape[0], seed=self.seed)
        comm = info["communities"]
        overlap = np.array([[len(np.intersect1d(anchors[:, i], comm[j])) for j in range(len(comm))]
                            for i in range(anchors.shape[1])])
        match = _stable_matching(overlap)
        out = dict(sigs)
        for i, state in enumerate(sigs):
            if i in match and overlap[i, match[i]] > 0:
                extra = _community_markers(logX, genes, comm[match[i]], n_genes)
                out[state] = list(dict.fromkeys(sigs[state] + extra))
        info["match"] = {list(sigs)[i]: f"arch_{j}" for i, j in match.items()}
        info["overlap"] = overlap
        return out, info

    # -- steps 4-7 ------------------------------------------------------------------------------------------
    def tensors(self, prep: dict, y: np.ndarray | None = None) -> dict:
        X = prep["X"].toarray() if sparse.issparse(prep["X"]) else np.asarray(prep["X"])
        out = {"x": torch.tensor(X, dtype=torch.float32),
               "prior": torch.tensor(prep["prior"], dtype=torch.float32),
               "lib": torch.tensor(prep["win_lib"][:, None], dtype=torch.float32)}
        if y is not None:
            out["y"] = torch.tensor(y, dtype=torch.float32)
        return out

    def _batches(self, data: dict, generator: torch.Generator):
        n = data["x"].shape[0]
        bs = min(self.batch_size, n)

        def make():
            order = torch.randperm(n, generator=generator)
            return [{k: v[order[s:s + bs]] for k, v in data.items()} for s in range(0, n - bs + 1, bs)]
        return make

    def train_model(self, data: dict, n_states: int, epochs: int | None = None):
        """Train ``n_repeats`` models; keep the one whose lowest epoch KL_c is smallest. Returns (model, histories)."""
        epochs = self.epochs if epochs is None else epochs
        n_pixels = data["y"].shape[1] if "y" in data else None
        best, best_kl, histories = None, np.inf, []
        for rep in range(self.n_repeats):
            set_seed(self.seed + rep)
            model = StarfyshModel(data["x"].shape[1], n_states, n_latent=self.n_latent, n_hidden=self.n_hidden,
                                  alpha=self.alpha, n_pixels=n_pixels)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr, foreach=True)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.gamma)
            gen = torch.Generator().manual_seed(self.seed + rep)

            def step(epoch, terms, sched=sched):
                sched.step()

            hist = fit(model, self._batches(data, gen), epochs=epochs, optimizer=opt, grad_clip=5.0,
                       callback=step, progress=self.progress, desc=f"Starfysh {rep + 1}/{self.n_repeats}")
            histories.append(hist)
            kl_c = min(hist.terms["kl_c"])
            if kl_c < best_kl:
                best, best_kl = copy.deepcopy(model), kl_c
        best.eval()
        return best, histories

    @torch.no_grad()
    def proportions(self, model: StarfyshModel, data: dict) -> np.ndarray:
        """Posterior mean proportions :math:`\\lambda(x_i)` (n_spots, K), BatchNorm in eval mode."""
        model.eval()
        return model.encode(data["x"], data.get("y"), sample=False)["qc_m"].numpy()

    def run(self, adata, reference=None):
        use_image = bool(self.histology)
        if use_image and not self._has_image(adata):
            warnings.warn("Starfysh: adata has no H&E image in uns['spatial'], so histology is not used "
                          "(pass histology=False to silence this).", UserWarning, stacklevel=2)
            use_image = False
        prep = self.prepare(adata, reference)
        y = self.patches(adata) if use_image else None
        data = self.tensors(prep, y)
        model, histories = self.train_model(data, len(prep["signatures"]))
        props = self.proportions(model, data)
        write_frame(adata, f"proportions_{self.key}", props, list(prep["signatures"]))
        adata.uns[self.key] = {
            "histology": use_image, "signature_source": prep["source"], "genes": np.asarray(prep["genes"], str),
            "prior": pd.DataFrame(prep["prior"], index=adata.obs_names, columns=list(prep["signatures"])),
            "anchors": pd.DataFrame(np.asarray(adata.obs_names)[prep["anchors"]],
                                    columns=list(prep["signatures"])),
            "signatures": {k: np.asarray(v, str) for k, v in prep["signatures"].items()},
        }
        self.model_, self.histories_, self.prep_ = model, histories, prep
        self.history_ = min(histories, key=lambda h: min(h.terms["kl_c"]))
        return adata
