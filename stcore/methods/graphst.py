r"""GraphST: a graph self-supervised contrastive autoencoder for spatial domains and for cell-type deconvolution.

Long Y, Ang KS, Li M, *et al.* Spatially informed clustering, integration, and deconvolution of spatial
transcriptomics with GraphST. *Nat Commun* 14, 1155 (2023). Official code: JinmiaoChenLab/GraphST (PyPI
``GraphST`` 1.1.1). Two registered methods share this module: ``graphst`` (task ``domains``) and
``graphst_deconv`` (task ``deconv``). Each piece (features, graph, encoder, loss) has one home here and both use it.

Notation: N spots, G genes, :math:`X \in \mathbb R^{N \times G}` the pre-processed expression, :math:`A` the
binary spatial kNN graph, :math:`\mathcal N(i)` the k nearest spots of spot i.

Spot features and graph (both methods)
--------------------------------------
1. **Features** (:func:`graphst_features`): the ``n_top_genes`` = 3000 highly variable genes (Seurat v3, on
   counts), ``normalize_total`` to 10\ :sup:`4`, ``log1p``, each gene divided by its standard deviation (no
   centring) and clipped at 10 (scanpy's ``scale(zero_center=False, max_value=10)``).
2. **Graph** (:func:`graphst_graph`): the ``k`` = 3 nearest spots of each spot (:func:`stcore.graphs.knn_graph`,
   directed, :math:`\mathcal N(i)`) for the readout and the InfoNCE positives; its symmetrisation (OR) :math:`A`
   for the convolutions, normalised as in the official dense path,

   .. math:: \hat A = D^{-1/2} A D^{-1/2} + I, \qquad D = \operatorname{diag}(A\mathbf 1)

   (``adj_norm="official"``; ``"gcn"`` gives Kipf & Welling's :math:`\tilde D^{-1/2}(A + I)\tilde D^{-1/2}`, the
   official sparse path for Stereo-seq/Slide-seq). Stored as ``(edge_index, edge_weight)``, never dense.

Spatial domains (``graphst``, :class:`GraphSTEncoder`)
------------------------------------------------------
One weight pair :math:`W_1 \in \mathbb R^{G \times 64}`, :math:`W_2 \in \mathbb R^{64 \times G}` (two linear graph
convolutions without bias, Xavier-initialised; the products with the sparse :math:`\hat A` are ``torch.sparse.mm``):

.. math:: Z = \hat A X W_1, \qquad H = \hat A Z W_2, \qquad
          \tilde Z = \hat A \tilde X W_1 \;\; (\tilde X = \text{rows of } X \text{ permuted}),

local summaries :math:`s_i = \sigma\big(\mathrm{L2norm}(\frac{1}{k+1}\sum_{j \in \mathcal N(i) \cup \{i\}}
\mathrm{ReLU}(Z_j))\big)` and :math:`\tilde s_i` likewise from :math:`\tilde Z`
(:func:`stcore.nn.sigmoid_readout`), a bilinear discriminator :math:`D(h, s) = h^\top W s + b`
(:class:`stcore.nn.ReadoutDiscriminator`) and the loss

.. math:: L = \alpha\,\mathrm{MSE}(X, H) + \beta\big[\mathrm{BCE}(D(h_i, s_i) \to 1, D(\tilde h_i, s_i) \to 0)
          + \mathrm{BCE}(D(\tilde h_i, \tilde s_i) \to 1, D(h_i, \tilde s_i) \to 0)\big]

with :math:`h = \mathrm{ReLU}(Z)`, :math:`\alpha = 10`, :math:`\beta = 1` (:func:`stcore.nn.dgi_loss`). Adam,
lr 10\ :sup:`-3`, no weight decay, 600 full-batch epochs. The embedding is the reconstruction :math:`H` (N, G), not
:math:`Z`. Domains: PCA to 20 components, then a Gaussian mixture with one shared covariance (mclust's ``EEE``,
:func:`stcore.cluster.gmm`) with K components; optionally refined by GraphST's majority vote over the ``radius`` =
50 nearest spots (:func:`graphst_refine`).

Deconvolution (``graphst_deconv``, :class:`CellToSpotMap`)
----------------------------------------------------------
1. Spots and reference cells restricted to their shared genes (the ``n_top_genes`` most variable of them on the
   spots when there are more), both pre-processed as in step 1.
2. The spot autoencoder above is trained with the same loss; :math:`E = \mathrm{L2norm}(H)` (N, G).
3. A purely linear cell autoencoder G → 256 → 64 → 32 → 64 → 256 → G (:class:`stcore.nn.MLP`, no activations, no
   bias; :class:`CellAutoencoder`) trained with MSE (Adam lr 0.01, 600 epochs); :math:`S = \mathrm{L2norm}(\hat
   X_{sc})` (N_c, G).
4. A mapping matrix :math:`M \in \mathbb R^{N_c \times N}` (Xavier initialisation),
   :math:`P = \operatorname{softmax}_{\text{spots}}(M)` (each cell distributes over spots),
   :math:`\hat Y = P^\top S` (N, G), and the loss

   .. math:: L = \lambda_1 \mathrm{MSE}(\hat Y, E) - \lambda_2 \frac1N \sum_i \log
             \frac{\sum_{j \in \mathcal N(i) \cup \{i\}} e^{\cos(\hat y_i, e_j)}}
                  {\sum_{j} e^{\cos(\hat y_i, e_j)} - e^{\cos(\hat y_i, e_i)}}

   with :math:`\lambda_1 = 10`, :math:`\lambda_2 = 1` (:func:`neighbourhood_info_nce`), Adam lr 10\ :sup:`-3`,
   600 epochs.
5. Proportions (:func:`top_cells_proportions`): for each spot keep the ``retain_percent`` = 10 % of cells with the
   largest :math:`P_{cs}`, sum them by cell type and normalise the spot's row to 1.

=====================  ===================  ==========================================
tensor                 shape                meaning
=====================  ===================  ==========================================
``x``                  (N, G)               scaled log-expression of the spots
``edge_index``         (2, E)               symmetric kNN graph + self loops, weights Â
``readout_index``      (2, N k)             directed kNN: j -> i for j in N(i)
``Z`` / ``H``          (N, 64) / (N, G)     latent / reconstruction (the embedding)
``M``, ``P``           (N_c, N)             mapping logits / softmax over spots
``Y_hat``              (N, G)               spots predicted from the cells
proportions            (N, C)               rows sum to 1
=====================  ===================  ==========================================

Deliberate deviations from the official code
---------------------------------------------
* **Sparse throughout.** The official Visium path builds a dense N × N distance matrix, a dense adjacency and a
  dense N × N readout mask (its "Slide" mode still keeps the mask dense); here the graph is a k-d tree kNN and
  every propagation is sparse, so memory is O(N k). The InfoNCE denominator :math:`\sum_j e^{\cos(\hat y_i, e_j)}`
  is computed exactly in row blocks of ``block_size`` spots with activation checkpointing, so memory is
  O(``block_size`` × N) instead of N × N. Its time is still O(N² G) per epoch; above ``exact_nce_max`` = 10,000
  spots (``n_negatives="auto"``) the sum over all spots is estimated each epoch from 1,024 spots drawn at random,
  :math:`\frac{N}{m}\sum_{j \in S} e^{\cos(\hat y_i, e_j)}` (pass ``n_negatives=None`` to keep it exact at any size).
* **Normalisation.** The official dense path's :math:`D^{-1/2} A D^{-1/2} + I` is kept (``adj_norm="official"``):
  it is what produced the published DLPFC results. Note that it is not the GCN normalisation (the self loop has
  weight 1 while a neighbour has about 1/k).
* **Seed.** The official code fixes seed 41 (50 in its deconvolution tutorial); here ``seed`` (default 0) seeds
  everything, including the one row permutation that makes :math:`\tilde X` (drawn once, as officially).
* **Clustering.** R mclust ``EEE`` is replaced by scikit-learn's tied-covariance Gaussian mixture started from
  k-means (:func:`stcore.cluster.gmm`); the PCA is scanpy's ARPACK PCA instead of scikit-learn's (same components up
  to sign). The official refinement computes a dense distance matrix; :func:`graphst_refine` uses a k-d tree.
* **Deconvolution genes.** Both data sets are normalised on their shared genes only (the official code
  normalises on all genes, then keeps the shared ones), so the two are on one scale. When fewer than
  ``retain_percent`` × N_c rounds down to 0 cells, one cell is kept per spot.
* **Epochs.** Defaults are the official ones (600 for every stage). On 2 CPU cores one DLPFC slide (3,639 spots,
  3,000 genes) trains in about a minute, instead of the official code's 7 minutes with a dense adjacency.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import graphs, preprocess
from ..nn import MLP, ReadoutDiscriminator, dgi_loss, sigmoid_readout
from ..train import fit, set_seed
from ..validation import cell_type_labels, check_n_clusters, counts_matrix, shared_genes, spatial_coords
from . import Method, register
from ._common import embedding_to_domains, write_domains, write_frame

__all__ = [
    "CellAutoencoder",
    "CellToSpotMap",
    "GraphST",
    "GraphSTDeconvolution",
    "GraphSTEncoder",
    "graphst_features",
    "graphst_graph",
    "graphst_refine",
    "neighbourhood_info_nce",
    "scale_genes",
    "top_cells_proportions",
]


# ------------------------------------------------------------------------------------------------ features, graph
def scale_genes(X, max_value: float = 10.0) -> np.ndarray:
    """scanpy's ``scale(zero_center=False, max_value=10)``: each gene divided by its standard deviation
    (n - 1 denominator; genes with none are left as they are), then clipped at ``max_value``. (n, g) float32."""
    X = np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float64)
    sd = X.std(0, ddof=1) if X.shape[0] > 1 else np.zeros(X.shape[1])
    X = X / np.where(sd > 0, sd, 1.0)
    return np.minimum(X, max_value).astype(np.float32)


def graphst_features(adata, n_top_genes: int = 3000, *, genes=None) -> tuple[np.ndarray, list[str]]:
    """Step 1: HVGs (Seurat v3 on counts) -> normalise to 1e4 -> log1p -> scale without centring, clip at 10.

    ``genes`` fixes the gene set (the deconvolution passes the shared genes); otherwise the ``n_top_genes`` most
    variable genes are used (all genes when there are fewer). Returns ``(X (n, g) float32, gene names)``.
    """
    counts = counts_matrix(adata)
    if genes is None:
        if adata.n_vars > n_top_genes:
            mask = preprocess.highly_variable(adata, n_top_genes)
            genes = list(adata.var_names[mask])
        else:
            genes = list(adata.var_names)
        counts = counts_matrix(adata[:, genes])
    else:
        genes = list(genes)
        counts = counts_matrix(adata[:, genes])
    X = sparse.csr_matrix(counts, dtype=np.float64)
    total = np.asarray(X.sum(1)).ravel()
    X = sparse.diags(np.where(total > 0, 1e4 / np.where(total > 0, total, 1.0), 0.0)) @ X
    X.data = np.log1p(X.data)
    return scale_genes(X), genes


def graphst_graph(coords, k: int = 3, *, adj_norm: str = "official"):
    """Step 2: ``(edge_index, edge_weight, readout_index)``.

    ``readout_index`` (2, N k) is the directed kNN graph (edge j -> i for each of the k nearest j of i) that defines
    the local summaries and the InfoNCE positives. ``edge_index`` / ``edge_weight`` hold the normalised symmetric
    adjacency with its diagonal: ``"official"`` :math:`D^{-1/2} A D^{-1/2} + I`, ``"gcn"``
    :math:`\\tilde D^{-1/2} (A + I) \\tilde D^{-1/2}`.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    if int(k) != k or k < 1:
        raise ValueError(f"k={k}: the number of spatial neighbours must be a positive integer (official 3).")
    if n <= k:
        raise ValueError(f"GraphST needs more spots than k={k} neighbours (got {n} spots); lower k or add spots.")
    readout = graphs.knn_graph(coords, k, symmetric=False)
    sym = graphs.to_undirected(readout, n)
    if adj_norm == "official":
        ei, w = graphs.normalize(sym, n, self_loops=False)
        A = graphs.to_scipy(ei, n, w) + sparse.identity(n, dtype=np.float32, format="csr")
        ei, w = graphs.from_scipy(A.tocsr())
    elif adj_norm == "gcn":
        ei, w = graphs.normalize(sym, n, self_loops=True)
    else:
        raise ValueError(f"adj_norm={adj_norm!r}: use 'official' (D^-1/2 A D^-1/2 + I, the official Visium path) "
                         "or 'gcn' (D~^-1/2 (A + I) D~^-1/2, its Slide-seq/Stereo-seq path).")
    return ei, w, readout


