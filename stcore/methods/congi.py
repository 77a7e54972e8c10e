r"""ConGI: contrastive learning between gene expression and histology images, fused into one embedding.

Zeng Y, Yin R, Luo M, *et al.* Identifying spatial domain by adapting transcriptomics with histopathology through
contrastive learning. *Brief Bioinform* 24, bbad048 (2023). Official code: biomed-AI/ConGI (``train.py``,
``model.py``, ``dataset.py``, ``loss.py``). Defaults below are those of its ``train.py``.

Pipeline (integration strategy: *fusion* — a gene encoder and an image encoder are trained to agree through
contrastive losses, and their embeddings are added into one):

1. **Gene input** (:func:`congi_gene_features`, the official ``pca`` route): drop genes detected in fewer than
   ``min_cells`` = 3 spots, normalise each spot to total 1 (``normalize_total(target_sum=1,
   exclude_highly_expressed=True)``; **no log**), scale each gene to zero mean and unit variance, PCA to
   ``n_pcs`` = 300: :math:`X \in \mathbb R^{N \times 300}`.
2. **Image input**: a square crop of ``tile_fullres`` = 224 full-resolution pixels around each spot (officially
   ``img_size`` = 112 is the half-width), at least 16 image pixels wide (:func:`congi_tiles`).
3. **Augmentations.** Gene vector (:func:`gene_augment`), three independent operations, each applied with
   probability 0.5: zero a random 20 % of the entries; add :math:`\mathcal N(0, 0.5^2)` noise to a random 80 %;
   swap 15 random pairs of entries (10 % of 300, halved). Image (:func:`image_augment`): random horizontal and
   vertical flips, a colour jitter (0.4, 0.4, 0.4, hue 0.1) with probability 0.8, greyscale with probability 0.2
   (:func:`stcore.images.augment` without its crop, rotation and blur) and a Cutout with probability 0.5.
4. **Model** (:class:`ConGIModel`). Gene encoder :math:`f_g`: MLP 300 → 128 → 64, every block Linear +
   BatchNorm + ELU (+ Dropout ``p_drop`` = 0). Image encoder :math:`f_i`: a CNN, then one such block to 64. A
   projector :math:`p` (64 → 64, ReLU, 64 → 64) **shared** by both modalities.
5. **Loss** with NT-Xent (SimCLR; cosine similarity, temperature :math:`\tau` = 1,
   :func:`stcore.nn.info_nce`, written :math:`\ell(a, b)` below) on a mini-batch of B spots:

   .. math:: L = L_{g2i} + 0.1\,L_{g2g} + 0.1\,L_{i2i}

   .. math:: L_{g2i} = \lambda\,\ell\big(p f_g(\bar x), p f_i(t_u)\big)
                     + (1 - \lambda)\,\ell\big(p f_g(\bar x), p f_i(t_u)_\pi\big), \quad
             \bar x = \lambda x + (1 - \lambda) x_\pi

   .. math:: L_{g2g} = \lambda'\,\ell\big(p f_g(\bar x_u), p f_g(x_v)\big)
                     + (1 - \lambda')\,\ell\big(p f_g(\bar x_u), p f_g(x_v)_{\pi'}\big), \quad
             \bar x_u = \lambda' x_u + (1 - \lambda') x_{u, \pi'}

   .. math:: L_{i2i} = \ell\big(p f_i(t_u), p f_i(t_v)\big)

   where :math:`x_u, x_v` are two gene augmentations and :math:`t_u, t_v` two image augmentations of the batch,
   :math:`\pi, \pi'` random permutations of the batch and :math:`\lambda, \lambda' \sim \mathrm{Beta}(0.2, 0.2)`
   (mixup, as the official ``mixup_data`` / ``mixup_criterion``). AdamW (lr 3e-4, weight decay 0.01), batch 64,
   ``epochs`` (officially 250).
6. **Embedding and domains**: in eval mode, without augmentation,

   .. math:: z = f_g(x) + 0.1\,f_i(t) \in \mathbb R^{64}

   clustered by a Gaussian mixture with a shared covariance (mclust's EEE, :func:`stcore.cluster.gmm`) into
   ``n_domains`` = K clusters. Optional refinement (``refine=True``): the official majority vote over the 24
   nearest spots when there are more than 1000 spots, else 4 (``refine_k`` overrides).

``histology=False`` keeps the gene branch alone: the loss is :math:`0.1\,L_{g2g}` (Adam's steps do not depend on
the constant factor), :math:`z = f_g(x)`, and the image is never read.

Deliberate deviations from the official code
---------------------------------------------
* **Image encoder.** The official encoder is an ImageNet DenseNet-121 (1024 features), fine-tuned for 250 epochs
  on 224 × 224 crops with three image passes per step: hours on a GPU, impractical on a CPU, and the ImageNet
  weights cannot be downloaded here. By default (``image_encoder="finetune"``) it is replaced by the course's small
  :class:`stcore.nn.TileCNN` (``tile_latent`` = 64 features, ``tile_width`` = 16 channels), randomly initialised
  and trained jointly with the rest, as the official code fine-tunes its backbone; ``tile_weights`` (a saved
  TileCNN state dict) starts it from pretrained weights instead. ``image_encoder="frozen"`` is a cheaper variant:
  the CNN is trained first on the slide's tiles with SimCLR (``tile_epochs``) and frozen
  (:func:`congi_tile_views`); each tile is encoded plain and under ``n_views`` = 8 random augmentations, each step
  picks two different views, and only the block after the CNN learns from ConGI's losses. Tiles are at least 16
  image pixels: on DLPFC's 600 × 600 low-resolution image (the only one in the course data) a 224-pixel crop would
  be 10 pixels wide.
* **Epochs.** 250 official, 20 here (the default ``epochs``), to keep one DLPFC slide within a few minutes on one
  CPU core. Measured on DLPFC 151673 (K = 7, seed 0, no refinement) under a busy machine: fine-tuned CNN, 20
  epochs: ARI 0.35; frozen CNN, 60 epochs: 0.21; without the image: 0.41 (5 epochs) and 0.42 (60 epochs).
* **PCA.** scanpy's exact ARPACK PCA (about 35 s for 300 components of one DLPFC slide on one core) is replaced
  by a seeded randomised SVD (4 power iterations, a few seconds) with the same leading components; the trailing
  ones, which carry near-equal noise variance, differ. ``exact_pca=True`` restores the exact PCA. Genes are scaled
  with the population standard deviation (scanpy: n - 1), a common factor.
* **All spots are used.** The official code drops every spot without a manual ``layer_guess`` label *before
  training* (the ground truth filters the data). Here all spots are trained on and clustered; unlabelled spots are
  only left out of the scores (:func:`stcore.metrics.domain_scores`).
* **Mixup partners.** torchtoolbox's ``mixup_data`` mixes row i of a batch with row B - 1 - i; here the partner
  is drawn by a random permutation. Batches are shuffled, so both pair each spot with a random other one. The
  official code passes the permuted images (and gene views) through the encoders a second
  time; in training mode BatchNorm uses the batch statistics, which a permutation does not change, so here the
  encoded batch is permuted instead (the same values, one pass fewer). BatchNorm's running statistics are
  therefore updated from three encoder calls per step instead of four.
* **Cutout** (torchtoolbox's, probability 0.5) erases a rectangle of 2–40 % of the tile with aspect ratio in
  [0.4, 2.5]; here it is filled with one random colour (torchtoolbox's random fill may be per pixel), and applied
  after the colour jitter instead of before it. Augmentations are vectorised over the batch and seeded.
* **Gaussian mixture** in Python (:func:`stcore.cluster.gmm`, k-means start) instead of R's ``mclust``
  (hierarchical start): the same EEE model, possibly different labels.
* **Refinement neighbours** come from ``obsm["spatial"]`` (any AnnData has it) instead of the Visium array
  coordinates (``array_row``, ``array_col``), in which a row step is shorter than a column step, so the 24-spot
  windows differ slightly at their rim.
* **Not used**, as in the official code: the reconstruction term (weight 0) and the position embeddings
  (commented out there).
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import scanpy as sc
import torch
from torch import nn

from .. import images, preprocess
from ..nn import MLP, TileCNN, info_nce
from ..train import fit, set_seed
from ..validation import check_n_clusters, counts_matrix, spatial_coords
from . import Method, register
from ._common import embedding_to_domains, write_domains

__all__ = [
    "ConGI",
    "ConGIModel",
    "congi_gene_features",
    "congi_tile_views",
    "congi_tiles",
    "cutout",
    "gene_augment",
    "image_augment",
    "mixup",
]


# ------------------------------------------------------------------------------------------------ inputs
def congi_gene_features(adata, n_pcs: int = 300, *, min_cells: int = 3, seed: int = 0,
                        exact: bool = False) -> np.ndarray:
    """Step 1: filter genes (``min_cells``), normalise each spot to total 1 (no log), scale genes, PCA.

    The PCA is :func:`stcore.preprocess.pca` with the randomised solver (seeded), whose leading components match
    the exact ones in a fraction of ARPACK's time; ``exact=True`` uses the exact ARPACK PCA (as scanpy, about 35 s
    on one DLPFC slide on one core).

    Returns (N, min(n_pcs, N - 1, G - 1)) float32.
    """
    counts = counts_matrix(adata)
    tmp = ad.AnnData(X=counts.astype(np.float32))
    sc.pp.filter_genes(tmp, min_cells=min_cells)
    if tmp.n_vars < 2:
        raise ValueError(f"Only {tmp.n_vars} gene(s) are detected in at least min_cells={min_cells} spots; "
                         "lower min_cells or check that adata.X holds the counts.")
    X = sc.pp.normalize_total(tmp, target_sum=1, exclude_highly_expressed=True, inplace=False)["X"]
    solver = "arpack" if exact else "randomized"
    return np.ascontiguousarray(preprocess.pca(X, n_pcs, seed=seed, scale=True, solver=solver), dtype=np.float32)


def congi_tile_views(tiles, *, n_views: int = 8, n_latent: int = 64, epochs: int = 5, width: int = 16,
                     weights: str | None = None, seed: int = 0, max_train_tiles: int = 10_000,
                     progress: bool = True) -> np.ndarray:
    """Frozen image encoder: features of each tile and of ``n_views`` random ConGI augmentations of it.

    The encoder is a :class:`stcore.nn.TileCNN` loaded from ``weights``, or else trained for ``epochs`` on the
    slide's tiles with SimCLR (:func:`stcore.images.train_tile_encoder`, on at most ``max_train_tiles`` tiles).
    Returns (n_views + 1, N, n_latent) float32: row 0 the plain tiles, rows 1.. the augmented views
    (:func:`image_augment`).
    """
    if int(n_views) != n_views or n_views < 2:
        raise ValueError(f"n_views={n_views}: the image-image loss needs at least 2 augmented views per tile.")
    if weights is not None:
        encoder = TileCNN(n_latent=n_latent, width=width).load_pretrained(weights).eval()
    else:
        train = tiles
        if len(tiles) > max_train_tiles:
            pick = np.random.default_rng(seed).choice(len(tiles), int(max_train_tiles), replace=False)
            train = tiles[np.sort(pick)]
        encoder, _ = images.train_tile_encoder(train, n_latent=n_latent, epochs=epochs, seed=seed, width=width,
                                               progress=progress)
    g = torch.Generator().manual_seed(int(seed))
    out = [images.encode_tiles(encoder, tiles)]
    out += [images.encode_tiles(encoder, image_augment(tiles, g)) for _ in range(int(n_views))]
    return np.stack(out)


def congi_tiles(adata, tile_fullres: float = 224.0, *, min_px: int = 16, library_id: str | None = None) -> np.ndarray:
    """Step 2: the H&E tile of each spot, (N, S, S, 3) uint8, ``S = max(min_px, round(tile_fullres * scale))``.

    ``obsm["tiles"]`` is used when present (tiles already cut from the full-resolution image).
    """
    if "tiles" in adata.obsm:
        tiles = np.asarray(adata.obsm["tiles"])
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"obsm['tiles'] must be (n_spots, H, W, 3) uint8, got {tiles.shape} {tiles.dtype}.")
        return tiles
    image, scale = images.image_and_scale(adata, library_id, resolution=None)
    size = max(int(min_px), round(tile_fullres * scale))
    return images.spot_tiles(image, spatial_coords(adata), size, scale)


# ------------------------------------------------------------------------------------------------ augmentations
def _random_subset(shape: tuple[int, int], n_pick: int, g: torch.Generator) -> torch.Tensor:
    """Boolean (B, D) mask with exactly ``n_pick`` random True entries in each row (uniform over subsets)."""
    d = shape[1]
    n_pick = max(0, min(int(n_pick), d))
    small = min(n_pick, d - n_pick)                       # draw the smaller of the subset and its complement
    mask = torch.zeros(shape, dtype=torch.bool)
    if small > 0:
        mask.scatter_(1, torch.rand(shape, generator=g).topk(small, dim=1).indices, True)
    return mask if small == n_pick else ~mask


def gene_augment(x: torch.Tensor, generator: torch.Generator | int | None = None, *, prob_mask: float = 0.5,
                 pct_mask: float = 0.2, prob_noise: float = 0.5, pct_noise: float = 0.8, sigma_noise: float = 0.5,
                 prob_swap: float = 0.5, pct_swap: float = 0.1) -> torch.Tensor:
    """One random view of each row of ``x`` (B, D): ConGI's mask / noise / swap, each with its own probability.

    For each row independently: with probability ``prob_mask`` set ``int(D * pct_mask)`` random entries to 0;
    then with probability ``prob_noise`` add :math:`\\mathcal N(0, \\sigma^2)` to ``int(D * pct_noise)`` random
    entries; then with probability ``prob_swap`` swap the values of ``int(D * pct_swap / 2)`` random pairs of
    entries (drawn with replacement, as in the official code). Returns a new (B, D) tensor.
    """
    for name, p in (("prob_mask", prob_mask), ("prob_noise", prob_noise), ("prob_swap", prob_swap),
                    ("pct_mask", pct_mask), ("pct_noise", pct_noise), ("pct_swap", pct_swap)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name}={p}: probabilities and fractions must lie in [0, 1].")
    if x.dim() != 2:
        raise ValueError(f"gene_augment needs a (B, D) batch, got shape {tuple(x.shape)}.")
    g = images._generator(generator)
    b, d = x.shape
    x = x.clone()
    on = (torch.rand(b, generator=g) < prob_mask)[:, None]
    x = torch.where(on & _random_subset((b, d), int(d * pct_mask), g), torch.zeros_like(x), x)
    on = (torch.rand(b, generator=g) < prob_noise)[:, None]
    noise = torch.randn((b, d), generator=g).to(x) * sigma_noise
    x = x + torch.where(on & _random_subset((b, d), int(d * pct_noise), g), noise, torch.zeros_like(x))
    n_pairs = int(d * pct_swap / 2)
    if n_pairs > 0:
        on = (torch.rand(b, generator=g) < prob_swap)[:, None]
        first = torch.randint(0, d, (b, n_pairs), generator=g)
        second = torch.randint(0, d, (b, n_pairs), generator=g)
        swapped = x.clone()
        swapped.scatter_(1, first, x.gather(1, second))
        swapped.scatter_(1, second, x.gather(1, first))
        x = torch.where(on, swapped, x)
    return x


def cutout(x: torch.Tensor, generator: torch.Generator | int | None = None, *, p: float = 0.5,
           scale: tuple[float, float] = (0.02, 0.4), ratio: tuple[float, float] = (0.4, 2.5)) -> torch.Tensor:
    """With probability ``p`` per tile, fill a random rectangle (area fraction in ``scale``, aspect ratio in
    ``ratio``) with one random colour. ``x`` (n, 3, H, W) float in [0, 1]; returns a new tensor."""
    if not 0 <= p <= 1:
        raise ValueError(f"p={p}: a probability must lie in [0, 1].")
    g = images._generator(generator)
    n, _, h, w = x.shape
    on = torch.rand(n, generator=g) < p
    area = images._uniform(n, scale[0], scale[1], g) * h * w
    r = torch.exp(images._uniform(n, math.log(ratio[0]), math.log(ratio[1]), g))
    eh = torch.sqrt(area * r).round().clamp(1, h)
    ew = torch.sqrt(area / r).round().clamp(1, w)
    top = (torch.rand(n, generator=g) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).floor()
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    box = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
           & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None]) & on[:, None, None])
    colour = torch.rand((n, 3, 1, 1), generator=g).to(x)
    return torch.where(box[:, None], colour.expand_as(x), x)


def image_augment(tiles, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """ConGI's image view: flips, colour jitter (0.4, 0.4, 0.4, 0.1) w.p. 0.8, grey w.p. 0.2, Cutout w.p. 0.5.

    ``tiles`` (n, H, W, 3) uint8 or (n, 3, H, W) float in [0, 1] -> (n, 3, H, W) float in [0, 1]. The ImageNet
    normalisation happens inside :class:`stcore.nn.TileCNN`.
    """
    g = images._generator(generator)
    x = images.augment(tiles, g, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, rotate=False, p_jitter=0.8,
                       brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p_grey=0.2, p_blur=0.0)
    return cutout(x, g, p=0.5)


def mixup(x: torch.Tensor, generator: torch.Generator | int | None = None, alpha: float = 0.2):
    """In-batch mixup: ``(lam * x + (1 - lam) * x[perm], perm, lam)`` with ``lam ~ Beta(alpha, alpha)`` and
    ``perm`` a random permutation of the rows (torchtoolbox's ``mixup_data`` reverses the row order instead; on
    shuffled batches both mix each spot with a random other one)."""
    g = images._generator(generator)
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=g)
    return lam * x + (1 - lam) * x[perm], perm, lam


# ------------------------------------------------------------------------------------------------ model
def _block_mlp(dims, p_drop: float) -> MLP:
    """Linear + BatchNorm + ELU (+ Dropout) for every layer, the official ``LinearBlock``."""
    return MLP(list(dims), activation="elu", batch_norm=True, last_activation=True, dropout=p_drop)


class ConGIModel(nn.Module):
    """Gene MLP, image encoder + block, shared projector, and the three contrastive losses (steps 3-5).

    Parameters
    ----------
    genes
        (N, n_in) gene input X.
    tiles
        (N, S, S, 3) uint8 tiles for ``image_encoder="finetune"`` (a :class:`stcore.nn.TileCNN` trained jointly),
        or ``None``.
    tile_views
        For ``image_encoder="frozen"``: (A + 1, N, d) features of each tile from a frozen encoder, row 0 without
        augmentation, rows 1..A of A random augmentations; each training step picks two different augmented
        rows per spot. ``None`` with ``tiles=None`` means no histology.

    ``loss(idx)`` takes a LongTensor of spot indices (one mini-batch) and returns the weighted terms
    ``{"g2i", "g2g", "i2i"}`` (``{"g2g"}`` without histology); :meth:`epoch_batches` draws the epoch's gene
    augmentations and image views and returns its shuffled mini-batches; :meth:`embed` returns z (N, n_latent).
    """

    def __init__(self, genes, tiles=None, tile_views=None, *, gene_hidden=(128,), n_latent: int = 64,
                 p_drop: float = 0.0, tile_latent: int = 64, tile_width: int = 16, tile_weights: str | None = None,
                 tau: float = 1.0, w_g2i: float = 1.0, w_g2g: float = 0.1, w_i2i: float = 0.1,
                 image_weight: float = 0.1, mixup_alpha: float = 0.2, gene_aug: dict | None = None,
                 batch_size: int = 64, seed: int = 0):
        super().__init__()
        if tiles is not None and tile_views is not None:
            raise ValueError("Give tiles (fine-tuned CNN) or tile_views (frozen encoder), not both.")
        self.register_buffer("genes", torch.as_tensor(np.asarray(genes), dtype=torch.float32))
        n = self.genes.shape[0]
        self.gene_encoder = _block_mlp([self.genes.shape[1], *gene_hidden, n_latent], p_drop)
        self.projector = nn.Sequential(nn.Linear(n_latent, n_latent), nn.ReLU(), nn.Linear(n_latent, n_latent))
        self.mode = "finetune" if tiles is not None else "frozen" if tile_views is not None else None
        self.histology = self.mode is not None
        if self.mode == "finetune":
            tiles = torch.as_tensor(np.ascontiguousarray(tiles))
            if tiles.shape[0] != n:
                raise ValueError(f"{tiles.shape[0]} tiles for {n} spots: give one tile per spot.")
            self.register_buffer("tiles", tiles)
            self.cnn = TileCNN(n_latent=tile_latent, width=tile_width)
            if tile_weights is not None:
                self.cnn.load_pretrained(tile_weights)
            self.image_linear = _block_mlp([tile_latent, n_latent], p_drop)
        elif self.mode == "frozen":
            views = torch.as_tensor(np.asarray(tile_views), dtype=torch.float32)
            if views.dim() != 3 or views.shape[1] != n or views.shape[0] < 3:
                raise ValueError(f"tile_views must be (A + 1, {n}, d) with A >= 2 augmented views, "
                                 f"got {tuple(views.shape)}.")
            self.register_buffer("tile_views", views)
            self.image_linear = _block_mlp([views.shape[2], n_latent], p_drop)
        self.tau, self.w_g2i, self.w_g2g, self.w_i2i = tau, w_g2i, w_g2g, w_i2i
        self.image_weight, self.mixup_alpha, self.batch_size = image_weight, mixup_alpha, int(batch_size)
        self.gene_aug = dict(gene_aug or {})
        self.generator = torch.Generator().manual_seed(int(seed))
        self._epoch = None

    def epoch_batches(self) -> list:
        """Draw this epoch's two gene views and two image views of every spot, and shuffled index batches of
        ``batch_size`` (a last batch of one spot joins the previous one: BatchNorm needs two rows)."""
        g, n = self.generator, self.genes.shape[0]
        views = {"xg_u": gene_augment(self.genes, g, **self.gene_aug),
                 "xg_v": gene_augment(self.genes, g, **self.gene_aug)}
        if self.mode == "finetune":
            views["t_u"] = image_augment(self.tiles, g)
            views["t_v"] = image_augment(self.tiles, g)
        elif self.mode == "frozen":
            a = self.tile_views.shape[0] - 1
            u = torch.randint(0, a, (n,), generator=g)
            v = (u + torch.randint(1, a, (n,), generator=g)) % a       # a different view
            views["t_u"] = self.tile_views[1 + u, torch.arange(n)]
            views["t_v"] = self.tile_views[1 + v, torch.arange(n)]
        self._epoch = views
        batches = list(torch.randperm(n, generator=g).split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < 2:
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        return batches

    def encode_image(self, x) -> torch.Tensor:
        """f_i: tiles (b, 3, S, S) in [0, 1] (fine-tuned CNN) or frozen features (b, d) -> (b, n_latent)."""
        return self.image_linear(self.cnn(x) if self.mode == "finetune" else x)

    def loss(self, idx: torch.Tensor) -> dict:
        if self._epoch is None:
            self.epoch_batches()
        g, views = self.generator, self._epoch
        terms = {}
        if self.histology:
            hi_u = self.projector(self.encode_image(views["t_u"][idx]))
            hi_v = self.projector(self.encode_image(views["t_v"][idx]))
            x_mix, perm, lam = mixup(self.genes[idx], g, self.mixup_alpha)
            hg = self.projector(self.gene_encoder(x_mix))
            terms["g2i"] = self.w_g2i * (lam * info_nce(hg, hi_u, self.tau)
                                         + (1 - lam) * info_nce(hg, hi_u[perm], self.tau))
        u_mix, perm, lam = mixup(views["xg_u"][idx], g, self.mixup_alpha)
        hg_u = self.projector(self.gene_encoder(u_mix))
        hg_v = self.projector(self.gene_encoder(views["xg_v"][idx]))
        terms["g2g"] = self.w_g2g * (lam * info_nce(hg_u, hg_v, self.tau)
                                     + (1 - lam) * info_nce(hg_u, hg_v[perm], self.tau))
        if self.histology:
            terms["i2i"] = self.w_i2i * info_nce(hi_u, hi_v, self.tau)
        return terms

    @torch.no_grad()
    def embed(self, batch_size: int = 1024, parts: bool = False):
        """z = f_g(x) + image_weight * f_i(t) in eval mode, without augmentation. (N, n_latent) numpy array;
        with ``parts=True`` the tuple ``(z, f_g(x), f_i(t))`` (the last ``None`` without histology)."""
        was = self.training
        self.eval()
        zg = self.gene_encoder(self.genes)
        zi = None
        if self.histology:
            source = self.tiles if self.mode == "finetune" else self.tile_views[0]
            zi = torch.cat([self.encode_image(source[i:i + batch_size])
                            for i in range(0, source.shape[0], batch_size)])
        self.train(was)
        z = zg if zi is None else zg + self.image_weight * zi
        if parts:
            return z.numpy(), zg.numpy(), None if zi is None else zi.numpy()
        return z.numpy()


# ------------------------------------------------------------------------------------------------ the method
@register
class ConGI(Method):
    """ConGI (Zeng et al. 2023): gene and H&E encoders aligned by contrastive losses; domains from a GMM.

    Options follow the official ``train.py`` (see the module docstring for every step): gene input
    (``n_pcs``, ``min_cells``, ``exact_pca``), image (``image_encoder``: ``"frozen"`` or ``"finetune"``,
    ``tile_fullres``, ``tile_weights``, ``tile_epochs``, ``tile_latent``, ``tile_width``, ``n_views``),
    augmentations (``prob_mask``, ``pct_mask``, ``prob_noise``, ``pct_noise``, ``sigma_noise``, ``prob_swap``,
    ``pct_swap``, ``mixup_alpha``), model (``gene_hidden``, ``n_latent``, ``p_drop``), loss (``tau``, ``w_g2g``,
    ``w_i2i``), training (``epochs``, ``batch_size``, ``lr``, ``weight_decay``), fusion (``image_weight``),
    domains (``refine``, ``refine_k``: ``None`` = the official 24 above 1000 spots, else 4).
    """

    name = "congi"
    task = "domains"
    summary = "contrastive gene/H&E encoders (3 NT-Xent losses), fused embedding + GMM"
    paper = "Zeng et al., Brief Bioinform 2023"
    uses_image = True

    def __init__(self, n_domains: int | None = 7, *, histology: bool = True, refine: bool = False, seed: int = 0,
                 progress: bool = True, epochs: int = 20, batch_size: int = 64, lr: float = 3e-4,
                 weight_decay: float = 0.01, n_pcs: int = 300, min_cells: int = 3, exact_pca: bool = False,
                 gene_hidden: tuple[int, ...] = (128,), n_latent: int = 64, p_drop: float = 0.0,
                 image_encoder: str = "finetune", tile_fullres: float = 224.0, tile_weights: str | None = None,
                 tile_epochs: int = 5, tile_latent: int = 64, tile_width: int = 16, n_views: int = 8,
                 tau: float = 1.0, w_g2g: float = 0.1, w_i2i: float = 0.1, image_weight: float = 0.1,
                 mixup_alpha: float = 0.2, prob_mask: float = 0.5, pct_mask: float = 0.2, prob_noise: float = 0.5,
                 pct_noise: float = 0.8, sigma_noise: float = 0.5, prob_swap: float = 0.5, pct_swap: float = 0.1,
                 refine_k: int | None = None, library_id: str | None = None):
        if n_domains is None or int(n_domains) != n_domains or n_domains < 1:
            raise ValueError(f"n_domains={n_domains}: ConGI clusters with a Gaussian mixture, which needs the "
                             "number of domains K (command line: --n-domains K).")
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"epochs={epochs}: must be a positive integer (official 250).")
        if int(batch_size) != batch_size or batch_size < 2:
            raise ValueError(f"batch_size={batch_size}: contrastive training needs at least 2 spots per batch "
                             "(official 64).")
        if tau <= 0 or lr <= 0:
            raise ValueError(f"tau={tau}, lr={lr}: both must be > 0 (official 1 and 3e-4).")
        if mixup_alpha <= 0:
            raise ValueError(f"mixup_alpha={mixup_alpha}: the Beta(alpha, alpha) parameter must be > 0 "
                             "(official 0.2).")
        if image_encoder not in ("frozen", "finetune"):
            raise ValueError(f"image_encoder={image_encoder!r}: use 'frozen' (a SimCLR-trained tile CNN, then a "
                             "trainable block) or 'finetune' (the tile CNN trained with the contrastive losses).")
        if int(n_views) != n_views or n_views < 2:
            raise ValueError(f"n_views={n_views}: the image-image loss needs at least 2 augmented views per tile.")
        if refine_k is not None and refine_k < 1:
            raise ValueError(f"refine_k={refine_k}: give a positive number of neighbours, or None for the official "
                             "rule (24 above 1000 spots, else 4).")
        self.n_domains, self.histology, self.refine, self.seed = int(n_domains), histology, refine, seed
        self.progress, self.epochs, self.batch_size = progress, int(epochs), int(batch_size)
        self.lr, self.weight_decay, self.n_pcs, self.min_cells = lr, weight_decay, n_pcs, min_cells
        self.exact_pca, self.image_encoder, self.tile_fullres = exact_pca, image_encoder, tile_fullres
        self.tile_weights, self.tile_epochs, self.tile_latent = tile_weights, tile_epochs, tile_latent
        self.tile_width, self.n_views, self.library_id = tile_width, int(n_views), library_id
        self.gene_aug = {"prob_mask": prob_mask, "pct_mask": pct_mask, "prob_noise": prob_noise,
                         "pct_noise": pct_noise, "sigma_noise": sigma_noise, "prob_swap": prob_swap,
                         "pct_swap": pct_swap}
        gene_augment(torch.zeros(1, 4), 0, **self.gene_aug)          # fail early on a bad probability
        self.model_kwargs = {"gene_hidden": tuple(gene_hidden), "n_latent": n_latent, "p_drop": p_drop,
                             "tile_latent": tile_latent, "tile_width": tile_width, "tile_weights": tile_weights,
                             "tau": tau, "w_g2g": w_g2g, "w_i2i": w_i2i, "image_weight": image_weight,
                             "mixup_alpha": mixup_alpha, "gene_aug": self.gene_aug, "batch_size": batch_size}
        self.refine_k = refine_k

    def prepare(self, adata) -> dict:
        """Steps 1-2: ``{"genes": X (N, n_pcs), "tiles": (N, S, S, 3) uint8, "tile_views": (A + 1, N, d)}``
        (the image entries only where the image encoder needs them; none without histology)."""
        spatial_coords(adata)
        check_n_clusters(self.n_domains, adata.n_obs)
        if adata.n_obs < 3:
            raise ValueError(f"ConGI needs at least 3 spots (got {adata.n_obs}).")
        inputs = {"genes": congi_gene_features(adata, self.n_pcs, min_cells=self.min_cells, seed=self.seed,
                                               exact=self.exact_pca)}
        if self.histology:
            tiles = congi_tiles(adata, self.tile_fullres, library_id=self.library_id)
            if self.image_encoder == "finetune":
                inputs["tiles"] = tiles
            else:
                inputs["tile_views"] = congi_tile_views(
                    tiles, n_views=self.n_views, n_latent=self.tile_latent, epochs=self.tile_epochs,
                    width=self.tile_width, weights=self.tile_weights, seed=self.seed, progress=self.progress)
        return inputs

    def train_model(self, inputs: dict) -> ConGIModel:
        """Steps 3-5; keeps ``history_`` (per-epoch mean of each weighted loss term)."""
        set_seed(self.seed)
        kwargs = dict(self.model_kwargs)
        if "tile_views" in inputs:
            kwargs.pop("tile_weights")                    # the frozen encoder already used them
        model = ConGIModel(inputs["genes"], inputs.get("tiles"), inputs.get("tile_views"), seed=self.seed,
                           **kwargs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.history_ = fit(model, model.epoch_batches, epochs=self.epochs, optimizer=optimizer,
                            progress=self.progress, desc="ConGI")
        return model

    def domain_labels(self, z: np.ndarray, coords=None) -> np.ndarray:
        """Step 6: GMM (EEE) with K = ``n_domains``, refined over ``refine_k`` (official 24 / 4) spots when
        ``coords`` are given."""
        k = self.refine_k if self.refine_k is not None else (24 if len(z) > 1000 else 4)
        return embedding_to_domains(z, self.n_domains, clustering="gmm", seed=self.seed, refine_with=coords,
                                    refine_k=min(k, len(z) - 1))

    def run(self, adata, reference=None):
        model = self.train_model(self.prepare(adata))
        z = model.embed()
        labels = self.domain_labels(z, spatial_coords(adata) if self.refine else None)
        write_domains(adata, self.key, labels, z)
        return adata
