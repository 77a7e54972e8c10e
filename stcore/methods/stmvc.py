"""stMVC: multi-view graph collaborative learning over a histology-similarity graph and a spatial-location graph.

Zuo C, Zhang Y, Cao C, Feng J, Jiao M, Chen L. Elucidating tumor heterogeneity from spatially resolved
transcriptomics data by multi-view graph collaborative learning. *Nat Commun* 13, 5962 (2022). Official code:
cmzuo11/stMVC (commit 40c3e9e); defaults below are those of its ``parameter_setting`` and DLPFC example.

.. warning::
   **stMVC is weakly supervised.** Its official loss contains cross-entropy terms on the *ground-truth labels* of a
   training subset of spots (weights 8, 10 and 100). With ``supervised=True`` (the official method, the default)
   the labels in ``obs[label_key]`` enter training, so its ARI against those labels is **not comparable** to the
   ARI of unsupervised methods. ``supervised=False`` drops every cross-entropy term (see the deviations).

Pipeline (integration strategy: *graph* — the image defines one of the two graphs over which the expression
features are propagated; the two graph views are then fused by attention):

1. **RNA branch** (:func:`rna_latent`). ``normalize_total`` + ``log1p`` picks ``n_hvg`` = 2000 highly variable
   genes (seurat flavour). Their raw counts :math:`x_i` feed an autoencoder with input :math:`\\log(1 + x_i)`,
   layers 2000 → 1000 → 50 → 1000 → 2000 and a negative-binomial reconstruction,
   :math:`x_{ig} \\sim \\mathrm{NB}(\\ell_i\\,\\mathrm{softmax}(D(h_i))_g, \\theta_g)` with :math:`\\ell_i` the
   spot's total count. The 50-d code :math:`h_i` is the node-feature matrix of **both** graphs.
2. **Graphs** (:func:`histology_graph`, :func:`spatial_graph`). HSG: k = 7 nearest spots (self included) by
   cosine similarity of the tile features of :func:`stcore.images.slide_tile_features`; SLG: k = 7 nearest spots
   (self included) by Euclidean distance of the pixel coordinates. Both are symmetrised.
3. **One graph-attention autoencoder per view** (:class:`SGATE`): 2 heads × 25 (concatenated, ELU), an output GAT
   to 10 dimensions with ELU, :math:`z^{(v)} = \\mathrm{ELU}(\\mathrm{GAT}(\\mathrm{GAT}(h)))`; an inner-product
   decoder :math:`\\hat A^{(v)}_{ij} = \\sigma(z^{(v)}_i \\cdot z^{(v)}_j)` and a linear classifier
   :math:`\\mathrm{softmax}(z^{(v)} W^{(v)})`. Dropout 0.1 in the HSG view, 0 in the SLG view; LeakyReLU slope 0.2.
4. **Attention over views** (:class:`ViewAttention`): per spot,

   .. math:: \\lambda_i = \\mathrm{softmax}_v\\big(\\mathrm{LeakyReLU}([z^{(1)}_i \\Vert z^{(2)}_i]\\, a_v)\\big),
             \\qquad R_i = \\lambda_{i1} z^{(1)}_i + \\lambda_{i2} z^{(2)}_i,

   and a classifier :math:`\\mathrm{softmax}(\\mathrm{ReLU}(R W_1) W_2)` (10 → 20 → classes).
5. **Losses** (:func:`graph_loss`). Per view, the weighted adjacency BCE of the (variational) graph autoencoder,
   :math:`L^{(v)}_{\\text{graph}} = \\text{norm}\\cdot\\operatorname{mean}_{ij}\\,
   \\mathrm{BCE}_{\\text{logits}}(z_i \\cdot z_j, [A + I]_{ij}; \\text{pos\\_weight})` with
   pos_weight :math:`= (N^2 - \\sum A)/\\sum A`, norm :math:`= N^2 / (2 (N^2 - \\sum A))`; the robust term
   :math:`L_{\\text{rob}} = \\sum_i \\sum_v \\lambda_{iv} \\lVert z^{(v)}_i - R_i \\rVert^2` (λ and R detached).
6. **Alternating training** (:meth:`StMVC.train_model`), for up to ``rounds`` rounds: (a) the HSG view alone,
   :math:`L^{(1)}_{\\text{graph}} + \\beta L^{(1)}_{\\text{rob}} + 8\\,\\mathrm{CE}^{(1)}`; (b) the SLG view alone,
   likewise; (c) the collaborative step on all parameters,
   :math:`\\sum_v L^{(v)}_{\\text{graph}} + \\beta L_{\\text{rob}} + 10 \\sum_v \\mathrm{CE}^{(v)} +
   100\\,\\mathrm{CE}(\\text{fused})`. λ and R of the robust term are those of the previous step. The rounds stop
   when the collaborative loss changes by less than 1 %. Adam (lr 0.002, weight decay 1e-6, eps 0.01), a fresh
   optimiser per step, β = 5e-4.
7. **Domains**: KMeans (``n_init`` = 5) on R with K = ``n_domains``; optionally a 6-nearest-spot majority vote.

Supervision (``supervised=True``): the cross-entropy terms use ``obs[label_key]`` on a stratified random
``train_fraction`` = 0.7 of the *labelled* spots of each class (the official ``Train_test_prop`` column:
"randomly selected spots from each cluster", 70 % in the DLPFC example). Unlabelled spots (NaN) are never
training labels. The chosen spots are kept in ``train_mask_`` so their labels can be left out of an evaluation.

Deliberate deviations from the official code
--------------------------------------------
* **HSG bug fixed.** For the cosine metric the official code sorts by *descending* distance
  (``argsort(-dist)``), so the HSG links each spot to its 7 *least* similar spots. Here the HSG links the most
  similar spots, as the paper describes.
* **Sparse throughout.** The official graph autoencoders are dense GATs with a dense :math:`N \\times N`
  reconstruction. Here the GATs are PyG ``GATConv`` layers on ``edge_index``, and the dense BCE is estimated
  without bias from the exact sum over the :math:`E + N` positive entries plus ``neg_ratio`` × (E + N) uniformly
  drawn pairs for the all-pairs sum (:func:`graph_loss`). Memory is O(N k).
* **Image features.** The official image branch trains a SimCLR ResNet-50 (500 epochs, about 3.7 h on a GPU) on
  32 × 32 tiles cut from 40 hires pixels. Here the shared self-supervised tile CNN of
  :func:`stcore.images.slide_tile_features` is trained on the slide's own tiles (``tile_fullres`` = 266
  full-resolution pixels, 40 hires pixels at the DLPFC hires scale 0.15; ``tile_epochs`` = 10, 64 features); pass
  ``tile_weights`` to use local pretrained weights.
* **Shorter training.** The official RNA autoencoder trains with lr 8e-5 (decayed to 1e-5) until convergence,
  and every graph step runs 500 epochs for up to 11 rounds. Here the autoencoder trains ``ae_epochs`` = 10 epochs
  at lr 1e-3 (mini-batches of 128), and each graph step ``epochs`` = 60 epochs for at most ``rounds`` = 3 rounds
  (same 1 % stopping rule), so one DLPFC slide takes about 100 s of CPU time on one core (tile CNN about 30 s,
  autoencoder about 35 s, graph training about 35 s). On DLPFC 151673, K = 7, seed 0, this gives ARI 0.76
  (supervised, both views; 0.74 on the spots whose labels were not used), 0.77 (supervised, SLG only) and 0.28
  (unsupervised, both views). The 10 % of edges and spots the official code holds out to *monitor*
  link-prediction AUC and reconstruction are not held out.
* **Cross-entropy on logits.** The official classifiers return softmax probabilities and then apply
  ``cross_entropy`` (which applies a second log-softmax). Here the cross-entropy takes the logits.
* **Transductive graphs.** The DLPFC example builds its graphs on a 70 % ``Train_test`` subset of spots and
  predicts the rest afterwards; here both graphs span all spots and only the label subset is drawn.
* **Unsupervised variant** (``supervised=False``, not in the official code): every cross-entropy term is dropped.
  Without them nothing would train the view attention (its only gradient came from the fused classifier), so the
  collaborative step adds the graph loss of the fused representation on both graphs,
  :math:`\\sum_v L_{\\text{graph}}(R, A^{(v)})`: the attention learns which view's neighbours R reproduces.
* ``histology=False``: only the SLG view is built and trained (λ = 1, R = z of the SLG); the image is not read.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from .. import cluster, graphs, images, preprocess
from ..nn import MLP
from ..nn.likelihoods import nb_log_prob
from ..train import History, fit, set_seed
from ..validation import check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import write_domains

__all__ = [
    "NBAutoencoder",
    "SGATE",
    "StMVC",
    "StMVCModel",
    "ViewAttention",
    "graph_loss",
    "histology_graph",
    "rna_latent",
    "spatial_graph",
    "training_labels",
]

VIEW_NAMES = {"hsg": "histology-similarity graph", "slg": "spatial-location graph"}


# ------------------------------------------------------------------------------------------------ step 1
class NBAutoencoder(nn.Module):
    """The RNA autoencoder: ``log1p(x)`` (N, G) -> h (N, 50) -> NB mean ``l * softmax(D(h))`` and per-gene θ."""

    def __init__(self, n_genes: int, n_hidden: int = 1000, n_latent: int = 50):
        super().__init__()
        self.encoder = MLP([n_genes, n_hidden, n_latent], activation="relu")
        self.decoder = MLP([n_latent, n_hidden, n_genes], activation="relu")
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def embed(self, counts: torch.Tensor) -> torch.Tensor:
        return self.encoder(torch.log1p(counts))

    def loss(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(counts)
        mu = torch.softmax(self.decoder(h), dim=1) * counts.sum(1, keepdim=True)
        return {"nb": -nb_log_prob(counts, mu, self.log_theta.exp()).sum(1).mean()}


def rna_latent(counts, *, n_hvg: int = 2000, n_hidden: int = 1000, n_latent: int = 50, epochs: int = 30,
               lr: float = 1e-3, batch_size: int = 128, seed: int = 0, progress: bool = True):
    """Step 1: the 50-d code of the NB autoencoder on the HVG counts. Returns ``(h (N, n_latent) float32, History)``."""
    import anndata as ad

    counts = sparse.csr_matrix(counts, dtype=np.float32)
    mask = preprocess.highly_variable(ad.AnnData(counts), min(n_hvg, counts.shape[1]), flavor="seurat")
    x = torch.as_tensor(counts[:, mask].toarray())
    set_seed(seed)
    model = NBAutoencoder(x.shape[1], n_hidden, n_latent)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.randperm(len(x), generator=gen)
        return [x[order[i:i + batch_size]] for i in range(0, len(x), batch_size)]

    history = fit(model, batches, epochs=epochs, lr=lr, progress=progress, desc="stMVC RNA autoencoder")
    model.eval()
    with torch.no_grad():
        h = model.embed(x)
    return h.numpy().astype(np.float32), history


# ------------------------------------------------------------------------------------------------ step 2
def histology_graph(features, k: int = 7) -> torch.Tensor:
    """HSG: each spot to its ``k - 1`` most cosine-similar spots (k counts the spot itself), symmetrised.

    The official code links the ``k`` *least* similar spots (``argsort(-dist)`` on cosine distances); that bug is
    not reproduced. (2, E) edge_index without self loops.
    """
    return graphs.feature_knn_graph(features, k - 1, metric="cosine")


def spatial_graph(coords, k: int = 7) -> torch.Tensor:
    """SLG: each spot to its ``k - 1`` nearest spots in pixel coordinates (k counts the spot itself), symmetrised."""
    return graphs.knn_graph(coords, k - 1)


# ------------------------------------------------------------------------------------------------ steps 3-5
def graph_loss(z: torch.Tensor, pos_index: torch.Tensor, n_spots: int, n_edges: int, *, neg_ratio: float = 1.0,
               pairs: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official weighted adjacency BCE of an inner-product decoder, without an N × N matrix.

    Officially ``norm * mean_ij BCEWithLogits(z_i . z_j, Y_ij, pos_weight)`` with ``Y = A + I``,
    ``pos_weight = (N² - ΣA) / ΣA`` and ``norm = N² / (2 (N² - ΣA))``. Split the mean into the positive entries
    (exact) and ``Σ_all softplus(s) - Σ_pos softplus(s)`` for the zeros; the all-pairs sum is estimated from
    ``pairs`` (2, M) drawn uniformly (``neg_ratio`` × the positives; pass all N² pairs for the exact value).

    Parameters
    ----------
    z
        (N, d) embedding.
    pos_index
        (2, P) the entries of A + I (each once, self loops included).
    n_edges
        ΣA (directed edges of A, without self loops).
    """
    n2 = float(n_spots) * n_spots
    pos_weight = (n2 - n_edges) / n_edges
    norm = n2 / (2.0 * (n2 - n_edges))
    s_pos = (z[pos_index[0]] * z[pos_index[1]]).sum(1)
    if pairs is None:
        m = max(1, int(neg_ratio * pos_index.shape[1]))
        pairs = torch.randint(0, n_spots, (2, m), generator=generator)
    s_all = (z[pairs[0]] * z[pairs[1]]).sum(1)
    total = (pos_weight * F.softplus(-s_pos).sum() + n2 * F.softplus(s_all).mean() - F.softplus(s_pos).sum())
    return norm * total / n2


