r"""STEM: spatially aware embeddings that map single cells onto spots and reconstruct where each cell came from.

Hao M, *et al.* STEM enables mapping of single-cell and spatial transcriptomics data with transfer learning.
*Commun Biol* 7:56 (2024). doi:10.1038/s42003-023-05640-1. Official code: WhirlFirst/STEM @3103da1 (PyPI
``scSTEM`` 0.0.2): ``STEM/model.py`` (``FeatureNet``, ``SOmodel.train_onestep``), ``STEM/utils.py``
(``MMDLoss``), ``STEM/evaluate.py`` (``all_coord``, ``k_coord``). Task ``locate``; integration strategy of the
review: *fusion* (both modalities are encoded by one network into one embedding space).

Notation: :math:`N_{st}` spots with positions :math:`c_j \in \mathbb R^2`, :math:`N_{sc}` single cells whose
positions are unknown, :math:`G` shared genes, :math:`f_\theta` the shared encoder, :math:`e_j = f_\theta(x_j)`.

Pipeline
--------
1. **Inputs** (:func:`stem_features`). Both data sets are restricted to their shared genes, then
   ``normalize_total`` (each to its own median library size, scanpy's default) and ``log1p``.
2. **ST input dropout** (:func:`st_dropout_rate`): spots hold several cells, so they detect more genes than one
   cell; dropout with rate

   .. math:: p = 1 - \frac{\operatorname{median}_{\text{cells}}(\#\text{genes} > 0)}
                           {\operatorname{median}_{\text{spots}}(\#\text{genes} > 0)}

   is applied to the ST input (only, and only in training), so spots look as sparse as cells. Clipped at 0 when
   spots are no denser than cells (single-cell ST).
3. **Encoder** (:class:`FeatureNet`): G → 512 → LayerNorm → ReLU → 256 → LayerNorm → ReLU → 128 (linear).
4. **Losses** (:class:`STEMModel`), all spots in every step:

   * adjacency target (:func:`adjacency_target`), a row-normalised Gaussian of the spot distances with
     :math:`\sigma` = half the spot pitch (``sigma=None``: half the median nearest-neighbour distance of the
     spatial data; :math:`\sigma = 0` gives the identity),

     .. math:: T_{ij} = \frac{\exp(-\lVert c_i - c_j\rVert^2 / 2\sigma^2)}{\sum_{k}\exp(-\lVert c_i - c_k\rVert^2
               / 2\sigma^2)};

   * adjacency prediction (:func:`adjacency_loss`), a soft-label cross-entropy over dot-product logits,
     self included: :math:`L_{pred} = -\frac{1}{N_{st}}\sum_i \sum_j T_{ij}\log\operatorname{softmax}_j(e_i^\top
     e_j)`;
   * domain alignment (:func:`stem_mmd`): the multi-kernel RBF MMD² between all spot embeddings and
     ``mmd_batch`` = 1000 cell embeddings drawn with replacement, 5 kernels :math:`\exp(-d^2/b_s)`,
     :math:`b_s = \gamma\, 2^{s-2}`, :math:`\gamma` the mean squared distance between distinct rows of the pooled
     sample (held constant in the gradient, as ``L2_distance.data`` does officially);
   * cycle mapping (:func:`cycle_loss`), with :math:`P^{st\to sc} = \operatorname{softmax}_{\text{cells}}(E_{st}
     E_{sc}^\top)` and :math:`P^{sc\to st} = \operatorname{softmax}_{\text{spots}}(E_{sc} E_{st}^\top)`,

     .. math:: L_{cyc} = \frac{1}{N_{st}}\sum_i \sum_j T_{ij}\big(\log T_{ij} - \log([P^{st\to sc}
               P^{sc\to st}]_{ij} + 10^{-7})\big);

   * total :math:`L = L_{pred} + \alpha L_{MMD} + r(e) L_{cyc}`, :math:`\alpha = 0.8`, ramp
     :math:`r(e) = \max\big((e - 50)/(E - 50), 0\big)` (:func:`cycle_ramp`).
5. **Training**: AdamW (lr 2·10\ :sup:`-3`, torch's default weight decay 0.01), StepLR (step 200, factor 0.5),
   :math:`E` = 400 full-batch epochs.
6. **Outputs.** Cell coordinates :math:`\hat c = P^{sc\to st} C` (``all_coord``), or the renormalised mean of
   each cell's ``top_k`` most probable spots (``k_coord``), in ``obsm["spatial_stem"]`` of the returned copy of
   the reference, with the cell embeddings in ``obsm["X_stem"]``; from the fitted object, both mapping matrices
   (:meth:`STEM.mapping`), the mapped cell-type mass of each spot (:meth:`STEM.spot_type_mass`, the quantity of
   STEM's own evaluation) and the **spatially dominant genes** (:meth:`STEM.dominant_genes`), which attribute each
   cell's predicted position to its genes with integrated gradients (:func:`integrated_gradients`).

Shapes
------
======================  =====================  ==============================================
tensor                  shape                  meaning
======================  =====================  ==============================================
``x_st`` / ``x_sc``     (N_st, G) / (N_sc, G)  log-normalised spots / cells
``coords``              (N_st, 2)              spot positions :math:`C`
``e_st`` / ``e_sc``     (N_st, 128) / (N_sc, 128)  embeddings
``T``                   (N_st, N_st)           adjacency target (rows sum to 1), built per block
``P^{st->sc}``          (N_st, N_sc)           each spot's distribution over cells, per block
``P^{sc->st}``          (N_sc, N_st)           each cell's distribution over spots, per block
``spatial_stem``        (N_sc, 2)              predicted cell positions
attributions            (N_sc, G, 2)           integrated gradients of :math:`\hat c` (x and y)
======================  =====================  ==============================================

Deliberate deviations from the official code
--------------------------------------------
* **No N × N matrix.** The official step forms :math:`T`, :math:`E_{st}E_{st}^\top` (N_st × N_st), both mapping
  matrices (N_st × N_sc) and their product, and the MMD kernel over N_st + 1000 points; memory grows as
  :math:`N_{st}(N_{st} + N_{sc})`. Here every one of them is computed in row blocks of at most ``block_size``²
  entries (2048² ≈ 4.2 M), each recomputed in the backward pass (activation checkpointing), with :math:`T` rebuilt
  from the coordinates inside each block and the row normalisers of :math:`P^{sc\to st}` (a log-sum-exp per cell)
  computed first, so memory stays bounded and the numbers are those of the dense formulas (equal up to rounding;
  tested). A matrix that fits in one block (the chapter's seqFISH data) is computed densely, without
  recomputation. The five MMD kernels come from one exponential by repeated squaring (same values). Time stays
  O(N_st² N_sc) per epoch, as officially: full-batch STEM suits up to a few thousand spots on a CPU. Measured on
  one CPU thread: the chapter's seqFISH data (440 spots, 3,814 cells, 351 genes) train the official 400 epochs in
  about 150 s; the benchmark's MERFISH half-section (2,416 positioned and 2,416 query cells) takes about 4 s per
  epoch, so about 25 minutes for 400 epochs.
* **Cycle ramp for short runs.** The official ramp is undefined (E = 50) or negative-then-large (E < 50) for short
  runs; the ramp starts at ``min(cycle_start, E // 8)`` (= 50 at the official 400 epochs). The cycle term is not
  evaluated while its weight is 0 (its gradient is then 0 anyway), and the history logs the *weighted* terms.
* **Random numbers.** The MMD cells are drawn with ``torch.randint`` (official: ``np.random.randint``), so one seed
  (default 0; official 2022) fixes everything and a CPU run repeats exactly.
* **Inputs and defaults made explicit.** The official code takes pre-processed matrices, a hand-set σ (3 in its
  demo) and a hand-computed dropout rate; here σ defaults to half the median nearest-neighbour spacing of the
  spatial data (the README's rule), the dropout rate is computed on the shared genes and clipped at 0, and inputs
  are validated (raw counts, coordinates, shared genes, empty spots or cells).
* **Spatially dominant genes.** The paper attributes the spatial information to genes with integrated gradients
  (captum); its exact target function is in a notebook that could not be checked here. This module attributes the
  predicted position :math:`\hat c(x) = \operatorname{softmax}(f_\theta(x) E_{st}^\top) C` of each cell along x and
  y, from an all-zero baseline (no expression; captum's default), 50 Gauss–Legendre steps (captum's default), and
  scores a gene by the mean over cells of the length of its (x, y) attribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import graphs, preprocess
from ..train import fit, set_seed
from ..validation import check_finite, counts_matrix, shared_genes, spatial_coords
from . import Method, register

__all__ = [
    "STEM",
    "FeatureNet",
    "STEMModel",
    "adjacency_loss",
    "adjacency_target",
    "cycle_loss",
    "cycle_ramp",
    "default_sigma",
    "integrated_gradients",
    "st_dropout_rate",
    "stem_features",
    "stem_mmd",
]


# ------------------------------------------------------------------------------------------------ inputs
def _genes_detected(counts) -> np.ndarray:
    """Number of genes with a count > 0 in each row, (n,)."""
    if sparse.issparse(counts):
        return np.diff(sparse.csr_matrix(counts > 0).indptr)
    return (np.asarray(counts) > 0).sum(1)


def st_dropout_rate(st_counts, sc_counts) -> float:
    """Step 2: :math:`p = \\max(0, 1 - \\mathrm{median}_{cells}(\\#genes) / \\mathrm{median}_{spots}(\\#genes))`.

    ``st_counts`` (N_st, G) and ``sc_counts`` (N_sc, G) are raw counts of the same genes (dense or sparse).
    """
    st, sc = np.median(_genes_detected(st_counts)), np.median(_genes_detected(sc_counts))
    if st <= 0 or sc <= 0:
        raise ValueError("The median spot or cell detects no gene at all on the shared genes; check that both "
                         "data sets hold raw counts of the same genes.")
    return float(max(0.0, 1.0 - sc / st))


def stem_features(adata, genes) -> np.ndarray:
    """Step 1: ``normalize_total`` (to the median library size) + ``log1p`` of the raw counts of ``genes``,
    normalised on those genes only. (n, len(genes)) float32. Rows without counts raise an error."""
    counts = counts_matrix(adata[:, list(genes)])
    empty = np.asarray(counts.sum(1)).ravel() == 0
    if empty.any():
        raise ValueError(f"{int(empty.sum())} spots/cells have no counts on the {len(genes)} shared genes; filter "
                         "them out first (e.g. sc.pp.filter_cells(adata, min_counts=1)).")
    X = preprocess.log_normalize(adata[:, list(genes)], target_sum=None).X
    return np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float32)


def default_sigma(coords) -> float:
    """Half the median distance from each spot to its nearest other spot: the official rule "σ = half the spot
    spacing" made automatic. Raises when the spots share positions."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        raise ValueError("STEM needs at least 2 spots with positions.")
    nearest = graphs.knn_indices(coords, 1)[:, 0]
    spacing = float(np.median(np.linalg.norm(coords - coords[nearest], axis=1)))
    if spacing <= 0:
        raise ValueError("Most spots share their position with another spot, so the spacing is 0; pass sigma=... "
                         "(half the spot pitch, in the units of obsm['spatial']).")
    return spacing / 2


