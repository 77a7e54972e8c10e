r"""CellDART: cell-type proportions of spots by adversarial domain adaptation from pseudo-spots.

Bae S, Na KJ, Koh J, *et al.* CellDART: cell type inference by domain adaptation of single-cell and spatial
transcriptomic data. *Nucleic Acids Res* 50(10):e57 (2022). doi:10.1093/nar/gkac084.
Official code: mexchy1000/CellDART (``pred_cellf_celldart``, ``da_cellfraction.train``, ``utils.random_mix``);
the defaults below are those of ``pred_cellf_celldart``.

A network trained on *pseudo-spots* (mixtures of reference cells with known proportions, the **source** domain)
would be applied to *real* spots (the **target** domain), which differ from pseudo-spots by platform, capture
efficiency and cell numbers. CellDART trains the feature embedder adversarially against a domain classifier, so
that real spots land where the proportion predictor was trained. Integration strategy of the review: *link*
(the reference is linked to the spots through pseudo-spots and a shared embedding).

Pipeline
--------
1. **Normalisation.** Reference and spots are each scaled to 10,000 counts per cell/spot over all their genes
   (``normalize_total(1e4)``).
2. **Marker genes** (:func:`marker_genes`). On :math:`\log(1 + x)` of the normalised reference, scanpy's Wilcoxon
   test of each type against the rest; the top ``num_markers`` = 20 genes of each type are pooled and intersected
   with the spatial genes: :math:`G` genes.
3. **Pseudo-spots** (:func:`mix_pseudo_spots`, the official ``random_mix``). ``npseudo`` = 20,000 spots, each
   mixing ``nmix`` = 10 cells drawn uniformly with replacement, with weights :math:`w \sim U(0,1)^{n_{mix}}`
   normalised to sum 1:

   .. math:: \tilde x_s = \sum_{j=1}^{n_{mix}} w_{sj}\, x^{\text{norm}}_{c_{sj}}, \qquad
             y_s = \sum_{j=1}^{n_{mix}} w_{sj}\, e_{t(c_{sj})} \in \Delta^{C-1}.

4. **Scaling** (:func:`log_minmax`). Pseudo-spots and real spots: :math:`\log(1 + x)`, then each spot min–max
   scaled to [0, 1] (:math:`(v - \min v) / (\max v - \min v + 10^{-8})`).
5. **Networks** (:class:`CellDARTModel`). Embedder :math:`f`: Dense 1024 → BatchNorm → ELU → Dense
   ``emb_dim`` = 64 → BatchNorm → ELU. Source classifier :math:`g`: Dense :math:`C` → softmax. Domain classifier
   :math:`D`: Dense 32 → BatchNorm → ELU → Dropout 0.5 → Dense 2 → softmax. Keras defaults are kept: Glorot-uniform
   weights, zero biases, BatchNorm momentum 0.99 (PyTorch 0.01) and epsilon 1e-3, Adam epsilon 1e-7.
6. **Pre-training.** :math:`f, g` on pseudo-spots, loss :math:`\mathrm{KL}(y_s \,\|\, g(f(\tilde x_s)))` (Keras
   ``kld``, :func:`kl_loss`), Adam lr 1e-3, batches of 512, ``init_train_epoch`` = 10 epochs.
7. **Adversarial adaptation**, ``n_iterations`` = 3,000 steps, each on 512 pseudo-spots :math:`S` and 512 real
   spots :math:`T` (one batch :math:`B = S \cup T`, :math:`|B| = 1024`), domain label 0 = pseudo, 1 = real:

   (a) embedder step, Adam lr 1e-3 (:meth:`CellDARTModel.loss`):

   .. math:: L_E = \frac{1}{|B|}\sum_{i \in S} \mathrm{KL}\big(y_i \,\|\, g(f_T(\tilde x_i))\big)
             + \alpha\, \frac{1}{|B|} \sum_{i \in T} \mathrm{CE}\big(D(f_T(x_i)),\, 0\big),
             \qquad \alpha = 0.6,

       i.e. the real spots are given the *inverted* ("pseudo") domain label, so the embedder learns to fool
       :math:`D`, while the proportion loss keeps pseudo-spots predictable. :math:`D` is not updated; under ADDA
       it reads the same batch as in (b), :math:`[f_S(\tilde x_S);\, f_T(x_T)]`.
   (b) domain-classifier step, Adam lr ``alpha_lr`` × 1e-3 = 5e-3 (:meth:`CellDARTModel.discriminator_step`):

   .. math:: L_D = \frac{1}{|B|}\Big[\sum_{i \in S} \mathrm{CE}\big(D(f_S(\tilde x_i)), 0\big)
             + \sum_{i \in T} \mathrm{CE}\big(D(f_T(x_i)), 1\big)\Big].

   Only :math:`D` changes in (b) and only the embedder and classifier in (a), BatchNorm running statistics
   included. In both steps the embedders run in training mode on the whole mixed batch :math:`B` (batch
   statistics over pseudo and real spots together, as in the official ``train_on_batch`` calls).
8. **Prediction**: :math:`\hat y = g(f_T(x))` for every real spot (evaluation mode), written to
   ``obsm["proportions_celldart"]``; the embedding :math:`f_T(x)` goes to ``obsm["X_celldart"]``.

``adaptation`` chooses the embedders of step 7:

* ``"adda"`` (default, the paper's ADDA framing, Tzeng *et al.* 2017): the pre-trained embedder becomes the fixed
  **source** embedder :math:`f_S`; an untied **target** embedder :math:`f_T` starts as its copy and is the one
  trained in (a); :math:`D` compares :math:`f_S(\text{pseudo})` with :math:`f_T(\text{real})`. The paper's
  :math:`\alpha`-weighted proportion loss is kept in (a), on :math:`f_T`, so that the target embedder stays
  compatible with the classifier (which is trained with it).
* ``"shared"`` (the official code): one embedder :math:`f_S = f_T = f`; step (a) inverts the domain labels of
  *both* halves, :math:`\alpha / |B| \cdot [\sum_S \mathrm{CE}(D(f(\tilde x_i)), 1) + \sum_T \mathrm{CE}(D(f(x_i)), 0)]`.
* ``"none"``: no adversary; after pre-training the classifier gets ``n_iterations`` more source-only steps (the
  official ``enable_dann=False``).

Deliberate deviations from the official code
--------------------------------------------
* **ADDA by default.** The paper describes ADDA-style adaptation; the official code trains one shared embedder
  with GAN-style flipped labels on both domains. ``adaptation="adda"`` (default) follows the paper with an untied,
  copy-initialised target embedder and a frozen source embedder as the discriminator's reference;
  ``adaptation="shared"`` reproduces the official scheme. In both, every other default is the official one.
* **BatchNorm statistics are not mixed across steps.** The official loop restores the weights of the part that
  should not move after each step; the comment in the code says the BatchNorm running statistics escape this.
  Here each step leaves the other part's running statistics exactly as they were.
* **Fewer real spots than the batch.** The official generator draws a batch without replacement and fails when
  a domain has fewer than ``batch_size`` (512) spots; here such a domain is drawn *with* replacement (the
  100 µm MERFISH grid of the benchmark has about 320 spots).
* **Gene order.** The official code pools markers through a Python ``set`` (order changes between runs);
  here the genes keep the spatial data's order, so a seed repeats exactly.
* **Cross-entropy from logits.** The domain cross-entropy is computed from logits (log-softmax) instead of
  clipped probabilities; the KL keeps Keras' clipping to [1e-7, 1].
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import nn

from ..train import fit, set_seed
from ..validation import cell_type_labels, check_int, counts_matrix, reference_cell_types, shared_genes
from . import Method, register
from ._common import write_frame

__all__ = [
    "CellDART",
    "CellDARTModel",
    "kl_loss",
    "log_minmax",
    "marker_genes",
    "mix_pseudo_spots",
    "normalize_total",
]

_KERAS_EPS = 1e-7
ADAPTATIONS = ("adda", "shared", "none")


# ------------------------------------------------------------------------------------------------ preprocessing
def normalize_total(X, target_sum: float = 1e4) -> np.ndarray:
    """Scale each row of a count matrix (n, G) to sum ``target_sum`` (rows of zeros stay zero), as a dense float32
    array (scanpy ``normalize_total``)."""
    X = X.toarray() if sparse.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    lib = X.sum(1, keepdims=True)
    return (X / np.where(lib > 0, lib, 1.0) * target_sum).astype(np.float32)


def log_minmax(X) -> np.ndarray:
    r""":math:`v = \log(1 + x)` of each row, min–max scaled: :math:`(v - \min v) / (\max v - \min v + 10^{-8})`.

    (n, G) -> (n, G) float32 in [0, 1].
    """
    v = np.log1p(np.asarray(X, dtype=np.float64))
    lo, hi = v.min(1, keepdims=True), v.max(1, keepdims=True)
    return ((v - lo) / (hi - lo + 1e-8)).astype(np.float32)


def marker_genes(reference, cell_type_key: str = "cell_type", num_markers: int = 20, genes=None) -> list[str]:
    """Top ``num_markers`` Wilcoxon markers of each cell type (each type vs the rest, scanpy ranking) on
    ``log1p`` of the reference normalised to 10,000 counts, pooled; kept if in ``genes`` (default: all).

    Returns the pooled genes in the order of ``genes`` (or of ``reference.var_names``).
    """
    import anndata as ad
    import scanpy as sc

    labels = cell_type_labels(reference, cell_type_key)
    sizes = labels.value_counts()
    if (sizes < 2).any():
        raise ValueError(f"Cell types {list(sizes.index[sizes < 2])} have a single reference cell; the Wilcoxon "
                         "marker test needs at least 2 cells per type. Drop or merge those types.")
    logX = np.log1p(normalize_total(counts_matrix(reference)))
    tmp = ad.AnnData(logX, obs=pd.DataFrame({"t": pd.Categorical(labels.to_numpy())}, index=reference.obs_names),
                     var=pd.DataFrame(index=reference.var_names.astype(str)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(tmp, "t", method="wilcoxon", use_raw=False)
    names = pd.DataFrame.from_records(tmp.uns["rank_genes_groups"]["names"])
    pooled = set(names.head(num_markers).to_numpy().ravel().astype(str))
    order = reference.var_names.astype(str) if genes is None else pd.Index(genes).astype(str)
    return [g for g in order if g in pooled]


def mix_pseudo_spots(X, types, n_types: int, npseudo: int = 20_000, nmix: int = 10, seed: int = 0):
    r"""Pseudo-spots as random weighted mixtures of cells (the official ``random_mix``).

    Each pseudo-spot draws ``nmix`` cells uniformly with replacement and weights :math:`w \sim U(0, 1)^{n_{mix}}`
    normalised to sum 1; its profile is :math:`\sum_j w_j x_{c_j}` and its label :math:`\sum_j w_j e_{t(c_j)}`.

    Parameters
    ----------
    X : (n_cells, G) normalised expression of the reference cells
    types : (n_cells,) integer cell-type codes in ``[0, n_types)``
    n_types, npseudo, nmix, seed

    Returns
    -------
    X_mix : (npseudo, G) float32; Y : (npseudo, n_types) float32, rows summing to 1;
    mixing matrix M : CSR (npseudo, n_cells) with X_mix = M X.
    """
    types = np.asarray(types)
    rng = np.random.default_rng(seed)
    weights = rng.random((npseudo, nmix))
    weights /= weights.sum(1, keepdims=True)
    cells = rng.integers(len(types), size=(npseudo, nmix))
    rows = np.repeat(np.arange(npseudo), nmix)
    M = sparse.csr_matrix((weights.ravel(), (rows, cells.ravel())), shape=(npseudo, len(types)))  # sums repeats
    onehot = sparse.csr_matrix((np.ones(len(types)), (np.arange(len(types)), types)), shape=(len(types), n_types))
    X_mix = np.asarray(M @ np.asarray(X, dtype=np.float64), dtype=np.float32)
    Y = np.asarray((M @ onehot).todense(), dtype=np.float32)
    return X_mix, Y, M


# --------------------------------------------------------------------------------------------------- networks
def kl_loss(y, logits) -> torch.Tensor:
    r"""Per-row Keras ``kld``: :math:`\sum_c \bar y_c \log(\bar y_c / \bar p_c)` with :math:`p = \mathrm{softmax}`
    and both clipped to [1e-7, 1]. (n, C), (n, C) -> (n,)."""
    y = y.clamp(_KERAS_EPS, 1.0)
    p = F.softmax(logits, dim=1).clamp(_KERAS_EPS, 1.0)
    return (y * (y.log() - p.log())).sum(1)


def _dense(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)  # Keras glorot_uniform, zero bias
    nn.init.zeros_(layer.bias)
    return layer


def _bn(d: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(d, momentum=0.01, eps=1e-3)  # Keras momentum 0.99, epsilon 1e-3


def _embedder(n_genes: int, n_hidden: int, emb_dim: int) -> nn.Sequential:
    return nn.Sequential(_dense(n_genes, n_hidden), _bn(n_hidden), nn.ELU(),
                         _dense(n_hidden, emb_dim), _bn(emb_dim), nn.ELU())


@contextlib.contextmanager
def _keep_buffers(*modules):
    """Run a block in which the BatchNorm layers of ``modules`` use batch statistics but leave their running
    statistics unchanged (momentum 0 for the block; the update is then the identity)."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked = tracked


