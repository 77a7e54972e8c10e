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
#     review_section: "The deep-learning toolbox: attention and Transformers"
#     strategy: "sum (attention-weighted, as a building block)"
# ---

# %% [markdown]
# # Attention and Transformers
#
# In this chapter you build scaled dot-product attention, multi-head attention and a Transformer block from a few
# lines of PyTorch, restrict attention to the neighbours of a spatial graph (graph attention), train a graph
# attention autoencoder on a human cortex slide, and use attention to weigh two views of every spot.
#
# ```{admonition} Key takeaways
# :class: tip
# * Attention is a data-dependent weighted average: each query scores every key, a softmax turns the scores into
#   weights that sum to 1, and the output mixes the values with those weights. A Transformer block is multi-head
#   attention plus a small feed-forward network, both with residual connections.
# * Graph attention (GAT) is attention restricted to graph neighbours: sparse, so it scales to whole slides. A GAT
#   autoencoder on the Visium hexagonal graph finds cortical layers far better than PCA alone — but so does plain
#   averaging over the same graph: the graph, not the attention, does most of the work.
# * Attention over modalities (the sum strategy of SpatialGlue and stMVC) gives every spot its own weights. Such
#   weights can fit the training data without generalising: compare them with one global weight on held-out data
#   before reading a weight map as biology.
# ```
#
# **Prerequisites:** {doc}`c02_gnn_spatial_graphs` (spatial graphs, message passing) and
# {doc}`c03_autoencoders_vaes` (autoencoders). **Run time:** about 3–5 minutes on 2 CPU cores (FAST mode: under a
# minute).

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.decomposition import PCA

import stcore

cfg = stcore.config.get()
stcore.train.set_seed(cfg.seed)
cfg

# %% [markdown]
# ## Motivation: which neighbours, which modality?
#
# A spot's expression is noisy; its neighbours on the slide are usually in the same tissue domain, so averaging
# over them denoises it — except at a domain boundary, where the neighbours across the boundary should count
# less. Likewise, when a spot is measured by two modalities (expression and histology, RNA and protein), one
# modality may be informative in one region and the other elsewhere. In both cases we want weights that are
# **computed from the data, per spot**, rather than fixed. That is what attention provides.
#
# In the review {cite:p}`luo2025review` attention appears in three roles. The Transformer {cite:p}`vaswani2017attention`
# lets every element of a set attend to every other (TransformerST {cite:p}`zhao2024transformerst` uses graph
# Transformer layers on spots and histology). Graph attention {cite:p}`velickovic2018gat` lets a spot weigh its
# spatial neighbours (stMVC's view-specific graph encoders {cite:p}`zuo2022stmvc`). And attention over
# modalities is the "sum" integration strategy: SpatialGlue {cite:p}`long2024spatialglue` fuses the
# spatial-graph and feature-graph embeddings of each modality, then the modalities themselves, with learned
# per-spot weights, and stMVC weighs its views the same way.
#
# ## The model
#
# **Scaled dot-product attention.** Queries $Q \in \mathbb{R}^{L_q \times d}$, keys $K \in \mathbb{R}^{L \times d}$
# and values $V \in \mathbb{R}^{L \times d_v}$:
#
# $$
# \mathrm{Attention}(Q, K, V) = \underbrace{\mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right)}_{A \,\in\,
# \mathbb{R}^{L_q \times L}} V
# $$ (eq-attention)
#
# where the softmax acts on each row, so row $i$ of $A$ is a probability distribution over the $L$ keys. In
# **self-attention** $Q = X W_Q$, $K = X W_K$, $V = X W_V$ are linear maps of the same tokens $X$. **Multi-head**
# attention runs $H$ such maps of width $d / H$ in parallel, concatenates the outputs and mixes them with $W_O$.
#
# **Graph attention** restricts the softmax to the neighbours $N(i)$ of node $i$ (plus itself) and scores a pair
# with a small network instead of a dot product:
#
# $$
# \alpha_{ij} = \mathrm{softmax}_{j \in N(i) \cup \{i\}}\Big(\mathrm{LeakyReLU}\big(a_\text{src}^\top W h_j +
# a_\text{dst}^\top W h_i\big)\Big), \qquad h_i' = \sum_{j \in N(i) \cup \{i\}} \alpha_{ij} W h_j + b
# $$ (eq-gat)
#
# **Attention over modalities** (`stcore.strategies.AttentionSum`): spot $i$ has one embedding $z_{im}$ per
# modality or view $m$;
#
# $$
# e_{im} = u^\top \tanh(W z_{im}), \qquad \beta_{im} = \mathrm{softmax}_m(e_{im}), \qquad
# z_i = \sum_m \beta_{im} z_{im}
# $$ (eq-attention-sum)
#
# | quantity | shape | here |
# |---|---|---|
# | tokens of one spot (itself + 6 hexagonal neighbours) | $L \times d$ | $7 \times 30$ |
# | attention weights of one head | $L \times L$ | $7 \times 7$ |
# | spot features $X$ (expression PCs) | $N \times d$ | $3639 \times 30$ |
# | spatial graph `edge_index` | $2 \times E$ | $2 \times 21124$ |
# | GAT attention $\alpha$ (with self loops) | $(E + N) \times H$ | $24763 \times 1$ |
# | view embeddings $z_{im}$ / view weights $\beta$ | $N \times M \times d$ / $N \times M$ | $3639 \times 2 \times 30$ / $3639 \times 2$ |
#
# ## The data
#
# Visium slide 151673 of the human dorsolateral prefrontal cortex {cite:p}`maynard2021`: 3,639 spots, 5,000
# genes, and every spot annotated by hand with one of the six cortical layers or the white matter. The
# expression-only baseline of the course (`gmm`: highly variable genes, log-normalisation, 30 principal
# components, then a Gaussian mixture with K = 7) gives us both a yardstick and the input features of our models:
# its 30 PCs, stored in `obsm["X_gmm"]`.

