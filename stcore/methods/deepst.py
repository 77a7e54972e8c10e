"""DeepST: morphology-aware data augmentation, then a denoising autoencoder + variational graph autoencoder with DEC.

Xu C, Jin X, Wei S, *et al.* DeepST: identifying spatial domains in spatial transcriptomics by deep learning.
*Nucleic Acids Res* 50, e131 (2022). Official code: JiangBioLab/DeepST (package ``deepstkit``; the version run by
the independent benchmarks is commit 1daa513). Defaults below are those of its ``run`` pipeline. Not to be confused
with the contrastive "DeepST" of Long et al. that became GraphST.

Pipeline (integration strategy: *link*, as stLearn's SME — the image only sets the weights with which neighbouring
spots are added to each spot's counts, i.e. the edge weights of a smoothing graph; the network never sees it):

1. **Image features.** A tile of ``tile_fullres`` = 50 full-resolution pixels around each spot goes through a CNN;
   the features are reduced to ``image_pcs`` = 50 principal components :math:`u_i`
   (:func:`deepst_image_features`).
2. **Augmentation weights** on the ``spatial_k`` = 30 nearest spots :math:`\\mathcal N_i` of each spot
   (:func:`augmentation_weights`):

   .. math:: W_{ij} = \\mathrm{PD}_{ij}\\,\\mathrm{GC}_{ij}\\,\\mathrm{MS}_{ij}, \\quad
             \\mathrm{PD}_{ij} = [j \\in \\mathcal N_i], \\quad
             \\mathrm{GC}_{ij} = \\operatorname{corr}(g_i, g_j), \\quad
             \\mathrm{MS}_{ij} = \\max\\big(0, \\cos(u_i, u_j)\\big)

   with :math:`g_i` the first ``gene_pcs`` = 100 principal components of the raw counts (raw counts when there are
   at most 500 genes). Without histology :math:`W = \\mathrm{PD} \\odot \\mathrm{GC}`.
3. **Augmented expression** (:func:`augment_expression`): for each spot take its ``neighbour_k`` = 4 largest
   weights, drop the largest (the official code keeps ranks 2–4), and add the weighted mean of those spots' counts:

   .. math:: x'_i = x_i + a \\, \\frac{\\sum_{j \\in T_i} W_{ij} x_j}{\\sum_{j \\in T_i} W_{ij}}, \\qquad a = 0.3.

4. **Network input** (:func:`deepst_features`): :math:`x'` normalised to total 1, ``log1p``, genes scaled to unit
   variance, PCA to ``n_pcs`` = 200: :math:`X \\in \\mathbb R^{N \\times 200}`. **Graph**: the symmetrised
   12-nearest-neighbour graph of the spot positions (:func:`stcore.graphs.knn_graph`), self loops added by the
   attention layers.
5. **Model** (:class:`DeepSTModel`). A denoising MLP encoder :math:`f = E(\\tilde X)` (200 → 32 → 20; Linear,
   BatchNorm, ELU, Dropout 0.01; input entries zeroed with probability 0.001 during pre-training); a variational
   graph encoder on :math:`f`: :math:`h = \\mathrm{ReLU}(\\mathrm{BN}(\\mathrm{GAT}(f)))` (64),
   :math:`\\mu = \\mathrm{GAT}_\\mu(h)`, :math:`\\log\\sigma = \\mathrm{GAT}_\\sigma(h)` (8 each),
   :math:`g = \\mu + \\sigma \\odot \\epsilon`; the latent :math:`z = [f \\Vert g]` (28); an MLP decoder
   :math:`\\hat X = D(z)` (28 → 32 → 200). Loss of the pre-training phase
   (``pre_epochs``, officially 1000):

   .. math:: L = \\mathrm{MSE}(\\hat X, X) + \\frac{\\eta}{N^2} \\sum_{i,j} \\mathrm{BCE}_{\\text{logits}}
             \\big(M_{ij}\\,\\sigma(z_i^\\top z_j),\\, M_{ij}\\big)
             - \\frac{1}{2N} \\operatorname{mean}_i \\sum_k \\big(1 + 2\\log\\sigma_{ik} - \\mu_{ik}^2 -
             \\sigma_{ik}^2\\big)

   with :math:`M = A + I` and :math:`\\eta = N^2 / (2(N^2 - \\sum A))`. Then the DEC phase (``epochs``,
   officially 500) adds :math:`\\mathrm{KL}(P \\Vert Q)` with
   :math:`q_{ik} \\propto (1 + \\lVert z_i - c_k\\rVert^2/\\alpha)^{-(\\alpha+1)/2}`
   (α = 0.9), target :math:`p_{ik} \\propto q_{ik}^2 / \\sum_i q_{ik}` refreshed every 20 epochs; the centres
   :math:`c_k` start at the means of a Louvain clustering (20 neighbours, resolution 1) of the pre-trained
   :math:`z`. Adam (lr 5e-4, weight decay 1e-4), gradient norm clipped at 5.
6. **Domains**: Leiden on a 15-nearest-neighbour graph of :math:`z`, scanning the resolution from 2.49 down to 0.1
   in steps of 0.01 until exactly ``n_domains`` clusters appear (without ``n_domains``: the resolution with the best
   Calinski–Harabasz score); optionally refined by a 6-nearest-spot majority vote.

Deliberate deviations from the official code
---------------------------------------------
* **Sparse throughout.** The official code builds dense :math:`N \\times N` spatial, correlation, morphology and
  weight matrices and a dense :math:`N \\times N` adjacency target. Here the weights are computed only on the 30
  spatial neighbours (the only non-zero entries of ``PD``), the augmented counts stay sparse, and the masked
  graph loss is evaluated on the :math:`E + N` entries of :math:`A + I` plus its constant value on the rest
  (:func:`graph_reconstruction_loss`), so memory is O(N k). The numbers are the same.
* **Image CNN.** The official code passes a 50-pixel crop resized to 224 through torchvision's ImageNet ResNet-50
  (2048 features). Those weights cannot be downloaded here: by default a small tile CNN is trained on the slide's
  own tiles with SimCLR (:func:`stcore.images.slide_tile_features`, ``tile_epochs`` = 10, 64 features); pass
  ``tile_weights`` (a saved :class:`stcore.nn.TileCNN` state dict) to use pretrained weights instead. The official
  extraction also applies *random* augmentations (blur, inversion, solarisation, erasing ...) to the tiles it
  encodes, so its features change from run to run; they are not applied here. On a low-resolution image a tile
  is at least 16 image pixels wide (a 50-pixel crop would be 2–3 pixels).
* **PCA.** scikit-learn's randomised PCA (unseeded in the official code) is replaced by the seeded ARPACK PCA of
  :func:`stcore.preprocess.pca`; genes are scaled with the population standard deviation (scanpy uses n − 1), a
  common factor that does not change the components' directions.
* **Clustering graphs.** Louvain and Leiden run on :mod:`stcore.cluster`'s rebuild of scanpy's UMAP-weighted
  ``neighbors`` (exact kNN instead of pynndescent), so the resolution that gives K may differ. The scan visits every tenth
  resolution first and walks the skipped ones only where the count falls to K (:func:`leiden_scan`): the same
  answer as the official one-by-one scan whenever the count does not rise as the resolution falls. When no
  resolution of the scan gives K (the official code then silently uses 1.0), a bisection over [0.01, 3] is tried
  (:func:`stcore.cluster.search_resolution`). Above 20,000 spots (``resolution_search="auto"``) the bisection
  replaces the 240-step scan to save time.
* **Kept as in the official code** (they change results): the graph loss applies a sigmoid *before*
  ``binary_cross_entropy_with_logits`` and only scores the edges and self loops (:math:`M = A + I`); with no
  negative pairs, "fixing" the double sigmoid alone would reward inflating :math:`\\lVert z \\rVert` without bound.
  Both this term and the latent KL (divided by N twice) are tiny next to the reconstruction, so in practice the
  model is a denoising autoencoder whose latent passes through one graph-attention smoothing. The largest of the
  four neighbours is dropped from the augmentation. The ``logvar`` outputs are log standard deviations.
* **Single slide only.** The official "Integration" task adds a domain classifier behind a gradient-reversal layer
  to align several slides; it is not implemented here (run one slide at a time).
* **Epochs.** The official ``run`` defaults are ``pre_epochs`` = 1000 and ``epochs`` = 500; the defaults here are
  500 and 250 (about 2.5 minutes of CPU time for one DLPFC slide with the image, instead of about 4). Measured on
  DLPFC 151673, K = 7, seed 0, without the image: ARI 0.49 (200 + 100 epochs), 0.57 (500 + 250), 0.57 (1000 + 500);
  with the image: 0.51 (200 + 100), 0.52 (500 + 250), 0.46 (1000 + 500). Seeds, and even the number of CPU threads,
  move the ARI by a few hundredths as well. The official DEC stopping rule has tolerance 0 and never fires; it is
  omitted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from .. import cluster, graphs, images, preprocess
from ..nn import MLP
from ..train import fit, set_seed
from ..validation import check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import write_domains

__all__ = [
    "DeepST",
    "DeepSTModel",
    "augment_expression",
    "augmentation_weights",
    "deepst_features",
    "deepst_image_features",
    "graph_reconstruction_loss",
    "leiden_scan",
    "neighbour_weights",
]


# ------------------------------------------------------------------------------------------------ steps 1-4
def deepst_image_features(adata, *, tile_fullres: float = 50.0, n_latent: int = 64, image_pcs: int = 50,
                          epochs: int = 10, seed: int = 0, weights: str | None = None, library_id: str | None = None,
                          progress: bool = True) -> np.ndarray:
    """Step 1: CNN features of each spot's tile, reduced to ``image_pcs`` principal components. (N, image_pcs)."""
    feats = images.slide_tile_features(adata, tile_fullres, n_latent=n_latent, epochs=epochs, seed=seed,
                                       weights=weights, library_id=library_id, progress=progress)
    return preprocess.pca(feats, image_pcs, seed=seed)