class CellDARTModel(nn.Module):
    """Embedder(s), source classifier and domain classifier of CellDART (module docstring, step 5).

    ``loss(batch)`` depends on ``stage``: ``"pretrain"`` takes ``(x, y)`` and returns the proportion KL;
    ``"adapt"`` takes ``(x_pseudo, y_pseudo, x_real)`` and returns the embedder-step terms (a) of step 7;
    :meth:`discriminator_step` then performs step (b) on the same batch.

    Shapes: x (n, G) in [0, 1]; y (n, C) proportions; ``embed`` -> (n, emb_dim); ``predict`` -> (n, C).
    """

    def __init__(self, n_genes: int, n_types: int, *, n_hidden: int = 1024, emb_dim: int = 64, alpha: float = 0.6,
                 adaptation: str = "adda"):
        super().__init__()
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation={adaptation!r}: use 'adda' (the paper), 'shared' (the official code) or "
                             "'none' (no domain adaptation).")
        self.alpha, self.adaptation, self.stage = float(alpha), adaptation, "pretrain"
        self.source_embedder = _embedder(n_genes, n_hidden, emb_dim)
        self.target_embedder: nn.Sequential | None = None
        self.classifier = _dense(emb_dim, n_types)
        self.discriminator = nn.Sequential(_dense(emb_dim, 32), _bn(32), nn.ELU(), nn.Dropout(0.5), _dense(32, 2))
        self.d_history: dict[str, list[float]] = {"discriminator": [], "discriminator accuracy": []}
        self._batch = None

    # ------------------------------------------------------------------ helpers
    @property
    def embedder(self) -> nn.Sequential:
        """The embedder applied to real spots: the target one under ADDA, else the shared one."""
        return self.target_embedder if self.target_embedder is not None else self.source_embedder

    def start_adaptation(self) -> None:
        """Enter step 7; under ADDA freeze the source embedder and create the target embedder as its copy."""
        self.stage = "adapt"
        if self.adaptation == "adda":
            self.target_embedder = copy.deepcopy(self.source_embedder)
            self.source_embedder.requires_grad_(False)

    def embedder_parameters(self) -> list[nn.Parameter]:
        """What step (a) updates: the trainable embedder and the classifier."""
        return list(self.embedder.parameters()) + list(self.classifier.parameters())

    @torch.no_grad()
    def embed(self, x) -> torch.Tensor:
        self.eval()
        return self.embedder(torch.as_tensor(x, dtype=torch.float32))

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """Proportions :math:`g(f_T(x))`, (n, C)."""
        return F.softmax(self.classifier(self.embed(x)), dim=1)

    # ------------------------------------------------------------------ losses
    def loss(self, batch) -> dict[str, torch.Tensor]:
        if self.stage == "pretrain":
            x, y = batch
            return {"proportions (KL)": kl_loss(y, self.classifier(self.source_embedder(x))).mean()}
        xs, ys, xt = batch
        self._batch = batch
        n_s, n = len(xs), len(xs) + len(xt)
        h = self.embedder(torch.cat([xs, xt]))
        kl = kl_loss(ys, self.classifier(h[:n_s])).sum() / n
        if self.adaptation == "none":
            return {"proportions (KL)": kl}
        d_in = h
        if self.adaptation == "adda":  # D sees what it sees in its own step: the fixed source features
            with torch.no_grad(), _keep_buffers(self.source_embedder):
                h_source = self.source_embedder(torch.cat([xs, xt]))[:n_s]
            d_in = torch.cat([h_source, h[n_s:]])
        self.discriminator.requires_grad_(False)
        with _keep_buffers(self.discriminator):
            logits = self.discriminator(d_in)
        self.discriminator.requires_grad_(True)
        flipped = torch.cat([torch.ones(n_s), torch.zeros(n - n_s)]).long()
        ce = F.cross_entropy(logits, flipped, reduction="none")
        if self.adaptation == "adda":
            ce = ce[n_s:]  # the frozen source embedder gets no gradient: only the real spots' term acts
        return {"proportions (KL)": kl, "adversarial (inverted labels)": self.alpha * ce.sum() / n}

    def discriminator_loss(self, xs, xt) -> tuple[torch.Tensor, float]:
        """:math:`L_D` of step (b), without gradient to the embedders, which run in training mode on the mixed
        batch (as in step (a)) and keep their running statistics. Returns the loss and the discriminator's
        accuracy on the batch."""
        x = torch.cat([xs, xt])
        with torch.no_grad(), _keep_buffers(self.source_embedder, self.embedder):
            h = self.embedder(x)
            if self.adaptation == "adda":  # the fixed source mapping for the pseudo-spots
                h = torch.cat([self.source_embedder(x)[:len(xs)], h[len(xs):]])
        logits = self.discriminator(h)
        domain = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]).long()
        acc = float((logits.argmax(1) == domain).float().mean())
        return F.cross_entropy(logits, domain), acc

    def discriminator_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step (b) on the batch of the last embedder step (called by ``fit``'s callback)."""
        if self.adaptation == "none" or self._batch is None:
            return
        xs, _, xt = self._batch
        self.train()
        loss, acc = self.discriminator_loss(xs, xt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.d_history["discriminator"].append(float(loss.detach()))
        self.d_history["discriminator accuracy"].append(acc)


# ------------------------------------------------------------------------------------------------- the method
def _draw(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` indices out of ``n``: without replacement when possible, else with replacement."""
    if n >= size:
        return torch.randperm(n, generator=gen)[:size]
    return torch.randint(n, (size,), generator=gen)


@register
class CellDART(Method):
    """CellDART deconvolution (see the module docstring for the model and the deviations).

    Parameters
    ----------
    cell_type_key
        Column of ``reference.obs`` with the cell types.
    num_markers
        Wilcoxon markers kept per cell type (pooled, intersected with the spatial genes).
    npseudo, nmix
        Number of pseudo-spots and of cells mixed into each.
    adaptation
        ``"adda"`` (paper: untied target embedder), ``"shared"`` (official code: one embedder) or ``"none"``.
    alpha, alpha_lr
        Weight of the adversarial term; the domain classifier's learning rate is ``alpha_lr * lr``.
    lr, batch_size, emb_dim, n_hidden
        Embedder/classifier learning rate, per-domain batch size, embedding and hidden widths.
    n_iterations, init_train_epoch
        Adversarial steps and pre-training epochs.
    seed, progress
        Random seed (pseudo-spots, weights, batches); show progress bars.
    """

    name = "celldart"
    task = "deconv"
    summary = "pseudo-spot MLP with adversarial (ADDA) domain adaptation"
    paper = "Bae et al. 2022, Nucleic Acids Res"
    needs_reference = True

    def __init__(self, *, cell_type_key: str = "cell_type", num_markers: int = 20, npseudo: int = 20_000,
                 nmix: int = 10, adaptation: str = "adda", alpha: float = 0.6, alpha_lr: float = 5.0,
                 lr: float = 1e-3, batch_size: int = 512, emb_dim: int = 64, n_hidden: int = 1024,
                 n_iterations: int = 3000, init_train_epoch: int = 10, seed: int = 0, progress: bool = True):
        if adaptation not in ADAPTATIONS:
            raise ValueError(f"adaptation={adaptation!r}: use 'adda' (the paper), 'shared' (the official code) or "
                             "'none' (no domain adaptation).")
        for name_, value in (("alpha", alpha), ("alpha_lr", alpha_lr), ("lr", lr)):
            if not np.isfinite(value) or value < 0 or (name_ != "alpha" and value == 0):
                raise ValueError(f"{name_}={value!r} must be a finite {'non-negative' if name_ == 'alpha' else 'positive'}"
                                 " number.")
        self.cell_type_key, self.adaptation = cell_type_key, adaptation
        self.num_markers = check_int("num_markers", num_markers)
        self.npseudo = check_int("npseudo", npseudo, 2)
        self.nmix = check_int("nmix", nmix)
        self.batch_size = check_int("batch_size", batch_size, 2)
        self.emb_dim, self.n_hidden = check_int("emb_dim", emb_dim), check_int("n_hidden", n_hidden)
        self.n_iterations = check_int("n_iterations", n_iterations, 0)
        self.init_train_epoch = check_int("init_train_epoch", init_train_epoch, 0)
        self.alpha, self.alpha_lr, self.lr = float(alpha), float(alpha_lr), float(lr)
        self.seed, self.progress = int(seed), progress

    # ------------------------------------------------------------------ data
    def prepare(self, adata, reference) -> dict:
        """Steps 1–4: marker genes, pseudo-spots and the scaled inputs of both domains."""
        self._check_reference(reference)
        genes = shared_genes(adata, reference)
        labels, types = reference_cell_types(reference, self.cell_type_key)
        spots_norm = normalize_total(counts_matrix(adata))  # over all spatial genes, as the official code
        ref_norm = normalize_total(counts_matrix(reference))
        markers = marker_genes(reference, self.cell_type_key, self.num_markers, genes=genes)
        if not markers:
            raise ValueError(f"None of the top {self.num_markers} markers of any cell type is measured in the "
                             "spatial data; raise num_markers or use a reference on the same gene panel.")
        sp_idx = adata.var_names.get_indexer(markers)
        ref_idx = reference.var_names.get_indexer(markers)
        codes = pd.Categorical(labels.to_numpy(), categories=types).codes
        X_mix, Y, _ = mix_pseudo_spots(ref_norm[:, ref_idx], codes, len(types), self.npseudo, self.nmix, self.seed)
        return {"genes": markers, "types": types, "x_pseudo": log_minmax(X_mix), "y_pseudo": Y,
                "x_real": log_minmax(spots_norm[:, sp_idx])}

    # ------------------------------------------------------------------ training
    def _pretrain_batches(self, x, y, gen):
        def epoch():
            order = torch.randperm(len(x), generator=gen)
            starts = list(range(0, len(x), self.batch_size))
            if len(x) - starts[-1] == 1 and len(starts) > 1:  # a batch of one breaks BatchNorm: merge it
                starts = starts[:-1]
            for i, s in enumerate(starts):
                stop = starts[i + 1] if i + 1 < len(starts) else len(x)
                yield x[order[s:stop]], y[order[s:stop]]
        return epoch

    def train(self, prep: dict, pretrained: CellDARTModel | None = None) -> CellDARTModel:
        """Steps 5–7 on the output of :meth:`prepare`; returns the trained model (also ``self.model_``).

        ``pretrained``: a model returned by :meth:`pretrain` on the same ``prep``; a copy of it is adapted and the
        pre-training is skipped (so several variants can start from the same pre-trained network).
        """
        set_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        xs, ys = torch.from_numpy(prep["x_pseudo"]), torch.from_numpy(prep["y_pseudo"])
        xt = torch.from_numpy(prep["x_real"])
        self.history_ = {}
        if pretrained is None:
            model = CellDARTModel(xs.shape[1], ys.shape[1], n_hidden=self.n_hidden, emb_dim=self.emb_dim,
                                  alpha=self.alpha, adaptation=self.adaptation)
            if self.init_train_epoch > 0:
                opt = torch.optim.Adam(model.parameters(), lr=self.lr, eps=_KERAS_EPS)
                self.history_["pretrain"] = fit(model, self._pretrain_batches(xs, ys, gen),
                                                epochs=self.init_train_epoch, optimizer=opt, progress=self.progress,
                                                desc="CellDART pre-training")
        else:
            if pretrained.stage != "pretrain" or pretrained.source_embedder[0].in_features != xs.shape[1]:
                raise ValueError("pretrained must be a model returned by CellDART.pretrain(prep) on the same "
                                 "prepared data, before adaptation.")
            model = copy.deepcopy(pretrained)
            model.adaptation, model.alpha = self.adaptation, self.alpha
        model.start_adaptation()
        if self.n_iterations > 0:
            opt_e = torch.optim.Adam(model.embedder_parameters(), lr=self.lr, eps=_KERAS_EPS)
            opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=self.alpha_lr * self.lr, eps=_KERAS_EPS)

            def batch():
                i = _draw(len(xs), self.batch_size, gen)
                j = _draw(len(xt), self.batch_size, gen)
                return [(xs[i], ys[i], xt[j])]

            self.history_["adapt"] = fit(model, batch, epochs=self.n_iterations, optimizer=opt_e,
                                         callback=lambda epoch, terms: model.discriminator_step(opt_d),
                                         progress=self.progress, desc=f"CellDART adaptation ({self.adaptation})")
        model.eval()
        self.model_ = model
        return model

    def pretrain(self, prep: dict) -> CellDARTModel:
        """Step 6 only: the pre-trained network (stage ``"pretrain"``), to pass to :meth:`train` as ``pretrained``."""
        n_iterations, self.n_iterations = self.n_iterations, 0
        try:
            model = self.train(prep)
        finally:
            self.n_iterations = n_iterations
        model.stage = "pretrain"
        model.target_embedder = None
        model.source_embedder.requires_grad_(True)
        return model

    def run(self, adata, reference=None):
        prep = self.prepare(adata, reference)
        model = self.train(prep)
        props = model.predict(prep["x_real"]).numpy()
        write_frame(adata, f"proportions_{self.key}", props, prep["types"])
        adata.obsm[f"X_{self.key}"] = model.embed(prep["x_real"]).numpy()
        adata.uns[self.key] = {"genes": list(prep["genes"]), "adaptation": self.adaptation}
        self.prep_ = prep
        return adata