class SGATE(nn.Module):
    """One view's graph-attention autoencoder: h (N, n_in) -> z (N, n_latent) and class logits (N, n_classes).

    ``GATConv(n_in, n_hidden, heads)`` concatenated + ELU, ``GATConv(heads * n_hidden, n_latent)`` + ELU, dropout
    ``dropout`` on the input, between the layers and on the attention coefficients; classifier ``z W`` (no bias).
    """

    def __init__(self, n_in: int = 50, n_hidden: int = 25, n_latent: int = 10, heads: int = 2,
                 dropout: float = 0.0, negative_slope: float = 0.2, n_classes: int = 0):
        super().__init__()
        from torch_geometric.nn import GATConv

        self.dropout = float(dropout)
        self.conv1 = GATConv(n_in, n_hidden, heads=heads, concat=True, negative_slope=negative_slope,
                             dropout=dropout)
        self.conv2 = GATConv(heads * n_hidden, n_latent, heads=1, negative_slope=negative_slope, dropout=dropout)
        self.classifier = nn.Linear(n_latent, n_classes, bias=False) if n_classes > 0 else None
        if self.classifier is not None:
            nn.init.xavier_uniform_(self.classifier.weight, gain=1.414)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = F.dropout(h, self.dropout, self.training)
        x = F.dropout(F.elu(self.conv1(x, edge_index)), self.dropout, self.training)
        return F.elu(self.conv2(x, edge_index))