def _rowwise(X: np.ndarray, nbrs: np.ndarray, kind: str) -> np.ndarray:
    """Correlation or cosine similarity of each row i with its neighbours nbrs[i] (n, k), without an n x n matrix."""
    X = np.asarray(X, dtype=np.float64)
    if kind == "correlation":
        X = X - X.mean(1, keepdims=True)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norm > 0, norm, 1.0)
    return np.einsum("id,ikd->ik", X, X[nbrs])


def augmentation_weights(coords, counts, image_features=None, *, spatial_k: int = 30, gene_pcs: int = 100,
                         seed: int = 0) -> sparse.csr_matrix:
    """Step 2: the weights ``W = PD * GC [* MS]`` as a sparse (N, N) matrix, one row per spot.

    Parameters
    ----------
    coords
        (N, 2) spot positions.
    counts
        (N, G) raw counts (sparse or dense).
    image_features
        (N, d) image features (principal components), or ``None`` for ``W = PD * GC`` (no histology).
    spatial_k
        Spatial neighbours per spot (``PD``); capped at N - 1.
    gene_pcs
        Principal components of the counts for ``GC`` when there are more than 500 genes.

    Returns
    -------
    (N, N) CSR matrix with ``spatial_k`` stored entries per row: :math:`\\operatorname{corr}(g_i, g_j)
    \\max(0, \\cos(u_i, u_j))` for the spatial neighbours j of i (entries may be negative or zero).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    k = min(int(spatial_k), n - 1)
    nbrs = graphs.knn_indices(coords, k)
    expr = preprocess.pca(counts, gene_pcs, seed=seed) if counts.shape[1] > 500 else (
        counts.toarray() if sparse.issparse(counts) else np.asarray(counts))
    w = _rowwise(expr, nbrs, "correlation")
    if image_features is not None:
        w = w * np.maximum(_rowwise(image_features, nbrs, "cosine"), 0.0)
    return sparse.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), nbrs.ravel())), shape=(n, n))


def neighbour_weights(W: sparse.csr_matrix, neighbour_k: int = 4) -> sparse.csr_matrix:
    """The row-normalised weights of ranks 2..``neighbour_k`` of each row of W (the largest is dropped).

    Negative weights count as 0 (the official code takes the top of the whole row, where the zeros of non-neighbours
    outrank negative weights). A row whose kept weights are all 0 gets no neighbours.
    """
    W = sparse.csr_matrix(W)
    n = W.shape[0]
    rows = np.repeat(np.arange(n), np.diff(W.indptr))
    order = np.lexsort((-W.data, rows))                      # by row, then weight descending
    rank = np.arange(len(order)) - W.indptr[rows[order]]
    keep = order[(rank >= 1) & (rank < neighbour_k)]
    r, c, w = rows[keep], W.indices[keep], np.maximum(W.data[keep], 0.0)
    total = np.bincount(r, weights=w, minlength=n)
    w = np.where(total[r] > 0, w / np.where(total[r] > 0, total[r], 1.0), 0.0)
    M = sparse.csr_matrix((w, (r, c)), shape=(n, n))
    M.eliminate_zeros()
    return M


def augment_expression(counts, W: sparse.csr_matrix, *, neighbour_k: int = 4,
                       adjacent_weight: float = 0.3) -> sparse.csr_matrix:
    """Step 3: :math:`x' = x + a \\cdot M x` with M from :func:`neighbour_weights`. Sparse (N, G) float64."""
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    return (counts + adjacent_weight * (neighbour_weights(W, neighbour_k) @ counts)).tocsr()


def deepst_features(augmented, n_pcs: int = 200, seed: int = 0) -> np.ndarray:
    """Step 4: normalise each spot to total 1, ``log1p``, scale genes, PCA. (N, min(n_pcs, ...)) float32."""
    X = sparse.csr_matrix(augmented, dtype=np.float64)
    total = np.asarray(X.sum(1)).ravel()
    X = sparse.diags(np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 0.0)) @ X
    X.data = np.log1p(X.data)
    return np.ascontiguousarray(preprocess.pca(X, n_pcs, seed=seed, scale=True), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ step 5
def graph_reconstruction_loss(z: torch.Tensor, edge_index: torch.Tensor, n_spots: int, norm: float) -> torch.Tensor:
    """The official masked graph loss, evaluated sparsely.

    Officially ``norm * BCEWithLogits(sigmoid(Z Z^T) * M, M)`` averaged over all N² entries with M = A + I. Off
    the mask both arguments are 0 and each entry costs log 2; on the mask an entry costs
    ``softplus(-sigmoid(z_i . z_j))``. ``edge_index`` must hold the edges of A + I (each once).
    """
    s = (z[edge_index[0]] * z[edge_index[1]]).sum(1)
    on_mask = F.softplus(-torch.sigmoid(s)).sum()
    off_mask = (n_spots * n_spots - edge_index.shape[1]) * math.log(2.0)
    return norm * (on_mask + off_mask) / (n_spots * n_spots)


def _conv(conv_type: str, d_in: int, d_out: int) -> nn.Module:
    import torch_geometric.nn as pyg_nn

    cls = getattr(pyg_nn, conv_type, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"conv_type={conv_type!r} is not a PyTorch Geometric layer; use e.g. 'GATConv' "
                         "(the official default), 'GCNConv', 'SAGEConv' or 'TransformerConv'.")
    return cls(d_in, d_out)


class DeepSTModel(nn.Module):
    """Denoising MLP autoencoder + variational graph encoder + DEC head (step 5).

    Shapes: ``x`` (N, n_in) -> ``z`` (N, encoder_hidden[-1] + conv_hidden[-1]), reconstruction (N, n_in).
    ``phase`` is ``"pretrain"`` (masking noise, no clustering loss) or ``"dec"`` (adds KL(P||Q)).
    """

    def __init__(self, n_in: int, edge_index: torch.Tensor, n_spots: int, *, conv_type: str = "GATConv",
                 encoder_hidden=(32, 20), decoder_hidden=(32,), conv_hidden=(32, 8), p_drop: float = 0.01,
                 alpha: float = 0.9, corrupt: float = 0.001, mse_weight: float = 1.0, bce_kld_weight: float = 1.0,
                 kl_weight: float = 1.0, q_stride: int = 20):
        super().__init__()
        enc, dec = [n_in, *encoder_hidden], [encoder_hidden[-1] + conv_hidden[-1], *decoder_hidden, n_in]
        self.encoder = MLP(enc, activation="elu", dropout=p_drop, batch_norm=True, last_activation=True)
        self.decoder = MLP(dec, activation="elu", dropout=p_drop, batch_norm=True)
        for m in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.BatchNorm1d):       # the official blocks' BatchNorm settings
                m.momentum, m.eps = 0.01, 1e-3
        width = conv_hidden[0] * 2
        self.conv = _conv(conv_type, encoder_hidden[-1], width)
        self.conv_norm = nn.BatchNorm1d(width)
        self.conv_mu = _conv(conv_type, width, conv_hidden[-1])
        self.conv_logsd = _conv(conv_type, width, conv_hidden[-1])
        self.register_buffer("edge_index", edge_index)
        self.register_buffer("edge_index_self", graphs.add_self_loops(edge_index, n_spots))
        self.n_spots = n_spots
        self.norm = n_spots * n_spots / float(2 * (n_spots * n_spots - edge_index.shape[1]))
        self.centres = nn.Parameter(torch.zeros(1, enc[-1] + conv_hidden[-1]))
        self.p_drop, self.alpha, self.corrupt, self.q_stride = p_drop, alpha, corrupt, q_stride
        self.mse_weight, self.bce_kld_weight, self.kl_weight = mse_weight, bce_kld_weight, kl_weight
        self.phase, self.steps, self.target = "pretrain", 0, None

    def forward(self, x: torch.Tensor):
        """(z, mu, log_sd, reconstruction)."""
        feat = self.encoder(x)
        h = F.relu(self.conv_norm(self.conv(feat, self.edge_index)))
        mu, log_sd = self.conv_mu(h, self.edge_index), self.conv_logsd(h, self.edge_index)
        g = mu + torch.randn_like(mu) * log_sd.exp() if self.training else mu
        z = torch.cat([feat, g], 1)
        return z, mu, log_sd, self.decoder(z)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The latent z = [f || mu] in eval mode (N, 28)."""
        was = self.training
        self.eval()
        z = self(x)[0]
        self.train(was)
        return z

    def soft_assign(self, z: torch.Tensor) -> torch.Tensor:
        """Student-t assignments q (N, K) with the standard exponent (α + 1) / 2."""
        q = 1.0 / (1.0 + torch.cdist(z, self.centres).pow(2) / self.alpha + 1e-8)
        q = q.pow((self.alpha + 1.0) / 2.0)
        return q / q.sum(1, keepdim=True)

    def start_dec(self, labels: np.ndarray, x: torch.Tensor) -> None:
        """Centres = mean eval-mode z of each initial cluster; switch to the DEC phase."""
        z = self.embed(x)
        codes = torch.as_tensor(np.unique(labels, return_inverse=True)[1].ravel())
        k = int(codes.max()) + 1
        sums = torch.zeros(k, z.shape[1]).index_add_(0, codes, z)
        self.centres.data = sums / torch.bincount(codes, minlength=k)[:, None].float()
        self.phase, self.steps, self.target = "dec", 0, None

    def loss(self, x: torch.Tensor) -> dict:
        terms = {}
        if self.phase == "dec" and self.steps % self.q_stride == 0:    # refresh P from the eval-mode model
            with torch.no_grad():
                q = self.soft_assign(self.embed(x))
                weight = q.pow(2) / q.sum(0)
                self.target = weight / weight.sum(1, keepdim=True)
        inputs = x
        if self.phase == "pretrain" and self.corrupt > 0:               # masking noise
            inputs = x.masked_fill(torch.rand_like(x) < self.corrupt, 0.0)
        z, mu, log_sd, recon = self(inputs)
        terms["mse"] = self.mse_weight * F.mse_loss(recon, x)
        z_drop = F.dropout(z, self.p_drop, training=self.training)
        terms["graph_bce"] = self.bce_kld_weight * graph_reconstruction_loss(
            z_drop, self.edge_index_self, self.n_spots, self.norm)
        kld = -0.5 / self.n_spots * torch.mean(torch.sum(1 + 2 * log_sd - mu.pow(2) - (2 * log_sd).exp(), 1))
        terms["latent_kl"] = self.bce_kld_weight * kld
        if self.phase == "dec":
            q = self.soft_assign(z)
            terms["dec_kl"] = self.kl_weight * F.kl_div(q.log(), self.target, reduction="batchmean")
            self.steps += 1
        return terms


