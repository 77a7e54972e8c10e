"""SpaCell: autoencoders on spot expression and H&E tile features, clustered together by k-means.

Tan X, Su A, Tran M, Nguyen Q. SpaCell: integrating tissue morphology and spatial gene expression to predict
disease cells. *Bioinformatics* 36(7), 2293–2294 (2020). Official code: BiomedicalMachineLearning/Spacell
(``SpaCell/spacell_clustering.py``, ``model.py``, ``count_matrix_normalization.py``).

Pipeline (integration strategy: *fusion* — two modality-specific latent spaces are joined before clustering):

1. Expression: keep genes with at least one count in at least 1 % of the spots; divide each spot by its total
   (proportions, no log); keep 2048 genes (``n_genes``); PCA (200 components; all in the official code); min-max
   scale each column to
   [0, 1]: :math:`x_i \\in [0, 1]^{G'}`.
2. Image: a 299 × 299 full-resolution-pixel tile around each spot goes through a CNN (ResNet-50 ImageNet in the
   original, 2048 features); PCA with all components; min-max scale: :math:`t_i \\in [0, 1]^{D}`.
3. Two autoencoders, one per modality, with the official sizes
   ``n_in → 512 → 256 → 64 → 20 (linear) → 64 → 256 → 512 → n_in (sigmoid)`` (ReLU elsewhere), each trained
   alone on :math:`\\ell(x, \\hat x) = -\\frac1{G'} \\sum_g [x_g \\log \\hat x_g + (1 - x_g) \\log(1 - \\hat x_g)]`
   (binary cross-entropy, the CLI default; ``loss="mse"`` optional), Adam (lr 10⁻³), batch 32, 100 epochs.
4. Fusion: each 20-d bottleneck is min-max scaled to [0, 1] and the two are concatenated,
   :math:`z_i = [\\tilde z^{ge}_i, \\tilde z^{img}_i] \\in [0, 1]^{40}`; k-means with K = ``n_domains``.

``model="combined"`` runs the official *combined* autoencoder instead: ``Dense(256)`` per modality,
concatenated into a 20-d linear bottleneck, ``Dense(512)``, then one sigmoid decoder per modality, trained on the
sum of the two reconstruction losses; k-means on the 20-d bottleneck. (The official script runs both and saves
both; the two-autoencoder fusion is the one described here as SpaCell's clustering.)

Deliberate deviations from the official code
---------------------------------------------
* **Tile CNN.** ImageNet ResNet-50 weights cannot be downloaded here, so the tile features come from
  :func:`stcore.images.slide_tile_features`: the course's TileCNN trained on the slide's own tiles with SimCLR
  (``tile_epochs``), or local weights (``tile_weights``). Its ``n_latent`` (64) replaces ResNet-50's 2048. The
  stain normalisation (Vahadane, staintools) is not applied.
* **Gene selection.** The official ``-v`` option keeps the *first* 2048 genes with non-zero variance (in file
  order), although its help says "top variational"; here the 2048 most variable proportions are kept.
* **Expression PCs.** The official ``-p`` keeps all components (2048 inputs). The first layer then dominates
  the cost (about 50 ms per batch of 32 on one CPU core: 20 minutes for 100 epochs on a 3,600-spot slide), so
  ``n_pcs=200`` components are kept by default; ``n_pcs=None`` restores the official input.
* **Spot filter.** The official normalisation drops spots below the 1 % quantile of detected genes; here every
  spot is kept so that every spot receives a domain.
* **Preprocessing defaults.** The CLI's bare defaults feed unscaled features to sigmoid decoders under binary
  cross-entropy; the defaults here follow the usage example in the script's header (``-p -s -v``: gene
  selection, PCA, min-max scaling).
* PyTorch instead of Keras: the same layer sizes and Keras's initialisers (Glorot-uniform weights, zero biases;
  U(-0.05, 0.05) for the combined bottleneck); ``seed`` fixes weights, batch order and k-means.
* ``histology=False`` keeps only the expression autoencoder (the official "single model, gene count" run) and
  never reads the image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import sparse
from sklearn.decomposition import PCA
from sklearn.preprocessing import minmax_scale
from torch import nn
from torch.nn import functional as F

from .. import cluster, images
from ..train import fit, set_seed
from ..validation import check_n_clusters, counts_matrix
from . import Method, register
from ._common import write_domains

__all__ = ["SpaCell", "SpaCellAE", "SpaCellCombinedAE", "spacell_expression", "spacell_scale", "minibatches"]


# ----------------------------------------------------------------------------------------------------- steps 1-2
def spacell_scale(X, pca: bool = True, scale: bool = True, seed: int = 0, n_pcs: int | None = None) -> np.ndarray:
    """PCA (``n_pcs=None``: all components, a rotation of the centred data) then min-max scaling to [0, 1]."""
    X = np.asarray(X, dtype=np.float64)
    if pca:
        n_comp = min(X.shape) if n_pcs is None else min(int(n_pcs), *X.shape)
        X = PCA(n_components=n_comp, random_state=seed).fit_transform(X)
    if scale:
        X = minmax_scale(X, feature_range=(0, 1), axis=0)
    return X.astype(np.float32)


def spacell_expression(adata, n_genes: int | None = 2048, *, min_spot_fraction: float = 0.01, pca: bool = True,
                       scale: bool = True, seed: int = 0, n_pcs: int | None = 200) -> np.ndarray:
    """SpaCell's expression input (N, G'): gene filter, spot proportions, top-variance genes, PCA, min-max (step 1).

    Genes with at least one count in fewer than ``min_spot_fraction`` of the spots are dropped; each spot is
    divided by its total count; the ``n_genes`` most variable proportions are kept (``None``: all); PCA keeps
    ``n_pcs`` components (``None``: all, as the official ``-p``).
    """
    counts = sparse.csr_matrix(counts_matrix(adata), dtype=np.float64)
    totals = np.asarray(counts.sum(1)).ravel()
    if (totals == 0).any():
        raise ValueError(f"{int((totals == 0).sum())} spots have no counts; remove them before running SpaCell.")
    detected = np.asarray((counts > 0).mean(0)).ravel() >= min_spot_fraction
    if not detected.any():
        raise ValueError(f"No gene is detected in {min_spot_fraction:.0%} of the spots; lower min_spot_fraction.")
    props = (sparse.diags(1.0 / totals) @ counts[:, detected]).tocsr()
    if n_genes is not None and props.shape[1] > n_genes:
        mean = np.asarray(props.mean(0)).ravel()
        var = np.asarray(props.multiply(props).mean(0)).ravel() - mean**2
        props = props[:, np.sort(np.argsort(-var, kind="stable")[:n_genes])]
    return spacell_scale(props.toarray(), pca=pca, scale=scale, seed=seed, n_pcs=n_pcs)


# ----------------------------------------------------------------------------------------------------- step 3
def _dense(n_in: int, n_out: int, init: str = "glorot") -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    if init == "glorot":
        nn.init.xavier_uniform_(layer.weight)
    else:  # Keras "uniform": U(-0.05, 0.05)
        nn.init.uniform_(layer.weight, -0.05, 0.05)
    nn.init.zeros_(layer.bias)
    return layer


def _reconstruction(x_hat: torch.Tensor, x: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "bce":
        return F.binary_cross_entropy(x_hat.clamp(1e-7, 1 - 1e-7), x)  # Keras clips at 1e-7 as well
    return F.mse_loss(x_hat, x)


class SpaCellAE(nn.Module):
    """The single-modality autoencoder ``n_in-512-256-64-[20]-64-256-512-n_in`` (step 3).

    ``loss(x)`` returns ``{"reconstruction": BCE (or MSE)}`` averaged over features and spots.
    """

    def __init__(self, n_in: int, hidden=(512, 256, 64), n_latent: int = 20, loss: str = "bce"):
        super().__init__()
        sizes = [n_in, *hidden]
        enc = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            enc += [_dense(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*enc, _dense(sizes[-1], n_latent))
        back = [n_latent, *hidden[::-1]]
        dec = []
        for a, b in zip(back[:-1], back[1:]):
            dec += [_dense(a, b), nn.ReLU()]
        self.decoder = nn.Sequential(*dec, _dense(back[-1], n_in), nn.Sigmoid())
        self.loss_kind = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, x: torch.Tensor) -> dict:
        return {"reconstruction": _reconstruction(self(x), x, self.loss_kind)}


class SpaCellCombinedAE(nn.Module):
    """The official combined autoencoder: ``Dense(256)`` per modality → concat → 20 → 512 → two sigmoid decoders."""

    def __init__(self, n_genes: int, n_tile: int, n_hidden: int = 256, n_latent: int = 20, loss: str = "bce"):
        super().__init__()
        self.enc_ge = nn.Sequential(_dense(n_genes, n_hidden), nn.ReLU())
        self.enc_tile = nn.Sequential(_dense(n_tile, n_hidden), nn.ReLU())
        self.bottleneck = _dense(2 * n_hidden, n_latent, init="uniform")
        self.inverse = nn.Sequential(_dense(n_latent, 2 * n_hidden), nn.ReLU())
        self.dec_ge = nn.Sequential(_dense(2 * n_hidden, n_genes), nn.Sigmoid())
        self.dec_tile = nn.Sequential(_dense(2 * n_hidden, n_tile), nn.Sigmoid())
        self.loss_kind = loss

    def encoder(self, batch) -> torch.Tensor:
        x, t = batch
        return self.bottleneck(torch.cat([self.enc_ge(x), self.enc_tile(t)], 1))

    def loss(self, batch) -> dict:
        x, t = batch
        h = self.inverse(self.encoder(batch))
        return {"expression": _reconstruction(self.dec_ge(h), x, self.loss_kind),
                "image": _reconstruction(self.dec_tile(h), t, self.loss_kind)}


def minibatches(tensors, batch_size: int = 32, seed: int = 0):
    """A factory of shuffled mini-batches (a fresh order every epoch, Keras ``shuffle=True``) for ``train.fit``."""
    n = tensors[0].shape[0]
    g = torch.Generator().manual_seed(seed)

    def epoch():
        order = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            yield tensors[0][idx] if len(tensors) == 1 else tuple(t[idx] for t in tensors)

    return epoch


# ----------------------------------------------------------------------------------------------------- method
@register
class SpaCell(Method):
    """SpaCell (Tan et al. 2020): expression and tile-feature autoencoders, fused latents, k-means.

    Options (official defaults): ``model`` (``"two_ae"``: one autoencoder per modality, latents min-max scaled
    and concatenated; ``"combined"``: the combined autoencoder), ``loss`` (``"bce"``; or ``"mse"``), ``epochs``
    (100), ``batch_size`` (32), ``lr`` (Adam's 10⁻³), ``n_latent`` (20), ``n_genes`` (2048), ``pca`` / ``scale``
    (PCA, min-max), ``n_pcs`` (200; ``None`` = all, official), ``tile_fullres`` (299 full-resolution pixels). Tile CNN: ``tile_latent``,
    ``tile_epochs``, ``tile_weights``.
    """

    name = "spacell"
    task = "domains"
    summary = "expression + H&E tile autoencoders, fused latents, k-means"
    paper = "Tan et al., Bioinformatics 2020"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, model: str = "two_ae",
                 loss: str = "bce", epochs: int = 100, batch_size: int = 32, lr: float = 1e-3, n_latent: int = 20,
                 n_genes: int | None = 2048, n_pcs: int | None = 200, pca: bool = True, scale: bool = True,
                 tile_fullres: float = 299,
                 tile_latent: int = 64, tile_epochs: int = 30, tile_weights: str | None = None,
                 refine: bool = False, refine_k: int = 6, seed: int = 0, library_id: str | None = None,
                 progress: bool = True):
        if n_domains is None:
            raise ValueError("SpaCell clusters with k-means, which needs the number of domains: pass n_domains=K "
                             "(command line: --n-domains K).")
        if model not in ("two_ae", "combined"):
            raise ValueError(f"model={model!r}: choose 'two_ae' (one autoencoder per modality) or 'combined'.")
        if loss not in ("bce", "mse"):
            raise ValueError(f"loss={loss!r}: choose 'bce' (binary cross-entropy, the default) or 'mse'.")
        if loss == "bce" and not scale:
            raise ValueError("loss='bce' needs inputs in [0, 1]: keep scale=True, or use loss='mse'.")
        for key, value in dict(epochs=epochs, batch_size=batch_size, n_latent=n_latent, tile_latent=tile_latent,
                               tile_epochs=tile_epochs).items():
            if int(value) != value or value < 1:
                raise ValueError(f"{key}={value} must be a positive integer.")
        self.n_domains, self.histology, self.model, self.loss = n_domains, histology, model, loss
        self.epochs, self.batch_size, self.lr, self.n_latent = epochs, batch_size, lr, n_latent
        self.n_genes, self.n_pcs, self.pca, self.scale, self.tile_fullres = n_genes, n_pcs, pca, scale, tile_fullres
        self.tile_latent, self.tile_epochs, self.tile_weights = tile_latent, tile_epochs, tile_weights
        self.refine, self.refine_k, self.seed, self.library_id = refine, refine_k, seed, library_id
        self.progress = progress

    def tile_features(self, adata) -> np.ndarray:
        """Step 2: (N, D) scaled tile features."""
        feats = images.slide_tile_features(adata, self.tile_fullres, n_latent=self.tile_latent,
                                           epochs=self.tile_epochs, seed=self.seed, weights=self.tile_weights,
                                           library_id=self.library_id, progress=self.progress)
        return spacell_scale(feats, pca=self.pca, scale=self.scale, seed=self.seed)

    def _fit(self, model: nn.Module, tensors, desc: str):
        return fit(model, minibatches(tensors, self.batch_size, self.seed), epochs=self.epochs, lr=self.lr,
                   progress=self.progress, desc=desc)

    def embed(self, x: np.ndarray, t: np.ndarray | None) -> np.ndarray:
        """Steps 3–4: train the autoencoder(s) and return the fused latent (N, 20 or 40)."""
        set_seed(self.seed)
        xt = torch.as_tensor(x)
        self.histories_ = {}
        if t is not None and self.model == "combined":
            tt = torch.as_tensor(t)
            ae = SpaCellCombinedAE(x.shape[1], t.shape[1], n_latent=self.n_latent, loss=self.loss)
            self.histories_["combined"] = self._fit(ae, (xt, tt), "SpaCell combined AE")
            with torch.no_grad():
                return ae.encoder((xt, tt)).numpy()
        parts = []
        for key, data in [("expression", x), ("image", t)]:
            if data is None:
                continue
            ae = SpaCellAE(data.shape[1], n_latent=self.n_latent, loss=self.loss)
            self.histories_[key] = self._fit(ae, (torch.as_tensor(data),), f"SpaCell {key} AE")
            with torch.no_grad():
                parts.append(minmax_scale(ae.encoder(torch.as_tensor(data)).numpy(), axis=0))
        return np.concatenate(parts, axis=1)

    def run(self, adata, reference=None):
        from ..validation import spatial_coords

        coords = spatial_coords(adata)
        check_n_clusters(self.n_domains, adata.n_obs)
        x = spacell_expression(adata, self.n_genes, pca=self.pca, scale=self.scale, seed=self.seed, n_pcs=self.n_pcs)
        t = self.tile_features(adata) if self.histology else None
        embedding = self.embed(x, t)
        labels = cluster.kmeans(embedding, self.n_domains, seed=self.seed)
        if self.refine:
            labels = cluster.refine(labels, coords=coords, k=self.refine_k)
        write_domains(adata, self.key, labels, embedding)
        return adata
