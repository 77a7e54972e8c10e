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
#     review_section: "Modalities: histology; the deep-learning toolbox: convolutional networks"
#     strategy: "none (building block)"
# ---

# %% [markdown]
# # Convolutional networks on H&E tiles
#
# In this chapter you build a tile encoder for H&E images: you apply hand-made convolution kernels to a
# breast-cancer tile, assemble a small convolutional network, train it without labels by contrastive learning
# (SimCLR), and test honestly whether its features know more about the tissue than simple colour statistics.
#
# ```{admonition} Key takeaways
# :class: tip
# * A convolution slides a small kernel over the image and computes a weighted sum at every position; a
#   hand-made kernel already separates the haematoxylin (nuclei) stain or finds edges. A CNN learns stacks of such
#   kernels and pools them into one feature vector per tile.
# * The histology methods of the review take their tile features from ImageNet-pretrained ResNets. Without such
#   weights, a small CNN can be trained on the tiles themselves with SimCLR: two random views of a tile must map
#   to nearby features, views of other tiles far apart.
# * Measure before you trust: on a few hundred tiles, self-supervised features must be compared with colour and
#   texture statistics and with an untrained network on a task with known answers — here they do not clearly beat
#   them.
# ```
#
# **Prerequisites:** {doc}`../p0_foundations/c00_modalities_and_tasks`; basic PyTorch (tensors, `nn.Module`).
# **Run time:** about 1–2 minutes on 2 CPU cores (FAST mode: about 30 s).

# %%
import inspect
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import stcore

cfg = stcore.config.get()
stcore.train.set_seed(cfg.seed)
cfg

# %% [markdown]
# ## Motivation: what does the tissue look like under each spot?
#
# Every spot of a Visium or legacy-ST slide sits on an H&E-stained section. A pathologist reads the stain:
# purple-blue haematoxylin marks nuclei (dense in tumour and immune infiltrates), pink eosin marks cytoplasm and
# extracellular matrix (stroma, connective tissue), white marks fat and glass. If a network can turn the tile
# under each spot into a feature vector that captures this morphology, the image becomes a second modality to
# integrate with expression: to sharpen spatial domains, to impute expression, to go below spot resolution.
#
# In the review {cite:p}`luo2025review` the convolutional network is the first tool of the deep-learning
# toolbox and the histology encoder of most ST + histology methods: SpaCell, stLearn, DeepST and ConGI extract
# tile features with an ImageNet-pretrained ResNet-50, stMVC with a ResNet-50 trained by contrastive learning on the
# slide's own tiles, and all of them feed these features into their expression models. Convolutional networks
# themselves go back to {cite:t}`lecun1998cnn`. The later histology chapters of this course use the encoder built
# here (`stcore.nn.TileCNN`) wherever the original uses a ResNet.
#
# ## The model
#
# A 2-D convolution with kernel $w \in \mathbb{R}^{C_\text{out} \times C_\text{in} \times k \times k}$ maps an
# image $x \in \mathbb{R}^{C_\text{in} \times H \times W}$ to feature maps
#
# $$
# y_{o,r,c} = b_o + \sum_{i=1}^{C_\text{in}} \sum_{u=0}^{k-1} \sum_{v=0}^{k-1} w_{o,i,u,v}\,
# x_{i,\,r s + u - p,\,c s + v - p}
# $$ (eq-conv2d)
#
# with stride $s$ and zero padding $p$ (deep-learning libraries compute this cross-correlation and call it
# convolution). The same few weights are reused at every position, so a feature detector found in one corner of the
# tile works everywhere. A CNN stacks convolutions, non-linearities and pooling, then averages each final feature
# map over the tile and maps the result to the tile's feature vector $h_i$ (the notation of {doc}`../../book/notation`).
#
# Without labels, SimCLR {cite:p}`chen2020simclr` trains the encoder $f$ so that two random views
# $a(t_i), a'(t_i)$ of the same tile agree. With $u_i = g(f(a(t_i)))$, $v_i = g(f(a'(t_i)))$ ($g$ a small
# projection head) and cosine similarity $s(\cdot,\cdot)$, the loss over a batch of $B$ tiles is
#
# $$
# \ell_i = -\log \frac{\exp(s(u_i, v_i)/\tau)}{\sum_{b \ne i} \exp(s(u_i, w_b)/\tau)}
# $$ (eq-infonce)
#
# where $w_b$ runs over the other $2B - 1$ views in the batch and $\tau$ is a temperature.
#
# | quantity | shape | here |
# |---|---|---|
# | tiles (uint8, as stored) | $N \times H \times W \times 3$ | $367 \times 112 \times 112 \times 3$ |
# | tiles (torch, in $[0, 1]$) | $N \times 3 \times H \times W$ | $367 \times 3 \times 48 \times 48$ |
# | first-layer kernels | $C_\text{out} \times 3 \times 3 \times 3$ | $16 \times 3 \times 3 \times 3$ |
# | tile features $h_i$ | $N \times d$ | $367 \times 64$ |
#
# ## The data
#
# Sections C2 and C3 of the HER2-positive breast-cancer study {cite:p}`andersson2021her2` are the two
# neighbouring sections of patient C that come with their full-resolution H&E. Each legacy-ST spot (100 µm) has a
# 112 × 112 px tile in `obsm["tiles"]`, cut from the full-resolution image (1.5 spot diameters, about 150 µm).

