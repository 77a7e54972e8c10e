r"""gimVI: missing-gene imputation with a joint VAE of scRNA-seq and spatial data aligned by an adversary.

Lopez R, Nazaret A, Langevin M, *et al.* A joint model of unpaired data from scRNA-seq and spatial transcriptomics
for imputing missing gene expression measurements. *ICML Workshop on Computational Biology* (2019),
arXiv:1905.02269. Official code: scverse/scvi-tools ``scvi.external.GIMVI`` (``JVAE`` module,
``GIMVITrainingPlan``); the defaults below are those of ``GIMVI(adata_seq, adata_spatial).train()``.

An image-based spatial assay measures a few hundred genes per cell; a scRNA-seq reference measures them all. gimVI
encodes the cells of *both* datasets into one latent space, decodes every latent point into the expression of all
the reference genes, and asks each dataset to explain only the genes it measured. A classifier that tries to tell
the two datasets apart from the latent code, and an encoder trained to fool it, make that space shared; a spatial
cell decoded from it then carries values for the genes the spatial assay never measured. Integration strategy of
the review: *fusion* (one latent space learnt from both modalities).

Pipeline
--------
1. **Genes.** :math:`\mathcal G_{sp}` = the genes shared by the spatial data and the reference (spatial order);
   the genes to impute, ``genes`` (default: every reference gene the spatial data lacks); the modelled genes
   :math:`\mathcal G` = the reference genes among both (reference order, :math:`G` of them). Counts stay raw.
2. **Encoder** (``MultiEncoder``). Modality :math:`m \in \{\text{seq}, \text{sp}\}` reads :math:`\log(1 + x)` of
   its own genes through its own head (1 layer of ``n_hidden`` = 64), then a layer shared by both, each layer
   Linear → BatchNorm → ReLU → dropout 0.2; :math:`q(z \mid x) = \mathcal N(\mu, \mathrm{diag}\,\sigma^2)`,
   :math:`\sigma^2 = e^{h}`, :math:`z \in \mathbb R^{10}`.
3. **Library size.** scRNA-seq: latent, :math:`q(\log l \mid x)` from a separate encoder (1 layer of 128,
   variance :math:`e^{h} + 10^{-4}`) with the empirical prior :math:`\mathcal N(m_l, v_l)` (mean and variance of
   the cells' log total counts). Spatial: the observed :math:`l_n = \sum_{g \in \mathcal G_{sp}} x_{ng}`.
4. **Decoder** (``MultiDecoder`` with its default 0 hidden layers: linear). :math:`\rho = \mathrm{softmax}(Wz + b)
   \in \Delta^{G-1}` over all modelled genes, renormalised over the genes modality :math:`m` measures,

   .. math:: \tilde\rho_{ng}^{(m)} = \rho_{ng} \Big/ \sum_{g' \in \mathcal G_m} \rho_{ng'}, \qquad
             \mu_{ng} = l_n\, \tilde\rho_{ng}^{(m)},

   with :math:`\mathcal G_{seq} = \mathcal G` (so :math:`\tilde\rho^{(seq)} = \rho`). Likelihoods
   (``generative_distributions``): ZINB for scRNA-seq (zero-inflation logits :math:`W'z + b'`), NB for spatial;
   inverse dispersion :math:`\theta_{g}^{(m)} = e^{r_{gm}}`, one per gene and dataset ("gene-batch").
5. **Loss of one step**, mini-batches :math:`B_{seq}, B_{sp}` (128 cells each), :math:`n = |B_{seq}| + |B_{sp}|`:

   .. math::
      \mathcal L_{VAE} = \frac1n \sum_m \sum_{i \in B_m} \Big( -\log p(x_i \mid z_i, l_i)
      + w_{KL} \big[\mathrm{KL}(q(z_i)\,\|\,\mathcal N(0, I)) + \mathrm{KL}(q(l_i)\,\|\,\mathcal N(m_l, v_l))\big]\Big)
      + \kappa\, \frac1n \sum_{i} \mathrm{CE}\big(D(z_i),\ 1 - m_i\big),

   the likelihood over the genes modality :math:`m_i` measures only, the library KL for scRNA-seq cells only,
   :math:`w_{KL}` = epoch / ``n_epochs_kl_warmup`` (400, so it reaches only 0.5 after the default 200 epochs), and
   the **adversarial term with flipped labels**: the encoder is rewarded when the modality classifier :math:`D`
   (3 layers of 32, BatchNorm, ReLU, dropout 0.1, then 2 logits) mistakes each cell for the other dataset;
   :math:`\kappa` = 5. The classifier's success estimates the H-divergence between the two latent distributions,
   the quantity with which domain-adaptation theory (Ben-David *et al.* 2010) bounds the error of transferring
   what is learnt on one domain to the other; the encoder is trained to lower it.
6. **Alternating steps** (:class:`AlternatingSteps`): an Adam step of the VAE on :math:`\mathcal L_{VAE}`, then on
   the same mini-batches a fresh :math:`z` (encoder in training mode, no gradient) and an Adam step of :math:`D` on
   :math:`\kappa \frac1n \sum_i \mathrm{CE}(D(z_i), m_i)` (true labels). 200 epochs; an epoch is one pass over
   the larger dataset, the smaller one's shuffled mini-batches cycled alongside (``CyclicMultiDataLoader``); both
   datasets are split 90 / 10 once and only the 90 % are trained on (``train_size``).
7. **Imputation** (``get_imputed_values(normalized=False)``, deterministic): each spatial cell is encoded with the
   spatial head, :math:`z` = the posterior mean, and decoded in the spatial modality, so the output for gene
   :math:`g` is

   .. math:: \hat x_{ng} = l_n\, \rho_{ng}(\mu_n) \Big/ \sum_{g' \in \mathcal G_{sp}} \rho_{ng'}(\mu_n),

   the expected count of :math:`g` in that cell on the spatial data's own scale (its observed total over the
   measured genes). Written to ``obsm["imputed_gimvi"]`` (DataFrame, the genes asked for as columns); the
   posterior means to ``obsm["X_gimvi"]``; the gene sets to ``uns["gimvi"]``. A spatial cell with no counts gets 0.

Training settings are those of scvi-tools' ``AdversarialTrainingPlan``: Adam, lr 1e-3, eps 0.01, weight decay
1e-6, for both the VAE and the classifier.

Shapes
------
=========================  ========================  ==============================================
tensor                     shape                     meaning
=========================  ========================  ==============================================
``x_seq``                  (n_seq, G)                reference counts of the modelled genes
``x_sp``                   (n_sp, G_sp)              spatial counts of the shared genes
``spatial_idx``            (G_sp,)                   columns of the shared genes among the G
``qz_mean``, ``qz_var``    (n, 10)                   posterior of :math:`z`
``log_library``            (n, 1)                    :math:`\log l` (sampled for scRNA-seq, observed for spatial)
``rho``                    (n, G)                    renormalised decoder output :math:`\tilde\rho^{(m)}`
``px_r``                   (G, 2)                    log inverse dispersions (column 0 seq, 1 spatial)
``classifier(z)``          (n, 2)                    modality logits (0 = scRNA-seq, 1 = spatial)
``imputed_gimvi``          (n_sp, n_targets)         :math:`\hat x_{ng}` of the genes asked for
=========================  ========================  ==============================================

Deliberate deviations from the official code
--------------------------------------------
* **One batch per dataset.** The official model accepts batch keys inside each dataset (a library prior and a
  dispersion per batch); here each dataset is one batch, which is how the Li et al. 2022 benchmark runs it.
  The decoder is the official default (linear, ``n_layers_decoder_*`` = 0): its optional hidden layers, the other
  dispersion modes and ``model_library_size`` other than ``[True, False]`` are not implemented.
* **Layers from stcore.** scvi-tools' ``FCLayers`` are :class:`stcore.nn.MLP` with BatchNorm given scvi-tools'
  settings (momentum 0.01, eps 1e-3); likelihoods and KL terms are ``stcore.nn``'s, which follow scvi-tools'
  formulas (ZINB/NB with eps 1e-8).
* **Training loop.** ``stcore.train.fit`` steps one optimiser per mini-batch; :class:`AlternatingSteps` is that
  optimiser, and does the VAE step and then the classifier step, the official order. The 10 % held out by
  ``train_size`` are not scored (the official code only logs a validation ELBO; nothing depends on it).
* **The modelled genes** are the shared genes plus the genes asked for; with ``genes=None`` (the default) that
  is every reference gene, as when the official model is given the whole reference.
* **Small and empty inputs.** A last mini-batch of one cell is merged into the one before (BatchNorm cannot train
  on one cell). Cells without counts (spatial: on the shared genes; reference: on the modelled genes) are left
  out of training with a warning, and empty spatial cells are imputed as 0; the variance of the library prior
  is floored at 1e-4 (equal libraries would give a zero-width prior). Clear errors for bad options and
  inputs (no shared genes, non-count or NaN values, duplicated gene names, fewer than two cells).
* **Random streams.** A seed makes a CPU run repeat exactly, but the draws differ from scvi-tools' for the same
  seed, so single runs differ by seed-to-seed noise.
"""

