# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   stcore:
#     review_section: "ST + histology: spatial domain identification (SpaCell)"
#     strategy: "fusion"
# ---

# %% [markdown]
# # SpaCell: one autoencoder per modality, clustered together
#
# In this chapter you build SpaCell's clustering: an autoencoder compresses each spot's expression, another
# compresses its H&E tile features, and k-means clusters the two latent codes side by side on DLPFC slide 151673.
#
# ```{admonition} Key takeaways
# :class: tip
# * SpaCell is the simplest deep *fusion*: each modality gets its own autoencoder with a 20-d bottleneck; the two
#   codes are min-max scaled, concatenated and clustered by k-means with a given K.
# * Nothing in the model knows where a spot is: space enters only through the tiles (neighbouring tiles look
#   alike), so the domains are as noisy as the spot-level inputs.
# * Check the image's share by ablation: with `histology=False` only the expression autoencoder remains; on a
#   low-resolution image the tile code can help or hurt, and the table says which.
# ```
#
# **Prerequisites:** {doc}`../p1_toolbox/c01_cnn_histology_tiles` (tile encoders),
# {doc}`../p1_toolbox/c03_autoencoders_vaes` (autoencoders).
# **Run time:** about 5–8 minutes on 2 CPU cores (FAST mode: under a minute).

# %%
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

import stcore
from stcore import cluster, images, metrics, plotting
from stcore.methods import get_method
from stcore.methods import spacell as sp

cfg = stcore.config.get()
stcore.train.set_seed(cfg.seed)
cfg

# %% [markdown]
# ## Motivation
#
# A pathologist and a transcriptome see different things in the same spot. SpaCell {cite:p}`tan2020spacell`
# asked whether combining both helps to find cell types and disease stages on legacy ST slides (prostate cancer,
# ALS mouse spinal cord): it trains autoencoders on the counts and on ImageNet CNN features of each spot's tile,
# and clusters the learned codes. In the review {cite:p}`luo2025review` it is the earliest ST + histology
# domain method and a clear example of the *fusion* strategy: two representations are learned separately and
# joined before the downstream task. stLearn ({doc}`c07_stlearn_sme`) uses the same tile features as a *link*
# instead, to weight a spatial smoothing.

# %% [markdown]
# ## The model
#
# With $x_i \in [0, 1]^{G'}$ the scaled expression input and $t_i \in [0, 1]^{D}$ the scaled tile features,
# each autoencoder $f = (E, D)$ has layers $n \to 512 \to 256 \to 64 \to 20 \to 64 \to 256 \to 512 \to n$
# (ReLU, a linear bottleneck, a sigmoid output) and minimises the binary cross-entropy
#
# $$
# \ell(x, \hat x) = -\frac{1}{n}\sum_{g=1}^{n} \bigl[x_g \log \hat x_g + (1 - x_g)\log(1 - \hat x_g)\bigr],
# \qquad \hat x = D(E(x)).
# $$ (eq-spacell-bce)
#
# The fused code is $z_i = [\,\mathrm{mm}(E_{ge}(x_i)),\ \mathrm{mm}(E_{img}(t_i))\,] \in [0, 1]^{40}$
# (mm = min-max scaling of each column), and k-means with K = 7 (the true number of layers, which flatters every
# score) gives the domains.
#
# | object | shape | meaning |
# |---|---|---|
# | $X$ | $N \times 200$ | spot proportions of the 2048 most variable genes, PCA (200 components), min-max scaled |
# | tiles | $N \times 16 \times 16 \times 3$ | 299 full-resolution px around each spot, on the low-resolution image |
# | $T$ | $N \times 64$ | tile CNN features, full PCA, min-max scaled |
# | $E_{ge}(X)$, $E_{img}(T)$ | $N \times 20$ each | bottlenecks |
# | $Z$ | $N \times 40$ | fused code, clustered by k-means (`obsm["X_spacell"]`) |

# %% [markdown]
# ## The data
#
# DLPFC slide 151673 {cite:p}`maynard2021`: Visium spots, 5,000 genes, manual layers in `obs["layer"]` (NaN =
# unlabelled) and the 600 × 600 px low-resolution H&E, where a spot spans about four pixels. FAST mode keeps the
# 800 spots nearest the tissue centre.