# %%
sections = {s: stcore.data.load(f"her2st_{s}") for s in ("C2", "C3")}
for s, adata in sections.items():
    print(s, adata.shape, "tiles", adata.obsm["tiles"].shape, adata.obsm["tiles"].dtype)
tiles = np.concatenate([adata.obsm["tiles"] for adata in sections.values()])
section = np.repeat(list(sections), [adata.n_obs for adata in sections.values()])
clusters = pd.concat([adata.obs["paper_cluster"].astype(object) for adata in sections.values()])
clusters.value_counts(dropna=False)

# %% [markdown]
# **Which labels?** C2 and C3 carry no pathologist annotation. What they do carry is `paper_cluster`: the
# expression clusters the authors computed for all sections of patient C together, so cluster `"3"` means the
# same in C2 and C3. Pathologist labels exist for the neighbouring section C1 (which has no image); crossing them
# with C1's clusters tells what the clusters are:

# %%
c1 = stcore.data.load("her2st_C1")
pd.crosstab(c1.obs["paper_cluster"], c1.obs["label"].cat.remove_unused_categories())

# %% [markdown]
# Most spots of C1 are invasive cancer; the clusters split it into expression states, and clusters 0 and 6
# contain most of the connective tissue. So the target of this chapter is **"the expression cluster of a spot,
# predicted from its tile alone"**: a real, partly morphological target with a known answer, but not a tissue-type
# label, and we should not expect high accuracy from any image feature.
#
# ## Step 1: a convolution by hand
#
# A tile has three channels (R, G, B). Colour deconvolution {cite:p}`ruifrok2001deconvolution` separates the two
# stains: convert intensities to optical density $\mathrm{OD} = -\log_{10}((I + 1) / 256)$, which is linear in the
# amount of each stain, and project the three OD channels on the inverse of the stain matrix (the standard
# haematoxylin, eosin and residual colour vectors). That projection is a **1 × 1 convolution** with a
# (2, 3, 1, 1) kernel.

# %%
stains = np.array([[0.650, 0.704, 0.286],    # haematoxylin
                   [0.072, 0.990, 0.105],    # eosin
                   [0.268, 0.570, 0.776]])   # residual
stains /= np.linalg.norm(stains, axis=1, keepdims=True)
unmix = torch.tensor(np.linalg.inv(stains), dtype=torch.float32)    # OD (3) @ unmix -> amounts (3)
deconv_kernel = unmix[:, :2].T.reshape(2, 3, 1, 1)                  # (out=H, E; in=R, G, B; 1, 1)