# ------------------------------------------------------------------------------------------------ encoder
class FeatureNet(nn.Module):
    """The shared encoder G -> 512 -> LayerNorm -> ReLU -> 256 -> LayerNorm -> ReLU -> 128, with the ST input
    dropout as a separate switch. Shapes: (n, G) -> (n, dims[-1]).

    ``stcore.nn.MLP`` offers BatchNorm only, so the layers are listed here (same order and initialisation as the
    official ``FeatureNet``).
    """

    def __init__(self, n_genes: int, dims: Sequence[int] = (512, 256, 128), dropout: float = 0.0):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 1 or min(dims) < 1:
            raise ValueError(f"dims={dims}: give positive layer sizes, e.g. [512, 256, 128] (official).")
        layers: list[nn.Module] = []
        d_in = n_genes
        for d in dims[:-1]:
            layers += [nn.Linear(d_in, d), nn.LayerNorm(d), nn.ReLU()]
            d_in = d
        layers.append(nn.Linear(d_in, dims[-1]))
        self.net = nn.Sequential(*layers)
        self.input_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, dropout: bool = False) -> Tensor:
        return self.net(self.input_dropout(x) if dropout else x)


# ------------------------------------------------------------------------------------------------ losses
def _run(fn: Callable, *args, blocked: bool):
    """``fn(*args)``, recomputed in the backward pass (checkpointing) when the work is split into blocks."""
    if blocked and torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _block_rows(n_rows: int, n_cols: int, block_size: int) -> tuple[int, bool]:
    """Rows per block of an (n_rows, n_cols) matrix holding at most ``block_size``² entries, and whether it is split
    at all (a matrix that fits in one block is computed densely, without checkpointing)."""
    if n_rows * n_cols <= block_size**2:
        return max(n_rows, 1), False
    return max(1, block_size**2 // max(n_cols, 1)), True


def adjacency_target(coords: Tensor, sigma: float, start: int = 0, stop: int | None = None) -> Tensor:
    """Rows ``start:stop`` of the adjacency target T (b, N): a Gaussian of the spot distances, each row divided by
    its sum (the official constant :math:`1/\\sqrt{2\\pi}\\sigma` cancels); ``sigma = 0`` gives the identity.
    ``coords`` is (N, 2); float32 out, distances in float64."""
    coords = coords.double()
    rows = coords[start:stop]
    if sigma == 0:
        target = torch.zeros(len(rows), len(coords), dtype=torch.float32, device=coords.device)
        target[torch.arange(len(rows)), start + torch.arange(len(rows))] = 1.0
        return target
    d2 = (rows.pow(2).sum(1, keepdim=True) + coords.pow(2).sum(1) - 2 * rows @ coords.T).clamp_min(0)
    kernel = torch.exp(-d2 / (2 * sigma**2))
    return (kernel / kernel.sum(1, keepdim=True).clamp_min(1e-12)).float()


def _adjacency_block(e_rows, e_st, coords, sigma, start):
    target = adjacency_target(coords, sigma, start, start + len(e_rows))
    return -(target * F.log_softmax(e_rows @ e_st.T, dim=1)).sum()


def adjacency_loss(e_st: Tensor, coords: Tensor, sigma: float, *, block_size: int = 2048) -> Tensor:
    """:math:`L_{pred} = -\\frac{1}{N}\\sum_i\\sum_j T_{ij}\\log\\mathrm{softmax}_j(e_i^\\top e_j)` (official
    ``F.cross_entropy(E E^T, T)``), in row blocks of at most ``block_size``² entries."""
    n = e_st.shape[0]
    rows, blocked = _block_rows(n, n, block_size)
    total = sum(_run(_adjacency_block, e_st[s:s + rows], e_st, coords, sigma, s, blocked=blocked)
                for s in range(0, n, rows))
    return total / n


def _logsumexp_block(e_rows, e_other):
    return torch.logsumexp(e_rows @ e_other.T, dim=1)


def _cycle_chunk(p_st_sc, e_sc, lse_sc, e_st):
    """(b, N_st) contribution of a chunk of cells to :math:`P^{st\\to sc} P^{sc\\to st}`."""
    return p_st_sc @ torch.exp(e_sc @ e_st.T - lse_sc[:, None])


def _cycle_block(e_rows, e_sc, lse_sc, e_st, coords, sigma, start, block_size, eps):
    p_st_sc = F.softmax(e_rows @ e_sc.T, dim=1)                                      # (b, N_sc)
    n_sc = e_sc.shape[0]
    chunk, blocked = _block_rows(n_sc, e_st.shape[0], block_size)
    st2st = sum(_run(_cycle_chunk, p_st_sc[:, c:c + chunk], e_sc[c:c + chunk], lse_sc[c:c + chunk], e_st,
                     blocked=blocked) for c in range(0, n_sc, chunk))                  # (b, N_st)
    target = adjacency_target(coords, sigma, start, start + len(e_rows))
    return (torch.xlogy(target, target) - target * torch.log(st2st + eps)).sum()


def cycle_loss(e_st: Tensor, e_sc: Tensor, coords: Tensor, sigma: float, *, block_size: int = 2048,
               eps: float = 1e-7) -> Tensor:
    """:math:`L_{cyc} = \\frac1N\\sum_i \\mathrm{KL}(T_i \\,\\|\\, [P^{st\\to sc}P^{sc\\to st}]_i + \\epsilon)`
    (official ``F.kl_div(log(st2sc @ sc2st + 1e-7), T).sum(1).mean()``).

    Blockwise once N_st × N_sc exceeds ``block_size``²: the log-normaliser of each cell's softmax over spots is
    computed first (in chunks of cells); then for each block of spot rows the product is summed over chunks of
    cells, each chunk recomputed in the backward pass, so neither mapping matrix is ever held whole.
    """
    n_st, n_sc = e_st.shape[0], e_sc.shape[0]
    chunk, blocked = _block_rows(n_sc, n_st, block_size)
    lse_sc = torch.cat([_run(_logsumexp_block, e_sc[c:c + chunk], e_st, blocked=blocked)
                        for c in range(0, n_sc, chunk)])                                   # (N_sc,)
    rows, blocked = _block_rows(n_st, n_sc, block_size)
    total = sum(_run(_cycle_block, e_st[s:s + rows], e_sc, lse_sc, e_st, coords, sigma, s, block_size, eps,
                     blocked=blocked) for s in range(0, n_st, rows))
    return total / n_st


def _kernel_block(a, b, inv_bandwidths, squaring):
    d2 = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2 * a @ b.T).clamp_min(0)
    if squaring:              # kernel_mul = 2: exp(-d2 / b_s) = exp(-d2 / b_max) ** (2 ** (S - 1 - s))
        k = torch.exp(-d2 * inv_bandwidths[-1])
        total = k
        for _ in inv_bandwidths[:-1]:
            k = k * k
            total = total + k
        return total.sum()
    return sum(torch.exp(-d2 * w) for w in inv_bandwidths).sum()