# ------------------------------------------------------------------------------------------------ spot encoder
class GraphSTEncoder(nn.Module):
    """The graph self-supervised contrastive autoencoder (one weight pair + a bilinear discriminator).

    Shapes: ``x`` (N, G) -> ``Z`` (N, n_latent), ``H`` (N, G). ``loss(x)`` returns ``{"reconstruction": alpha *
    MSE(x, H), "contrastive": beta * (L_sl1 + L_sl2)}``. The corrupted input is ``x[permutation]`` with one
    permutation drawn at construction (from the global torch seed), as the official code draws it once.
    """

    def __init__(self, n_genes: int, edge_index: torch.Tensor, edge_weight: torch.Tensor,
                 readout_index: torch.Tensor, n_spots: int, *, n_latent: int = 64, alpha: float = 10.0,
                 beta: float = 1.0):
        super().__init__()
        self.weight1 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_genes, n_latent)))
        self.weight2 = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_latent, n_genes)))
        self.discriminator = ReadoutDiscriminator(n_latent)
        adj = torch.sparse_coo_tensor(edge_index, edge_weight.float(), (n_spots, n_spots),
                                      check_invariants=True).coalesce()
        self.register_buffer("adj", adj)
        self.register_buffer("readout_index", readout_index)
        self.register_buffer("permutation", torch.randperm(n_spots))
        self.alpha, self.beta = float(alpha), float(beta)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`Z = \\hat A X W_1` (N, n_latent)."""
        return torch.sparse.mm(self.adj, x @ self.weight1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z, H)``: the latent :math:`\\hat A X W_1` and the reconstruction :math:`\\hat A Z W_2`."""
        z = self.encode(x)
        return z, torch.sparse.mm(self.adj, z @ self.weight2)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction H (N, G): GraphST's embedding."""
        return self(x)[1]

    def discriminate(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits :math:`h_i^\\top W s_i + b` (n,), computed as ``((h W) * s).sum(1) + b``:
        the same numbers as ``self.discriminator(h, s)`` (``nn.Bilinear``) about 10 times faster on a CPU."""
        bilinear = self.discriminator.bilinear
        return ((h @ bilinear.weight[0]) * s).sum(1) + bilinear.bias

    def loss(self, x: torch.Tensor) -> dict:
        xw = x @ self.weight1
        z = torch.sparse.mm(self.adj, xw)
        h_rec = torch.sparse.mm(self.adj, z @ self.weight2)
        z_corrupt = torch.sparse.mm(self.adj, xw[self.permutation])     # (X[perm]) W1 = (X W1)[perm]
        h, h_corrupt = F.relu(z), F.relu(z_corrupt)
        s = sigmoid_readout(h, self.readout_index)
        s_corrupt = sigmoid_readout(h_corrupt, self.readout_index)
        d = self.discriminate
        sl1 = dgi_loss(d(h, s), d(h_corrupt, s))
        sl2 = dgi_loss(d(h_corrupt, s_corrupt), d(h, s_corrupt))
        return {"reconstruction": self.alpha * F.mse_loss(h_rec, x), "contrastive": self.beta * (sl1 + sl2)}


def train_spot_encoder(x: torch.Tensor, coords, *, k: int = 3, adj_norm: str = "official", n_latent: int = 64,
                       alpha: float = 10.0, beta: float = 1.0, epochs: int = 600, lr: float = 1e-3,
                       weight_decay: float = 0.0, seed: int = 0, progress: bool = True):
    """Steps 1-2 of both methods: build the graph, train :class:`GraphSTEncoder`. Returns ``(model, history)``."""
    edge_index, edge_weight, readout = graphst_graph(coords, k, adj_norm=adj_norm)
    set_seed(seed)
    model = GraphSTEncoder(x.shape[1], edge_index, edge_weight, readout, x.shape[0], n_latent=n_latent,
                           alpha=alpha, beta=beta)
    history = fit(model, x, epochs=epochs, lr=lr, weight_decay=weight_decay, progress=progress,
                  desc="GraphST spot encoder")
    return model, history


def graphst_refine(labels, coords, radius: int = 50) -> np.ndarray:
    """GraphST's refinement: each spot takes the most common label of its ``radius`` nearest other spots (itself
    excluded; ties go to the label seen first among the neighbours, nearest first). (n,) labels."""
    values, codes = np.unique(np.asarray(labels), return_inverse=True)
    codes = codes.ravel()
    n = len(codes)
    radius = min(int(radius), n - 1)
    nbrs = codes[graphs.knn_indices(np.asarray(coords, dtype=float), radius)]          # (n, radius)
    counts = np.zeros((n, len(values)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), radius), nbrs.ravel()), 1)
    best = counts.max(1, keepdims=True)
    is_best = counts[np.arange(n)[:, None], nbrs] == best                               # first tied label seen
    return values[nbrs[np.arange(n), is_best.argmax(1)]]


# ------------------------------------------------------------------------------------------------ deconvolution
class CellAutoencoder(nn.Module):
    """The official purely linear cell autoencoder G -> 256 -> 64 -> 32 -> 64 -> 256 -> G (no bias, no
    activation); ``loss(x) = {"reconstruction": MSE(x, f(x))}``."""

    def __init__(self, n_genes: int, hidden=(256, 64, 32)):
        super().__init__()
        hidden = list(hidden)
        self.net = MLP([n_genes, *hidden, *hidden[-2::-1], n_genes], activation=None, bias=False)
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor) -> dict:
        return {"reconstruction": F.mse_loss(self(x), x)}


def _exp_cos_sum(pred_block: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.exp(pred_block @ target.T).sum(1)


def neighbourhood_info_nce(pred: torch.Tensor, target: torch.Tensor, pos_index: torch.Tensor, *,
                           block_size: int = 2048, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """GraphST's neighbourhood InfoNCE, without an N x N matrix.

    .. math:: L = -\\frac1N \\sum_i \\log \\frac{\\sum_{j \\in \\mathcal N(i) \\cup \\{i\\}} e^{c_{ij}}}
              {\\sum_j e^{c_{ij}} - e^{c_{ii}}}, \\qquad c_{ij} = \\cos(\\hat y_i, e_j)

    Parameters
    ----------
    pred, target
        (N, G) predicted spots :math:`\\hat y` and spot embeddings :math:`e` (row i of both = spot i).
    pos_index
        (2, P) directed graph whose edges j -> i make j a positive of i (the kNN graph); i itself is added.
    block_size
        Rows of the denominator computed at once; each block is recomputed in the backward pass (checkpointing),
        so memory is O(block_size x N).
    negatives
        ``None``: the denominator sums over all N spots (exact). A LongTensor of m spot indices: the sum is
        estimated as :math:`\\frac{N}{m}\\sum_{j \\in S} e^{c_{ij}}`.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be the same (N, G).")
    n = pred.shape[0]
    p, t = F.normalize(pred, dim=1), F.normalize(target, dim=1)
    src, dst = pos_index
    self_sim = (p * t).sum(1)
    pos = torch.exp(self_sim).index_add(0, dst, torch.exp((p[dst] * t[src]).sum(1)))
    pool = t if negatives is None else t[negatives]
    scale = 1.0 if negatives is None else n / len(negatives)
    blocks = []
    for start in range(0, n, block_size):
        block = p[start:start + block_size]
        if torch.is_grad_enabled() and block.requires_grad:
            blocks.append(checkpoint(_exp_cos_sum, block, pool, use_reentrant=False))
        else:
            blocks.append(_exp_cos_sum(block, pool))
    denominator = scale * torch.cat(blocks) - torch.exp(self_sim)
    return -(torch.log(pos) - torch.log(denominator)).mean()


