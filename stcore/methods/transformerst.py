r"""TransformerST: a graph Transformer autoencoder on two histology-aware spot graphs, and image-based
super-resolution.

Zhao C, Xu Z, Wang X, Tao S, MacDonald WA, He K, Poholek AC, Chen K, Huang H, Chen W. Innovative super-resolution
in spatial transcriptomics: a transformer model exploiting histology images and spatial gene expression.
*Brief Bioinform* 25(2), bbae052 (2024). doi:10.1093/bib/bbae052.
Official code: Zhaocy-Research/TransformerST (``src/TransformerST_{graph_func,model,train_adaptive}.py``, demo
``Mouse_Lung_histology.py``); HEAD does not import (an IndentationError in ``graph_func``), so the 2022 version of
the same files was read. The defaults below are those of the demo.

Integration strategy: *graph* — the H&E enters as a third coordinate that decides which spots are neighbours.

Pipeline (domains, :class:`TransformerST`)

1. Expression (:func:`transformerst_expression`): genes seen in fewer than 5 spots are dropped, the 3000 most
   variable genes are chosen by ``seurat_v3`` on the counts, every spot is normalised to 10,000 counts and
   ``log1p``-transformed: :math:`X \in \mathbb R^{N \times 3000}` (no PCA).
2. Histology coordinate (:meth:`TransformerST.graph_points`): SpaGCN's colour value of a
   :math:`\beta \times \beta` window (β = 49 pixels of the image used), collapsed to one number by variance
   weights, z-scored and scaled by :math:`s \cdot \max(\operatorname{sd}(x), \operatorname{sd}(y))` (s = 1)
   (:func:`stcore.images.colour_coordinate`). With ``histology=False``, :math:`z = 0`: positions only.
3. Graph 1 (:func:`knn_cut_graph`): the ``k`` nearest spots of each spot in :math:`(x, y, z)`; an edge is kept
   when :math:`d_{ij} \le \operatorname{mean}_i(d) + \operatorname{sd}_i(d)` over spot i's k distances;
   symmetrised.
4. Graph 2, the "adaptive" graph (:func:`adaptive_graph`): the edges of graph 1 whose ends share an initial Leiden
   label (resolution 0.6 on the expression: scanpy's PCA-50 / 15-neighbour graph).
5. Model (:class:`TransformerSTModel`): an MLP encoder 3000→512→128 (Linear–BatchNorm–ELU–Dropout 0.2 blocks)
   gives :math:`f_i`; three ``TransformerConv`` layers 128→128→128→64 (1 head, attention dropout 0.2) run on both
   graphs, and each layer's output is the attention-weighted mix

   .. math:: h^{(l+1)}_i = \tfrac12 \sum_j \alpha^{(1)}_{ij} \operatorname{TC}_1(h^{(l)})_j +
             \tfrac12 \sum_j \alpha^{(2)}_{ij} \operatorname{TC}_2(h^{(l)})_j

   (ReLU after the first two layers), where :math:`\alpha^{(g)}` are the attention coefficients the layer
   returned on graph g. The embedding is :math:`z_i = [f_i \Vert \mu_i]` (128 + 64); an MLP decoder
   :math:`z \to \hat X` (one Linear–BatchNorm–ELU–Dropout block).
6. Loss: :math:`\mathcal L = \operatorname{MSE}(\hat X, X) + \text{norm} \cdot \operatorname{mean}_{ij}
   \operatorname{BCE}(\tilde z_i^\top \tilde z_j, Y_{ij})` (:math:`\tilde z`: z after dropout 0.2, as the
   official inner-product decoder applies it while training), :math:`Y = (A_1 + A_2)/2 + I`,
   :math:`\text{norm} = N^2 / (2 (N^2 - |A_1|))`; after pre-training, a DEC head with Student-t kernel
   (α = 1) :math:`q_{ik} \propto (1 + \lVert z_i - m_k \rVert^2)^{-1}`, centroids from k-means (10 clusters,
   20 restarts), target :math:`p_{ik} \propto q_{ik}^2 / \sum_i q_{ik}` refreshed every 20 epochs, adds
   :math:`\operatorname{KL}(P \Vert Q)` (averaged over all N·K entries, as ``F.kl_div`` does by default).
   Adam (lr 1e-3, weight decay 1e-4; the default here is lr 1e-2, see below).
7. Domains: Leiden on a 20-neighbour graph of :math:`z`, the resolution searched in [0.2, 2.5] until K domains
   appear; optionally the 6-nearest-spot majority vote.

Super-resolution (:func:`super_resolve`)

8. A small CNN with global average pooling and a linear head (:class:`PatchToGene`) is trained to predict the spots'
   log-normalised expression of chosen genes from the H&E patch under each spot; it is then applied to sub-spot
   patches on TESLA's super-pixel grid (:func:`stcore.methods.tesla.superpixel_grid`, one point every ``res``
   full-resolution pixels inside the tissue). Because the head is linear after the average pooling, the
   prediction for a patch is the mean of the predictions for its parts: a spot's prediction is (up to border
   effects) the mean of its sub-spots', the additive assumption behind super-resolution.

Deliberate deviations from the official code
---------------------------------------------
* **The graph weights are kept.** The official code computes 0/1 weights (the mean + sd cut) and, for graph 2, the
  shared-label condition, but then turns the edge list into a dict of neighbour lists and discards the weights,
  so both graphs become the same plain symmetric kNN graph. Here zero-weight edges are removed, as the paper
  describes: graph 1 is the cut kNN graph and graph 2 its label-pruned subgraph. (For a kept edge of graph 2 the
  official weight is the distance itself; as weights are never used by ``TransformerConv``, the edge's presence
  is what matters.)
* **Sparse attention.** The official layer densifies each returned attention matrix to N×N (``to_dense_adj``)
  and multiplies it with the layer output; here the same product is a scatter over the edges, O(E) memory.
  The official orientation is kept: the coefficient PyG returns for edge :math:`j \to i` (normalised over i's
  incoming edges) is placed at row j, column i, so the mix sums over a spot's *outgoing* edges.
* **Blocked graph loss.** The official code forms the N×N score matrix :math:`ZZ^\top`; here the same mean BCE
  over all :math:`N^2` pairs is computed exactly as :math:`\sum_{ij}\operatorname{softplus}(z_i^\top z_j) -
  \sum_{(i,j) \in P} Y_{ij}\, z_i^\top z_j` (P: edges and diagonal), the first sum in row blocks recomputed in
  the backward pass, so memory is O(block × N) (about 1 s per epoch for 3,639 spots). An unbiased estimate from
  ``pair_samples`` drawn pairs remains available for very large slides; with ``2N`` draws its gradient is so noisy
  that on DLPFC 151673 the reconstruction error after 50 epochs was 0.88 instead of 0.69 (exact).
* **Second graph input.** The official middle layer feeds the *graph-1 output* into the graph-2 branch
  (``x`` is overwritten before ``x_prue`` is computed); here both branches read the layer's input.
* **No vector quantiser.** The official ``VectorQuantizer`` on :math:`f` has a 64-wide codebook that only fits
  ``feat_hidden2 = 64`` (the scripts use 128) and its loss is never added; it is left out and
  :math:`z = [f \Vert \mu]`, as in the official super-resolution model.
* **Far fewer epochs, larger learning rate.** The official schedule is 1000 full-batch epochs without DEC, then
  1000 with DEC (tolerance 0, so all are run), at lr 1e-3. One epoch on a Visium slide (3,639 spots × 3000 genes)
  costs about 1–3 s on one CPU core, so the defaults are ``epochs=50`` and ``dec_epochs=10``, with ``lr=1e-2`` to
  make up part of the difference: at lr 1e-3, 50 or even 200 epochs leave the autoencoder barely trained (the
  encoder features :math:`f`, which dominate :math:`z`, have less layer structure than at initialisation; Leiden
  ARI on DLPFC 151673 below 0.05). The official schedule, run with this module on a GPU (``epochs=1000,
  dec_epochs=1000, lr=1e-3, device="cuda"``, 3 seeds, ``book/results/transformerst_official_schedule.csv``),
  reached a mean Leiden ARI of 0.23 with the image and 0.26 without on DLPFC 151673 (K = 7, no refinement, seeds
  between 0.21 and 0.26), against 0.18 for the defaults here (``make bench-histology``): a few hundredths
  higher, and still far below a Gaussian mixture on expression PCs (0.42).
* **k = 10.** The lung demo uses ``k = 20`` neighbours, the IDC script ``k = 10``; the default here is 10, which
  halves the cost of the attention layers.
* **All spots kept.** The official ``filter_cells(min_counts=5)`` is not applied, so every spot gets a domain.
* **Resolution search.** The official loop steps the Leiden resolution down from 2.5 by 0.02; here
  :func:`stcore.cluster.search_resolution` bisects the same range (falling back to [0.01, 3]).
* **Super-resolution module.** The paper's image→gene model is a Vision Transformer trained on the spots' image
  patches, whose sub-spot predictions feed the graph model (``vision_transformer=False`` in the demo, and the
  official code stacks its output as extra rows). Here a small CNN (no pretrained weights, which cannot be
  downloaded) is trained on the patches of the image in ``uns["spatial"]`` and applied to sub-spot patches; it
  is a separate function, not part of the domain pipeline. ``tile_weights`` therefore does not apply to the
  domain method.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch_geometric.nn import TransformerConv

from .. import cluster, graphs, images, preprocess
from ..train import fit, set_seed
from ..validation import check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import write_domains
from .tesla import superpixel_grid, tissue_mask

__all__ = ["TransformerST", "TransformerSTModel", "transformerst_expression", "knn_cut_graph", "adaptive_graph",
           "attention_mix", "PatchToGene", "super_resolve"]


# ------------------------------------------------------------------------------------------ step 1: expression
def transformerst_expression(adata, n_top_genes: int = 3000, min_cells: int = 5):
    """Log-normalised expression of the highly variable genes, (N, n_top_genes) float32, and their names.

    Genes detected in fewer than ``min_cells`` spots are dropped; HVGs by ``seurat_v3`` on the counts; then
    ``normalize_total(1e4)`` and ``log1p`` (computed on all kept genes, as the official code does before subsetting).
    """
    counts = counts_matrix(adata)
    detected = np.asarray((counts > 0).sum(0)).ravel() >= min_cells
    if detected.sum() < 2:
        raise ValueError(f"Only {int(detected.sum())} genes are detected in at least {min_cells} spots; "
                         "TransformerST needs expression counts of many genes (is .X all zeros?).")
    kept = adata[:, detected]
    hvg = preprocess.highly_variable(kept, n_top_genes)
    logx = preprocess.log_normalize(kept, target_sum=1e4).X[:, hvg]
    logx = logx.toarray() if hasattr(logx, "toarray") else np.asarray(logx)
    return np.ascontiguousarray(logx, dtype=np.float32), kept.var_names[hvg]


# -------------------------------------------------------------------------------------------- steps 3-4: graphs
def knn_cut_graph(points, k: int = 20) -> torch.Tensor:
    """Graph 1: each point's ``k`` nearest points, kept when closer than mean + sd of its own k distances;
    symmetrised (an edge in either direction gives both). Returns edge_index (2, E)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    idx = graphs.knn_indices(points, min(k, n - 1))
    dist = np.linalg.norm(points[idx] - points[:, None, :], axis=-1)
    boundary = dist.mean(1, keepdims=True) + dist.std(1, keepdims=True)
    keep = dist <= boundary
    src, dst = np.repeat(np.arange(n), idx.shape[1])[keep.ravel()], idx[keep]
    return graphs.to_undirected(torch.as_tensor(np.vstack([src, dst]), dtype=torch.long), n)