# ------------------------------------------------------------------------------------------------ step 6
def leiden_scan(z, n_domains: int | None, *, seed: int = 0, n_neighbors: int = 15, resolutions=None,
                coarse: int = 10) -> tuple[np.ndarray, float | None]:
    """DeepST's resolution choice: Leiden at resolutions 2.49, 2.48, ..., 0.10 on one kNN graph of ``z``.

    With ``n_domains``: the first (largest) resolution of the scan that gives exactly K clusters. To save time the
    scan first visits every ``coarse``-th resolution and walks the skipped ones only in the step where the count
    falls to K or below; this finds the official answer whenever the number of clusters does not rise as the
    resolution falls within a step (``coarse=1`` visits every resolution). Without ``n_domains``: the resolution
    with the highest Calinski-Harabasz score (all resolutions visited). Returns ``(labels, resolution)``, or
    ``(None, None)`` when no resolution gives K.
    """
    from sklearn.metrics import calinski_harabasz_score

    z = np.asarray(z, dtype=np.float64)
    g = cluster.community_graph(z, n_neighbors)
    grid = sorted(np.arange(0.1, 2.5, 0.01), reverse=True) if resolutions is None else list(resolutions)

    def leiden(i):
        return cluster.communities(g, "leiden", float(grid[i]), seed)

    if n_domains is None:
        best = (-np.inf, None, None)
        for i in range(len(grid)):
            labels = leiden(i)
            if 1 < labels.max() + 1 < len(z):
                score = calinski_harabasz_score(z, labels)
                if score > best[0]:
                    best = (score, labels, float(grid[i]))
        return best[1], best[2]
    previous = -1
    for i in [*range(0, len(grid), coarse), len(grid) - 1]:
        if i <= previous:
            continue
        labels = leiden(i)
        if labels.max() + 1 <= n_domains:              # K is crossed in (previous, i]: walk it in order
            for j in range(previous + 1, i):
                fine = leiden(j)
                if fine.max() + 1 == n_domains:
                    return fine, float(grid[j])
            return (labels, float(grid[i])) if labels.max() + 1 == n_domains else (None, None)
        previous = i
    return None, None