class CellToSpotMap(nn.Module):
    """The learnable cell -> spot mapping (step 4). ``M`` (N_c, N) logits, ``P = softmax(M, dim=1)``.

    ``loss(None)`` returns ``{"mse": lambda1 * MSE(P^T S, E), "info_nce": lambda2 * L_NCE}`` for the fixed,
    row-normalised cell and spot embeddings ``S`` (N_c, G) and ``E`` (N, G).
    """

    def __init__(self, cell_emb: torch.Tensor, spot_emb: torch.Tensor, pos_index: torch.Tensor, *,
                 lambda1: float = 10.0, lambda2: float = 1.0, block_size: int = 2048, n_negatives: int | None = None):
        super().__init__()
        self.M = nn.Parameter(torch.empty(cell_emb.shape[0], spot_emb.shape[0]))
        nn.init.xavier_uniform_(self.M)
        self.register_buffer("cell_emb", cell_emb)
        self.register_buffer("spot_emb", spot_emb)
        self.register_buffer("pos_index", pos_index)
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.block_size, self.n_negatives = int(block_size), n_negatives

    def probabilities(self) -> torch.Tensor:
        """P (N_c, N): each cell's distribution over spots."""
        return F.softmax(self.M, dim=1)

    def predict_spots(self) -> torch.Tensor:
        """:math:`\\hat Y = P^\\top S` (N, G)."""
        return self.probabilities().T @ self.cell_emb

    def loss(self, _=None) -> dict:
        y_hat = self.predict_spots()
        negatives = None
        n = self.spot_emb.shape[0]
        if self.n_negatives is not None and self.n_negatives < n:
            negatives = torch.randperm(n)[: self.n_negatives]
        nce = neighbourhood_info_nce(y_hat, self.spot_emb, self.pos_index, block_size=self.block_size,
                                     negatives=negatives)
        return {"mse": self.lambda1 * F.mse_loss(y_hat, self.spot_emb), "info_nce": self.lambda2 * nce}