# %%
adata = stcore.data.load("dlpfc_151673")
if cfg.fast:
    adata = stcore.data.central_patch(adata, 800)
print(adata.shape, adata.obs["layer"].value_counts(dropna=False).sort_index().to_dict())

# %% [markdown]
# ## Step 1: the expression input
#
# Genes seen in fewer than 1 % of the spots are dropped, each spot becomes proportions (no log), the 2048 most
# variable genes are kept, then a PCA (200 components; the official code keeps all 2048, which makes the first
# layer ten times more expensive) and min-max scaling to $[0, 1]$, which the sigmoid decoder and the
# cross-entropy need.

# %%
x = sp.spacell_expression(adata, n_genes=2048, n_pcs=200, seed=cfg.seed)
print("expression input", x.shape, "range", x.min(), x.max())

# %% [markdown]
# ## Step 2: the tile features
#
# SpaCell passes 299 × 299 px tiles through an ImageNet ResNet-50. Those weights cannot be downloaded here, so the
# course's small tile CNN is trained on the slide's own tiles by SimCLR ({doc}`../p1_toolbox/c01_cnn_histology_tiles`);
# here 299 full-resolution px become 16 low-resolution pixels.

# %%
image, scale = images.image_and_scale(adata, resolution=None)
tiles = images.spot_tiles(image, adata.obsm["spatial"], max(16, round(299 * scale)), scale)
encoder, tile_history = images.train_tile_encoder(tiles, n_latent=64, epochs=cfg.epochs(full=30), seed=cfg.seed)
weights_file = tempfile.NamedTemporaryFile(suffix=".pt", delete=False).name
torch.save(encoder.state_dict(), weights_file)
method = get_method("spacell")(n_domains=7, epochs=cfg.epochs(full=100), tile_weights=weights_file, seed=cfg.seed)
t = method.tile_features(adata)
print("tiles", tiles.shape, "-> tile input", t.shape)

# %% [markdown]
# ## Step 3: two autoencoders
#
# `SpaCell.embed` trains one autoencoder per modality (Adam, batch 32, 100 epochs in full mode) and returns the
# fused code. The layer sizes are the official ones:

# %%
print(sp.SpaCellAE(x.shape[1]))

# %%
Z = method.embed(x, t)
fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
plotting.loss_curves(tile_history, ax=axes[0]); axes[0].set_title("tile CNN (SimCLR)", fontsize=9)
for ax, (name, history) in zip(axes[1:], method.histories_.items()):
    plotting.loss_curves(history, ax=ax); ax.set_title(f"{name} autoencoder", fontsize=9)
plt.tight_layout()

# %% [markdown]
# ## Step 4: fuse and cluster
#
# The two 20-d codes are min-max scaled and concatenated; k-means with K = 7 gives the domains. This is exactly
# what `SpaCell.run` does after `embed`.

# %%
adata.obs["SpaCell"] = pd.Categorical(cluster.kmeans(Z, 7, seed=cfg.seed).astype(str))
adata.obs["SpaCell, expression code only"] = pd.Categorical(cluster.kmeans(Z[:, :20], 7, seed=cfg.seed).astype(str))
adata.obs["SpaCell, image code only"] = pd.Categorical(cluster.kmeans(Z[:, 20:], 7, seed=cfg.seed).astype(str))
print("Z", Z.shape)

# %% [markdown]
# ## Results
#
# We compare the fused code with each half of it, with the registered method run with `histology=False` (only
# the expression autoencoder is trained and the image is never read), and with an expression-only baseline: a
# Gaussian mixture on the PCs of the log-normalised expression (`gmm`).

# %%
no_image = get_method("spacell")(n_domains=7, histology=False, epochs=cfg.epochs(full=100), seed=cfg.seed,
                                 progress=False).run(adata.copy())
adata.obs["SpaCell without histology"] = no_image.obs["domain_spacell"]
adata.obs["GMM on expression PCs"] = get_method("gmm")(n_domains=7, seed=cfg.seed).run(adata.copy()).obs["domain_gmm"]
keys = ["SpaCell", "SpaCell without histology", "GMM on expression PCs"]
fig = plotting.domain_maps(adata, keys, truth="layer", titles=["manual layers"] + keys)