# %%
adata = stcore.data.load("dlpfc_151673")
stcore.methods.get_method("gmm")(n_domains=7, seed=cfg.seed).run(adata)
pcs = adata.obsm["X_gmm"]
x = torch.tensor(pcs / pcs.std(), dtype=torch.float32)            # (N, 30), one global scale
edge_index = stcore.graphs.visium_hex_graph(adata.obs["array_row"], adata.obs["array_col"])
indptr, indices = stcore.graphs.neighbour_lists(edge_index, adata.n_obs)
print(adata.shape, "PCs", tuple(x.shape), "edges", tuple(edge_index.shape))
print("neighbours per spot:", pd.Series(np.diff(indptr)).value_counts().sort_index().to_dict())

# %% [markdown]
# ## Step 1: attention from scratch
#
# Take one spot and its six neighbours as a sequence of $L = 7$ tokens (their 30 PCs). Equation
# {eq}`eq-attention` is three lines; PyTorch's fused `scaled_dot_product_attention` must give the same result.

# %%
def attention(Q, K, V):
    """Scaled dot-product attention; returns the output and the weights (rows sum to 1)."""
    weights = torch.softmax(Q @ K.transpose(-2, -1) / Q.shape[-1] ** 0.5, dim=-1)
    return weights @ V, weights


spot = int(np.flatnonzero(np.diff(indptr) == 6)[0])               # an interior spot
tokens = x[np.r_[spot, indices[indptr[spot]:indptr[spot + 1]]]]   # (7, 30): the spot, then its neighbours
out, weights = attention(tokens, tokens, tokens)
assert torch.allclose(out, F.scaled_dot_product_attention(tokens[None], tokens[None], tokens[None])[0], atol=1e-5)
print("weights of the spot's own query over the 7 tokens:", weights[0].numpy().round(3))