def top_cells_proportions(P, cell_types, retain_percent: float = 0.1, *, block_size: int = 4096):
    """Step 5: proportions (N, C) from the mapping P (N_c, N) and the cells' type codes (N_c,) in [0, C).

    For each spot keep the ``floor(retain_percent * N_c)`` cells (at least 1) with the largest :math:`P_{cs}`, add
    their :math:`P_{cs}` by type, and normalise the row to 1.
    """
    P = torch.as_tensor(P)
    codes = torch.as_tensor(np.asarray(cell_types), dtype=torch.long)
    n_cells, n_spots = P.shape
    if codes.shape != (n_cells,):
        raise ValueError(f"cell_types has shape {tuple(codes.shape)}; give one type code per cell ({n_cells}).")
    if not 0 < retain_percent <= 1:
        raise ValueError(f"retain_percent={retain_percent}: must be in (0, 1] (official 0.1).")
    n_types = int(codes.max()) + 1
    keep = max(1, int(math.floor(retain_percent * n_cells + 1e-9)))
    out = torch.zeros(n_spots, n_types, dtype=P.dtype)
    for start in range(0, n_spots, block_size):
        block = P[:, start:start + block_size].T                                        # (b, N_c)
        values, idx = torch.topk(block, keep, dim=1)
        out[start:start + block_size] = torch.zeros(block.shape[0], n_types, dtype=P.dtype).scatter_add_(
            1, codes[idx], values)
    total = out.sum(1, keepdim=True)
    return (out / torch.where(total > 0, total, torch.ones_like(total))).numpy()


