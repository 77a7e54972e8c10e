"""SpaGCN: one graph convolution over a histology-aware spatial graph, clustered by deep embedded clustering.

Hu J, Li X, Coleman K, *et al.* SpaGCN: integrating gene expression, spatial location and histology to identify
spatial domains and spatially variable genes by graph convolutional network. *Nat Methods* 18, 1342–1351 (2021).
Official code: jianhuupenn/SpaGCN (v1.2.7); defaults below are those of its tutorial.

Pipeline (integration strategy: *graph* — histology enters as edge weights):

1. Expression: drop genes seen in fewer than 3 spots and ``MT-``/``ERCC`` genes, normalise each spot to the median
   library size, ``log1p``, PCA to 50 components: :math:`X \\in \\mathbb{R}^{N \\times 50}`.
2. Histology: the mean colour of a :math:`b \\times b` window (b = 49 pixels of the image used) around each spot,
   collapsed to one value and scaled by ``s`` into a third coordinate :math:`z_i`
   (:func:`stcore.images.colour_coordinate`).
3. Graph: :math:`w_{ij} = \\exp(-d_{ij}^2 / 2l^2)` with :math:`d_{ij}` the distance in :math:`(x, y, z)`,
   :math:`w_{ii} = 1`, and ``l`` chosen so that neighbours add ``p = 0.5`` to each spot's weight on average.
4. Model: :math:`H = W X \\Theta + b` (one layer, no normalisation, no activation) and a DEC head with centroids
   :math:`\\mu_k`: :math:`q_{ik} \\propto (1 + \\lVert h_i - \\mu_k \\rVert^2 / \\alpha)^{-(\\alpha + 1)}`,
   target :math:`p_{ik} \\propto q_{ik}^2 / \\sum_i q_{ik}`, loss :math:`\\operatorname{mean}_i \\mathrm{KL}(p_i \\Vert q_i)`.
   Centroids start at the means of a Louvain clustering of the untrained :math:`H`; the Louvain resolution is
   searched (start 0.7, step 0.1, 20 epochs per trial) until training ends with ``n_domains`` clusters.
5. Train :math:`\\Theta, b` with Adam (lr 0.05) for at most 200 epochs, refreshing :math:`p` every 3 epochs and
   stopping when fewer than 0.5 % of the labels change; the centroids stay where the Louvain initialisation put
   them, as in the official code (its centroid parameter is created after the optimiser, so the optimiser never
   updates it; standard DEC also trains them: ``train_centroids=True``). Optionally refine labels by a majority
   vote over the 6 nearest spots.

Deliberate deviations from the official code
---------------------------------------------
* **Sparse graph.** The official code builds the dense :math:`N \\times N` kernel (6 GiB at 20k spots). Here the
  kernel is truncated where :math:`w_{ij} < 10^{-4}` (:func:`stcore.graphs.gaussian_kernel_graph`), and ``l`` is
  searched on each spot's nearest neighbours (:func:`stcore.graphs.search_bandwidth`); memory is O(N k).
* **Louvain.** The official initialisation calls ``scanpy.pp.neighbors`` (UMAP-weighted 10-NN graph) and the
  ``louvain`` package. :func:`stcore.cluster.louvain` rebuilds both (the same UMAP weights, the same local-moving
  and aggregation algorithm, with ``leidenalg``'s optimiser), but its random node order differs, so a given seed
  does not reproduce the official partition. This part matters: igraph's multilevel Louvain on a binary graph,
  used in an earlier version, lost about 0.05 ARI on DLPFC 151673.
* **DEC kernel.** The official code raises the Student-t kernel to the power :math:`\\alpha + 1` (standard DEC
  uses :math:`(\\alpha + 1)/2`); this is kept, since it changes the clustering.
* The full-resolution image is rarely available; the best image in ``uns["spatial"]`` is used with its scale
  factor. As in the official code, which reads ``b`` in the pixels of whatever image it is given, the window is
  ``b`` pixels *of that image*: on DLPFC's 600-pixel low-resolution image, 49 pixels span about 11 spots.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import cluster, graphs, images, preprocess
from ..train import fit, set_seed
from ..validation import check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import write_domains

__all__ = ["SpaGCN", "SpaGCNModel", "spagcn_expression"]


def spagcn_expression(adata, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """SpaGCN's expression features (N, n_pcs): filter genes, median-normalise, log1p, PCA (step 1)."""
    counts = counts_matrix(adata)
    symbols = adata.var["symbol"].astype(str) if "symbol" in adata.var else adata.var_names.astype(str)
    detected = np.asarray((counts > 0).sum(0)).ravel() >= 3
    special = symbols.str.upper().str.startswith(("MT-", "ERCC")) | adata.var_names.str.upper().str.startswith(
        ("MT-", "ERCC"))
    kept = adata[:, detected & ~np.asarray(special)]
    return np.ascontiguousarray(preprocess.pca(preprocess.log_normalize(kept, target_sum=None).X, n_pcs, seed=seed))