# ------------------------------------------------------------------------------------------------ the method
@register
class DeepST(Method):
    """DeepST (Xu et al. 2022): histology-weighted data augmentation, then a denoising AE + VGAE with DEC.

    Options follow the official ``run`` pipeline (see the module docstring for every step): image (``tile_fullres``,
    ``image_pcs``, ``tile_weights``, ``tile_epochs``, ``tile_latent``), augmentation (``spatial_k``, ``gene_pcs``,
    ``neighbour_k``, ``adjacent_weight``), network input and graph (``n_pcs``, ``k``), model (``conv_type``,
    ``encoder_hidden``, ``decoder_hidden``, ``conv_hidden``, ``p_drop``, ``alpha``, ``corrupt``), training
    (``pre_epochs``, ``epochs``, ``lr``, ``weight_decay``, ``grad_clip``, ``q_stride``, loss weights), DEC start
    (``init_neighbors``, ``init_resolution``), domains (``resolution_search``: ``"scan"``, ``"bisect"`` or
    ``"auto"``). ``histology=False`` is the official ``use_morphological=False`` (the image is not read).
    """

    name = "deepst"
    task = "domains"
    summary = "histology-weighted augmentation + AE/VGAE + DEC"
    paper = "Xu et al., Nucleic Acids Res 2022"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, refine: bool = False, seed: int = 0,
                 progress: bool = True, pre_epochs: int = 500, epochs: int = 250,
                 tile_fullres: float = 50.0, tile_weights: str | None = None, tile_epochs: int = 10,
                 tile_latent: int = 64, image_pcs: int = 50, spatial_k: int = 30, gene_pcs: int = 100,
                 neighbour_k: int = 4, adjacent_weight: float = 0.3, n_pcs: int = 200, k: int = 12,
                 conv_type: str = "GATConv", encoder_hidden: tuple[int, ...] = (32, 20),
                 decoder_hidden: tuple[int, ...] = (32,), conv_hidden: tuple[int, ...] = (32, 8),
                 p_drop: float = 0.01, alpha: float = 0.9, corrupt: float = 0.001, lr: float = 5e-4,
                 weight_decay: float = 1e-4, grad_clip: float = 5.0, q_stride: int = 20, mse_weight: float = 1.0,
                 bce_kld_weight: float = 1.0, kl_weight: float = 1.0, init_neighbors: int = 20,
                 init_resolution: float = 1.0, resolution_search: str = "auto", refine_k: int = 6,
                 library_id: str | None = None):
        if n_domains is not None and (int(n_domains) != n_domains or n_domains < 1):
            raise ValueError(f"n_domains={n_domains}: give a positive number of domains, or None to choose "
                             "the Leiden resolution by the Calinski-Harabasz score.")
        if pre_epochs < 1 or epochs < 0:
            raise ValueError(f"pre_epochs={pre_epochs}, epochs={epochs}: need pre_epochs >= 1 and epochs >= 0 "
                             "(official: 1000 and 500).")
        if resolution_search not in ("auto", "scan", "bisect"):
            raise ValueError(f"resolution_search={resolution_search!r}: use 'scan' (official), 'bisect' or 'auto'.")
        if not 2 <= neighbour_k <= spatial_k:
            raise ValueError(f"neighbour_k={neighbour_k}: must lie in [2, spatial_k={spatial_k}] (the largest of "
                             "the neighbour_k best neighbours is dropped, official 4).")
        if adjacent_weight < 0:
            raise ValueError(f"adjacent_weight={adjacent_weight}: must be >= 0 (official 0.3).")
        self.n_domains, self.histology, self.refine, self.seed = n_domains, histology, refine, seed
        self.progress, self.pre_epochs, self.epochs = progress, pre_epochs, epochs
        self.tile_fullres, self.tile_weights, self.tile_epochs = tile_fullres, tile_weights, tile_epochs
        self.tile_latent, self.image_pcs = tile_latent, image_pcs
        self.spatial_k, self.gene_pcs, self.neighbour_k = spatial_k, gene_pcs, neighbour_k
        self.adjacent_weight, self.n_pcs, self.k = adjacent_weight, n_pcs, k
        self.model_kwargs = {"conv_type": conv_type, "encoder_hidden": tuple(encoder_hidden),
                             "decoder_hidden": tuple(decoder_hidden), "conv_hidden": tuple(conv_hidden),
                             "p_drop": p_drop, "alpha": alpha, "corrupt": corrupt, "mse_weight": mse_weight,
                             "bce_kld_weight": bce_kld_weight, "kl_weight": kl_weight, "q_stride": q_stride}
        self.lr, self.weight_decay, self.grad_clip = lr, weight_decay, grad_clip
        self.init_neighbors, self.init_resolution = init_neighbors, init_resolution
        self.resolution_search, self.refine_k, self.library_id = resolution_search, refine_k, library_id

    # -- steps 1-4 -------------------------------------------------------------------------------------------
    def image_features(self, adata) -> np.ndarray:
        """Step 1 with this method's options. (N, image_pcs)."""
        return deepst_image_features(adata, tile_fullres=self.tile_fullres, n_latent=self.tile_latent,
                                     image_pcs=self.image_pcs, epochs=self.tile_epochs, seed=self.seed,
                                     weights=self.tile_weights, library_id=self.library_id, progress=self.progress)

    def prepare(self, adata):
        """Steps 1-4: ``(X (N, n_pcs) float32 tensor, edge_index (2, E))``; keeps ``weights_`` and
        ``image_features_`` (``None`` without histology)."""
        coords = spatial_coords(adata)
        counts = counts_matrix(adata)
        if adata.n_obs < 10:
            raise ValueError(f"DeepST needs at least 10 spots (got {adata.n_obs}): it builds 12-neighbour graphs.")
        self.image_features_ = self.image_features(adata) if self.histology else None
        self.weights_ = augmentation_weights(coords, counts, self.image_features_, spatial_k=self.spatial_k,
                                             gene_pcs=self.gene_pcs, seed=self.seed)
        augmented = augment_expression(counts, self.weights_, neighbour_k=self.neighbour_k,
                                       adjacent_weight=self.adjacent_weight)
        x = torch.as_tensor(deepst_features(augmented, self.n_pcs, seed=self.seed))
        return x, graphs.knn_graph(coords, min(self.k, adata.n_obs - 1))

    # -- step 5 ----------------------------------------------------------------------------------------------
    def train_model(self, x: torch.Tensor, edge_index: torch.Tensor) -> DeepSTModel:
        """Pre-train, start DEC from Louvain, train with DEC. Keeps ``history_`` and ``init_labels_``."""
        set_seed(self.seed)
        model = DeepSTModel(x.shape[1], edge_index, x.shape[0], **self.model_kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.history_ = fit(model, x, epochs=self.pre_epochs, optimizer=optimizer, grad_clip=self.grad_clip,
                            progress=self.progress, desc="DeepST pre-training")
        if self.epochs > 0:
            z = model.embed(x).numpy()
            self.init_labels_ = cluster.louvain(z, resolution=self.init_resolution, seed=self.seed,
                                                n_neighbors=self.init_neighbors)
            model.start_dec(self.init_labels_, x)
            dec = fit(model, x, epochs=self.epochs, optimizer=optimizer, grad_clip=self.grad_clip,
                      progress=self.progress, desc="DeepST DEC")
            for key, values in dec.terms.items():         # one history: pre-training then DEC epochs
                self.history_.terms[key] = self.history_.terms.get(key, []) + values
            n_pre = self.pre_epochs
            self.history_.terms["dec_kl"] = [float("nan")] * n_pre + dec.terms["dec_kl"]
            self.history_.total += dec.total
        return model

    # -- step 6 ----------------------------------------------------------------------------------------------
    def domains(self, z: np.ndarray) -> np.ndarray:
        """Leiden with DeepST's resolution scan (or bisection, see ``resolution_search``)."""
        search = self.resolution_search
        if search == "auto":
            search = "scan" if len(z) <= 20_000 else "bisect"
        labels, self.resolution_ = (None, None)
        if search == "scan" or self.n_domains is None:
            labels, self.resolution_ = leiden_scan(z, self.n_domains, seed=self.seed)
        if labels is None:
            if self.n_domains is None:
                raise ValueError("No Leiden resolution in [0.1, 2.5) gave more than one cluster; pass n_domains.")
            labels, self.resolution_ = cluster.search_resolution(z, self.n_domains, method="leiden", seed=self.seed)
        return labels

    def run(self, adata, reference=None):
        if self.n_domains is not None:
            check_n_clusters(self.n_domains, adata.n_obs)
        x, edge_index = self.prepare(adata)
        model = self.train_model(x, edge_index)
        z = model.embed(x).numpy()
        labels = self.domains(z)
        if self.refine:
            labels = cluster.refine(labels, coords=spatial_coords(adata), k=self.refine_k)
        write_domains(adata, self.key, labels, z)
        return adata