# ------------------------------------------------------------------------------------------------ the methods
def _check_common(epochs: int, k: int, alpha: float, beta: float, lr: float) -> None:
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs={epochs}: must be a positive integer (official 600).")
    if int(k) != k or k < 1:
        raise ValueError(f"k={k}: the number of spatial neighbours must be a positive integer (official 3).")
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise ValueError(f"alpha={alpha}, beta={beta}: loss weights must be >= 0 and not both 0 (official 10, 1).")
    if lr <= 0:
        raise ValueError(f"lr={lr}: the learning rate must be > 0 (official 1e-3).")


@register
class GraphST(Method):
    """GraphST (Long et al. 2023) for spatial domains: a DGI-style contrastive graph autoencoder, PCA(20) + GMM.

    Options: ``n_domains`` (K), ``n_top_genes`` (3000), ``k`` (3 spatial neighbours), ``adj_norm``
    (``"official"`` or ``"gcn"``), ``n_latent`` (64), ``alpha`` / ``beta`` (10 / 1), ``epochs`` (600), ``lr``
    (1e-3), ``weight_decay`` (0), ``n_pcs`` (20), ``clustering`` (``"gmm"`` = mclust EEE; or ``"kmeans"``,
    ``"leiden"``, ``"louvain"``), ``refine`` (GraphST's majority vote over ``radius`` = 50 nearest spots).
    Writes ``obs["domain_graphst"]`` and ``obsm["X_graphst"]`` (the reconstruction H, N x G).
    """

    name = "graphst"
    task = "domains"
    summary = "graph contrastive autoencoder (DGI local summaries) + GMM"
    paper = "Long et al., Nat Commun 2023"

    def __init__(self, n_domains: int | None = 7, *, n_top_genes: int = 3000, k: int = 3,
                 adj_norm: str = "official", n_latent: int = 64, alpha: float = 10.0, beta: float = 1.0,
                 epochs: int = 600, lr: float = 1e-3, weight_decay: float = 0.0, n_pcs: int = 20,
                 clustering: str = "gmm", resolution: float = 1.0, refine: bool = False, radius: int = 50,
                 seed: int = 0, progress: bool = True):
        _check_common(epochs, k, alpha, beta, lr)
        if n_domains is not None and (int(n_domains) != n_domains or n_domains < 1):
            raise ValueError(f"n_domains={n_domains}: give a positive number of domains (or None with "
                             "clustering='leiden').")
        if clustering not in ("gmm", "kmeans", "leiden", "louvain"):
            raise ValueError(f"clustering={clustering!r}: use 'gmm' (mclust EEE, official), 'kmeans', 'leiden' "
                             "or 'louvain'.")
        if adj_norm not in ("official", "gcn"):
            raise ValueError(f"adj_norm={adj_norm!r}: use 'official' or 'gcn'.")
        self.n_domains, self.n_top_genes, self.k, self.adj_norm = n_domains, n_top_genes, k, adj_norm
        self.n_latent, self.alpha, self.beta, self.epochs = n_latent, alpha, beta, epochs
        self.lr, self.weight_decay, self.n_pcs, self.clustering = lr, weight_decay, n_pcs, clustering
        self.resolution, self.refine, self.radius, self.seed, self.progress = resolution, refine, radius, seed, progress

    def embed(self, adata) -> np.ndarray:
        """Steps 1-2 and training: the reconstruction H (N, G). Keeps ``model_``, ``history_``, ``genes_``."""
        coords = spatial_coords(adata)
        X, self.genes_ = graphst_features(adata, self.n_top_genes)
        x = torch.from_numpy(X)
        self.model_, self.history_ = train_spot_encoder(
            x, coords, k=self.k, adj_norm=self.adj_norm, n_latent=self.n_latent, alpha=self.alpha,
            beta=self.beta, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, seed=self.seed,
            progress=self.progress)
        return self.model_.embed(x).numpy()

    def domains(self, H: np.ndarray, coords=None) -> np.ndarray:
        """PCA(``n_pcs``) of H, then the clustering; GraphST's refinement when ``refine``. Keeps ``pcs_``."""
        self.pcs_ = preprocess.pca(H, self.n_pcs, seed=self.seed)
        labels = embedding_to_domains(self.pcs_, self.n_domains, clustering=self.clustering, seed=self.seed,
                                      resolution=self.resolution)
        if self.refine:
            labels = graphst_refine(labels, coords, self.radius)
        return labels

    def run(self, adata, reference=None):
        coords = spatial_coords(adata)
        if self.n_domains is not None:
            check_n_clusters(self.n_domains, adata.n_obs)
        H = self.embed(adata)
        write_domains(adata, self.key, self.domains(H, coords), H)
        return adata