# %%
rows = keys + ["SpaCell, expression code only", "SpaCell, image code only"]
table = pd.DataFrame({k: metrics.domain_scores(adata.obs["layer"], adata.obs[k]) for k in rows}).T.round(3)
table

# %%
gain = table.loc["SpaCell", "ARI"] - table.loc["SpaCell without histology", "ARI"]
print(f"Adding the image code changed the ARI by {gain:+.3f}; the image code alone reaches ARI "
      f"{table.loc['SpaCell, image code only', 'ARI']:.3f}.")

# %% [markdown]
# How to read this: K = 7 is given, the clustering is k-means, and there is a single seed (autoencoder training
# and k-means restarts move the scores by several hundredths). SpaCell has no spatial term, so its domains are
# speckled where the expression is noisy, and the expression-only baseline on log-normalised PCs is a strong
# competitor. The image code on this low-resolution H&E mostly encodes stain density and position on the
# slide (white matter is paler); fused with the expression code it can pull domains towards the image's coarse
# regions, which helps or hurts depending on the run — compare the "image code only" row before crediting the
# image. Independent benchmarks also found SpaCell less accurate than SpaGCN and stLearn.

# %% [markdown]
# ## Exercises
#
# ```{exercise-start}
# :label: c06-ex-combined
# ```
# The official script also trains a *combined* autoencoder: `Dense(256)` per modality, one shared 20-d
# bottleneck, `Dense(512)`, and one decoder per modality. Run it with `model="combined"` and compare its ARI and
# its two loss terms with the two-autoencoder fusion.
# ```{exercise-end}
# ```

# %% [markdown]
# ```{solution-start} c06-ex-combined
# :class: dropdown
# ```

# %%
combined = get_method("spacell")(n_domains=7, model="combined", epochs=cfg.epochs(full=100),
                                 tile_weights=weights_file, seed=cfg.seed, progress=False)
res = combined.run(adata.copy())
print(f"combined AE: ARI {metrics.ari(adata.obs['layer'], res.obs['domain_spacell']):.3f} "
      f"vs two autoencoders {table.loc['SpaCell', 'ARI']:.3f}")
plotting.loss_curves(combined.histories_["combined"]);

# %% [markdown]
# In the combined model both modalities must pass through one 20-d code, and the loss is the sum of the two
# reconstruction errors, so the modality that is easier to reconstruct (here the low-dimensional tile features)
# can dominate the code. Separate autoencoders give each modality its own 20 dimensions and leave the balance to
# the min-max scaling before k-means.
# ```{solution-end}
# ```

# %% [markdown]
# ```{exercise-start}
# :label: c06-ex-refine
# ```
# SpaCell ignores positions. Add the 6-nearest-spot majority vote used by SpaGCN (`refine=True`) to the run
# without histology. How much of the gap to spatial methods does this post-processing close?
# ```{exercise-end}
# ```

# %% [markdown]
# ```{solution-start} c06-ex-refine
# :class: dropdown
# ```

# %%
refined = stcore.cluster.refine(adata.obs["SpaCell without histology"].to_numpy(), coords=adata.obsm["spatial"], k=6)
before = metrics.ari(adata.obs["layer"], adata.obs["SpaCell without histology"])
after = metrics.ari(adata.obs["layer"], refined)
print(f"ARI {before:.3f} -> {after:.3f} after the majority vote")
assert len(refined) == adata.n_obs

# %% [markdown]
# The vote (the same as `refine=True`) removes isolated spots whose neighbours mostly carry another label. It
# smooths the map and usually raises the ARI a little, but it cannot move a boundary that the clustering placed
# wrongly: spatial information used during learning (stLearn's smoothing, graph methods) does more.
# ```{solution-end}
# ```

# %% [markdown]
# ## Summary
#
# * SpaCell fuses two separately trained 20-d autoencoder codes, one for expression and one for tile features,
#   and clusters them with k-means; the official sizes are 512-256-64-20 with sigmoid outputs and cross-entropy.
# * It has no spatial term: positions enter only through the tiles.
# * Here ImageNet ResNet-50 features are replaced by a self-supervised tile CNN on a low-resolution image, so the
#   image code carries little more than stain density; the ablation rows of the table measure its share.