tile = torch.as_tensor(tiles[7]).permute(2, 0, 1).float()           # (3, 112, 112), 0..255
od = -torch.log10((tile + 1) / 256)
he = F.conv2d(od[None], deconv_kernel)[0]                           # (2, 112, 112): H and E maps
print("kernel", tuple(deconv_kernel.shape), "-> maps", tuple(he.shape))

# %% [markdown]
# A **3 × 3 kernel** looks at a neighbourhood. The Sobel kernels respond to horizontal and vertical intensity
# changes; applied to the haematoxylin map they outline nuclei. We check one output pixel against the explicit
# sum of Equation {eq}`eq-conv2d`.

# %%
sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
edge_kernel = torch.stack([sobel, sobel.T])[:, None]                 # (2, 1, 3, 3): d/dx, d/dy
haem = he[0][None, None]                                             # (1, 1, 112, 112)
grad = F.conv2d(haem, edge_kernel, padding=1)[0]                     # (2, 112, 112)
edges = grad.pow(2).sum(0).sqrt()

r, c = 40, 60                                                        # one pixel, by hand
by_hand = (haem[0, 0, r - 1:r + 2, c - 1:c + 2] * sobel).sum()
assert torch.isclose(by_hand, grad[0, r, c], atol=1e-5)

fig, axes = plt.subplots(1, 4, figsize=(11, 3))
panels = [(tiles[7], "H&E tile", None), (he[0], "haematoxylin (1×1 conv)", "Blues"),
          (he[1], "eosin (1×1 conv)", "Reds"), (edges, "edges of haematoxylin (3×3 Sobel)", "magma")]
for ax, (img, title, cmap) in zip(axes, panels):
    vmax = None if cmap is None else np.percentile(img, 99.5)          # clip a few extreme pixels
    ax.imshow(img, cmap=cmap, vmin=0 if cmap else None, vmax=vmax)
    ax.set_title(title, fontsize=8)
    ax.axis("off")

# %% [markdown]
# The haematoxylin map lights up the nuclei, the eosin map the stroma between them, and the edge map the nuclear
# outlines. A CNN's first layer holds exactly such kernels — but many of them, learned rather than designed, and
# followed by more layers that combine them into detectors of larger patterns (nuclear clusters, glands, fibres).
#
# ## Step 2: the tile encoder
#
# `stcore.nn.TileCNN` is a small CNN: a stride-2 stem, two convolution blocks with max pooling, a last
# convolution block, global average pooling and a linear head. It standardises its input inside, so it takes
# raw tiles in $[0, 1]$ (or uint8). Training cost grows with the number of pixels, so we downsample the tiles to
# 48 × 48 px (about 3 µm per pixel: nuclei stay visible as a few pixels) and use width 16.

# %%
tile_px = 48
tiles_small = F.interpolate(stcore.images.to_tensor(tiles), size=(tile_px, tile_px), mode="area")
encoder_kwargs = {"n_latent": 64, "width": 16}
torch.manual_seed(cfg.seed)
random_cnn = stcore.nn.TileCNN(**encoder_kwargs).eval()   # the untrained baseline (same seed as SimCLR below)
print(random_cnn)
print(f"{sum(p.numel() for p in random_cnn.parameters()):,} parameters; input {tuple(tiles_small.shape)}")

# %% [markdown]
# The shape of the data after each layer of `features` (for a batch of 8 tiles):

# %%
x = random_cnn.prepare(tiles_small[:8])
rows = [("input (standardised)", tuple(x.shape))]
with torch.no_grad():
    for name, layer in random_cnn.features.named_children():
        x = layer(x)
        if not isinstance(layer, (torch.nn.BatchNorm2d, torch.nn.ReLU)):
            rows.append((f"{name}: {type(layer).__name__}", tuple(x.shape)))
    rows.append(("head: Linear", tuple(random_cnn.head(x).shape)))
pd.DataFrame(rows, columns=["layer", "output shape"])