def _kernel_sum(a: Tensor, b: Tensor, inv_bandwidths, squaring: bool, block_size: int) -> Tensor:
    rows, blocked = _block_rows(a.shape[0], b.shape[0], block_size)
    return sum(_run(_kernel_block, a[s:s + rows], b, inv_bandwidths, squaring, blocked=blocked)
               for s in range(0, a.shape[0], rows))


def stem_mmd(x: Tensor, y: Tensor, *, kernel_mul: float = 2.0, kernel_num: int = 5,
             block_size: int = 2048) -> Tensor:
    """STEM's multi-kernel RBF MMD² (biased; official ``MMDLoss``), in row blocks.

    .. math:: \\mathrm{MMD}^2 = \\overline{K_{xx}} + \\overline{K_{yy}} - 2\\overline{K_{xy}},\\quad
              K = \\sum_{s=0}^{S-1}\\exp(-d^2 / b_s),\\quad b_s = \\frac{\\gamma\\, m^s}{m^{\\lfloor S/2\\rfloor}}

    with :math:`\\gamma` the mean squared distance between distinct rows of the pooled sample [x; y] (closed form
    :math:`\\sum_{ab}\\lVert z_a - z_b\\rVert^2 = 2n\\sum_a\\lVert z_a\\rVert^2 - 2\\lVert\\sum_a z_a\\rVert^2`,
    no n × n matrix) and held constant in the gradient. With m = 2 the S kernels come from one exponential by
    repeated squaring. Same value as :func:`stcore.nn.mmd` (whose widths carry a gradient); x (n_x, d),
    y (n_y, d) -> scalar.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or len(x) + len(y) < 2:
        raise ValueError(f"stem_mmd needs (n_x, d) and (n_y, d) samples, 2 rows in all; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}.")
    with torch.no_grad():
        z = torch.cat([x, y]).double()
        n = len(z)
        total = 2 * n * z.pow(2).sum() - 2 * z.sum(0).pow(2).sum()
        base = float((total / (n * n - n)).clamp_min(1e-12)) / kernel_mul ** (kernel_num // 2)
    inv = [1.0 / (base * kernel_mul**s) for s in range(kernel_num)]
    squaring = kernel_mul == 2
    nx, ny = len(x), len(y)
    kxx = _kernel_sum(x, x, inv, squaring, block_size) / nx**2
    kyy = _kernel_sum(y, y, inv, squaring, block_size) / ny**2
    kxy = _kernel_sum(x, y, inv, squaring, block_size) / (nx * ny)
    return kxx + kyy - 2 * kxy


def cycle_ramp(epoch: int, epochs: int, start: int = 50) -> float:
    """Weight :math:`r(e) = \\max((e - s)/(E - s), 0)` of the cycle loss at ``epoch`` (0-based) of ``epochs``,
    with :math:`s` = ``min(start, epochs // 8)`` (official: s = 50, E = 400)."""
    s = min(int(start), int(epochs) // 8)
    return max((epoch - s) / (epochs - s), 0.0)


class STEMModel(nn.Module):
    """The encoder and STEM's loss. ``loss((x_st, x_sc))`` returns the weighted terms ``{"adjacency": L_pred,
    "mmd": alpha * L_MMD, "cycle": r(e) * L_cyc}``; ``cycle_weight`` (r(e)) is set by the training loop.

    ``coords`` (N_st, 2) and ``sigma`` define T; ``dropout`` is the ST input dropout rate.
    """

    def __init__(self, n_genes: int, coords, *, sigma: float, dropout: float, alpha: float = 0.8,
                 mmd_batch: int = 1000, dims: Sequence[int] = (512, 256, 128), block_size: int = 2048):
        super().__init__()
        self.encoder = FeatureNet(n_genes, dims, dropout)
        self.register_buffer("coords", torch.as_tensor(np.asarray(coords), dtype=torch.float64))
        self.sigma, self.alpha, self.mmd_batch = float(sigma), float(alpha), int(mmd_batch)
        self.block_size = int(block_size)
        self.cycle_weight = 0.0

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """Embeddings (n, 128) without dropout, in eval mode."""
        was = self.training
        self.eval()
        out = self.encoder(x)
        self.train(was)
        return out

    def loss(self, batch) -> dict:
        x_st, x_sc = batch
        e_st = self.encoder(x_st, dropout=True)
        e_sc = self.encoder(x_sc)
        bs = self.block_size
        terms = {"adjacency": adjacency_loss(e_st, self.coords, self.sigma, block_size=bs)}
        pick = torch.randint(0, e_sc.shape[0], (self.mmd_batch,), device=e_sc.device)
        terms["mmd"] = self.alpha * stem_mmd(e_st, e_sc[pick], block_size=bs)
        if self.cycle_weight > 0:
            terms["cycle"] = self.cycle_weight * cycle_loss(e_st, e_sc, self.coords, self.sigma, block_size=bs)
        else:
            terms["cycle"] = torch.zeros((), dtype=e_st.dtype, device=e_st.device)
        return terms


# ------------------------------------------------------------------------------------------------ attributions
def integrated_gradients(f: Callable[[Tensor], Tensor], x: Tensor, baseline: Tensor | None = None, *,
                         n_steps: int = 50, method: str = "gausslegendre", batch_size: int = 1024) -> Tensor:
    r"""Integrated gradients (Sundararajan et al. 2017) of a row-wise scalar function.

    .. math:: A_{ig} = (x_{ig} - x'_{ig}) \int_0^1 \frac{\partial f(x'_i + a (x_i - x'_i))}{\partial x_{ig}}\,da
              \approx (x_{ig} - x'_{ig}) \sum_k w_k\, \partial_g f(x'_i + a_k (x_i - x'_i))

    with Gauss–Legendre nodes on [0, 1] (``method="gausslegendre"``, captum's default) or the trapezoid rule
    (``"riemann_trapezoid"``). Completeness: :math:`\sum_g A_{ig} \to f(x_i) - f(x'_i)`, exactly for a quadratic
    ``f`` with Gauss–Legendre (``n_steps`` ≥ 2).

    Parameters
    ----------
    f
        Maps (m, G) to (m,); row i of the output may depend on row i of the input only.
    x, baseline
        (n, G) inputs and baselines (default zeros; a (G,) baseline is broadcast).
    n_steps, method, batch_size
        Quadrature nodes, rule, and rows evaluated at once.

    Returns
    -------
    (n, G) attributions (no gradient).
    """
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(int(n_steps))
        nodes, weights = (nodes + 1) / 2, weights / 2
    elif method == "riemann_trapezoid":
        if n_steps < 2:
            raise ValueError("The trapezoid rule needs n_steps >= 2.")
        nodes = np.linspace(0, 1, int(n_steps))
        weights = np.full(int(n_steps), 1.0 / (n_steps - 1))
        weights[[0, -1]] /= 2
    else:
        raise ValueError(f"method={method!r}: use 'gausslegendre' or 'riemann_trapezoid'.")
    x = torch.as_tensor(x).detach()
    base = torch.zeros_like(x) if baseline is None else torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    out = torch.empty_like(x)
    for s in range(0, len(x), batch_size):
        xb, bb = x[s:s + batch_size], base[s:s + batch_size]
        grad = torch.zeros_like(xb)
        for a, w in zip(nodes, weights):
            point = (bb + float(a) * (xb - bb)).requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(f(point).sum(), point)
            grad += float(w) * g
        out[s:s + batch_size] = (xb - bb) * grad
    return out


# ------------------------------------------------------------------------------------------------ the method
@register
class STEM(Method):
    """STEM (Hao et al. 2024): one MLP embeds spots and cells; cells are placed by their softmax map onto spots.

    Options (official defaults): ``sigma`` (None = half the median spot spacing), ``dropout`` (None = the ST input
    dropout rate of step 2), ``alpha`` (0.8), ``mmd_batch`` (1000), ``dims`` ([512, 256, 128]), ``epochs`` (400),
    ``lr`` (2e-3, AdamW), ``step_size`` / ``gamma`` (StepLR 200 / 0.5), ``cycle_start`` (50), ``top_k`` (None:
    ``all_coord``; k: ``k_coord``), ``block_size`` (blocks of at most 2048² entries), ``seed``.

    ``run(spatial, reference)`` returns a copy of the reference (the cells to place) with ``obsm["spatial_stem"]``
    (N_sc, 2) and ``obsm["X_stem"]`` (N_sc, 128). The fitted object keeps ``model_``, ``history_``, ``genes_``,
    ``sigma_``, ``dropout_``, ``x_st_``, ``x_sc_``, ``coords_``, ``e_st_``, ``e_sc_``.
    """

    name = "stem"
    task = "locate"
    summary = "shared MLP embedding: spatial adjacency + MMD + cycle mapping"
    paper = "Hao et al., Commun Biol 2024"
    needs_reference = True

    def __init__(self, *, sigma: float | None = None, dropout: float | None = None, alpha: float = 0.8,
                 mmd_batch: int = 1000, dims: list[int] = (512, 256, 128), epochs: int = 400, lr: float = 2e-3,
                 step_size: int = 200, gamma: float = 0.5, cycle_start: int = 50, top_k: int | None = None,
                 block_size: int = 2048, seed: int = 0, progress: bool = True):
        for name, value in (("epochs", epochs), ("mmd_batch", mmd_batch), ("step_size", step_size),
                            ("block_size", block_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}={value}: must be a positive integer.")
        if sigma is not None and not (np.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma={sigma}: the Gaussian width must be >= 0 (0 = identity target) or None (auto).")
        if dropout is not None and not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout}: the ST input dropout rate must be in [0, 1) or None (auto).")
        if alpha < 0 or lr <= 0 or not 0 < gamma <= 1 or cycle_start < 0:
            raise ValueError(f"alpha={alpha}, lr={lr}, gamma={gamma}, cycle_start={cycle_start}: need alpha >= 0, "
                             "lr > 0, 0 < gamma <= 1 and cycle_start >= 0 (official 0.8, 2e-3, 0.5, 50).")
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k={top_k}: give a positive number of spots, or None for all spots.")
        self.sigma, self.dropout, self.alpha, self.mmd_batch = sigma, dropout, alpha, int(mmd_batch)
        self.dims, self.epochs, self.lr, self.step_size, self.gamma = list(dims), int(epochs), lr, step_size, gamma
        self.cycle_start, self.top_k, self.block_size = cycle_start, top_k, int(block_size)
        self.seed, self.progress = seed, progress

    # ---------------------------------------------------------------- fitting
    def prepare(self, adata, reference) -> dict:
        """Steps 1-2 and σ: checks the inputs; keeps ``genes_``, ``x_st_``, ``x_sc_``, ``coords_``, ``dropout_``,
        ``sigma_``."""
        self._check_reference(reference)
        coords = spatial_coords(adata)[:, :2]
        genes = shared_genes(adata, reference)
        self.genes_ = list(genes)
        self.x_st_ = torch.from_numpy(stem_features(adata, genes))
        self.x_sc_ = torch.from_numpy(stem_features(reference, genes))
        for name, X in (("spatial data", self.x_st_), ("reference", self.x_sc_)):
            check_finite(X.numpy(), f"the log-normalised {name}")
        self.coords_ = coords
        self.dropout_ = (st_dropout_rate(counts_matrix(adata[:, genes]), counts_matrix(reference[:, genes]))
                         if self.dropout is None else float(self.dropout))
        self.sigma_ = default_sigma(coords) if self.sigma is None else float(self.sigma)
        return {"x_st": self.x_st_, "x_sc": self.x_sc_, "coords": coords}

    def fit(self, adata, reference) -> STEM:
        """Steps 1-5: prepare and train. Keeps ``model_``, ``history_`` and the embeddings ``e_st_``, ``e_sc_``."""
        self.prepare(adata, reference)
        set_seed(self.seed)
        model = STEMModel(self.x_st_.shape[1], self.coords_, sigma=self.sigma_, dropout=self.dropout_,
                          alpha=self.alpha, mmd_batch=self.mmd_batch, dims=self.dims, block_size=self.block_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        model.cycle_weight = cycle_ramp(0, self.epochs, self.cycle_start)

        def next_epoch(epoch, _terms):
            scheduler.step()
            model.cycle_weight = cycle_ramp(epoch + 1, self.epochs, self.cycle_start)

        self.history_ = fit(model, (self.x_st_, self.x_sc_), epochs=self.epochs, optimizer=optimizer,
                            progress=self.progress, desc="STEM", callback=next_epoch)
        self.model_ = model
        self.e_st_, self.e_sc_ = model.embed(self.x_st_), model.embed(self.x_sc_)
        return self

    def run(self, adata, reference=None):
        self._check_reference(reference)
        self.fit(adata, reference)
        out = reference.copy()
        out.obsm[f"spatial_{self.key}"] = self.predict_coords(self.top_k)
        out.obsm[f"X_{self.key}"] = self.e_sc_.numpy().astype(np.float32)
        return out

    # ---------------------------------------------------------------- outputs (blockwise over cells)
    def _fitted(self):
        if not hasattr(self, "e_sc_"):
            raise RuntimeError("Fit STEM first: call .fit(spatial, reference) or .run(spatial, reference).")

    def _sc_to_st_blocks(self, e_sc: Tensor | None = None):
        """(start, P^{sc->st} rows (b, N_st)) for blocks of at most ``block_size``² entries."""
        e_sc = self.e_sc_ if e_sc is None else e_sc
        rows, _ = _block_rows(len(e_sc), len(self.e_st_), self.block_size)
        for s in range(0, len(e_sc), rows):
            yield s, F.softmax(e_sc[s:s + rows] @ self.e_st_.T, dim=1)

    def predict_coords(self, top_k: int | None = None) -> np.ndarray:
        """Cell positions (N_sc, 2): ``all_coord`` (each cell's mapping row, normalised, times the spot positions)
        or, with ``top_k``, ``k_coord`` (the same over its ``top_k`` most probable spots only)."""
        self._fitted()
        coords = torch.as_tensor(self.coords_, dtype=torch.float64)
        out = np.empty((len(self.e_sc_), 2))
        for s, P in self._sc_to_st_blocks():
            P = P.double()
            if top_k is None:
                pred = (P / P.sum(1, keepdim=True)) @ coords
            else:
                values, idx = torch.topk(P, min(int(top_k), P.shape[1]), dim=1)
                pred = ((values / values.sum(1, keepdim=True))[..., None] * coords[idx]).sum(1)
            out[s:s + len(P)] = pred.numpy()
        return out

    def mapping(self, direction: str = "sc2st", rows=None, max_entries: int = 50_000_000) -> np.ndarray:
        """A dense block of a mapping matrix: ``"sc2st"`` :math:`P^{sc\\to st}` (each cell over spots, rows sum to
        1) or ``"st2sc"`` :math:`P^{st\\to sc}` (each spot over cells), for the rows ``rows`` (indices or a mask;
        default all). Refuses more than ``max_entries`` entries: ask for fewer rows."""
        self._fitted()
        src, dst = (self.e_sc_, self.e_st_) if direction == "sc2st" else (self.e_st_, self.e_sc_)
        if direction not in ("sc2st", "st2sc"):
            raise ValueError(f"direction={direction!r}: use 'sc2st' or 'st2sc'.")
        if rows is not None:
            src = src[torch.as_tensor(np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows))]
        if len(src) * len(dst) > max_entries:
            raise ValueError(f"The {direction} block would hold {len(src)} x {len(dst)} entries (> max_entries="
                             f"{max_entries:,}); pass rows=... to take fewer rows at a time.")
        return F.softmax(src @ dst.T, dim=1).numpy()

    def spot_type_mass(self, cell_types) -> pd.DataFrame:
        """Mapped cell mass of each type at each spot, :math:`\\sum_{c: t_c = t} P^{sc\\to st}_{cj}` (N_st, C),
        which STEM's evaluation correlates with the true composition. ``cell_types``: (N_sc,) labels of the cells
        (e.g. ``reference.obs["cell_type"]``)."""
        self._fitted()
        labels = pd.Series(np.asarray(cell_types)).astype(str)
        if len(labels) != len(self.e_sc_):
            raise ValueError(f"cell_types has {len(labels)} labels; give one per reference cell ({len(self.e_sc_)}).")
        onehot = pd.get_dummies(labels).astype(np.float32)
        hot = torch.from_numpy(onehot.to_numpy())
        mass = torch.zeros(len(self.e_st_), hot.shape[1])
        for s, P in self._sc_to_st_blocks():
            mass += P.T @ hot[s:s + len(P)]
        return pd.DataFrame(mass.numpy(), columns=onehot.columns)

    def position_function(self, direction) -> Callable[[Tensor], Tensor]:
        """:math:`x \\mapsto \\hat c(x) \\cdot u` for a (2,) ``direction`` u: the predicted position of cells with
        log-expression x (m, G) along u, with the spot embeddings held fixed. Returns (m,)."""
        self._fitted()
        target = torch.as_tensor(self.coords_, dtype=torch.float32) @ torch.as_tensor(direction, dtype=torch.float32)
        encoder, e_st = self.model_.encoder.eval(), self.e_st_
        return lambda x: F.softmax(encoder(x) @ e_st.T, dim=1) @ target

    def dominant_genes(self, cells=None, *, n_steps: int = 50, baseline=None, batch_size: int = 1024) -> pd.DataFrame:
        """Spatially dominant genes: integrated gradients of each cell's predicted x and y (all-zero baseline by
        default) for the cells ``cells`` (indices or a mask; default all).

        Keeps ``attributions_`` (n, G, 2). Returns a table over genes sorted by ``score`` = the mean over cells of
        :math:`\\sqrt{A_x^2 + A_y^2}`, with the mean signed attributions ``dx``, ``dy`` (coordinate units).
        """
        self._fitted()
        x = self.x_sc_
        if cells is not None:
            x = x[torch.as_tensor(np.flatnonzero(cells) if np.asarray(cells).dtype == bool else np.asarray(cells))]
        parts = [integrated_gradients(self.position_function(u), x, baseline, n_steps=n_steps, batch_size=batch_size)
                 for u in ([1.0, 0.0], [0.0, 1.0])]
        self.attributions_ = torch.stack(parts, -1).numpy()                                # (n, G, 2)
        score = np.sqrt((self.attributions_ ** 2).sum(-1)).mean(0)
        table = pd.DataFrame({"score": score, "dx": self.attributions_[..., 0].mean(0),
                              "dy": self.attributions_[..., 1].mean(0)}, index=pd.Index(self.genes_, name="gene"))
        return table.sort_values("score", ascending=False)