from __future__ import annotations

import math
from itertools import cycle

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor, nn

from ..nn import MLP, gaussian_kl, nb_log_prob, normal_kl, poisson_log_prob, zinb_log_prob
from ..train import fit, kl_warmup, set_seed
from ..validation import check_float, check_int, counts_matrix, rows_with_counts, shared_genes
from . import Method, register
from ._common import missing_genes, write_frame

__all__ = ["JVAE", "SEQ", "SPATIAL", "AlternatingSteps", "GimVI", "scvi_layers"]

SEQ, SPATIAL = 0, 1  # modality labels, as scvi-tools numbers the two datasets
LIKELIHOODS = ("zinb", "nb", "poisson")
_ADAM = {"eps": 0.01}  # scvi-tools' training-plan Adam (lr and weight decay are options)


def _scvi_batchnorm(net: nn.Module) -> nn.Module:
    """Give every BatchNorm of ``net`` scvi-tools' settings (momentum 0.01, eps 1e-3)."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum, module.eps = 0.01, 1e-3
    return net


def scvi_layers(dims, dropout: float) -> MLP:
    """scvi-tools' ``FCLayers``: every layer ``Linear -> BatchNorm1d(momentum 0.01, eps 1e-3) -> ReLU -> Dropout``.

    Shapes: (n, dims[0]) -> (n, dims[-1]).
    """
    return _scvi_batchnorm(MLP(dims, dropout=dropout, batch_norm=True, last_activation=True))


def _log_likelihood(kind: str, x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor) -> Tensor:
    if kind == "zinb":
        return zinb_log_prob(x, mu, theta, zi_logits)
    if kind == "nb":
        return nb_log_prob(x, mu, theta)
    return poisson_log_prob(x, mu)


class JVAE(nn.Module):
    r"""The joint VAE of steps 2–5 and the modality classifier :math:`D`.

    ``loss(batch)`` takes ``(x_seq, x_sp)`` (dense counts (n_seq, G) and (n_sp, G_sp)) and returns the VAE-step
    terms of step 5, each already divided by :math:`n`; :meth:`classifier_step` then does step 6's classifier
    update on the same batch. ``kl_weight`` is set by the warm-up callback.

    Parameters
    ----------
    n_genes
        :math:`G`, the modelled genes (the scRNA-seq modality's input and the decoder's output).
    spatial_idx
        (G_sp,) positions of the spatial genes among the :math:`G`.
    library_prior
        ``(mean, variance)`` of the scRNA-seq log library sizes.
    """

    def __init__(self, n_genes: int, spatial_idx, library_prior: tuple[float, float], *, n_latent: int = 10,
                 n_hidden: int = 64, n_layers_individual: int = 1, n_layers_shared: int = 1, dropout: float = 0.2,
                 kappa: float = 5.0, generative_distributions=("zinb", "nb")):
        super().__init__()
        idx = torch.as_tensor(np.asarray(spatial_idx), dtype=torch.long)
        self.register_buffer("spatial_idx", idx)
        self.register_buffer("library_prior", torch.tensor([float(library_prior[0]), float(library_prior[1])]))
        self.n_genes, self.n_latent, self.kappa = int(n_genes), int(n_latent), float(kappa)
        self.likelihoods = tuple(generative_distributions)
        self.heads = nn.ModuleList([scvi_layers([n_in] + [n_hidden] * n_layers_individual, dropout)
                                    for n_in in (n_genes, len(idx))])
        self.shared = scvi_layers([n_hidden] * (n_layers_shared + 1), dropout)
        self.z_mean, self.z_var = nn.Linear(n_hidden, n_latent), nn.Linear(n_hidden, n_latent)
        self.library_encoder = scvi_layers([n_genes, 128], dropout)  # scvi-tools' Encoder, n_hidden 128
        self.l_mean, self.l_var = nn.Linear(128, 1), nn.Linear(128, 1)
        self.px_scale = nn.Linear(n_latent, n_genes)    # softmax -> rho
        self.px_dropout = nn.Linear(n_latent, n_genes)  # zero-inflation logits (scRNA-seq ZINB)
        self.px_r = nn.Parameter(torch.randn(n_genes, 2))
        self.classifier = _scvi_batchnorm(MLP([n_latent, 32, 32, 32, 2], dropout=0.1, batch_norm=True))
        self.kl_weight = 1.0
        self.classifier_log: list[tuple[float, float]] = []  # (loss, accuracy) of each classifier step
        self._batch = None

    # ------------------------------------------------------------------ the model
    def inference(self, x: Tensor, mode: int) -> dict[str, Tensor]:
        """Posterior of :math:`z` and of :math:`\\log l` (scRNA-seq) or the observed :math:`\\log l` (spatial),
        with one reparameterised draw of each."""
        x_log = torch.log1p(x)
        h = self.shared(self.heads[mode](x_log))
        qz_mean, qz_logvar = self.z_mean(h), self.z_var(h)  # variance exp(h), no floor (MultiEncoder)
        out = {"qz_mean": qz_mean, "qz_logvar": qz_logvar,
               "z": qz_mean + torch.exp(0.5 * qz_logvar) * torch.randn_like(qz_mean)}
        if mode == SEQ:
            hl = self.library_encoder(x_log)
            ql_mean, ql_var = self.l_mean(hl), torch.exp(self.l_var(hl)) + 1e-4
            out.update(ql_mean=ql_mean, ql_var=ql_var,
                       log_library=ql_mean + ql_var.sqrt() * torch.randn_like(ql_mean))
        else:
            out["log_library"] = torch.log(x.sum(1, keepdim=True))
        return out

    def decode(self, z: Tensor, mode: int) -> Tensor:
        """:math:`\\tilde\\rho^{(m)}`, (n, G): the softmax over all modelled genes renormalised over the genes of
        modality ``mode``."""
        rho = F.softmax(self.px_scale(z), dim=-1)
        measured = rho if mode == SEQ else rho[:, self.spatial_idx]
        return rho / measured.sum(-1, keepdim=True)

    def elbo_terms(self, x: Tensor, mode: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-cell negative log-likelihood (over the measured genes) and KL (z, plus the library for scRNA-seq),
        each (n,), and the latent draw (n, L)."""
        out = self.inference(x, mode)
        mu = self.decode(out["z"], mode) * torch.exp(out["log_library"])
        theta, zi = torch.exp(self.px_r[:, mode]), self.px_dropout(out["z"])
        if mode == SPATIAL:
            mu, theta, zi = mu[:, self.spatial_idx], theta[self.spatial_idx], zi[:, self.spatial_idx]
        rec = -_log_likelihood(self.likelihoods[mode], x, mu, theta, zi).sum(-1)
        kl = gaussian_kl(out["qz_mean"], out["qz_logvar"])
        if mode == SEQ:
            m, v = self.library_prior
            kl = kl + normal_kl(out["ql_mean"], out["ql_var"].log(), m, v.log())
        return rec, kl, out["z"]

    def modality_ce(self, z: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of the classifier's modality prediction from ``z`` against ``labels``."""
        return F.cross_entropy(self.classifier(z), labels)

    @staticmethod
    def labels(n_seq: int, n_sp: int) -> Tensor:
        """True modality labels of a concatenated batch: ``SEQ`` for the first ``n_seq`` cells, ``SPATIAL`` after."""
        return torch.cat([torch.full((n_seq,), SEQ), torch.full((n_sp,), SPATIAL)]).long()

    # ------------------------------------------------------------------ the two steps
    def loss(self, batch) -> dict[str, Tensor]:
        x_seq, x_sp = batch
        self._batch = batch
        n = len(x_seq) + len(x_sp)
        rec_seq, kl_seq, z_seq = self.elbo_terms(x_seq, SEQ)
        rec_sp, kl_sp, z_sp = self.elbo_terms(x_sp, SPATIAL)
        terms = {"reconstruction (scRNA-seq)": rec_seq.sum() / n, "reconstruction (spatial)": rec_sp.sum() / n,
                 "KL (weighted)": self.kl_weight * (kl_seq.sum() + kl_sp.sum()) / n}
        if self.kappa > 0:
            flipped = 1 - self.labels(len(x_seq), len(x_sp))
            terms["adversarial (flipped labels)"] = self.kappa * self.modality_ce(torch.cat([z_seq, z_sp]), flipped)
        return terms

    def classifier_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step 6b on the last batch given to :meth:`loss`: a fresh draw of :math:`z` (no gradient to the
        encoder), then one step of :math:`D` on :math:`\\kappa \\cdot \\mathrm{CE}` with the true labels."""
        if self.kappa <= 0 or self._batch is None:
            return
        x_seq, x_sp = self._batch
        with torch.no_grad():
            z = torch.cat([self.inference(x_seq, SEQ)["z"], self.inference(x_sp, SPATIAL)["z"]])
        labels = self.labels(len(x_seq), len(x_sp))
        logits = self.classifier(z)
        loss = self.kappa * F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.classifier_log.append((float(loss.detach()), float((logits.argmax(1) == labels).float().mean())))

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def latent(self, x: Tensor, mode: int) -> Tensor:
        """Posterior means of :math:`z`, (n, L), in evaluation mode."""
        self.eval()
        return self.z_mean(self.shared(self.heads[mode](torch.log1p(x))))

    @torch.no_grad()
    def impute(self, x_sp: Tensor, decode_mode: int = SPATIAL) -> Tensor:
        """Step 7: expected counts of all modelled genes, (n, G), for spatial cells ``x_sp`` (n, G_sp):
        :math:`l_n \\tilde\\rho^{(m)}(\\mu_n)` with :math:`l_n` the observed total and ``decode_mode`` :math:`m`
        (default spatial, the official ``decode_mode=None``; ``SEQ`` renormalises over all genes instead)."""
        return self.decode(self.latent(x_sp, SPATIAL), decode_mode) * x_sp.sum(1, keepdim=True)


class AlternatingSteps:
    """The optimiser ``stcore.train.fit`` steps: ``step()`` is the VAE's Adam step on the loss ``fit`` has just
    back-propagated, then :meth:`JVAE.classifier_step` on the same mini-batch with the classifier's own Adam (the
    official order of ``GIMVITrainingPlan.training_step``)."""

    def __init__(self, model: JVAE, *, lr: float = 1e-3, weight_decay: float = 1e-6):
        self.model = model
        vae = [p for name, p in model.named_parameters() if not name.startswith("classifier.")]
        self.vae = torch.optim.Adam(vae, lr=lr, weight_decay=weight_decay, **_ADAM)
        self.classifier = torch.optim.Adam(model.classifier.parameters(), lr=1e-3, weight_decay=weight_decay,
                                           **_ADAM)  # lr fixed at 1e-3 in the official training plan

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.vae.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.vae.step()
        self.model.classifier_step(self.classifier)


# ------------------------------------------------------------------------------------------------ data helpers
def _minibatches(order: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive chunks of ``order``; a last chunk of one index joins the chunk before it."""
    chunks = list(torch.split(order, batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def _paired_batches(x_seq, x_sp, batch_size: int, gen: torch.Generator):
    """A factory of one epoch of ``(x_seq, x_sp)`` mini-batches (CSR rows densified per batch): the larger dataset
    is shuffled and passed once, the smaller one's shuffled mini-batches are cycled alongside."""
    def epoch():
        seq = _minibatches(torch.randperm(x_seq.shape[0], generator=gen), batch_size)
        sp = _minibatches(torch.randperm(x_sp.shape[0], generator=gen), batch_size)
        pairs = zip(seq, cycle(sp)) if len(seq) >= len(sp) else zip(cycle(seq), sp)
        for i, j in pairs:
            yield torch.from_numpy(x_seq[i.numpy()].toarray()), torch.from_numpy(x_sp[j.numpy()].toarray())
    return epoch


def _train_split(n: int, train_size: float, gen: torch.Generator) -> np.ndarray:
    """The indices of the ``ceil(train_size * n)`` training cells of a random split (scvi-tools' DataSplitter)."""
    n_train = math.ceil(train_size * n)
    return np.sort(torch.randperm(n, generator=gen).numpy()[n - n_train:])


def _unique_names(adata, what: str) -> None:
    if not adata.var_names.is_unique:
        raise ValueError(f"The {what} has duplicated gene names; call .var_names_make_unique() first.")


@register
class GimVI(Method):
    """gimVI imputation of the genes the spatial data lacks (see the module docstring).

    Parameters
    ----------
    genes
        Genes to impute (all in the reference); ``None``: every reference gene missing from the spatial data.
    n_latent, n_hidden, n_layers_individual, n_layers_shared, dropout_rate
        Latent dimension, encoder width, layers of each dataset's encoder head and of the shared encoder, dropout.
    generative_distributions
        Likelihoods of the scRNA-seq and spatial counts, each ``"zinb"``, ``"nb"`` or ``"poisson"``.
    epochs, batch_size, lr, weight_decay, n_epochs_kl_warmup
        Training length (passes over the larger dataset), mini-batch size (per dataset), Adam settings and the
        epochs of the linear KL warm-up.
    kappa
        Weight :math:`\\kappa` of the adversarial terms (0: no adversary).
    train_size
        Share of each dataset trained on (the rest is held out, as in the official split).
    seed, progress
        Random seed (initialisation, split, batches, sampling, dropout); show a progress bar.
    """

    name = "gimvi"
    task = "impute"
    summary = "joint VAE of scRNA-seq and spatial counts, latent space aligned adversarially"
    paper = "Lopez et al. 2019, ICML CompBio workshop"
    needs_reference = True

    def __init__(self, *, genes: list[str] | None = None, n_latent: int = 10, n_hidden: int = 64,
                 n_layers_individual: int = 1, n_layers_shared: int = 1, dropout_rate: float = 0.2,
                 generative_distributions: list[str] | None = None, epochs: int = 200, batch_size: int = 128,
                 lr: float = 1e-3, weight_decay: float = 1e-6, n_epochs_kl_warmup: int = 400, kappa: float = 5.0,
                 train_size: float = 0.9, seed: int = 0, progress: bool = True):
        self.genes = genes
        self.n_latent, self.n_hidden = check_int("n_latent", n_latent), check_int("n_hidden", n_hidden)
        self.n_layers_individual = check_int("n_layers_individual", n_layers_individual)
        self.n_layers_shared = check_int("n_layers_shared", n_layers_shared)
        self.dropout_rate = check_float("dropout_rate", dropout_rate, below_one=True)
        dists = ["zinb", "nb"] if generative_distributions is None else list(generative_distributions)
        if len(dists) != 2 or any(d not in LIKELIHOODS for d in dists):
            raise ValueError(f"generative_distributions={generative_distributions!r}: give two of {LIKELIHOODS} "
                             "(scRNA-seq first, then spatial), e.g. ['zinb', 'nb'].")
        self.generative_distributions = dists
        self.epochs, self.batch_size = check_int("epochs", epochs), check_int("batch_size", batch_size, 2)
        self.lr = check_float("lr", lr, positive=True)
        self.weight_decay = check_float("weight_decay", weight_decay)
        self.n_epochs_kl_warmup = check_int("n_epochs_kl_warmup", n_epochs_kl_warmup, 0)
        self.kappa = check_float("kappa", kappa)
        self.train_size = check_float("train_size", train_size, positive=True)
        if self.train_size > 1:
            raise ValueError(f"train_size={train_size!r} must be in (0, 1].")
        self.seed, self.progress = int(seed), progress

    # ------------------------------------------------------------------ data
    def prepare(self, adata, reference) -> dict:
        """Step 1: the gene sets, CSR float32 counts of both datasets and the cells to train on."""
        self._check_reference(reference)
        _unique_names(adata, "spatial data")
        _unique_names(reference, "reference")
        shared = list(shared_genes(adata, reference))
        targets = missing_genes(adata, reference, self.genes)
        wanted = set(shared) | set(targets)
        modelled = [g for g in reference.var_names if g in wanted]
        x_seq = sparse.csr_matrix(counts_matrix(reference)[:, reference.var_names.get_indexer(modelled)],
                                  dtype=np.float32)
        x_sp = sparse.csr_matrix(counts_matrix(adata)[:, adata.var_names.get_indexer(shared)], dtype=np.float32)
        seq_cells = rows_with_counts(x_seq, "reference cells", "modelled genes")
        sp_cells = rows_with_counts(x_sp, "spatial cells", "genes shared with the reference")
        gen = torch.Generator().manual_seed(self.seed)
        seq_train = seq_cells[_train_split(len(seq_cells), self.train_size, gen)]
        sp_train = sp_cells[_train_split(len(sp_cells), self.train_size, gen)]
        for what, cells in (("reference", seq_train), ("spatial data", sp_train)):
            if len(cells) < 2:
                raise ValueError(f"The {what} has {len(cells)} cell(s) with counts to train on; gimVI needs at "
                                 "least 2 (BatchNorm) and, in practice, hundreds.")
        log_lib = np.log(np.asarray(x_seq[seq_cells].sum(1)).ravel())
        return {"shared": shared, "targets": list(targets), "modelled": modelled,
                "spatial_idx": np.array([modelled.index(g) for g in shared]), "x_seq": x_seq, "x_sp": x_sp,
                "seq_train": seq_train, "sp_train": sp_train,
                "library_prior": (float(log_lib.mean()), max(float(log_lib.var()), 1e-4))}

    # ------------------------------------------------------------------ training
    def build(self, prep: dict) -> JVAE:
        """A fresh :class:`JVAE` for the prepared data (seeded)."""
        set_seed(self.seed)
        return JVAE(len(prep["modelled"]), prep["spatial_idx"], prep["library_prior"], n_latent=self.n_latent,
                    n_hidden=self.n_hidden, n_layers_individual=self.n_layers_individual,
                    n_layers_shared=self.n_layers_shared, dropout=self.dropout_rate, kappa=self.kappa,
                    generative_distributions=self.generative_distributions)

    def train(self, prep: dict, model: JVAE | None = None) -> JVAE:
        """Steps 5–6 (also ``self.model_``); the per-epoch VAE terms in ``self.history_`` and the classifier's
        mean loss and accuracy per epoch in ``self.classifier_history_``."""
        model = self.build(prep) if model is None else model
        gen = torch.Generator().manual_seed(self.seed + 1)
        data = _paired_batches(prep["x_seq"][prep["seq_train"]], prep["x_sp"][prep["sp_train"]], self.batch_size,
                               gen)
        optimizer = AlternatingSteps(model, lr=self.lr, weight_decay=self.weight_decay)
        self.classifier_history_ = {"classifier (kappa * CE)": [], "classifier accuracy": []}
        model.kl_weight = kl_warmup(0, self.n_epochs_kl_warmup)

        def end_of_epoch(epoch, terms):
            model.kl_weight = kl_warmup(epoch + 1, self.n_epochs_kl_warmup)
            if model.classifier_log:
                loss, acc = np.mean(model.classifier_log, axis=0)
                self.classifier_history_["classifier (kappa * CE)"].append(float(loss))
                self.classifier_history_["classifier accuracy"].append(float(acc))
                model.classifier_log.clear()

        self.history_ = fit(model, data, epochs=self.epochs, optimizer=optimizer, callback=end_of_epoch,
                            progress=self.progress, desc="gimVI")
        model.eval()
        self.model_ = model
        return model

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def _chunks(X, fn, size: int = 4096) -> np.ndarray:
        return np.concatenate([fn(torch.from_numpy(X[s: s + size].toarray())).numpy()
                               for s in range(0, X.shape[0], size)])

    def impute(self, model: JVAE, prep: dict, decode_mode: int = SPATIAL) -> np.ndarray:
        """Step 7 for every spatial cell: (n_sp, G) expected counts of the modelled genes (``prep["modelled"]``)."""
        return self._chunks(prep["x_sp"], lambda x: model.impute(x, decode_mode))

    def latent(self, model: JVAE, prep: dict) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means of every reference cell and every spatial cell, (n_seq, L) and (n_sp, L)."""
        return (self._chunks(prep["x_seq"], lambda x: model.latent(x, SEQ)),
                self._chunks(prep["x_sp"], lambda x: model.latent(x, SPATIAL)))

    def run(self, adata, reference=None):
        prep = self.prepare(adata, reference)
        model = self.train(prep)
        values = self.impute(model, prep)
        cols = [prep["modelled"].index(g) for g in prep["targets"]]
        write_frame(adata, f"imputed_{self.key}", values[:, cols], prep["targets"])
        adata.obsm[f"X_{self.key}"] = self.latent(model, prep)[1].astype(np.float32)
        adata.uns[self.key] = {"imputed_genes": prep["targets"], "spatial_genes": prep["shared"],
                               "modelled_genes": prep["modelled"], "kappa": self.kappa}
        self.prep_ = prep
        return adata