# %% [markdown]
# ## Step 3: no ImageNet weights — train on the tiles themselves
#
# SpaCell, stLearn, DeepST and ConGI take their tile features from a ResNet-50 {cite:p}`he2016resnet` pretrained
# on ImageNet {cite:p}`deng2009imagenet` (about 25 million parameters). This course runs offline and downloads
# nothing, and `torchvision`'s pretrained weights are a download; besides, ImageNet photographs are far from H&E.
# We replace the pretrained backbone by the small CNN above trained **self-supervised on the tiles themselves**
# with SimCLR, as stMVC does for its ResNet-50. No labels enter the training; the labels are used only afterwards,
# for evaluation.
#
# The views come from `stcore.images.augment`: a random resized crop, flips and 90° rotations (tissue has no
# orientation), a colour jitter that is milder than SimCLR's (stain colour carries information in H&E), random
# greyscale and blur. Six views of one tile:

# %%
views = stcore.images.augment(stcore.images.to_tensor(tiles[[7] * 6]), generator=cfg.seed)
fig, axes = plt.subplots(1, 7, figsize=(12, 2))
axes[0].imshow(tiles[7])
axes[0].set_title("original", fontsize=8)
for ax, view in zip(axes[1:], views):
    ax.imshow(view.permute(1, 2, 0).numpy())
for ax in axes:
    ax.axis("off")

# %% [markdown]
# The loss of Equation {eq}`eq-infonce` is `stcore.nn.info_nce`: a cross-entropy in which each view must pick out
# its partner among the $2B - 1$ other views of the batch.

# %%
print(inspect.getsource(stcore.nn.info_nce))

# %% [markdown]
# `stcore.images.train_tile_encoder` runs the whole loop: per mini-batch, two augmented views, the encoder, a
# projection head (discarded after training, as in SimCLR) and `info_nce`; it returns the trained `TileCNN`. It
# seeds the weights with `seed`, so the untrained `random_cnn` above is exactly this encoder before training.

# %%
encoder, history = stcore.images.train_tile_encoder(
    tiles_small, **encoder_kwargs, epochs=cfg.epochs(full=40), batch_size=128, tau=0.5, seed=cfg.seed)
ax = stcore.plotting.loss_curves(history)
ax.axhline(np.log(2 * 128 - 1), color="grey", ls=":", lw=1)
ax.set_title("SimCLR loss (dotted: chance, log(2B - 1))");

# %% [markdown]
# The loss falls below the chance level $\log(2B - 1)$ of an encoder that cannot tell tiles apart: the network
# learns to recognise a tile across crops, rotations and colour changes. Whether the features it needs for that
# also separate tissue states is a different question, answered next.
#
# The trained weights can be saved and reloaded into a fresh `TileCNN`; the same `load_pretrained(path)` loads
# weights you trained elsewhere (on more slides, or on a GPU) into the chapters that follow.

# %%
with tempfile.TemporaryDirectory() as folder:
    path = f"{folder}/tile_cnn.pt"
    torch.save(encoder.state_dict(), path)
    reloaded = stcore.nn.TileCNN(**encoder_kwargs).load_pretrained(path).eval()
same = np.allclose(stcore.images.encode_tiles(reloaded, tiles_small[:16]),
                   stcore.images.encode_tiles(encoder, tiles_small[:16]), atol=1e-5)
print("reloaded encoder gives the same features:", same)

# %% [markdown]
# ## Results: do the learned features know the tissue?
#
# We compare three tile descriptors, each standardised per feature:
#
# * **colour/texture statistics**: `stcore.images.spot_tile_features`, 11 numbers per tile (mean and spread of
#   R, G, B, mean gradient, four grey-level co-occurrence statistics), computed on the full 112 px tiles;
# * **random TileCNN**: the 64 features of the untrained network (random convolutions are a surprisingly strong
#   baseline for texture);
# * **SimCLR TileCNN**: the 64 features of the trained encoder.
#
# Three scores against `paper_cluster`: k-nearest-neighbour accuracy (k = 10) in 5-fold cross-validation over
# both sections; kNN accuracy across sections (fit on C2, predict C3, and the reverse; mean), which also tests
# robustness to the staining difference between two slides; and the ARI of k-means (K = 7) on the features.

