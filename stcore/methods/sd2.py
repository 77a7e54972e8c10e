r"""SD²: deconvolution with a GCN on pseudo-spots and real spots, using dropout-based genes and a spatial graph.

Li H, Li H, Zhou J, Gao X. SD2: spatially resolved transcriptomics deconvolution through integration of dropout and
spatial information. *Bioinformatics* 38(21):4878-4884 (2022). doi:10.1093/bioinformatics/btac605.
Official code: leihouyeung/SD2 (R preprocessing ``SD2_utiles.R`` + TensorFlow 1/Keras ``gutils.py``, ``graph.py``,
``utils.py``, ``models.py``, ``train.py``).

SD² is DSTG (:mod:`stcore.methods.dstg`) with three changes: the genes are the union of **dropout-based genes**
(M3Drop) and the ANOVA genes; the pseudo↔real link graph is built in the 50-d code of an **autoencoder** instead of
a CCA space; and real spots are also linked to their **nearest spatial neighbour**. The GCN has one layer. Every
step that DSTG already has is imported from :mod:`stcore.methods.dstg`.

Integration strategy: *graph* — labelled pseudo-spots and unlabelled real spots are nodes of one graph whose edges
come from expression (pseudo↔real) and from the tissue (real↔real).

Pipeline
--------
1. **Genes.** Genes shared by the spots and the reference. The union of

   * the M3Drop dropout genes of the reference (:func:`m3drop_genes`, ``M3DropFeatureSelection`` on
     ``M3DropConvertData(counts)``, which with its defaults keeps the raw counts): for each gene the mean
     :math:`s_g` and the dropout rate :math:`p_g` (fraction of zero counts) over cells; the Michaelis–Menten
     curve :math:`p = K / (K + s)` is fitted by maximum likelihood with Gaussian residuals (= least squares in
     :math:`K`, :func:`fit_michaelis_menten`); each gene's own constant :math:`K_g = p_g s_g / (1 - p_g)` is
     compared with :math:`K` on the log scale,

     .. math:: Z_g = \frac{\log K_g - \log K}{\sqrt{\sigma_{\log K_g}^2 + \sigma_{\log K}^2}},
               \qquad \text{p-value} = 1 - \Phi(Z_g),

     with :math:`\sigma_{K_g}` propagated from the standard errors of :math:`s_g` and :math:`p_g`,
     :math:`\sigma_{\log K_g} = |\log(K_g - \sigma_{K_g}) - \log K_g|` and
     :math:`\sigma_{\log K} = \mathrm{sd}_g(\log K_g - \log K) / \sqrt{G}`. A one-sided test: genes with
     *more* dropouts than their mean predicts, Bonferroni-adjusted p < 0.05 (M3Drop's defaults);
   * the ``n_genes = 2000`` genes with the smallest one-way ANOVA p-value across reference cell types
     (:func:`stcore.methods.dstg.anova_genes`).
2. **Pseudo-spots**: ``n_pseudo = 1000`` SPOTlight spots of ``U{2..10}`` random cells
   (:func:`stcore.methods.dstg.mix_pseudo_spots`).
3. **Normalisation** per dataset: log CP10k and Seurat ``ScaleData`` on all selected genes
   (:func:`~stcore.methods.dstg.log_normalize`, :func:`~stcore.methods.dstg.scale_data`).
4. **Inter graph (pseudo↔real).** An autoencoder (:class:`SD2Autoencoder`) on the scaled pseudo-spots and real
   spots stacked, :math:`G \to d/2{+}50 \to d/4{+}50 \to d/8{+}50 \to 50` (ReLU, linear code, :math:`d = G - 50`),
   a mirrored decoder with a tanh output, MSE, Adam (1e-3), 5 epochs of mini-batches of 200. In the 50-d code a
   pseudo-spot :math:`i` and a real spot :math:`j` are linked when they are mutual nearest neighbours within the
   top ``k_mnn = 5`` (Euclidean) and :math:`j` is among the ``k_filter = 50`` nearest real spots of :math:`i` in
   L2-normalised log expression of the selected genes (:func:`inter_pairs`).
5. **Intra graph (real↔real)**: each real spot is linked to its single nearest spatial neighbour
   (``RANN::nn2`` with ``k = 2``; :func:`spatial_pairs`).
6. **Propagation matrix** :math:`\hat A = D^{-1/2}(A + 2I)D^{-1/2}` over both graphs
   (:func:`stcore.methods.dstg.dstg_graph`).
7. **Model** (:class:`SD2Model`): one GCN layer without bias on row-normalised counts,
   :math:`\hat y = \mathrm{softmax}(\hat A X W)`; soft-label cross-entropy
   (:func:`stcore.methods.dstg.soft_cross_entropy`) on 90 % of the pseudo-spots, the other 10 % validate.
8. **Training**: Adam, ``lr = 0.1``, ``epochs = 100``; stop when the validation loss exceeds the mean of the
   previous ``early_stopping = 50`` epochs (:func:`stcore.methods.dstg.early_stop`).

Shapes: ``N = n_pseudo + n_spots`` nodes (pseudo-spots first), ``G`` selected genes, ``C`` cell types;
X (N, G) · code (N, 50) · edge_index (2, E) · W (G, C) · Z (N, C).

Deliberate deviations from the official code
--------------------------------------------
* **The official code does not run as shipped**, and its versions disagree, so this follows the paper and the
  reference description of the repository. ``models.py`` needs TensorFlow 1 (``tf.app.flags``); the stored
  ``gutils.Link_graph`` (commit e020380) calls a 3-dimensional CCA (``Embed(num_cc=3)``, kNN 100,
  ``k_filter = 200``) with the autoencoder call commented out; ``graph.py`` never writes the real↔real graph and
  ``utils.load_data`` has the lines that would load it commented out (``SD2.R`` does write the nearest-spot
  indices, ``mindis_cell_indices.csv``, and ``train.py``'s hard-coded ``mode='pseudo'`` reads a
  ``Linked_graph2.csv`` nothing produces). Here the paper's pipeline is run: autoencoder code, kNN/MNN,
  ``k_filter = 50``, and the **1-nearest-spatial-neighbour graph is actually used** (``spatial_links=False``
  gives the official code's effective graph, pseudo↔real edges only).
* **Where the paper's wording and the code differ, the code is followed**: dropout genes are selected on the
  scRNA-seq reference only (the abstract says "from ST and scRNA-seq data"), and the GCN's node features are the
  row-normalised counts, not the autoencoder code (the autoencoder only places the pseudo↔real edges).
* **MNN search.** The official code searches ``k = 50`` neighbours but tests mutuality within the first 5, which
  gives the pairs of :func:`stcore.graphs.mutual_nn` with ``k = 5`` (up to distance ties); no ``k = 50`` option.
  The code is not L2-normalised before the search (the code comment says the autoencoder replaces both the CCA
  and its L2 normalisation).
* **M3Drop in Python.** ``bbmle::mle2`` (BFGS from ``K = 3``) is replaced by a bounded least-squares fit of
  :math:`K` (the same maximum: with Gaussian residuals the likelihood in :math:`K` is the residual sum of
  squares); the test statistic is M3Drop's ``bg__test_DE_K_equiv`` and Bonferroni is ``p.adjust(method="bon")``
  over the detected genes. ``mt_method="fdr"`` (Benjamini–Hochberg) is offered too.
* **Keras → PyTorch.** The autoencoder layers are :class:`stcore.nn.MLP` with Glorot-uniform weights and zero
  biases (Keras' initialisers); Adam epsilon is PyTorch's 1e-8 (Keras 1e-7). Mini-batches are shuffled by a
  generator seeded with ``seed``.
* **Seeds, split, sparsity, options** as in :mod:`stcore.methods.dstg`: one ``seed`` drives the pseudo-spots,
  the 90/10 split (official ``random_state=1``), the autoencoder and the GCN; the adjacency is an ``edge_index``
  with normalised weights (official: a dense identity matrix turned into networkx); dropout and weight decay are
  0 as in DSTG's defaults (the official flags file is not in the repository). When fewer than ``n_genes`` genes
  are shared all are ANOVA genes. Spots without ``obsm["spatial"]`` need ``spatial_links=False``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import optimize, sparse, stats
from torch import nn

from .. import graphs
from ..nn import MLP, GCNStack
from ..train import fit, set_seed
from ..validation import counts_matrix, reference_cell_types, shared_genes, spatial_coords
from . import register
from ._common import write_frame
from .dstg import (DSTG, DSTGModel, _l2_rows, anova_genes, dstg_graph, filter_pairs, log_normalize,
                   mix_pseudo_spots, scale_data)

__all__ = [
    "SD2",
    "SD2Autoencoder",
    "SD2Model",
    "dropout_stats",
    "fit_michaelis_menten",
    "inter_pairs",
    "m3drop_genes",
    "m3drop_test",
    "spatial_pairs",
    "train_autoencoder",
]


# ----------------------------------------------------------------------------------------- step 1: M3Drop
def dropout_stats(counts) -> dict[str, np.ndarray]:
    """Per-gene mean ``s``, dropout rate ``p`` (fraction of zeros) and their standard errors over cells.

    ``counts`` (n_cells, G). As M3Drop's ``bg__calc_variables``: ``s_stderr = sqrt((mean(x^2) - s^2) / n)``,
    ``p_stderr = sqrt(p (1 - p) / n)``.
    """
    X = sparse.csr_matrix(counts, dtype=np.float64)
    n = X.shape[0]
    s = np.asarray(X.mean(0)).ravel()
    s2 = np.asarray(X.multiply(X).mean(0)).ravel()
    p = 1.0 - np.bincount(X.indices[X.data > 0], minlength=X.shape[1]) / n
    return {"s": s, "p": p, "s_stderr": np.sqrt(np.maximum(s2 - s**2, 0.0) / n),
            "p_stderr": np.sqrt(p * (1 - p) / n)}


def fit_michaelis_menten(p: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    r"""Maximum-likelihood fit of :math:`p = K / (K + s)` with Gaussian residuals (M3Drop's ``bg__fit_MM``).

    For fixed :math:`K` the likelihood is maximised by :math:`\sigma^2 = \overline{r^2}`, so :math:`\hat K`
    minimises the residual sum of squares. Returns ``(K, sigma)``.
    """
    p, s = np.asarray(p, float), np.asarray(s, float)
    res = optimize.least_squares(lambda k: p - k[0] / (k[0] + s), x0=[3.0], bounds=([1e-12], [np.inf]),
                                 xtol=1e-12, ftol=1e-12, gtol=1e-12)
    K = float(res.x[0])
    return K, float(np.sqrt(np.mean((p - K / (K + s)) ** 2)))


def m3drop_test(stats_: dict[str, np.ndarray], K: float) -> np.ndarray:
    r"""One-sided p-values of "more dropouts than the fitted curve" (M3Drop's ``bg__test_DE_K_equiv``).

    :math:`K_g = p_g s_g / (1 - p_g)`; genes never at zero (:math:`p_g = 0`) get p-value 1.
    """
    p = stats_["p"].astype(float).copy()
    always = p == 0
    if always.all():
        return np.ones_like(p)
    p[always] = p[~always].min() / 2
    s, s_err, p_err = stats_["s"], stats_["s_stderr"], stats_["p_stderr"]
    with np.errstate(divide="ignore", invalid="ignore"):
        K_g = p * s / (1 - p)
        K_g_err = np.abs(K_g) * np.sqrt((s_err / s) ** 2 + (p_err / p) ** 2)
        log_K_g = np.log(K_g)
        lower = np.where(K_g - K_g_err > 0, K_g - K_g_err, 1e-100)
        err_log = np.abs(np.log(lower) - log_K_g)
        err_log[K_g - K_g_err <= 0] = 1e10
        err_K = np.std(log_K_g - np.log(K), ddof=1) / np.sqrt(len(log_K_g))
        z = (log_K_g - np.log(K)) / np.sqrt(err_log**2 + err_K**2)
    pval = stats.norm.sf(z)
    pval[always] = 1.0
    return np.where(np.isfinite(pval), pval, 1.0)


def m3drop_genes(counts, *, mt_method: str = "bon", mt_threshold: float = 0.05) -> tuple[np.ndarray, pd.DataFrame]:
    """Dropout-based genes of ``counts`` (n_cells, G), as ``M3DropFeatureSelection(M3DropConvertData(counts))``.

    Genes never detected are left out of the test (and of the multiple-testing count). ``mt_method`` is
    ``"bon"`` (Bonferroni, M3Drop's default) or ``"fdr"`` (Benjamini–Hochberg).

    Returns
    -------
    index : sorted column indices of the selected genes;
    table : DataFrame over the detected genes with ``s``, ``p``, ``K_gene``, ``p_value``, ``q_value``,
        ``selected``; ``table.attrs["K"]`` is the fitted constant.
    """
    st = dropout_stats(counts)
    detected = np.flatnonzero(st["p"] < 1)
    if len(detected) < 2:
        raise ValueError(f"Only {len(detected)} genes are detected in the reference; M3Drop needs at least 2.")
    st = {k: v[detected] for k, v in st.items()}
    K, sigma = fit_michaelis_menten(st["p"], st["s"])
    pval = m3drop_test(st, K)
    if mt_method == "bon":
        q = np.minimum(pval * len(pval), 1.0)
    elif mt_method == "fdr":
        q = stats.false_discovery_control(pval)
    else:
        raise ValueError(f"mt_method={mt_method!r}: use 'bon' (Bonferroni) or 'fdr' (Benjamini-Hochberg).")
    with np.errstate(divide="ignore", invalid="ignore"):
        K_gene = st["p"] * st["s"] / (1 - st["p"])
    table = pd.DataFrame({"s": st["s"], "p": st["p"], "K_gene": K_gene, "p_value": pval, "q_value": q,
                          "selected": q < mt_threshold}, index=detected)
    table.attrs.update(K=K, sigma=sigma)
    return detected[q < mt_threshold], table


# ------------------------------------------------------------------------------------ step 4: autoencoder
class SD2Autoencoder(nn.Module):
    r"""The official Keras autoencoder: ``G -> d/2+50 -> d/4+50 -> d/8+50 -> 50 -> ... -> G`` with
    :math:`d = G - 50`, ReLU hidden layers, a linear code and a tanh output; loss = mean squared error.

    Weights are Glorot-uniform and biases zero, as Keras initialises ``Dense``. ``x`` (n, G) -> code (n, n_latent).
    """

    def __init__(self, n_genes: int, n_latent: int = 50):
        super().__init__()
        d = n_genes - n_latent
        hidden = [max(1, round(d / f) + n_latent) for f in (2, 4, 8)]
        self.encoder = MLP([n_genes, *hidden, n_latent], activation="relu")
        self.decoder = MLP([n_latent, *hidden[::-1], n_genes], activation="relu")
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(self.encoder(x)))

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": F.mse_loss(self(x), x)}


def train_autoencoder(S: np.ndarray, *, n_latent: int = 50, epochs: int = 5, batch_size: int = 200,
                      lr: float = 1e-3, seed: int = 0, progress: bool = False):
    """Fit :class:`SD2Autoencoder` on ``S`` (n, G) (shuffled mini-batches) and return ``(code (n, n_latent),
    model, history)``."""
    set_seed(seed)
    X = torch.tensor(np.asarray(S), dtype=torch.float32)
    model = SD2Autoencoder(X.shape[1], n_latent)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        order = torch.randperm(X.shape[0], generator=gen)
        return [X[order[i:i + batch_size]] for i in range(0, X.shape[0], batch_size)]

    history = fit(model, batches, epochs=epochs, lr=lr, progress=progress, desc="SD2 autoencoder")
    model.eval()
    with torch.no_grad():
        code = model.encoder(X).numpy()
    return code, model, history


# --------------------------------------------------------------------------------------- steps 4-5: graphs
def inter_pairs(code_p: np.ndarray, code_r: np.ndarray, norm_p: np.ndarray, norm_r: np.ndarray, *,
                k_mnn: int = 5, k_filter: int = 50) -> tuple[np.ndarray, int]:
    """Pseudo↔real pairs: mutual nearest neighbours within the top ``k_mnn`` in the autoencoder code (Euclidean),
    kept when the real spot is among the ``k_filter`` nearest real spots of the pseudo-spot in L2-normalised log
    expression (:func:`stcore.methods.dstg.filter_pairs`).

    Returns ``(pairs (2, P), number of mutual pairs before the filter)``; row 0 indexes pseudo-spots.
    """
    pairs = graphs.mutual_nn(code_p, code_r, k=k_mnn, metric="euclidean").numpy()
    keep = filter_pairs(pairs, _l2_rows(np.asarray(norm_p, float)), _l2_rows(np.asarray(norm_r, float)), k_filter)
    return pairs[:, keep], int(pairs.shape[1])


def spatial_pairs(coords) -> np.ndarray:
    """Each spot and its single nearest spatial neighbour, ``(2, n)`` pairs ``(i, nn(i))`` (``RANN::nn2``,
    ``k = 2`` with the spot itself first). Duplicate positions count as neighbours at distance 0."""
    coords = np.asarray(coords, dtype=float)
    if coords.shape[0] < 2:
        return np.zeros((2, 0), dtype=np.int64)
    from scipy.spatial import cKDTree

    _, idx = cKDTree(coords).query(coords, k=2)
    i = np.arange(coords.shape[0])
    nn_ = np.where(idx[:, 0] == i, idx[:, 1], idx[:, 0])  # ties at distance 0 may list another spot first
    return np.stack([i, nn_]).astype(np.int64)


# -------------------------------------------------------------------------------------------- steps 7-8
class SD2Model(DSTGModel):
    r"""One bias-free GCN layer, ``X (N, G) -> Z = \hat A X W (N, C)``, on a pre-normalised graph.

    Same ``data`` dict, forward (dropout on the input) and soft-label loss as
    :class:`stcore.methods.dstg.DSTGModel`; only the depth differs (the official ``models.SD2`` keeps the
    second layer and comments out the hidden one).
    """

    def __init__(self, n_genes: int, n_types: int, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.dropout = float(dropout)
        self.gcn = GCNStack([n_genes, n_types], dropout=dropout, bias=False, normalize=False)


@register
class SD2(DSTG):
    """SD² (Li et al. 2022): DSTG with dropout-based genes, an autoencoder link graph and a spatial graph.

    Options (official defaults): ``n_genes`` ANOVA genes (2000), ``m3drop`` (add the M3Drop dropout genes, True),
    ``mt_method`` ("bon") and ``mt_threshold`` (0.05) of the M3Drop test, ``n_pseudo`` (1000),
    ``cells_per_spot`` ((2, 10)), ``n_latent`` autoencoder code size (50), ``ae_epochs`` (5), ``ae_batch_size``
    (200), ``ae_lr`` (0.001), ``k_mnn`` (5), ``k_filter`` (50), ``spatial_links`` (the 1-nearest-neighbour
    real↔real graph, True), ``self_loop_weight`` (2), ``dropout`` (0), ``lr`` (0.1), ``epochs`` (100),
    ``weight_decay`` (0), ``early_stopping`` (50; 0 disables it), ``spatial_key`` ("spatial"). The result is
    ``obsm["proportions_sd2"]``; ``uns["sd2"]`` keeps the genes, graph sizes, the validation loss and the RMSE on
    the held-out pseudo-spots.
    """

    name = "sd2"
    task = "deconv"
    summary = "GCN on pseudo-spots + spots linked by an autoencoder MNN graph and spatial neighbours"
    paper = "Li, Li, Zhou & Gao, Bioinformatics 2022"
    needs_reference = True

    def __init__(self, *, n_genes: int = 2000, m3drop: bool = True, mt_method: str = "bon",
                 mt_threshold: float = 0.05, n_pseudo: int = 1000, cells_per_spot: tuple[int, int] = (2, 10),
                 n_latent: int = 50, ae_epochs: int = 5, ae_batch_size: int = 200, ae_lr: float = 1e-3,
                 k_mnn: int = 5, k_filter: int = 50, spatial_links: bool = True, self_loop_weight: float = 2.0,
                 dropout: float = 0.0, lr: float = 0.1, epochs: int = 100, weight_decay: float = 0.0,
                 early_stopping: int = 50, spatial_key: str = "spatial", cell_type_key: str = "cell_type",
                 seed: int = 0, progress: bool = True):
        for name, value, low in [("n_genes", n_genes, 2), ("n_pseudo", n_pseudo, 10), ("n_latent", n_latent, 1),
                                 ("ae_epochs", ae_epochs, 1), ("ae_batch_size", ae_batch_size, 1),
                                 ("k_mnn", k_mnn, 1), ("k_filter", k_filter, 1), ("epochs", epochs, 1),
                                 ("early_stopping", early_stopping, 0)]:
            if int(value) != value or value < low:
                raise ValueError(f"{name}={value} must be an integer >= {low} (official defaults: "
                                 "help(stcore.methods.sd2.SD2)).")
        cps = tuple(cells_per_spot) if np.ndim(cells_per_spot) else (cells_per_spot, cells_per_spot)
        if len(cps) != 2 or not 1 <= cps[0] <= cps[1]:
            raise ValueError(f"cells_per_spot={cells_per_spot}: give (low, high) with 1 <= low <= high "
                             "(official (2, 10)).")
        if mt_method not in ("bon", "fdr"):
            raise ValueError(f"mt_method={mt_method!r}: use 'bon' (Bonferroni, official) or 'fdr'.")
        if not 0 < mt_threshold <= 1:
            raise ValueError(f"mt_threshold={mt_threshold} must lie in (0, 1] (official 0.05).")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout} must lie in [0, 1) (official 0).")
        if not lr > 0 or not ae_lr > 0 or weight_decay < 0 or not self_loop_weight > 0:
            raise ValueError(f"lr={lr}, ae_lr={ae_lr} and self_loop_weight={self_loop_weight} must be positive "
                             f"and weight_decay={weight_decay} non-negative (official 0.1, 0.001, 2 and 0).")
        self.n_genes, self.m3drop, self.mt_method, self.mt_threshold = n_genes, bool(m3drop), mt_method, mt_threshold
        self.n_pseudo, self.cells_per_spot = n_pseudo, cps
        self.n_latent, self.ae_epochs, self.ae_batch_size, self.ae_lr = n_latent, ae_epochs, ae_batch_size, ae_lr
        self.k_mnn, self.k_filter, self.spatial_links = k_mnn, k_filter, bool(spatial_links)
        self.self_loop_weight, self.dropout, self.lr, self.epochs = self_loop_weight, dropout, lr, epochs
        self.weight_decay, self.early_stopping, self.spatial_key = weight_decay, early_stopping, spatial_key
        self.cell_type_key, self.seed, self.progress = cell_type_key, seed, progress

    # -- steps 1-3 ------------------------------------------------------------------------------------------
    def prepare(self, adata, reference) -> dict:
        """Validate the inputs, select dropout + ANOVA genes, mix pseudo-spots and normalise. Returns a dict."""
        self._check_reference(reference)
        genes = shared_genes(adata, reference, min_genes=2)
        labels, types = reference_cell_types(reference, self.cell_type_key)
        coords = spatial_coords(adata, self.spatial_key) if self.spatial_links else None
        codes = pd.Categorical(labels, categories=types).codes
        ref = sparse.csr_matrix(counts_matrix(reference[:, genes]), dtype=np.float64)
        spots = sparse.csr_matrix(counts_matrix(adata[:, genes]), dtype=np.float64)
        empty = np.asarray(spots.sum(1)).ravel() <= 0
        if empty.any():
            raise ValueError(f"{int(empty.sum())} spots have no counts on the {len(genes)} genes shared with the "
                             "reference; remove them first (e.g. sc.pp.filter_cells(adata, min_counts=1)).")
        hvg = anova_genes(ref, codes, self.n_genes)
        drop, table = (m3drop_genes(ref, mt_method=self.mt_method, mt_threshold=self.mt_threshold)
                       if self.m3drop else (np.zeros(0, np.int64), None))
        sel = np.union1d(drop, hvg)
        pseudo, props = mix_pseudo_spots(ref[:, sel], codes, len(types), self.n_pseudo, self.cells_per_spot,
                                         seed=self.seed)
        real = sparse.csr_matrix(spots[:, sel], dtype=np.float32)
        norm_p, norm_r = log_normalize(pseudo), log_normalize(real)
        return {"genes": genes[sel], "types": types, "pseudo": pseudo, "props": props, "real": real,
                "norm_pseudo": norm_p, "norm_real": norm_r, "scaled_pseudo": scale_data(norm_p),
                "scaled_real": scale_data(norm_r), "coords": coords, "dropout_genes": genes[drop],
                "anova_genes": genes[hvg], "m3drop_table": table}

    # -- steps 4-6 ------------------------------------------------------------------------------------------
    def build_graph(self, prep: dict) -> dict:
        """Autoencoder code, pseudo↔real MNN pairs, spatial pairs and the normalised propagation matrix."""
        S = np.vstack([prep["scaled_pseudo"], prep["scaled_real"]])
        code, ae, history = train_autoencoder(S, n_latent=self.n_latent, epochs=self.ae_epochs,
                                              batch_size=self.ae_batch_size, lr=self.ae_lr, seed=self.seed,
                                              progress=self.progress)
        n_p, n_r = prep["pseudo"].shape[0], prep["real"].shape[0]
        pr, n_mnn = inter_pairs(code[:n_p], code[n_p:], prep["norm_pseudo"], prep["norm_real"],
                                k_mnn=self.k_mnn, k_filter=self.k_filter)
        rr = spatial_pairs(prep["coords"]) if self.spatial_links else None
        edge_index, edge_weight = dstg_graph(pr, rr, n_p, n_r, self_loop_weight=self.self_loop_weight)
        return {"edge_index": edge_index, "edge_weight": edge_weight, "pseudo_real": pr, "real_real": rr,
                "code": code, "ae_history": history, "n_mnn": n_mnn}

    def tensors(self, prep: dict, graph: dict) -> dict:
        """Row-normalised counts, soft labels and the 90/10 split of the pseudo-spots (validation = test)."""
        from sklearn.model_selection import train_test_split

        X = sparse.vstack([prep["pseudo"], prep["real"]]).tocsr().astype(np.float64)
        row = np.asarray(X.sum(1)).ravel()
        X = sparse.diags(np.divide(1.0, row, out=np.zeros_like(row), where=row > 0)) @ X
        n_p, n_r = prep["pseudo"].shape[0], prep["real"].shape[0]
        y = np.vstack([prep["props"], np.zeros((n_r, prep["props"].shape[1]))])
        train, val = train_test_split(np.arange(n_p), test_size=0.1, random_state=self.seed)
        train, val = (torch.as_tensor(np.sort(a), dtype=torch.long) for a in (train, val))
        return {"x": torch.tensor(X.toarray(), dtype=torch.float32), "y": torch.tensor(y, dtype=torch.float32),
                "edge_index": graph["edge_index"], "edge_weight": graph["edge_weight"], "train": train,
                "val": val, "test": val, "real": torch.arange(n_p, n_p + n_r)}

    # -- steps 7-8 ------------------------------------------------------------------------------------------
    def build_model(self, data: dict) -> SD2Model:
        """The untrained one-layer GCN (training: :meth:`DSTG.train_model`, window ``early_stopping``)."""
        return SD2Model(data["x"].shape[1], data["y"].shape[1], self.dropout)

    def run(self, adata, reference=None):
        prep = self.prepare(adata, reference)
        graph = self.build_graph(prep)
        data = self.tensors(prep, graph)
        model = self.train_model(data)
        P = self.predict(model, data)
        write_frame(adata, f"proportions_{self.key}", P[data["real"].numpy()], prep["types"])
        test = data["test"].numpy()
        adata.uns[self.key] = {
            "genes": np.asarray(prep["genes"], str), "dropout_genes": np.asarray(prep["dropout_genes"], str),
            "n_anova_genes": len(prep["anova_genes"]),
            "n_pseudo_real_edges": int(graph["pseudo_real"].shape[1]),
            "n_spatial_pairs": 0 if graph["real_real"] is None else int(graph["real_real"].shape[1]),
            "n_mnn_unfiltered": int(graph["n_mnn"]),
            "real_spots_linked": float(np.isin(np.arange(adata.n_obs), graph["pseudo_real"][1]).mean()),
            "ae_loss": np.asarray(graph["ae_history"].total), "epochs_run": len(self.history_),
            "val_loss": np.asarray(self.val_loss_),
            "pseudo_test_rmse": float(np.sqrt(((P[test] - prep["props"][test]) ** 2).mean())),
        }
        self.model_, self.prep_, self.graph_, self.data_ = model, prep, graph, data
        return adata