class ViewAttention(nn.Module):
    """Per-spot attention over V views: λ = softmax_v(LeakyReLU([z¹ ‖ … ‖ z^V] a_v)), R = Σ_v λ_v z^v.

    Shapes: V tensors (N, d) -> λ (N, V), R (N, d), class logits (N, n_classes) from ``ReLU(R W1) W2``.
    """

    def __init__(self, n_latent: int = 10, n_views: int = 2, n_classes: int = 0, negative_slope: float = 0.2):
        super().__init__()
        self.a = nn.Parameter(torch.empty(n_views * n_latent, n_views))
        nn.init.xavier_uniform_(self.a, gain=1.414)
        self.negative_slope = negative_slope
        self.classifier = None
        if n_classes > 0:
            self.classifier = nn.Sequential(nn.Linear(n_latent, 2 * n_latent, bias=False), nn.ReLU(),
                                            nn.Linear(2 * n_latent, n_classes, bias=False))
            for layer in (self.classifier[0], self.classifier[2]):
                nn.init.xavier_uniform_(layer.weight, gain=1.414)

    def forward(self, zs: list[torch.Tensor]):
        scores = F.leaky_relu(torch.cat(zs, 1) @ self.a, self.negative_slope)
        lam = torch.softmax(scores, dim=1)
        robust = sum(lam[:, v:v + 1] * z for v, z in enumerate(zs))
        logits = self.classifier(robust) if self.classifier is not None else None
        return lam, robust, logits