class SpaGCNModel(nn.Module):
    """One graph convolution :math:`H = W X \\Theta + b` and the DEC clustering head (step 4)."""

    def __init__(self, n_in: int, n_hidden: int, adjacency: torch.Tensor, *, alpha: float = 0.2,
                 update_interval: int = 3):
        super().__init__()
        self.linear = nn.Linear(n_in, n_hidden)
        self.register_buffer("adjacency", adjacency)  # sparse (N, N): W
        self.alpha, self.update_interval = alpha, update_interval
        self.mu = nn.Parameter(torch.zeros(1, n_hidden))
        self.steps, self.target, self.labels = 0, None, None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_in) -> (N, n_hidden). ``nn.Linear`` computes XΘ + b; W is applied to XΘ before the bias."""
        return torch.sparse.mm(self.adjacency, x @ self.linear.weight.T) + self.linear.bias

    def soft_assign(self, h: torch.Tensor) -> torch.Tensor:
        """(N, K) Student-t assignments with the official exponent α + 1."""
        q = 1.0 / (1.0 + torch.cdist(h, self.mu) ** 2 / self.alpha + 1e-8)
        q = q ** (self.alpha + 1.0) / 2.0
        return q / q.sum(1, keepdim=True)

    def init_centroids(self, x: torch.Tensor, labels: np.ndarray) -> None:
        """Centroids = mean untrained embedding of each initial cluster."""
        with torch.no_grad():
            h = self.embed(x)
            codes = torch.as_tensor(np.unique(labels, return_inverse=True)[1].ravel())
            k = int(codes.max()) + 1
            sums = torch.zeros(k, h.shape[1]).index_add_(0, codes, h)
            self.mu = nn.Parameter(sums / torch.bincount(codes, minlength=k)[:, None].float())
        self.steps, self.target, self.labels = 0, None, labels

    def loss(self, x: torch.Tensor) -> dict:
        q = self.soft_assign(self.embed(x))
        if self.steps % self.update_interval == 0:  # refresh the target distribution P
            weight = q.detach() ** 2 / q.detach().sum(0)
            self.target = weight / weight.sum(1, keepdim=True)
        self.steps += 1
        self.labels = q.detach().argmax(1).numpy()  # labels before this step: the official stopping check uses them
        p = self.target
        return {"kl": (p * torch.log(p / (q + 1e-6))).sum(1).mean()}


@register
class SpaGCN(Method):
    """SpaGCN (Hu et al. 2021): graph convolution on a histology-weighted spatial graph + DEC clustering.

    Options follow the official tutorial: ``s`` (histology scale, α in the paper), ``b`` (colour window, in pixels
    of the image used), ``p`` (neighbour contribution), ``lr``, ``epochs``, ``tol``, ``seed`` (100 in the
    tutorial). With ``histology=False`` the graph uses the spot positions only. ``resolution`` skips the resolution
    search. ``train_centroids=True`` lets the optimiser move the DEC centroids (standard DEC; the official code
    keeps them fixed).
    """

    name = "spagcn"
    task = "domains"
    summary = "GCN on histology-weighted graph + DEC"
    paper = "Hu et al., Nat Methods 2021"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, s: float = 1.0, b: float = 49,
                 p: float = 0.5, n_pcs: int = 50, lr: float = 0.05, epochs: int = 200, tol: float = 5e-3,
                 alpha: float = 0.2, n_neighbors: int = 10, resolution: float | None = None,
                 search_start: float = 0.7, search_step: float = 0.1, search_epochs: int = 20,
                 refine: bool = False, refine_k: int = 6, seed: int = 100, library_id: str | None = None,
                 train_centroids: bool = False, progress: bool = True):
        if n_domains is None and resolution is None:
            raise ValueError("Give n_domains (the resolution is then searched) or a Louvain resolution.")
        self.n_domains, self.histology, self.s, self.b, self.p = n_domains, histology, s, b, p
        self.n_pcs, self.lr, self.epochs, self.tol, self.alpha = n_pcs, lr, epochs, tol, alpha
        self.n_neighbors, self.resolution = n_neighbors, resolution
        self.search_start, self.search_step, self.search_epochs = search_start, search_step, search_epochs
        self.refine, self.refine_k, self.seed, self.library_id = refine, refine_k, seed, library_id
        self.train_centroids, self.progress = train_centroids, progress

    # -- steps 2-3 -------------------------------------------------------------------------------------------
    def graph_points(self, adata) -> np.ndarray:
        """(N, 2) spot pixels, or (N, 3) with the histology coordinate ``z``."""
        xy = spatial_coords(adata)
        if not self.histology:
            return xy
        image, scale = images.image_and_scale(adata, self.library_id, resolution=None)
        z = images.colour_coordinate(image, xy, scale, beta=self.b / scale, alpha=self.s)  # b image pixels
        return np.column_stack([xy, z])

    def adjacency(self, points: np.ndarray) -> tuple[torch.Tensor, float]:
        """Sparse W (N, N) and the kernel width l."""
        l = graphs.search_bandwidth(points, self.p)
        edge_index, weight = graphs.gaussian_kernel_graph(points, l)
        n = points.shape[0]
        w = torch.sparse_coo_tensor(edge_index.flip(0), weight, (n, n), check_invariants=False).coalesce()
        return w, l

    # -- steps 4-5 -------------------------------------------------------------------------------------------
    def _train(self, model: SpaGCNModel, x: torch.Tensor, resolution: float, epochs: int, progress: bool):
        set_seed(self.seed)
        bound = 1.0 / np.sqrt(model.linear.out_features)  # the official layer's U(-1/sqrt(d), 1/sqrt(d)) init,
        nn.init.uniform_(model.linear.weight, -bound, bound)  # drawn afresh for every trial as the official
        nn.init.uniform_(model.linear.bias, -bound, bound)  # code builds a new model each time
        with torch.no_grad():
            h0 = model.embed(x).numpy()
        init = cluster.louvain(h0, resolution=resolution, seed=self.seed, n_neighbors=self.n_neighbors)
        model.init_centroids(x, init)
        previous = {"labels": init}

        def converged(epoch, terms):
            changed = float(np.mean(model.labels != previous["labels"]))
            previous["labels"] = model.labels
            return epoch > 0 and (epoch - 1) % model.update_interval == 0 and changed < self.tol

        trained = [p for name, p in model.named_parameters() if self.train_centroids or name != "mu"]
        optimizer = torch.optim.Adam(trained, lr=self.lr)
        history = fit(model, x, epochs=epochs, optimizer=optimizer, callback=converged, progress=progress,
                      desc="SpaGCN")
        with torch.no_grad():
            labels = model.soft_assign(model.embed(x)).argmax(1).numpy()
        return labels, history

    def search_resolution(self, model: SpaGCNModel, x: torch.Tensor, max_run: int = 10) -> float:
        """The official stepping search: move by ``step`` towards K clusters, halving the step on overshoot."""
        res, step = self.search_start, self.search_step
        n_found = len(np.unique(self._train(model, x, res, self.search_epochs, False)[0]))
        for _ in range(max_run + 1):
            if n_found == self.n_domains:
                break
            sign = 1 if n_found < self.n_domains else -1
            candidate = max(res + step * sign, 1e-3)
            n_new = len(np.unique(self._train(model, x, candidate, self.search_epochs, False)[0]))
            if n_new == self.n_domains:
                return candidate
            if (1 if n_new < self.n_domains else -1) == sign:
                res, n_found = candidate, n_new
            else:
                step /= 2
        return res

    def run(self, adata, reference=None):
        if self.n_domains is not None:
            check_n_clusters(self.n_domains, adata.n_obs)
        x = torch.as_tensor(spagcn_expression(adata, self.n_pcs, seed=0), dtype=torch.float32)
        w, self.l_ = self.adjacency(self.graph_points(adata))
        model = SpaGCNModel(x.shape[1], x.shape[1], w, alpha=self.alpha)
        self.resolution_ = self.resolution if self.resolution is not None else self.search_resolution(model, x)
        labels, self.history_ = self._train(model, x, self.resolution_, self.epochs, self.progress)
        with torch.no_grad():
            embedding = model.embed(x).numpy()
        if self.refine:
            labels = cluster.refine(labels, coords=spatial_coords(adata), k=self.refine_k)
        write_domains(adata, self.key, labels, embedding)
        return adata