def adaptive_graph(edge_index: torch.Tensor, labels) -> torch.Tensor:
    """Graph 2: the edges of ``edge_index`` whose two ends carry the same initial label."""
    labels = torch.as_tensor(pd.factorize(np.asarray(labels))[0])
    same = labels[edge_index[0]] == labels[edge_index[1]]
    return edge_index[:, same]


def attention_mix(h: torch.Tensor, attention) -> torch.Tensor:
    """Sparse form of the official ``to_dense_adj(attention) @ h``: out_j = sum over edges j->i of alpha * h_i.

    ``attention`` is the ``(edge_index, alpha)`` pair a PyG layer returns with ``return_attention_weights``
    (alpha (E, 1) for one head).
    """
    (edge_index, alpha) = attention
    keep = edge_index[0] != edge_index[1]                    # remove_self_loops, as the official code does
    src, dst, a = edge_index[0, keep], edge_index[1, keep], alpha[keep].reshape(-1, 1)
    return torch.zeros_like(h).index_add_(0, src, a * h[dst])


# ------------------------------------------------------------------------------------------------ step 5: model
def _softplus_gram_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.softplus(a @ b.T).sum()


def _block(n_in: int, n_out: int, p_drop: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out, momentum=0.1, eps=1e-4), nn.ELU(),
                         nn.Dropout(p_drop))