# %% [markdown]
# Without learned projections a token's query matches its own key best, so here the spot attends mostly to itself
# and then to the neighbours whose PCs point the same way; the weights sum to 1.
#
# ## Step 2: multi-head attention and the Transformer block
#
# `stcore.nn.TransformerBlock` is a pre-norm Transformer encoder block:
# $h = x + \mathrm{MHA}(\mathrm{LN}(x))$, $y = h + \mathrm{FF}(\mathrm{LN}(h))$. We rebuild its output from its own
# weights: project, split into $H = 3$ heads of width 10, attend per head with our function, concatenate, mix
# with $W_O$, add the residual, then the feed-forward part.

# %%
torch.manual_seed(cfg.seed)
block = stcore.nn.TransformerBlock(dim=30, heads=3).eval()
y_block, w_block = block(tokens, return_attention=True)            # (7, 30), (3, 7, 7)

L, dim, heads = tokens.shape[0], 30, 3
h = block.norm1(tokens)
W_q, W_k, W_v = block.attn.in_proj_weight.chunk(3)
b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3)
split = lambda t: t.view(L, heads, dim // heads).transpose(0, 1)   # (heads, L, dim / heads)
o, w_heads = attention(split(h @ W_q.T + b_q), split(h @ W_k.T + b_k), split(h @ W_v.T + b_v))
hidden = tokens + block.attn.out_proj(o.transpose(0, 1).reshape(L, dim))
y_hand = hidden + block.ff(block.norm2(hidden))
assert torch.allclose(y_hand, y_block, atol=1e-5) and torch.allclose(w_heads, w_block, atol=1e-6)
print("block output", tuple(y_block.shape), "attention", tuple(w_block.shape), "- rebuilt by hand")

# %% [markdown]
# Each head has its own projections and therefore its own attention pattern over the same 7 tokens. The block is
# dense: for $L$ tokens it computes an $L \times L$ matrix per head. That is fine for 7 neighbours or a handful of
# modalities, but full self-attention over all $N$ spots of a slide would need $N^2 \approx 13$ million weights per
# head — and it would ignore the spatial layout.
#
# ## Step 3: graph attention — attention restricted to neighbours
#
# GAT (Equation {eq}`eq-gat`) computes weights only along the $E$ edges of a graph (plus self loops). With
# `return_attention=True`, `stcore.nn.GATStack` returns the last layer's `(edge_index, alpha)`. We recompute the
# output and the weights of our spot from the layer's parameters.

# %%
torch.manual_seed(cfg.seed)
gat = stcore.nn.GATStack([30, 8], heads=1)
z, (edges_with_loops, alpha) = gat(x, edge_index, return_attention=True)
conv = gat.convs[0]
Wh = conv.lin(x)                                                   # W h_j for every spot, (N, 8)
nbrs = np.r_[indices[indptr[spot]:indptr[spot + 1]], spot]         # N(i) and i itself
scores = F.leaky_relu(Wh[nbrs] @ conv.att_src[0, 0] + Wh[spot] @ conv.att_dst[0, 0], conv.negative_slope)
a_hand = torch.softmax(scores, 0)
assert torch.allclose(a_hand @ Wh[nbrs] + conv.bias, z[spot], atol=1e-5)

into_spot = edges_with_loops[1] == spot                            # edges j -> spot
order = [list(edges_with_loops[0][into_spot].numpy()).index(j) for j in nbrs]
assert torch.allclose(a_hand, alpha[into_spot, 0][order], atol=1e-6)
print("alpha:", tuple(alpha.shape), "for", edges_with_loops.shape[1], "edges incl. self loops;",
      "weights into our spot:", a_hand.detach().numpy().round(3))

# %% [markdown]
# The GAT layer's memory grows with $E + N$ (here about 25,000 weights), not with $N^2$: attention along a sparse
# graph is what lets graph-attention methods run on whole slides.
#
# ## Step 4: a graph attention autoencoder
#
# Now we train something. A GAT encoder maps the 30 PCs of each spot, mixed with its neighbours', to a 16-dimensional
# embedding; a GAT decoder maps the embedding back to the PCs (the design of STAGATE {cite:p}`dong2022stagate`,
# simplified). The model follows the course's contract: `loss(batch)` returns named terms and
# `stcore.train.fit` trains it.

# %%
class GATAutoencoder(torch.nn.Module):
    """GAT encoder (n_in -> n_hidden -> n_latent) and GAT decoder back to n_in; loss = MSE of the input."""

    def __init__(self, n_in, n_hidden=64, n_latent=16):
        super().__init__()
        self.encoder = stcore.nn.GATStack([n_in, n_hidden, n_latent])
        self.decoder = stcore.nn.GATStack([n_latent, n_hidden, n_in])

    def forward(self, x, edge_index, return_attention=False):
        return self.encoder(x, edge_index, return_attention=return_attention)

    def loss(self, batch):
        x, edge_index = batch
        return {"reconstruction": F.mse_loss(self.decoder(self(x, edge_index), edge_index), x)}


# %%
stcore.train.set_seed(cfg.seed)
model = GATAutoencoder(x.shape[1])
with torch.no_grad():
    untrained = model(x, edge_index).numpy()             # the same encoder before training, for comparison
history = stcore.train.fit(model, (x, edge_index), epochs=cfg.epochs(full=500), lr=1e-3, device=cfg.device)
stcore.plotting.loss_curves(history);

# %% [markdown]
# ## Results: cortical layers from the GAT embedding
#
# We cluster every embedding with the same Gaussian mixture (K = 7, tied covariance) the baseline uses on the
# PCs. Two extra rows separate what the graph does from what training does: the PCs simply averaged over each
# spot and its neighbours, twice (two hops, the reach of our two-layer encoder; no parameters at all), and the
# GAT encoder before training (random weights, but the same graph).

# %%
with torch.no_grad():
    embedding, (gat_edges, gat_alpha) = model(x.to(cfg.device), edge_index.to(cfg.device), return_attention=True)
mean_self_index, mean_self_weight = stcore.graphs.normalize(edge_index, adata.n_obs, kind="rw")  # over {i} + N(i)
S = stcore.graphs.to_scipy(mean_self_index, adata.n_obs, mean_self_weight)
embeddings = {"domain_smooth": S @ (S @ pcs), "domain_gat_untrained": untrained,
              "domain_gat": embedding.cpu().numpy()}
for key, Z in embeddings.items():
    adata.obs[key] = pd.Categorical(stcore.cluster.gmm(Z, 7, seed=cfg.seed).astype(str))
names = {"domain_gmm": "PCA + GMM (baseline)", "domain_smooth": "PCA averaged over 2 hops + GMM",
         "domain_gat_untrained": "GAT encoder, untrained + GMM", "domain_gat": "GAT autoencoder, trained + GMM"}
table = pd.DataFrame({name: stcore.metrics.domain_scores(adata.obs["layer"], adata.obs[key])
                      for key, name in names.items()}).T
table.round(3)

# %%
fig = stcore.plotting.domain_maps(adata, ["domain_gmm", "domain_smooth", "domain_gat"], truth="layer",
                                  image=False, size=3, panel_size=3.0,
                                  titles=["manual layers", "PCA + GMM", "PCA averaged over 2 hops", "GAT autoencoder"])

# %%
ari = table["ARI"]
print(f"ARI after {len(history)} epochs: trained GAT {ari.iloc[3]:.3f}; baseline {ari.iloc[0]:.3f}, "
      f"2-hop average {ari.iloc[1]:.3f}, untrained GAT {ari.iloc[2]:.3f}")

# %% [markdown]
# Mixing each spot with its neighbours is what turns the speckled baseline map into contiguous bands, and most of
# it needs no learning at all: averaging the PCs over two hops of the graph, with no parameters, lifts the ARI
# far above the baseline, and so does the GAT encoder with its random initial weights. Training adds a few points
# on top: in full mode (500 epochs, seed 0) the trained autoencoder reaches an ARI of about 0.60 against about 0.55
# for the two-hop average; with seeds 1 and 2 we measured about 0.56 and 0.59, so the gain from training is of the
# same size as the spread between seeds (FAST mode trains for only a few epochs, so its "trained" row is close to
# the untrained one). The graph does most of the work — the next question is whether the *attention* does
# anything beyond averaging.
#
# **What did the encoder attend to?** If attention helped at layer boundaries, edges that cross from one manual
# layer to another should get smaller weights than edges within a layer. We compare the last encoder layer's
# $\alpha$ on the two kinds of edge (a uniform weight over a spot and its six neighbours would be 1/7 ≈ 0.143):

# %%
src, dst = gat_edges.cpu().numpy()
a = gat_alpha[:, 0].cpu().numpy()
layer = adata.obs["layer"].astype(object).to_numpy()
labelled = pd.notna(layer[src]) & pd.notna(layer[dst]) & (src != dst)
same = labelled & (layer[src] == layer[dst])
cross = labelled & (layer[src] != layer[dst])
print(f"mean alpha: self loops {a[src == dst].mean():.3f}, within a layer {a[same].mean():.3f} "
      f"({same.sum()} edges), across layers {a[cross].mean():.3f} ({cross.sum()} edges)")
print("spread of alpha over neighbour edges (5%, 50%, 95%):", np.quantile(a[src != dst], [0.05, 0.5, 0.95]).round(3))

# %% [markdown]
# After training the weights are far from uniform (the 5–95 % range above), but in our full-mode run edges across
# a layer boundary receive on average the same weight as edges within a layer — slightly more, in fact. Nothing in a
# reconstruction loss asks the encoder to respect boundaries it has never been told about, so it does not: the
# improvement over PCA comes from smoothing over the graph, not from boundary-aware attention. This is why STAGATE
# adds a "cell-type-aware" graph that prunes edges between spots of different pre-clusters — a graph-level fix
# rather than an attention-level one.
#
# ## Step 5: attention as modality weighting
#
# The sum strategy fuses per-spot embeddings of several modalities with weights of their own
# (Equation {eq}`eq-attention-sum`). Here is `stcore.strategies.AttentionSum`, the module SpatialGlue's and
# stMVC's attention layers are built from:

# %%
print(inspect.getsource(stcore.strategies.AttentionSum.forward))

# %% [markdown]
# A fair test needs an objective whose answer is not obvious. We give each spot two **views** of its expression:
#
# * **own**: the spot's own expression profile (30 PCs);
# * **neighbourhood**: the mean profile of its hexagonal neighbours — the smoothing GAT did above.
#
# and ask the fused embedding to predict the spot's expression **in held-out molecules**. Splitting every count
# into two halves by binomial thinning gives two independent measurements of the same spot (half A, half B, each a
# Poisson sample of the same expression when counts are Poisson); the views are built from half A and the target
# is half B projected on the same PCs. Predicting half B from half A itself would copy its noise; the neighbours
# carry no noise of this spot but may belong to another layer. If the best mix differs from spot to spot (more
# neighbourhood for shallow, noisy spots; more of the spot itself at a layer boundary), per-spot attention should
# beat any single weight shared by all spots. We fit on a random half of the spots and score on the other half.

# %%
rng = np.random.default_rng(cfg.seed)
counts = adata.X.tocsr().astype(np.float32)
half_a = counts.copy()
half_a.data = rng.binomial(counts.data.astype(np.int64), 0.5).astype(np.float32)
half_b = counts - half_a


def log_cp10k(X):
    return np.log1p(1e4 * X.multiply(1.0 / np.maximum(X.sum(1), 1)).toarray())


pca = PCA(30, random_state=cfg.seed).fit(log_cp10k(half_a))
own, target = pca.transform(log_cp10k(half_a)), pca.transform(log_cp10k(half_b))
scale = own[:, 0].std()
mean_index, mean_weight = stcore.graphs.normalize(edge_index, adata.n_obs, kind="rw", self_loops=False)
neighbourhood = stcore.graphs.to_scipy(mean_index, adata.n_obs, mean_weight) @ own    # mean of the neighbours
own, neighbourhood, target = (torch.tensor(v / scale, dtype=torch.float32) for v in (own, neighbourhood, target))
fit_spots = torch.from_numpy(rng.random(adata.n_obs) < 0.5)
print("views", tuple(own.shape), tuple(neighbourhood.shape), "target", tuple(target.shape),
      "| fit on", int(fit_spots.sum()), "spots, score on", int((~fit_spots).sum()))

# %% [markdown]
# The model is just the attention module: the fused embedding $\beta_{i,\text{own}} z_{i,\text{own}} +
# \beta_{i,\text{nbr}} z_{i,\text{nbr}}$ is compared with the held-out half.

# %%
class ViewFusion(torch.nn.Module):
    """AttentionSum over views; loss = MSE between the fused embedding and the held-out target."""

    def __init__(self, dim):
        super().__init__()
        self.fuse = stcore.strategies.AttentionSum(dim)

    def forward(self, *views):
        return self.fuse(*views)

    def loss(self, batch):
        *views, target = batch
        fused, _ = self(*views)
        return {"held-out MSE": F.mse_loss(fused, target)}


# %%
stcore.train.set_seed(cfg.seed)
fusion = ViewFusion(own.shape[1])
batch = (own[fit_spots], neighbourhood[fit_spots], target[fit_spots])
history_fusion = stcore.train.fit(fusion, batch, epochs=cfg.epochs(full=300, fast=100), lr=1e-2)
with torch.no_grad():
    fused, beta = fusion(own, neighbourhood)

# %% [markdown]
# We compare the attention-weighted fusion with each view alone and with the best **single** weight for all spots
# (fitted by least squares on the same training spots), on the spots used for fitting and on the held-out spots:
# what matters is whether per-spot weights beat one global weight on spots they have not seen.

# %%
test = ~fit_spots
mse = lambda pred, spots=test: float(F.mse_loss(pred[spots], target[spots]))
d, t = (own - neighbourhood)[fit_spots], (target - neighbourhood)[fit_spots]
w_global = float((d * t).sum() / (d * d).sum())                    # argmin_w |w own + (1 - w) nbr - target|^2
candidates = {"own view only": own, "neighbourhood view only": neighbourhood,
              f"one global weight (own {w_global:.2f})": w_global * own + (1 - w_global) * neighbourhood,
              "attention (per-spot weights)": fused}
fusion_table = pd.DataFrame({"MSE, fit spots": {k: mse(v, fit_spots) for k, v in candidates.items()},
                             "MSE, held-out spots": {k: mse(v) for k, v in candidates.items()}})
fusion_table.round(4)

# %% [markdown]
# Now the figure: where on the slide does the attention trust the spot itself, and where its neighbours? Next
# to the two weight maps, the number of UMIs per spot (sequencing depth: fewer molecules, noisier own view).

# %%
adata.obs["weight on own view"] = beta[:, 0].numpy()
adata.obs["weight on neighbourhood"] = beta[:, 1].numpy()
adata.obs["log10 UMIs per spot"] = np.log10(counts.sum(1).A1)
span = float(np.quantile(np.abs(beta[:, 1].numpy() - 0.5), 0.99))      # one colour scale, centred on 1/2
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, key in zip(axes, ["weight on own view", "weight on neighbourhood", "log10 UMIs per spot"]):
    style = {"cmap": "coolwarm", "vmin": 0.5 - span, "vmax": 0.5 + span} if key.startswith("weight") else {
        "cmap": "Greys"}
    stcore.plotting.spatial(adata, key, ax=ax, image=False, size=7, **style)
fig.tight_layout()

# %%
rho_depth = spearmanr(adata.obs["weight on neighbourhood"], adata.obs["log10 UMIs per spot"])[0]
rho_nuclei = spearmanr(adata.obs["weight on neighbourhood"], adata.obs["n_nuclei"])[0]
print(f"weight on neighbourhood: mean {beta[:, 1].mean():.2f}, 5-95% range "
      f"{np.quantile(beta[:, 1], 0.05):.2f}-{np.quantile(beta[:, 1], 0.95):.2f}")
print(f"Spearman correlation with log UMIs {rho_depth:+.2f}, with nuclei per spot {rho_nuclei:+.2f}")
adata.obs.groupby("layer", observed=True)["weight on neighbourhood"].mean().round(3).to_frame().T

# %% [markdown]
# **Reading the weights honestly.** Fusing the two views helps a lot: either mix predicts the held-out molecules
# far better than the spot's own half alone or its neighbourhood alone. But per-spot attention does **not** beat
# one global weight shared by all spots. In our full-mode run it has the lower error on the spots it was fitted
# on and the higher error on the held-out spots: a textbook sign of overfitting, with fewer than a thousand
# parameters in the scoring layer. The weight maps show it too: they are dominated by spot-to-spot speckle. There is
# a faint trend on top — spots with fewer UMIs and spots of the upper layers lean a little more on their neighbours
# (the weak correlations in the printout, the layer means in the table) — but that variation does not predict
# held-out molecules any better than one global number does. Part of it is fitted noise; whatever is real in it is
# too weak to matter here.
#
# So the weights answer one question only — *which mix of these inputs fits this loss on these spots* — and the
# answer can look structured without being useful. They are not a measure of biological importance, and they
# change with the objective, the views' scales and the scoring network. Note also how the scores are computed
# (Equation {eq}`eq-attention-sum`): each view is scored on its own content, so the attention can only infer "this
# spot is noisy" from what its expression looks like, not from its UMI count. When a paper shows a map of
# modality weights (as SpatialGlue does for RNA and protein), read it the same way: a property of the trained
# model, to be checked on held-out data and against something measured before it is read as biology.
#
# ## Exercises
#
# ```{exercise-start}
# :label: c05-ex-scaling
# ```
# Why divide by $\sqrt{d}$? Draw random queries and keys with independent standard-normal entries for
# $d = 4, 16, 64, 256, 1024$ and 50 keys, and compare the entropy of the attention weights with and without
# the scaling. What happens to the softmax without it as $d$ grows?
# ```{exercise-end}
# ```
#
# ```{solution-start} c05-ex-scaling
# :class: dropdown
# ```

# %%
g = torch.Generator().manual_seed(cfg.seed)
rows = []
for d_k in (4, 16, 64, 256, 1024):
    q, k = torch.randn(200, d_k, generator=g), torch.randn(50, d_k, generator=g)
    scaled, unscaled = torch.softmax(q @ k.T / d_k ** 0.5, -1), torch.softmax(q @ k.T, -1)
    entropy = lambda w: float(-(w * w.clamp_min(1e-30).log()).sum(-1).mean())
    rows.append({"d": d_k, "sd of q.k": float((q @ k.T).std()), "entropy scaled": entropy(scaled),
                 "entropy unscaled": entropy(unscaled), "largest weight unscaled": float(unscaled.max(-1)[0].mean())})
scaling = pd.DataFrame(rows).set_index("d")
assert scaling["entropy scaled"].min() > 3 and scaling["largest weight unscaled"].iloc[-1] > 0.9
scaling.round(3)

# %% [markdown]
# The dot product of two random $d$-dimensional vectors has standard deviation $\sqrt{d}$. Without the scaling,
# the scores spread so far apart at large $d$ that the softmax puts almost all weight on one key (the entropy
# falls towards 0, versus $\log 50 \approx 3.9$ for uniform weights, and the largest weight towards 1); its
# gradient then vanishes for all other keys and training stalls. Dividing by $\sqrt{d}$ keeps the scores at unit
# scale whatever the width.
# ```{solution-end}
# ```
#
# ```{exercise-start}
# :label: c05-ex-masked
# ```
# Graph attention is dense attention with a mask. For the one-layer `gat` of Step 3, build the full
# $N \times N$ matrix of scores $\mathrm{LeakyReLU}(a_\text{src}^\top W h_j + a_\text{dst}^\top W h_i)$, set the
# entries of non-neighbours to $-\infty$, take a row-wise softmax and multiply by $W h$. Check that you recover the
# layer's output, and compare the memory of the dense matrix with that of `alpha`.
# ```{exercise-end}
# ```
#
# ```{solution-start} c05-ex-masked
# :class: dropdown
# ```

# %%
with torch.no_grad():
    Wh = conv.lin(x)
    s_src, s_dst = Wh @ conv.att_src[0, 0], Wh @ conv.att_dst[0, 0]
    dense = F.leaky_relu(s_dst[:, None] + s_src[None, :], conv.negative_slope)      # (N, N): row i = target
    allowed = torch.eye(adata.n_obs, dtype=torch.bool)
    allowed[edge_index[1], edge_index[0]] = True                                   # j -> i edges
    A = torch.softmax(dense.masked_fill(~allowed, float("-inf")), dim=1)
    assert torch.allclose(A @ Wh + conv.bias, z, atol=1e-5)
print(f"dense weights: {A.numel():,} floats ({A.numel() * 4 / 1e6:.0f} MB); "
      f"sparse alpha: {alpha.numel():,} floats ({alpha.numel() * 4 / 1e6:.2f} MB)")

# %% [markdown]
# The masked dense computation gives the layer's output exactly, but stores $N^2$ weights of which all but
# $E + N$ are zero. At 3,639 spots that is 53 MB instead of 0.1 MB; at 100,000 cells it would be 40 GB. Sparse
# message passing computes only the allowed entries.
# ```{solution-end}
# ```
#
# ```{exercise-start}
# :label: c05-ex-noise
# ```
# Add a third view that carries no information: Gaussian noise with the same overall scale as the own view. Train
# the same `ViewFusion` on the three views. How much weight does the noise view get, and what happens to the
# held-out error?
# ```{exercise-end}
# ```
#
# ```{solution-start} c05-ex-noise
# :class: dropdown
# ```

# %%
noise = torch.randn(own.shape, generator=torch.Generator().manual_seed(cfg.seed)) * own.std()
stcore.train.set_seed(cfg.seed)
fusion3 = ViewFusion(own.shape[1])
stcore.train.fit(fusion3, (own[fit_spots], neighbourhood[fit_spots], noise[fit_spots], target[fit_spots]),
                 epochs=cfg.epochs(full=300, fast=100), lr=1e-2, progress=False)
with torch.no_grad():
    fused3, beta3 = fusion3(own, neighbourhood, noise)
print("mean weights (own, neighbourhood, noise):", beta3.mean(0).numpy().round(3))
print(f"held-out MSE with the noise view {mse(fused3):.4f} vs {mse(fused):.4f} without")
assert beta3[:, 2].mean() < beta3[:, :2].mean(0).min()

# %% [markdown]
# The attention gives the noise view the smallest weight, but not zero, and the held-out error is clearly worse
# than without it: a softmax over views can turn a useless input down, but every bit of weight it keeps adds noise
# to the fused embedding. One reason to check each modality's contribution against a model without it before
# adding a modality "because attention will sort it out".
# ```{solution-end}
# ```
#
# ## Summary
#
# * Attention is $\mathrm{softmax}(QK^\top/\sqrt{d})V$: three lines of PyTorch that match
#   `torch.nn.functional.scaled_dot_product_attention`; multi-head attention, residual connections and a
#   feed-forward network make `stcore.nn.TransformerBlock`.
# * Graph attention (`stcore.nn.GATStack`) is attention restricted to graph neighbours, computed along the
#   edges only; `return_attention=True` returns the weights for inspection.
# * A GAT autoencoder on the Visium hexagonal graph, clustered with the same GMM, finds the cortical layers much
#   better than PCA — but its attention does not single out layer boundaries: the graph does most of the work.
# * `stcore.strategies.AttentionSum` (the sum strategy of SpatialGlue and stMVC) learns per-spot weights over
#   views or modalities. Fusing a spot with its neighbourhood helps, but here per-spot weights fit the training
#   spots without beating one global weight on held-out spots: validate a weight map before reading it.