class StMVCModel(nn.Module):
    """The views, their attention, and the three training steps as :func:`stcore.train.fit` losses.

    ``stage`` is a view index (train that view alone) or ``"collab"``; ``loss(h)`` returns the named terms of
    that step. ``y`` (N,) holds class indices with -1 for spots whose label is not used.
    """

    def __init__(self, h_dim: int, edge_indices: list[torch.Tensor], n_spots: int, *, view_names: list[str],
                 n_hidden: int = 25, n_latent: int = 10, heads: int = 2, dropouts=None, negative_slope: float = 0.2,
                 y: torch.Tensor | None = None, n_classes: int = 0, beta: float = 5e-4, view_ce: float = 8.0,
                 collab_view_ce: float = 10.0, fused_ce: float = 100.0, neg_ratio: float = 1.0, seed: int = 0):
        super().__init__()
        self.view_names, self.n_spots = list(view_names), n_spots
        dropouts = dropouts or [0.0] * len(edge_indices)
        self.views = nn.ModuleList(SGATE(h_dim, n_hidden, n_latent, heads, d, negative_slope, n_classes)
                                   for d in dropouts)
        self.attention = ViewAttention(n_latent, len(edge_indices), n_classes, negative_slope)
        self.edge_indices = edge_indices
        self.pos_indices = [graphs.add_self_loops(e, n_spots) for e in edge_indices]
        self.y = y
        self.train_idx = None if y is None else torch.nonzero(y >= 0).ravel()
        self.beta, self.view_ce, self.collab_view_ce, self.fused_ce = beta, view_ce, collab_view_ce, fused_ce
        self.neg_ratio = neg_ratio
        self.generator = torch.Generator().manual_seed(seed)
        self.stage: int | str = 0
        self.lam = self.robust = None          # detached λ and R of the previous step

    @property
    def supervised(self) -> bool:
        return self.y is not None

    def _graph(self, z, v):
        return graph_loss(z, self.pos_indices[v], self.n_spots, self.edge_indices[v].shape[1],
                          neg_ratio=self.neg_ratio, generator=self.generator)

    def _ce(self, logits):
        return F.cross_entropy(logits[self.train_idx], self.y[self.train_idx])

    def _robust(self, z, v):
        if self.lam is None:
            return z.new_zeros(())
        return (self.lam[:, v] * ((z - self.robust) ** 2).sum(1)).sum()

    def encode(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [view(h, e) for view, e in zip(self.views, self.edge_indices)]

    def loss(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage == "collab":
            zs = self.encode(h)
            terms = {f"graph_{n}": self._graph(z, v) for v, (n, z) in enumerate(zip(self.view_names, zs))}
            terms["robust"] = self.beta * sum(self._robust(z, v) for v, z in enumerate(zs))
            lam, robust, logits = self.attention(zs)
            if self.supervised:
                terms["ce_views"] = self.collab_view_ce * sum(self._ce(view.classifier(z))
                                                              for view, z in zip(self.views, zs))
                terms["ce_fused"] = self.fused_ce * self._ce(logits)
            elif len(zs) > 1:
                terms["graph_fused"] = sum(self._graph(robust, v) for v in range(len(zs)))
            return terms
        v = int(self.stage)
        view = self.views[v]
        z = view(h, self.edge_indices[v])
        terms = {f"graph_{self.view_names[v]}": self._graph(z, v), "robust": self.beta * self._robust(z, v)}
        if self.supervised:
            terms["ce_views"] = self.view_ce * self._ce(view.classifier(z))
        return terms

    @torch.no_grad()
    def fuse(self, h: torch.Tensor):
        """λ (N, V), R (N, d) and the per-view z (list of (N, d)) in eval mode."""
        was = self.training
        self.eval()
        zs = self.encode(h)
        lam, robust, _ = self.attention(zs)
        self.train(was)
        return lam, robust, zs


# ------------------------------------------------------------------------------------------------ supervision
def training_labels(labels, fraction: float = 0.7, seed: int = 0):
    """Class indices of a stratified random ``fraction`` of the labelled spots, -1 elsewhere.

    ``labels`` (N,) may hold NaN / None for unlabelled spots; those are never chosen. Returns
    ``(y (N,) int64 with -1 for unused spots, classes (list of the label values))``.
    """
    labels = pd.Series(np.asarray(labels, dtype=object))
    known = labels.notna().to_numpy()
    classes = sorted(pd.unique(labels[known]).tolist(), key=str)
    index = {c: i for i, c in enumerate(classes)}
    y = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for c in classes:
        members = np.flatnonzero(known & (labels == c).to_numpy())
        take = max(1, int(round(fraction * len(members))))
        y[rng.choice(members, take, replace=False)] = index[c]
    return y, classes


# ------------------------------------------------------------------------------------------------ method
@register
class StMVC(Method):
    """stMVC (Zuo et al., Nat Commun 2022) — **weakly supervised by default**; see the module docstring.

    Options: ``supervised`` (official: True; uses ``obs[label_key]`` on ``train_fraction`` of the labelled spots
    of each class), the RNA branch (``n_hvg``, ``ae_hidden``, ``ae_latent``, ``ae_epochs``, ``ae_lr``,
    ``ae_batch_size``), the image (``tile_fullres``, ``tile_weights``, ``tile_epochs``, ``tile_latent``), graphs
    (``k``, counting the spot itself), the views (``n_hidden``, ``n_latent``, ``heads``, ``dropout_hsg``,
    ``dropout_slg``), training (``epochs`` per step, ``rounds``, ``tol``, ``lr``, ``weight_decay``, ``eps``,
    ``beta``, the CE weights, ``neg_ratio``), clustering (``n_domains``, ``n_init``, ``refine``, ``refine_k``).
    ``histology=False`` trains the SLG view alone and never reads the image.
    """

    name = "stmvc"
    task = "domains"
    summary = "HSG + SLG graph-attention views fused by attention (weakly supervised)"
    paper = "Zuo et al., Nat Commun 2022"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, supervised: bool = True,
                 label_key: str = "layer", train_fraction: float = 0.7, refine: bool = False, seed: int = 0,
                 progress: bool = True, epochs: int = 60, rounds: int = 3, tol: float = 0.01,
                 n_hvg: int = 2000, ae_hidden: int = 1000, ae_latent: int = 50, ae_epochs: int = 10,
                 ae_lr: float = 1e-3, ae_batch_size: int = 128, tile_fullres: float = 266.0,
                 tile_weights: str | None = None, tile_epochs: int = 10, tile_latent: int = 64, k: int = 7,
                 n_hidden: int = 25, n_latent: int = 10, heads: int = 2, dropout_hsg: float = 0.1,
                 dropout_slg: float = 0.0, lr: float = 0.002, weight_decay: float = 1e-6, eps: float = 0.01,
                 beta: float = 5e-4, view_ce: float = 8.0, collab_view_ce: float = 10.0, fused_ce: float = 100.0,
                 neg_ratio: float = 1.0, n_init: int = 5, refine_k: int = 6, library_id: str | None = None):
        if n_domains is None or int(n_domains) != n_domains or n_domains < 1:
            raise ValueError(f"n_domains={n_domains}: stMVC clusters R with KMeans and needs a positive number of "
                             "domains K (command line: --n-domains K).")
        if epochs < 1 or rounds < 1 or ae_epochs < 1:
            raise ValueError(f"epochs={epochs}, rounds={rounds}, ae_epochs={ae_epochs}: all must be >= 1 "
                             "(official: 500 epochs per step, up to 11 rounds).")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction={train_fraction}: give the fraction of labelled spots per class "
                             "whose labels train the classifiers, in (0, 1] (official DLPFC example: 0.7).")
        if k < 2:
            raise ValueError(f"k={k}: the graphs need k >= 2 (k counts the spot itself; official 7).")
        self.n_domains, self.histology, self.supervised = int(n_domains), histology, supervised
        self.label_key, self.train_fraction, self.refine, self.seed = label_key, train_fraction, refine, seed
        self.progress, self.epochs, self.rounds, self.tol = progress, epochs, rounds, tol
        self.ae = dict(n_hvg=n_hvg, n_hidden=ae_hidden, n_latent=ae_latent, epochs=ae_epochs, lr=ae_lr,
                       batch_size=ae_batch_size)
        self.tile_fullres, self.tile_weights, self.tile_epochs = tile_fullres, tile_weights, tile_epochs
        self.tile_latent, self.k, self.library_id = tile_latent, k, library_id
        self.net = dict(n_hidden=n_hidden, n_latent=n_latent, heads=heads, beta=beta, view_ce=view_ce,
                        collab_view_ce=collab_view_ce, fused_ce=fused_ce, neg_ratio=neg_ratio)
        self.dropout_hsg, self.dropout_slg = dropout_hsg, dropout_slg
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.n_init, self.refine_k = n_init, refine_k

    # -- supervision -----------------------------------------------------------------------------------------
    def labels(self, adata):
        """``(y, classes)`` for ``supervised=True`` (see :func:`training_labels`); ``(None, [])`` otherwise."""
        if not self.supervised:
            return None, []
        if self.label_key not in adata.obs:
            raise KeyError(f"stMVC is weakly supervised: it trains on the labels in obs[{self.label_key!r}], which "
                           "this AnnData lacks. Pass label_key='<column with known domains>' or supervised=False "
                           "(command line: --supervised false) for the unsupervised variant.")
        labels = adata.obs[self.label_key]
        if labels.notna().sum() == 0:
            raise ValueError(f"obs[{self.label_key!r}] holds no labels (all NaN); pass supervised=False or "
                             "another label_key.")
        return training_labels(labels.to_numpy(), self.train_fraction, seed=self.seed)

    # -- steps 1-2 -------------------------------------------------------------------------------------------
    def image_features(self, adata) -> np.ndarray:
        """Tile features for the HSG (N, tile_latent)."""
        return images.slide_tile_features(adata, self.tile_fullres, n_latent=self.tile_latent,
                                          epochs=self.tile_epochs, seed=self.seed, weights=self.tile_weights,
                                          library_id=self.library_id, progress=self.progress)

    def prepare(self, adata):
        """Steps 1-2: ``(h (N, 50) tensor, {view name: edge_index})``. Keeps ``image_features_`` (``None``
        without histology) and ``ae_history_``."""
        coords = spatial_coords(adata)
        counts = counts_matrix(adata)
        if adata.n_obs <= self.k:
            raise ValueError(f"stMVC needs more than k={self.k} spots (got {adata.n_obs}).")
        views = {}
        self.image_features_ = None
        if self.histology:
            self.image_features_ = self.image_features(adata)
            views["hsg"] = histology_graph(self.image_features_, self.k)
        views["slg"] = spatial_graph(coords, self.k)
        h, self.ae_history_ = rna_latent(counts, seed=self.seed, progress=self.progress, **self.ae)
        return torch.as_tensor(h), views

    # -- steps 3-6 -------------------------------------------------------------------------------------------
    def build_model(self, h: torch.Tensor, views: dict, y=None, n_classes: int = 0) -> StMVCModel:
        set_seed(self.seed)
        dropouts = [self.dropout_hsg if n == "hsg" else self.dropout_slg for n in views]
        return StMVCModel(h.shape[1], list(views.values()), h.shape[0], view_names=list(views), dropouts=dropouts,
                          y=None if y is None else torch.as_tensor(y), n_classes=n_classes, seed=self.seed,
                          **self.net)

    def _step(self, model, h, stage, params, desc):
        model.stage = stage
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, eps=self.eps)
        return fit(model, h, epochs=self.epochs, optimizer=opt, progress=self.progress, desc=desc)

    def train_model(self, model: StMVCModel, h: torch.Tensor) -> StMVCModel:
        """The alternating rounds (step 6). Keeps ``history_`` (all steps, one after the other) and
        ``rounds_run_``."""
        parts, collab = [], []
        for r in range(self.rounds):
            for v, name in enumerate(model.view_names):
                parts.append(self._step(model, h, v, model.views[v].parameters(), f"stMVC {r + 1}: {name}"))
            lam, robust, _ = model.fuse(h)
            model.lam, model.robust = lam, robust
            parts.append(self._step(model, h, "collab", model.parameters(), f"stMVC {r + 1}: collaborative"))
            lam, robust, _ = model.fuse(h)
            model.lam, model.robust = lam, robust
            collab.append(parts[-1].total[-1])
            if len(collab) >= 2 and abs(collab[-1] - collab[-2]) / abs(collab[-2]) < self.tol:
                break
        self.rounds_run_ = len(collab)
        self.history_ = _concat(parts)
        return model

    def domains(self, robust) -> np.ndarray:
        """Step 7: KMeans (``n_init`` restarts, seeded) on R (N, d) with K = ``n_domains``."""
        from sklearn.cluster import KMeans

        robust = np.asarray(robust, dtype=np.float64)
        return KMeans(self.n_domains, n_init=self.n_init, random_state=self.seed).fit_predict(robust)

    def run(self, adata, reference=None):
        check_n_clusters(self.n_domains, adata.n_obs)
        y, self.classes_ = self.labels(adata)
        self.train_mask_ = None if y is None else y >= 0
        h, views = self.prepare(adata)
        self.graphs_ = views
        model = self.build_model(h, views, y, len(self.classes_))
        self.model_ = self.train_model(model, h)
        lam, robust, _ = model.fuse(h)
        self.attention_ = pd.DataFrame(lam.numpy(), index=adata.obs_names, columns=list(views))
        z = robust.numpy()
        labels = self.domains(z)
        if self.refine:
            labels = cluster.refine(labels, coords=spatial_coords(adata), k=self.refine_k)
        write_domains(adata, self.key, labels, z)
        adata.obsm["attention_stmvc"] = self.attention_
        return adata


def _concat(parts: list[History]) -> History:
    """One history of consecutive training steps; a term absent from a step is NaN there."""
    keys = list(dict.fromkeys(k for p in parts for k in p.terms))
    out = History()
    for p in parts:
        for key in keys:
            out.terms.setdefault(key, []).extend(p.terms.get(key, [math.nan] * len(p)))
        out.total.extend(p.total)
    return out