# %%
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

y = clusters.to_numpy()
known = clusters.notna().to_numpy()


def probe(Z, k=10):
    """kNN accuracy (cross-validated and across sections) and k-means ARI of the features Z (n, d)."""
    Z = StandardScaler().fit_transform(Z)
    folds = StratifiedKFold(5, shuffle=True, random_state=cfg.seed)
    cv = cross_val_score(KNeighborsClassifier(k), Z[known], y[known], cv=folds).mean()
    across = []
    for fit_on, test_on in (("C2", "C3"), ("C3", "C2")):
        a, b = known & (section == fit_on), known & (section == test_on)
        across.append(KNeighborsClassifier(k).fit(Z[a], y[a]).score(Z[b], y[b]))
    labels = stcore.cluster.kmeans(Z, 7, seed=cfg.seed)
    return {"kNN accuracy (5-fold)": cv, "kNN accuracy (across sections)": np.mean(across),
            "k-means ARI": stcore.metrics.ari(y[known], labels[known])}, labels


# %%
features = {
    "colour/texture statistics (11)": stcore.images.spot_tile_features(tiles),
    "random TileCNN (64)": stcore.images.encode_tiles(random_cnn, tiles_small),
    "SimCLR TileCNN (64)": stcore.images.encode_tiles(encoder, tiles_small),
}
majority = pd.Series(y[known]).value_counts(normalize=True).iloc[0]
scores = {"chance (majority cluster)": {"kNN accuracy (5-fold)": majority,
                                        "kNN accuracy (across sections)": majority, "k-means ARI": 0.0}}
kmeans_labels = {}
for name, Z in features.items():
    scores[name], kmeans_labels[name] = probe(Z)
table = pd.DataFrame(scores).T
table.round(3)

# %%
best = table.drop(index="chance (majority cluster)").idxmax()
print("Best descriptor per score:")
for metric, name in best.items():
    print(f"  {metric}: {name} ({table.loc[name, metric]:.3f}; chance {table.loc['chance (majority cluster)', metric]:.3f})")
gain = table.loc["SimCLR TileCNN (64)"] - table.loc["colour/texture statistics (11)"]
print("SimCLR minus colour/texture statistics:", gain.round(3).to_dict())
acc = table["kNN accuracy (5-fold)"].iloc[1:].mean()
print(f"standard error of a 5-fold accuracy near {acc:.2f} on {known.sum()} spots: "
      f"{np.sqrt(acc * (1 - acc) / known.sum()):.3f}")

# %% [markdown]
# The figure shows section C2 with its spots coloured by the expression clusters and by the k-means clusters of two
# descriptors (colours of a predicted cluster follow the true cluster it overlaps most; the ARI in each title is
# for C2 alone).

# %%
c2 = sections["C2"]
in_c2 = section == "C2"
for name, key in (("colour/texture statistics (11)", "kmeans_colour"), ("SimCLR TileCNN (64)", "kmeans_simclr")):
    c2.obs[key] = pd.Categorical(kmeans_labels[name][in_c2].astype(str))
fig = stcore.plotting.domain_maps(
    c2, ["kmeans_colour", "kmeans_simclr"], truth="paper_cluster", size=30,
    titles=["expression clusters (paper)", "k-means of colour/texture", "k-means of SimCLR features"])