class TransformerSTModel(nn.Module):
    """The graph Transformer autoencoder with its graph decoder and DEC head (steps 5-6).

    Parameters
    ----------
    n_genes : int
        Input width G.
    edge_index, edge_index_adaptive : (2, E1), (2, E2) long tensors
        Graph 1 and graph 2 (both directions, no self loops).
    feat_hidden : (512, 128); gcn_hidden : (128, 64); p_drop 0.2; n_layers 3; mix 0.5 (weight of graph 2)
    n_clusters : int
        DEC centroids (official ``dec_cluster_n`` = 10); ``dec_interval`` epochs between target updates.
    """

    def __init__(self, n_genes: int, n_spots: int, edge_index: torch.Tensor, edge_index_adaptive: torch.Tensor, *,
                 feat_hidden=(512, 128), gcn_hidden=(128, 64), p_drop: float = 0.2, n_layers: int = 3,
                 mix: float = 0.5, n_clusters: int = 10, dec_interval: int = 20, alpha: float = 1.0,
                 weights=(1.0, 1.0, 1.0), pair_samples: int | None = None):
        super().__init__()
        self.encoder = nn.Sequential(_block(n_genes, feat_hidden[0], p_drop), _block(*feat_hidden, p_drop))
        widths = [feat_hidden[1]] + [gcn_hidden[0]] * (n_layers - 1) + [gcn_hidden[1]]
        self.convs = nn.ModuleList(TransformerConv(a, b, heads=1, dropout=p_drop) for a, b in zip(widths, widths[1:]))
        self.n_latent = feat_hidden[1] + gcn_hidden[1]
        self.decoder = _block(self.n_latent, n_genes, p_drop)
        self.cluster_layer = nn.Parameter(torch.empty(n_clusters, self.n_latent))
        nn.init.xavier_normal_(self.cluster_layer)
        self.register_buffer("edge_index", edge_index)
        self.register_buffer("edge_index_adaptive", edge_index_adaptive)
        self.mix, self.alpha, self.dec_interval, self.p_drop = mix, alpha, dec_interval, p_drop
        self.w_rec, self.w_graph, self.w_dec = weights
        self.use_dec, self.steps, self.target = False, 0, None
        # the BCE targets Y = (A1 + A2)/2 + I, kept sparse: sorted keys i * N + j of the positive pairs
        self.n = n = int(n_spots)
        key1 = edge_index[0] * n + edge_index[1]
        key2 = edge_index_adaptive[0] * n + edge_index_adaptive[1]
        keys = torch.cat([key1, torch.arange(n) * (n + 1)])
        values = torch.cat([0.5 + 0.5 * torch.isin(key1, key2).float(), torch.ones(n)])
        order = torch.argsort(keys)
        self.register_buffer("pos_keys", keys[order])
        self.register_buffer("pos_values", values[order])
        self.norm = n * n / (2.0 * (n * n - key1.numel()))
        self.pair_samples = int(pair_samples) if pair_samples else None
        self.block_entries = 2**22                 # rows per block of the exact graph loss: 2^22 / N

    def encode(self, x: torch.Tensor):
        """(N, G) -> (z (N, 128 + 64), f (N, 128))."""
        f = self.encoder(x)
        h = f
        for i, conv in enumerate(self.convs):
            out1, att1 = conv(h, self.edge_index, return_attention_weights=True)
            out2, att2 = conv(h, self.edge_index_adaptive, return_attention_weights=True)
            h = (1 - self.mix) * attention_mix(out1, att1) + self.mix * attention_mix(out2, att2)
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return torch.cat([f, h], 1), f

    def soft_assign(self, z: torch.Tensor) -> torch.Tensor:
        """Student-t assignments (N, n_clusters), :math:`q \\propto (1 + d^2/\\alpha)^{-(\\alpha + 1)/2}`."""
        q = 1.0 / (1.0 + torch.cdist(z, self.cluster_layer) ** 2 / self.alpha)
        q = q ** ((self.alpha + 1.0) / 2.0)
        return q / q.sum(1, keepdim=True)

    def graph_loss(self, z: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
        """norm * mean over all N^2 pairs of BCE(z_i . z_j, Y_ij).

        With ``BCE(s, y) = softplus(s) - y s`` the mean splits into the sum of ``softplus(z_i . z_j)`` over all
        pairs, computed exactly in blocks of rows (each block recomputed in the backward pass, so memory stays
        O(block x N), never N x N), minus the sum of ``Y_ij z_i . z_j`` over the positive pairs P (edges and
        diagonal). Passing ``n_samples`` (or ``pair_samples`` to the model) instead estimates both parts from
        that many uniform draws, scaled to the parts' sizes (unbiased, O(n_samples), but the gradient is far
        noisier: on a Visium slide 2N draws leave the encoder features without expression structure).
        """
        n_samples = n_samples or self.pair_samples
        if n_samples:
            return self._graph_loss_sampled(z, n_samples)
        n = self.n
        rows = max(1, self.block_entries // n)
        total = z.new_zeros(())
        for start in range(0, n, rows):
            total = total + checkpoint(_softplus_gram_sum, z[start:start + rows], z, use_reentrant=False)
        i, j = self.pos_keys // n, self.pos_keys % n
        s = (z.index_select(0, i) * z.index_select(0, j)).sum(1)
        return self.norm * (total - (self.pos_values * s).sum()) / (n * n)

    def _graph_loss_sampled(self, z: torch.Tensor, n_samples: int) -> torch.Tensor:
        n, keys, m = self.n, self.pos_keys, self.pos_keys.numel()
        if n_samples >= m:
            pick, pos_scale = torch.arange(m, device=z.device), 1.0
        else:
            pick, pos_scale = torch.randint(0, m, (n_samples,), device=z.device), m / n_samples
        i, j = keys[pick] // n, keys[pick] % n
        s = (z.index_select(0, i) * z.index_select(0, j)).sum(1)
        pos = F.binary_cross_entropy_with_logits(s, self.pos_values[pick], reduction="sum") * pos_scale
        draws = min(n_samples, m)
        ni, nj = torch.randint(0, n, (draws,), device=z.device), torch.randint(0, n, (draws,), device=z.device)
        loc = torch.searchsorted(keys, ni * n + nj).clamp(max=m - 1)
        free = keys[loc] != ni * n + nj                          # drop draws that hit a positive pair
        ni, nj = ni[free], nj[free]
        s_neg = (z.index_select(0, ni) * z.index_select(0, nj)).sum(1)
        neg = F.softplus(s_neg).sum() * ((n * n - m) / max(len(ni), 1))
        return self.norm * (pos + neg) / (n * n)

    def update_target(self, x: torch.Tensor) -> None:
        """Refresh the DEC target P from the eval-mode assignments."""
        was = self.training
        self.eval()
        with torch.no_grad():
            q = self.soft_assign(self.encode(x)[0])
        self.train(was)
        weight = q ** 2 / q.sum(0)
        self.target = weight / weight.sum(1, keepdim=True)

    def loss(self, x: torch.Tensor) -> dict:
        z, _ = self.encode(x)
        terms = {"reconstruction": self.w_rec * F.mse_loss(self.decoder(z), x),
                 "graph": self.w_graph * self.graph_loss(F.dropout(z, self.p_drop, self.training))}
        if self.use_dec:
            if self.steps % self.dec_interval == 0:
                self.update_target(x)
            self.steps += 1
            q = self.soft_assign(z)
            kl = self.target * (torch.log(self.target + 1e-12) - torch.log(q + 1e-12))
            terms["dec"] = self.w_dec * kl.mean()             # F.kl_div's default "mean": over all N K entries
        return terms

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> np.ndarray:
        """Eval-mode embedding z (N, n_latent)."""
        self.eval()
        return self.encode(x)[0].cpu().numpy()


# ------------------------------------------------------------------------------------------------- the method
@register
class TransformerST(Method):
    """TransformerST (Zhao et al. 2024): graph Transformer autoencoder on a histology-aware kNN graph and its
    label-pruned ("adaptive") subgraph, DEC, Leiden to K domains.

    Options (official defaults unless named in the module docstring): ``k`` (neighbours, 20), ``b`` (colour
    window, pixels of the image used, 49), ``s`` (colour scale, 1), ``n_top_genes`` (3000), ``init_resolution``
    (Leiden resolution of the initial labels, 0.6), ``feat_hidden`` (512, 128), ``gcn_hidden`` (128, 64),
    ``p_drop`` (0.2), ``lr`` (official 1e-3, default 1e-2), ``weight_decay`` (1e-4), ``epochs`` (pre-training;
    official 1000, default 50), ``dec_epochs`` (official 1000, default 10), ``dec_clusters`` (10),
    ``dec_interval`` (20), ``n_neighbors`` (20, for the final Leiden). ``adaptive=False`` uses graph 1 twice (what the official code effectively does).
    ``resolution`` fixes the final Leiden resolution instead of searching it (needed when ``n_domains=None``).
    ``device`` (``"cpu"``; ``"cuda"`` makes the official schedule practical).
    """

    name = "transformerst"
    task = "domains"
    summary = "graph Transformer AE on histology kNN + label-pruned graphs, DEC, Leiden"
    paper = "Zhao et al., Brief Bioinform 2024"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, k: int = 10, b: float = 49,
                 s: float = 1.0, n_top_genes: int = 3000, init_resolution: float = 0.6, adaptive: bool = True,
                 feat_hidden=(512, 128), gcn_hidden=(128, 64), p_drop: float = 0.2, lr: float = 1e-2,
                 weight_decay: float = 1e-4, epochs: int = 50, dec_epochs: int = 10, dec_clusters: int = 10,
                 dec_interval: int = 20, n_neighbors: int = 20, resolution: float | None = None,
                 refine: bool = False, refine_k: int = 6, seed: int = 0, library_id: str | None = None,
                 device: str = "cpu", progress: bool = True):
        if n_domains is None and resolution is None:
            raise ValueError("Give n_domains (the Leiden resolution is then searched) or a Leiden resolution=.")
        if epochs < 1 or dec_epochs < 0:
            raise ValueError(f"epochs={epochs} must be >= 1 and dec_epochs={dec_epochs} >= 0.")
        if k < 1:
            raise ValueError(f"k={k}: the graph needs at least one neighbour per spot.")
        self.n_domains, self.histology, self.k, self.b, self.s = n_domains, histology, k, b, s
        self.n_top_genes, self.init_resolution, self.adaptive = n_top_genes, init_resolution, adaptive
        self.feat_hidden, self.gcn_hidden, self.p_drop = tuple(feat_hidden), tuple(gcn_hidden), p_drop
        self.lr, self.weight_decay, self.epochs, self.dec_epochs = lr, weight_decay, epochs, dec_epochs
        self.dec_clusters, self.dec_interval, self.n_neighbors = dec_clusters, dec_interval, n_neighbors
        self.resolution, self.refine, self.refine_k = resolution, refine, refine_k
        self.seed, self.library_id, self.device, self.progress = seed, library_id, device, progress

    # -- steps 2-4 ---------------------------------------------------------------------------------------------
    def graph_points(self, adata) -> np.ndarray:
        """(N, 3) points ``(x, y, z)``; ``z = 0`` with ``histology=False`` (the image is not read)."""
        xy = spatial_coords(adata)
        if not self.histology:
            return np.column_stack([xy, np.zeros(len(xy))])
        image, scale = images.image_and_scale(adata, self.library_id, resolution=None)
        z = images.colour_coordinate(image, xy, scale, beta=self.b / scale, alpha=self.s)
        return np.column_stack([xy, z])

    def build_graphs(self, adata, x: np.ndarray):
        """Graph 1, graph 2 and the initial Leiden labels (steps 3-4)."""
        if self.k >= adata.n_obs:
            raise ValueError(f"k={self.k} neighbours needs more than {self.k} spots (got {adata.n_obs}); "
                             "lower k.")
        g1 = knn_cut_graph(self.graph_points(adata), self.k)
        pcs = preprocess.pca(x, 50, seed=0)
        init = cluster.leiden(pcs, resolution=self.init_resolution, seed=self.seed, n_neighbors=15)
        g2 = adaptive_graph(g1, init) if self.adaptive else g1
        return g1, g2, init

    def _leiden(self, z: np.ndarray) -> np.ndarray:
        if self.n_domains is None:
            return cluster.leiden(z, resolution=self.resolution, seed=self.seed, n_neighbors=self.n_neighbors)
        if self.resolution is not None:
            return cluster.leiden(z, resolution=self.resolution, seed=self.seed, n_neighbors=self.n_neighbors)
        try:
            labels, self.resolution_ = cluster.search_resolution(z, self.n_domains, method="leiden", seed=self.seed,
                                                                 lo=0.2, hi=2.5, n_neighbors=self.n_neighbors)
        except ValueError:
            labels, self.resolution_ = cluster.search_resolution(z, self.n_domains, method="leiden", seed=self.seed,
                                                                 lo=0.01, hi=3.0, n_neighbors=self.n_neighbors)
        return labels

    def run(self, adata, reference=None):
        if self.n_domains is not None:
            check_n_clusters(self.n_domains, adata.n_obs)
        xnp, self.genes_ = transformerst_expression(adata, self.n_top_genes)
        g1, g2, self.init_labels_ = self.build_graphs(adata, xnp)
        self.graphs_ = (g1, g2)
        set_seed(self.seed)
        x = torch.as_tensor(xnp, device=self.device)
        model = TransformerSTModel(x.shape[1], adata.n_obs, g1, g2, feat_hidden=self.feat_hidden,
                                   gcn_hidden=self.gcn_hidden, p_drop=self.p_drop, n_clusters=self.dec_clusters,
                                   dec_interval=self.dec_interval).to(self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.history_ = fit(model, x, epochs=self.epochs, optimizer=optimizer, progress=self.progress,
                            desc="TransformerST")
        if self.dec_epochs > 0:
            z0 = model.embed(x)
            n_clusters = min(self.dec_clusters, adata.n_obs)
            km = KMeans(n_clusters=n_clusters, n_init=2 * n_clusters, random_state=self.seed).fit(z0)
            model.cluster_layer = nn.Parameter(torch.as_tensor(km.cluster_centers_, dtype=torch.float32,
                                                               device=self.device))
            optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            model.use_dec, model.steps = True, 0
            dec_history = fit(model, x, epochs=self.dec_epochs, optimizer=optimizer, progress=self.progress,
                              desc="TransformerST + DEC")
            self.history_.terms["dec"] = [0.0] * self.epochs
            for key, values in dec_history.terms.items():
                self.history_.terms[key] += list(values)
            self.history_.total += dec_history.total
        self.model_ = model
        embedding = model.embed(x)
        labels = self._leiden(embedding)
        if self.refine:
            labels = cluster.refine(labels, coords=spatial_coords(adata), k=self.refine_k)
        write_domains(adata, self.key, labels, embedding)
        return adata


# ------------------------------------------------------------------------------------------ step 8: super-resolution
class PatchToGene(nn.Module):
    """Image patch (n, 3, H, W) -> expression (n, n_genes): a 3x3 and a 1x1 convolution (ReLU), global average
    pooling, a linear head. Any patch size works; pooling then a linear head makes the output for a patch the mean
    of the outputs for its parts (up to border effects)."""

    def __init__(self, n_genes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.ReLU())
        self.head = nn.Linear(width, n_genes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class _PatchRegression(nn.Module):
    def __init__(self, net: PatchToGene, generator: torch.Generator):
        super().__init__()
        self.net, self.generator = net, generator

    def loss(self, batch) -> dict:
        x, y = batch
        turns = int(torch.randint(0, 4, (1,), generator=self.generator))
        x = torch.rot90(x, turns, (2, 3))
        if torch.rand(1, generator=self.generator) < 0.5:
            x = x.flip(3)
        return {"mse": F.mse_loss(self.net(x), y)}


def _patches(image, points, size, scale) -> torch.Tensor:
    tiles = images.spot_tiles(image, points, size, scale, tolerance=max(2.0, size))
    return torch.as_tensor(tiles, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0 - 0.5


def super_resolve(adata, genes, *, res: float | None = None, grid=None, epochs: int = 200, lr: float = 1e-2,
                  width: int = 16, seed: int = 0, library_id: str | None = None, progress: bool = True):
    """Sub-spot expression of ``genes`` predicted from the H&E (step 8).

    Parameters
    ----------
    adata
        Spots with raw counts, ``obsm["spatial"]`` (full-resolution pixels) and an image in ``uns["spatial"]``
        with ``spot_diameter_fullres`` among its scale factors.
    genes
        Gene names (in ``var_names``) to predict.
    res
        Sub-spot spacing in full-resolution pixels (default: a third of the spot diameter, i.e. 9 sub-spots per
        spot area); the sub-spot patch is ``res`` wide, the spot patch one spot diameter.
    grid
        (M, 2) sub-spot centres; default TESLA's super-pixel grid over the tissue mask of the image.
    epochs, lr, width, seed
        Training of :class:`PatchToGene` (Adam, full batch, random 90° rotations and flips).

    Returns
    -------
    AnnData (M, len(genes)) with the predicted log-normalised expression in ``X``, ``obsm["spatial"]`` the
    centres, ``uns["spatial"]`` shared with ``adata`` and ``uns["tesla"]["res"]`` (so
    :func:`stcore.methods.tesla.plot_superpixels` draws it); ``uns["transformerst"]`` holds the spot-level
    fit (``spot_pred``, ``spot_true``, ``pearson``) and the training ``history``.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    missing = [g for g in genes if g not in adata.var_names]
    if not genes or missing:
        raise KeyError(f"genes {missing[:3] or genes} are not in adata.var_names; pass measured gene names.")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1.")
    image, scale = images.image_and_scale(adata, library_id, resolution=None)
    lib = library_id or next(iter(adata.uns["spatial"]))
    diameter = adata.uns["spatial"][lib].get("scalefactors", {}).get("spot_diameter_fullres")
    if diameter is None:
        raise KeyError("uns['spatial'][...]['scalefactors'] has no 'spot_diameter_fullres'; add the spot diameter "
                       "in full-resolution pixels (Visium: about 89 at 55 um).")
    res = float(res) if res is not None else diameter / 3
    spot_px, sub_px = max(3, round(diameter * scale)), max(3, round(res * scale))
    if grid is None:
        mask, mscale = tissue_mask(adata, "image", library_id=library_id, res=res)
        grid = superpixel_grid(mask, mscale, res)
    grid = np.asarray(grid, dtype=float)
    xy = spatial_coords(adata)
    y = preprocess.log_normalize(adata, target_sum=1e4)[:, genes].X
    y = np.asarray(y.toarray() if hasattr(y, "toarray") else y, dtype=np.float32)
    mean, sd = y.mean(0), np.where(y.std(0) > 0, y.std(0), 1.0)
    set_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = PatchToGene(len(genes), width)
    spots = _patches(image, xy, spot_px, scale)
    target = torch.as_tensor((y - mean) / sd)
    history = fit(_PatchRegression(net, generator), (spots, target), epochs=epochs, lr=lr, progress=progress,
                  desc="patch -> gene")
    net.eval()
    with torch.no_grad():
        spot_pred = net(spots).numpy() * sd + mean
        sub = torch.cat([net(b) for b in torch.split(_patches(image, grid, sub_px, scale), 4096)]).numpy()
    sub = sub * sd + mean
    pearson = [float(np.corrcoef(spot_pred[:, g], y[:, g])[0, 1]) if y[:, g].std() > 0 else float("nan")
               for g in range(len(genes))]
    out = ad.AnnData(X=sub.astype(np.float32), obs=pd.DataFrame({"x": grid[:, 0], "y": grid[:, 1]},
                                                                 index=[f"sub{i}" for i in range(len(grid))]),
                     var=pd.DataFrame(index=genes))
    out.obsm["spatial"] = grid
    out.uns["spatial"] = adata.uns["spatial"]
    out.uns["tesla"] = {"res": res}
    out.uns["transformerst"] = {"spot_pred": spot_pred, "spot_true": y, "pearson": pearson, "history": history,
                                "spot_px": spot_px, "sub_px": sub_px}
    return out