@register
class GraphSTDeconvolution(Method):
    """GraphST's deconvolution (Long et al. 2023): spot and cell autoencoders, then a learnt cell -> spot mapping.

    Options: ``cell_type_key``; spot encoder as in :class:`GraphST` (``k``, ``adj_norm``, ``n_latent``, ``alpha``,
    ``beta``, ``epochs``, ``lr``); cell autoencoder (``sc_epochs`` 600, ``sc_lr`` 0.01); mapping (``map_epochs``
    600, ``map_lr`` 1e-3, ``lambda1`` 10, ``lambda2`` 1, ``block_size``, ``n_negatives`` ``"auto"``/None/int,
    ``exact_nce_max``); projection (``retain_percent`` 0.1). Writes ``obsm["proportions_graphst_deconv"]`` and
    keeps the mapping ``mapping_`` (N_c, N).
    """

    name = "graphst_deconv"
    task = "deconv"
    summary = "graph contrastive spot AE + cell AE + learnt cell-to-spot mapping"
    paper = "Long et al., Nat Commun 2023"
    needs_reference = True

    def __init__(self, *, cell_type_key: str = "cell_type", n_top_genes: int = 3000, k: int = 3,
                 adj_norm: str = "official", n_latent: int = 64, alpha: float = 10.0, beta: float = 1.0,
                 epochs: int = 600, lr: float = 1e-3, sc_epochs: int = 600, sc_lr: float = 0.01,
                 map_epochs: int = 600, map_lr: float = 1e-3, lambda1: float = 10.0, lambda2: float = 1.0,
                 retain_percent: float = 0.1, block_size: int = 2048, n_negatives="auto",
                 exact_nce_max: int = 10_000, seed: int = 0, progress: bool = True):
        _check_common(epochs, k, alpha, beta, lr)
        for name, value in (("sc_epochs", sc_epochs), ("map_epochs", map_epochs)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}={value}: must be a positive integer (official 600).")
        if not 0 < retain_percent <= 1:
            raise ValueError(f"retain_percent={retain_percent}: must be in (0, 1] (official 0.1).")
        if lambda1 < 0 or lambda2 < 0 or lambda1 + lambda2 == 0:
            raise ValueError(f"lambda1={lambda1}, lambda2={lambda2}: must be >= 0 and not both 0 (official 10, 1).")
        if isinstance(n_negatives, str) and n_negatives.isdigit():          # from the command line
            n_negatives = int(n_negatives)
        if isinstance(n_negatives, str) and n_negatives.lower() == "none":
            n_negatives = None
        if not (n_negatives is None or n_negatives == "auto" or (isinstance(n_negatives, int) and n_negatives > 0)):
            raise ValueError(f"n_negatives={n_negatives!r}: use None (exact), 'auto' or a positive integer.")
        if adj_norm not in ("official", "gcn"):
            raise ValueError(f"adj_norm={adj_norm!r}: use 'official' or 'gcn'.")
        self.cell_type_key, self.n_top_genes, self.k, self.adj_norm = cell_type_key, n_top_genes, k, adj_norm
        self.n_latent, self.alpha, self.beta, self.epochs, self.lr = n_latent, alpha, beta, epochs, lr
        self.sc_epochs, self.sc_lr, self.map_epochs, self.map_lr = sc_epochs, sc_lr, map_epochs, map_lr
        self.lambda1, self.lambda2, self.retain_percent = lambda1, lambda2, retain_percent
        self.block_size, self.n_negatives, self.exact_nce_max = block_size, n_negatives, exact_nce_max
        self.seed, self.progress = seed, progress

    def prepare(self, adata, reference) -> dict:
        """Step 1: genes, features of both data sets, cell-type codes. Returns a dict of arrays."""
        self._check_reference(reference)
        coords = spatial_coords(adata)
        types = cell_type_labels(reference, self.cell_type_key)
        genes = shared_genes(adata, reference)
        if len(genes) > self.n_top_genes:
            mask = preprocess.highly_variable(adata[:, genes], self.n_top_genes)
            genes = genes[mask]
        x_sp, genes = graphst_features(adata, genes=genes)
        x_sc, _ = graphst_features(reference, genes=genes)
        categories = sorted(types.unique())
        codes = types.map({c: i for i, c in enumerate(categories)}).to_numpy()
        return {"x_sp": torch.from_numpy(x_sp), "x_sc": torch.from_numpy(x_sc), "coords": coords,
                "genes": genes, "cell_types": categories, "codes": codes}

    def embeddings(self, prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-3: ``(E (N, G), S (N_c, G))``, both L2-normalised reconstructions. Keeps the histories."""
        spot_model, self.history_spots_ = train_spot_encoder(
            prep["x_sp"], prep["coords"], k=self.k, adj_norm=self.adj_norm, n_latent=self.n_latent,
            alpha=self.alpha, beta=self.beta, epochs=self.epochs, lr=self.lr, seed=self.seed, progress=self.progress)
        self.readout_index_ = spot_model.readout_index
        set_seed(self.seed)
        cell_model = CellAutoencoder(prep["x_sc"].shape[1])
        self.history_cells_ = fit(cell_model, prep["x_sc"], epochs=self.sc_epochs, lr=self.sc_lr,
                                  progress=self.progress, desc="GraphST cell autoencoder")
        with torch.no_grad():
            E = F.normalize(spot_model.embed(prep["x_sp"]), dim=1)
            S = F.normalize(cell_model(prep["x_sc"]), dim=1)
        return E, S

    def n_negatives_for(self, n_spots: int) -> int | None:
        """Spots in the InfoNCE denominator: ``None`` = all (exact)."""
        if self.n_negatives == "auto":
            return None if n_spots <= self.exact_nce_max else 1024
        return self.n_negatives

    def mapping(self, E: torch.Tensor, S: torch.Tensor, pos_index: torch.Tensor) -> CellToSpotMap:
        """Step 4: train the mapping; keeps ``history_map_``."""
        set_seed(self.seed)
        model = CellToSpotMap(S, E, pos_index, lambda1=self.lambda1, lambda2=self.lambda2,
                              block_size=self.block_size, n_negatives=self.n_negatives_for(E.shape[0]))
        self.history_map_ = fit(model, None, epochs=self.map_epochs, lr=self.map_lr, progress=self.progress,
                                desc="GraphST mapping")
        return model

    def run(self, adata, reference=None):
        prep = self.prepare(adata, reference)
        E, S = self.embeddings(prep)
        model = self.mapping(E, S, self.readout_index_)
        with torch.no_grad():
            self.mapping_ = model.probabilities()
        props = top_cells_proportions(self.mapping_, prep["codes"], self.retain_percent)
        write_frame(adata, f"proportions_{self.key}", props, prep["cell_types"])
        return adata