# %% [markdown]
# **What the numbers say.** Every descriptor predicts the expression cluster of a spot better than chance, so the
# tissue under a spot does carry information about its expression state. But the gain is modest, the k-means
# maps are speckled and agree with the expression clusters only in places (the stroma-rich tip on the left, where
# cluster 6 lies), and the self-supervised features do **not** clearly beat the 11 colour and texture statistics
# or the untrained network. In the full-mode run the three descriptors lie within about five accuracy points of
# each other — differences of the size of one or two standard errors — and which one is best changes from score to
# score (the printout above says which on this run). With a few hundred tiles of one patient, SimCLR learns what
# tells one tile from another under augmentation, and much of that is texture unrelated to expression states.
#
# This is the honest baseline for the histology chapters: an image feature must be compared with simple colour
# statistics before it is credited with an improvement. The original methods use ResNets pretrained on millions
# of images (or, today, pathology foundation models trained on millions of H&E tiles), which capture morphology
# far better than a 30k-parameter network trained on 367 tiles; if you have such weights locally, load them
# with `TileCNN.load_pretrained(path)` (for this architecture) or wrap your own encoder as an `nn.Module` that maps
# (n, 3, H, W) tiles to (n, d) features: every function of `stcore.images` that takes an encoder accepts it.
#
# ## Exercises
#
# ```{exercise-start}
# :label: c01-ex-haematoxylin
# ```
# Use the 1 × 1 deconvolution kernel of Step 1 on **all** tiles and summarise each tile by two numbers: its mean
# haematoxylin and mean eosin density (a crude nuclear density and stroma content). How well do these two numbers
# alone predict the expression cluster, compared with the table?
# ```{exercise-end}
# ```
#
# ```{solution-start} c01-ex-haematoxylin
# :class: dropdown
# ```

# %%
all_od = -torch.log10((torch.as_tensor(tiles).permute(0, 3, 1, 2).float() + 1) / 256)
stain_density = F.conv2d(all_od, deconv_kernel).mean((2, 3)).numpy()      # (n, 2): mean H, mean E
stain_scores, _ = probe(stain_density)
print({k: round(v, 3) for k, v in stain_scores.items()})
assert stain_scores["kNN accuracy (5-fold)"] > majority

# %% [markdown]
# Two stain densities do about as well as the 11 colour/texture statistics and not much worse than the CNN
# features: much of what any descriptor captures here is "how many nuclei, how much stroma". That is the
# morphological axis along which patient C's expression clusters differ most (compare clusters 0 and 6, rich in
# connective tissue, with the rest).
# ```{solution-end}
# ```
#
# ```{exercise-start}
# :label: c01-ex-combine
# ```
# Concatenate the colour/texture statistics and the SimCLR features (after standardising each block, so that the
# 64 learned features do not swamp the 11 statistics by number alone, weight each block by one over the square
# root of its width). Does the combination beat both parts?
# ```{exercise-end}
# ```
#
# ```{solution-start} c01-ex-combine
# :class: dropdown
# ```

# %%
blocks = [features["colour/texture statistics (11)"], features["SimCLR TileCNN (64)"]]
combined = np.hstack([StandardScaler().fit_transform(B) / np.sqrt(B.shape[1]) for B in blocks])
combined_scores, _ = probe(combined)
comparison = pd.concat([table.loc[["colour/texture statistics (11)", "SimCLR TileCNN (64)"]],
                        pd.DataFrame({"combined": combined_scores}).T])
comparison.round(3)

# %% [markdown]
# The combination lands close to the better of its two parts rather than clearly above both: the two
# descriptors largely see the same thing (stain amounts and coarse texture). Combining descriptors pays off when
# they are complementary — which is what the ST + histology methods hope for when they join image features with
# expression, a far more different modality.
# ```{solution-end}
# ```
#
# ## Summary
#
# * `torch.nn.functional.conv2d` applies a kernel at every position of an image; a 1 × 1 kernel mixes colour
#   channels (colour deconvolution into haematoxylin and eosin), a 3 × 3 kernel detects local patterns (edges).
# * `stcore.nn.TileCNN` stacks learned kernels, pooling and a linear head into a tile → feature-vector encoder
#   (about 30k parameters at width 16); `load_pretrained(path)` loads weights you trained before.
# * Without ImageNet weights, `stcore.images.train_tile_encoder` trains it with SimCLR on augmented views
#   (`stcore.images.augment`) of the unlabelled tiles.
# * On 367 tiles of patient C, learned features, an untrained CNN and 11 colour/texture statistics all predict a
#   spot's expression cluster better than chance and about equally well: always keep the simple baseline in the
#   comparison.
