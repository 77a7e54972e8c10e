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
#     review_section: "The deep-learning toolbox: autoencoders and variational autoencoders"
#     strategy: "none (building block)"
# ---

# %% [markdown]
# # Autoencoders and VAEs for count data
#
# In this chapter you build a plain autoencoder and a variational autoencoder (VAE) with a negative binomial
# decoder, after checking on a real Visium slide which count distribution its UMI counts actually follow.
#
# ```{admonition} Key takeaways
# :class: tip
# * An autoencoder squeezes each spot's expression through a low-dimensional bottleneck $z$. A VAE makes the
#   bottleneck probabilistic and trains by maximising the evidence lower bound (ELBO): expected log-likelihood of
#   the counts minus a KL penalty that keeps $q(z \mid x)$ close to the prior.
# * Visium UMI counts are over-dispersed: per gene, a negative binomial (NB) with the observed library size predicts
#   held-out spots better than a Poisson (most clearly for the well-expressed genes), and it already predicts the
#   zeros; zero inflation (ZINB) adds almost nothing.
# * Clustered into cortical layers, the latent space of a count VAE beats a squared-error autoencoder but not
#   plain PCA of log-normalised expression. None of them uses the spatial arrangement, which later chapters add.
# ```
#
# **Prerequisites:** {doc}`../p0_foundations/c00_modalities_and_tasks` (the data and the tasks); basic PyTorch.
# **Run time:** about 3 minutes on 2 CPU cores (FAST mode: about 30 s).

# %%
import inspect

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import stcore
from stcore import cluster, metrics, plotting, preprocess
from stcore.nn import MLP, gaussian_kl, nb_log_prob, poisson_log_prob, zinb_log_prob

cfg = stcore.config.get()
stcore.train.set_seed(cfg.seed)
cfg

# %% [markdown]
# ## Motivation: a compact summary of thousands of noisy counts
#
# A Visium spot measures a few hundred to a few thousand RNA molecules spread over thousands of genes, so its
# expression vector is long, sparse and noisy. Most analyses first compress it into a handful of numbers per spot
# (a *latent* representation) that keeps the biological signal, such as which cortical layer or cell population
# the spot belongs to, and drops the sampling noise. PCA does this linearly. An **autoencoder** does it with
# neural networks: an encoder maps the expression to a short code $z$ and a decoder maps the code back, trained so
# that the reconstruction is close to the input. A **variational autoencoder** {cite:p}`kingma2014vae` turns
# this into a probabilistic generative model of the counts, which can use a likelihood made for counts.
#
# Autoencoders are one of the main architectures of the review {cite:p}`luo2025review`, and many methods of this
# course are built on one. SpaCell and stMVC compress expression (and image features) with autoencoders, stMVC with
# a negative binomial loss; DeepST and STACI are graph VAEs (STACI with a zero-inflated NB likelihood); Starfysh is
# an NB VAE whose latent space is tied to cell-state archetypes and to histology. On the single-cell side, scVI
# {cite:p}`lopez2018scvi` set the pattern that gimVI {cite:p}`lopez2019gimvi` (joint VAE of scRNA-seq and spatial
# data, imputing missing genes) and DestVI (conditional NB VAE for deconvolution) extend, and stPlus and ENVI use
# autoencoders for imputation. This chapter builds the common core once, on real counts.

# %% [markdown]
# ## The model
#
# Spot $i$ has counts $x_i \in \mathbb{N}^G$ and library size $l_i = \sum_g x_{ig}$. Write
# $\tilde x_i = \log(1 + 10^4 x_i / l_i)$ for its log-normalised expression.
#
# **Autoencoder.** An encoder $f_\phi$ and a decoder $g_\psi$ (two MLPs) minimise the reconstruction error,
# $z_i = f_\phi(\tilde x_i)$ and $\mathcal L_{\text{AE}} = \frac1N \sum_i \lVert \tilde x_i - g_\psi(z_i)\rVert^2$.
#
# **VAE with a count likelihood** (the scVI recipe). The generative model draws a latent state
# $z_i \in \mathbb R^d$ and then counts whose mean is the *observed* library size times decoded proportions
# $\rho_i$ (so $z$ need not encode sequencing depth):
#
# $$
# z_i \sim \mathcal N(0, I_d), \qquad \rho_i = \mathrm{softmax}\big(g_\psi(z_i)\big), \qquad
# x_{ig} \mid z_i \sim \mathrm{NB}\big(\mu_{ig} = l_i \rho_{ig},\ \theta_g\big),
# $$ (eq-c03-generative)
#
# where the NB has mean $\mu$ and variance $\mu + \mu^2/\theta$, with one inverse dispersion $\theta_g$ per gene
# (small $\theta$ = much extra variance; $\theta \to \infty$ gives a Poisson). The encoder outputs a Gaussian
# $q_\phi(z_i \mid x_i) = \mathcal N\big(m_\phi(\tilde x_i), \mathrm{diag}\,\sigma^2_\phi(\tilde x_i)\big)$,
# and training maximises, averaged over spots, the evidence lower bound
#
# $$
# \mathrm{ELBO}_i = \mathbb E_{q_\phi(z_i \mid x_i)}\big[\log p_\psi(x_i \mid z_i)\big]
# - \mathrm{KL}\big(q_\phi(z_i \mid x_i)\,\big\|\,\mathcal N(0, I)\big) \le \log p(x_i).
# $$ (eq-c03-elbo)
#
# The expectation is estimated with one sample drawn by the **reparameterisation trick**,
# $z_i = m_i + \sigma_i \odot \varepsilon$ with $\varepsilon \sim \mathcal N(0, I)$, so that gradients flow
# through $m_i$ and $\sigma_i$; the KL between two Gaussians is closed-form. We minimise the negative ELBO, logged as
# two named terms, `reconstruction` and `kl`.
#
# | object | meaning | shape |
# |---|---|---|
# | `x` = $X$ | raw counts of the highly variable genes | $N \times G$ |
# | `lib` = $l$ | library size (total counts of a spot) | $N \times 1$ |
# | `mean`, `logvar` | $m_i$, $\log \sigma_i^2$ of $q(z_i \mid x_i)$ | $N \times d$ |
# | `z` | latent sample (or $m_i$ at evaluation) | $N \times d$ |
# | `rho` = $\rho$ | decoded proportions (rows sum to 1) | $N \times G$ |
# | `theta` = $\theta$ | gene-wise inverse dispersion | $G$ |

# %% [markdown]
# ## The data: DLPFC slide 151673
#
# The Visium slide of human dorsolateral prefrontal cortex {cite:p}`maynard2021` holds raw UMI counts of 5,000
# genes in 3,639 spots and a manual annotation of the six cortical layers and the white matter (`obs["layer"]`,
# missing for a few spots). For speed we keep the 2,000 most variable genes (scanpy's `seurat_v3` flavour, which
# works on raw counts). `X` holds the counts that the VAE models; `X_log` the log-normalised values that PCA and
# the plain autoencoder use.

# %%
adata = stcore.data.load("dlpfc_151673")
adata = adata[:, preprocess.highly_variable(adata, n_top_genes=2000)].copy()
X = torch.tensor(adata.X.toarray(), dtype=torch.float32)
X_log = torch.tensor(preprocess.log_normalize(adata).X.toarray(), dtype=torch.float32)
lib = X.sum(1, keepdim=True)
n_spots, n_genes = X.shape
print(f"{n_spots} spots x {n_genes} genes; library size min {lib.min():.0f}, median {lib.median():.0f}, "
      f"max {lib.max():.0f}; {100 * (X == 0).float().mean():.1f} % of the counts are zero")

# %% [markdown]
# ## Why counts need count likelihoods
#
# An MSE loss on log-normalised values treats every entry as Gaussian noise around the truth. Counts are not like
# that: most entries are 0, a few are large, and their noise grows with the mean. Three standard models, all in
# `stcore.nn` as element-wise log-probabilities:
#
# * **Poisson**($\mu$): variance = mean, the noise of pure sampling of molecules;
# * **negative binomial** NB($\mu, \theta$): variance $\mu + \mu^2/\theta$, a Poisson whose rate itself varies
#   from spot to spot (a Gamma–Poisson mixture);
# * **zero-inflated NB**: with probability $\pi$ an extra zero ("dropout"), otherwise NB.
#
# The NB uses the mean / inverse-dispersion parametrisation of scvi-tools. Before using it, check it against
# `torch.distributions`, which parametrises the NB by a number of failures and a success logit:

# %%
x_test = torch.tensor([0.0, 1.0, 3.0, 10.0, 40.0])
mu, theta = torch.tensor(5.0), torch.tensor(0.7)
reference = torch.distributions.NegativeBinomial(total_count=theta, logits=mu.log() - theta.log())
print("nb_log_prob:       ", nb_log_prob(x_test, mu, theta).numpy().round(4))
print("torch.distributions:", reference.log_prob(x_test).numpy().round(4))
assert torch.allclose(nb_log_prob(x_test, mu, theta), reference.log_prob(x_test), atol=1e-4)
assert torch.allclose(poisson_log_prob(x_test, mu), torch.distributions.Poisson(mu).log_prob(x_test))

# %% [markdown]
# ### Fit each model per gene, score it on held-out spots
#
# Which model do the counts support? For a sample of genes we fit each model by maximum likelihood, gene by gene,
# with the mean proportional to the library size, $\mu_{ig} = l_i \rho_g$ (parameters per gene: $\rho_g$, plus
# $\theta_g$ for NB, plus $\pi_g$ for ZINB). The Poisson estimate $\hat\rho_g = \sum_i x_{ig} / \sum_i l_i$ is
# closed-form and is the starting point of the other two, which L-BFGS fits (the genes are independent, so one
# optimiser fits all of them at once). We fit on 80 % of the spots and compare the log-likelihood of the other 20 %.
# A better held-out log-likelihood means a better description of new data, not just more parameters.

# %%
def count_log_prob(kind, x, lib, params):
    """Element-wise log p(x) under 'poisson', 'nb' or 'zinb' with mean lib * rho (per gene)."""
    mu = lib * params["log_rho"].exp()
    if kind == "poisson":
        return poisson_log_prob(x, mu)
    if kind == "nb":
        return nb_log_prob(x, mu, params["log_theta"].exp())
    return zinb_log_prob(x, mu, params["log_theta"].exp(), params["pi_logit"])


# %%
def fit_per_gene(kind, x, lib, max_iter):
    """Maximum-likelihood parameters of one count model per column (gene) of x."""
    params = {"log_rho": torch.log(x.sum(0) / lib.sum()),  # the Poisson MLE, closed-form
              "log_theta": torch.zeros(x.shape[1]), "pi_logit": torch.full((x.shape[1],), -2.0)}
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    if kind != "poisson":
        opt = torch.optim.LBFGS(list(params.values()), max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = -count_log_prob(kind, x, lib, params).mean(0).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return {k: v.detach() for k, v in params.items()}


# %% [markdown]
# We sample genes detected in at least 1 % of the spots (a gene seen in a handful of spots may have no count at
# all among the training spots, and then no model can score it).

# %%
gen = torch.Generator().manual_seed(cfg.seed)
pool = torch.nonzero((X > 0).float().mean(0) >= 0.01).ravel()
genes = pool[torch.randperm(len(pool), generator=gen)[: cfg.pick(200, 50)]]
order = torch.randperm(n_spots, generator=gen)
train, test = order[: int(0.8 * n_spots)], order[int(0.8 * n_spots):]
x_sub = X[:, genes]
fits, heldout = {}, {}
for kind in ["poisson", "nb", "zinb"]:
    fits[kind] = fit_per_gene(kind, x_sub[train], lib[train], max_iter=cfg.pick(100, 20))
    heldout[kind] = count_log_prob(kind, x_sub[test], lib[test], fits[kind]).mean(0)  # per gene
beats = {"poisson": np.nan, "nb": float((heldout["nb"] > heldout["poisson"]).float().mean()),
         "zinb": float((heldout["zinb"] > heldout["nb"] + 1e-3).float().mean())}
total = {k: float(v.sum()) for k, v in heldout.items()}
pd.DataFrame({"held-out log-likelihood per spot (sum over genes)": total,
              "genes where it beats the simpler model": beats}).round(3)

# %% [markdown]
# The second column counts the genes where NB beats Poisson, and where ZINB beats NB by more than $10^{-3}$ nats
# per spot. The figure shows why, in three views:
#
# 1. **Mean and variance** of the raw counts of all 2,000 genes. Spots differ in library size, which alone makes
#    the variance exceed a Poisson's: if $x \mid l \sim \mathrm{Poisson}(l\rho)$ then
#    $\mathrm{Var}\,x = m + m^2 \mathrm{CV}^2(l)$ with $m$ the gene's mean and $\mathrm{CV}$ the coefficient of
#    variation of $l$. The NB adds $m^2 (1 + \mathrm{CV}^2)/\theta$ on top (drawn with the median fitted $\theta$).
# 2. **Zeros**: the fraction of spots where a gene is 0, observed against the fraction each fitted model predicts
#    ($\frac1N \sum_i p(x_{ig} = 0)$, computed with the same log-probability functions).
# 3. **Held-out gain** per gene: NB minus Poisson, and ZINB minus NB, in nats per spot.

# %%
m, v = X.mean(0), X.var(0)
cv2 = float(lib.var() / lib.mean() ** 2)
theta_med = float(fits["nb"]["log_theta"].exp().median())
grid = torch.logspace(float(m.min().log10()), float(m.max().log10()), 100)
p_zero = {k: count_log_prob(k, torch.zeros_like(x_sub), lib, fits[k]).exp().mean(0) for k in fits}
zero_obs = (x_sub == 0).float().mean(0)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
axes[0].scatter(m, v, s=3, c="0.5", label="genes")
axes[0].plot(grid, grid, label="Poisson: var = mean")
axes[0].plot(grid, grid + grid**2 * cv2, label="Poisson + library size")
axes[0].plot(grid, grid + grid**2 * ((1 + cv2) / theta_med + cv2), label=f"NB, θ = {theta_med:.2f}")
axes[0].set(xscale="log", yscale="log", xlabel="mean count", ylabel="variance", title="mean–variance")
for k, marker in [("poisson", "o"), ("nb", "s"), ("zinb", "x")]:
    axes[1].scatter(zero_obs, p_zero[k], s=8, marker=marker, label=k)
axes[1].plot([0, 1], [0, 1], "k--", lw=1)
axes[1].set(xlabel="observed fraction of zeros", ylabel="predicted fraction of zeros", title="zeros")
axes[2].scatter(m[genes], heldout["nb"] - heldout["poisson"], s=8, label="NB − Poisson")
axes[2].scatter(m[genes], heldout["zinb"] - heldout["nb"], s=8, label="ZINB − NB")
axes[2].axhline(0, c="k", lw=1)
axes[2].set_yscale("symlog", linthresh=1e-3)
axes[2].set(xscale="log", xlabel="mean count", ylabel="held-out gain (nats per spot)",
            title="held-out log-likelihood")
for ax in axes:
    ax.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# All three views tell the same story. Most of these highly variable genes are rare (a mean below 0.1 count per
# spot): their counts are nearly all 0 or 1, and there every model agrees. From a mean of about 0.1 upwards, the
# variance lies above the Poisson line, and above what library-size differences alone explain, while the NB curve
# follows the cloud. The Poisson fit predicts too few zeros for the moderately expressed genes (the blue points
# below the diagonal); the NB's predictions lie on the diagonal, and the ZINB's lie on top of the NB's: once the
# variance is modelled, there are no "extra" zeros left to explain. On held-out spots the NB gains over the
# Poisson for most genes, most for the highly expressed ones, while the ZINB's gain over the NB is close to zero
# for almost every gene. This matches what has been found for droplet single-cell data
# {cite:p}`svensson2020zeros`: UMI counts are over-dispersed but not zero-inflated. Some of the over-dispersion is
# biology (the layers differ in expression) rather than noise, which is exactly what a latent variable $z$ can
# absorb: the VAE below learns its own $\theta_g$ *given* $z$.

# %% [markdown]
# ## Step 1: a plain autoencoder
#
# The encoder and the decoder are `stcore.nn.MLP`s: $G \to 128 \to d$ and back, with $d = 10$ latent dimensions
# (ReLU between layers, a linear bottleneck and a linear output). To train it with `stcore.train.fit`, the model
# only needs a `loss` method that returns a dict of named terms. The networks train on the same 80 % of the spots
# as the per-gene fits; the other 20 % are kept to check how well a model describes spots it has not seen (the
# trained encoder still embeds every spot).

# %%
n_latent, n_hidden = 10, 128


class Autoencoder(nn.Module):
    """MLP autoencoder with a squared-error loss on log-normalised expression."""

    def __init__(self, n_genes, n_latent, n_hidden):
        super().__init__()
        self.encoder = MLP([n_genes, n_hidden, n_latent])
        self.decoder = MLP([n_latent, n_hidden, n_genes])

    def loss(self, y):
        return {"mse": (self.decoder(self.encoder(y)) - y).pow(2).sum(-1).mean()}


def minibatches(data, batch_size=256):
    """A factory of shuffled mini-batches (rows of data), called afresh by fit() every epoch."""
    return lambda: torch.split(data[torch.randperm(len(data))], batch_size)


# %%
ae = Autoencoder(n_genes, n_latent, n_hidden)
ae_history = stcore.train.fit(ae, minibatches(X_log[train]), epochs=cfg.epochs(full=60), lr=3e-3,
                              device=cfg.device, desc="autoencoder")
with torch.no_grad():
    z_ae = ae.encoder(X_log.to(cfg.device)).cpu().numpy()
print(f"final loss {ae_history.total[-1]:.1f} (sum of squared errors per spot); latent {z_ae.shape}")

# %% [markdown]
# ## Step 2: the VAE with a negative binomial decoder
#
# The VAE changes three things. The encoder outputs two vectors per spot, the mean and the log-variance of
# $q(z \mid x)$, and a sample is drawn with the reparameterisation trick. The decoder outputs proportions (a
# softmax over genes) that are multiplied by the observed library size, as in equation {eq}`eq-c03-generative`.
# And the loss is the negative ELBO of equation {eq}`eq-c03-elbo`: the NB negative log-likelihood of the raw
# counts plus the KL term, which `stcore.nn.gaussian_kl` computes in closed form:

# %%
print(inspect.getsource(gaussian_kl))
mean_, logvar_ = torch.randn(4, n_latent), torch.randn(4, n_latent)
q = torch.distributions.Normal(mean_, (0.5 * logvar_).exp())
prior = torch.distributions.Normal(torch.zeros(n_latent), torch.ones(n_latent))
reference_kl = torch.distributions.kl_divergence(q, prior).sum(-1)
assert torch.allclose(gaussian_kl(mean_, logvar_), reference_kl, atol=1e-5)


# %%
class CountVAE(nn.Module):
    """VAE of raw counts: z ~ N(0, I), x_g ~ NB(l * softmax(decoder(z))_g, theta_g) (or Poisson)."""

    def __init__(self, n_genes, n_latent, n_hidden, likelihood="nb", beta=1.0):
        super().__init__()
        self.encoder = MLP([n_genes, n_hidden, 2 * n_latent])  # -> mean and log-variance of q(z | x)
        self.decoder = MLP([n_latent, n_hidden, n_genes])  # -> logits of the proportions rho
        self.log_theta = nn.Parameter(torch.zeros(n_genes))  # gene-wise inverse dispersion
        self.likelihood, self.beta = likelihood, beta

    def encode(self, x):
        x_log = torch.log1p(1e4 * x / x.sum(1, keepdim=True))
        return self.encoder(x_log).chunk(2, dim=-1)

    def log_prob(self, x, z):
        mu = x.sum(1, keepdim=True) * torch.softmax(self.decoder(z), dim=-1)  # observed library x rho
        if self.likelihood == "poisson":
            return poisson_log_prob(x, mu).sum(-1)
        return nb_log_prob(x, mu, self.log_theta.exp()).sum(-1)

    def loss(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterisation trick
        return {"reconstruction": -self.log_prob(x, z).mean(),
                "kl": self.beta * gaussian_kl(mean, logvar).mean()}


# %% [markdown]
# The encoder sees log-normalised expression, computed inside the model from the counts (scVI feeds $\log(1 + x)$
# of the raw counts instead, a minor difference), while the likelihood is evaluated on the raw counts. Training uses mini-batches of 256 spots and Adam; the progress bar
# shows the total loss.

# %%
vae_epochs = cfg.epochs(full=60)


def train_vae(epochs=vae_epochs, **kwargs):
    model = CountVAE(n_genes, n_latent, n_hidden, **kwargs)
    history = stcore.train.fit(model, minibatches(X[train]), epochs=epochs, lr=3e-3, device=cfg.device,
                               desc=f"VAE {kwargs}")
    return model, history


def latent_mean(model):
    with torch.no_grad():
        return model.encode(X.to(cfg.device))[0].cpu().numpy()


vae, vae_history = train_vae(likelihood="nb")
z_vae = latent_mean(vae)

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
plotting.loss_curves(ae_history, ax=axes[0]).set_title("autoencoder")
plotting.loss_curves(vae_history, ax=axes[1]).set_title("VAE: negative ELBO and its terms")
plotting.loss_curves({"kl": vae_history.terms["kl"]}, ax=axes[2]).set_title("VAE: KL term alone")
fig.tight_layout()

# %% [markdown]
# The reconstruction term dominates the negative ELBO: it is a sum over 2,000 genes, the KL a sum over 10 latent
# dimensions. The KL has its own dynamics (in full mode: a fall over the first epochs, then a slow rise). The
# randomly initialised encoder starts with posteriors far from the prior, which the KL term quickly pulls in; then,
# as the decoder learns to use $z$, the encoder puts more information about each spot into it, paying for it in
# KL and buying a larger decrease of the reconstruction term.
#
# The negative ELBO is a bound on $-\log p(x)$, so it also scores the model on spots it has never seen. We estimate
# its two terms by Monte Carlo (3 samples of $z$ per spot) on the training and the held-out spots:

# %%
def elbo_terms(model, x, n_samples=3):
    """Monte Carlo estimate of the ELBO and its two terms (nats per spot, averaged over the rows of x)."""
    with torch.no_grad():
        x = x.to(cfg.device)
        mean, logvar = model.encode(x)
        samples = [mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) for _ in range(n_samples)]
        rec = torch.stack([model.log_prob(x, z) for z in samples]).mean()
        kl = gaussian_kl(mean, logvar).mean()
    return {"E_q log p(x|z)": float(rec), "KL": float(kl), "ELBO": float(rec - kl)}


pd.DataFrame({"training spots": elbo_terms(vae, X[train]),
              "held-out spots": elbo_terms(vae, X[test])}).T.round(1)

# %% [markdown]
# The held-out ELBO is somewhat lower than the training one (held-out spots are a little less well described, as
# for any fitted model), but of the same size: the VAE has not memorised its training spots.
#
# What about the dispersion? We compare the VAE's $\theta_g$ with the per-gene NB fits of the previous section on
# the sampled genes that are not rare (mean at least 0.1 count per spot; for rarer genes the data say little about
# $\theta$).

# %%
expressed = genes[m[genes] >= 0.1]
theta_gene = fits["nb"]["log_theta"].exp()[m[genes] >= 0.1]
theta_vae = vae.log_theta.detach().exp().cpu()[expressed]
print(f"{len(expressed)} genes; median theta: per-gene NB fit {theta_gene.median():.2f}, "
      f"VAE given z {theta_vae.median():.2f}")

# %% [markdown]
# In full mode the VAE's inverse dispersions come out clearly larger (less extra variance) than the per-gene fits
# on the same genes: given the latent state, which captures the differences between layers, the counts are less
# over-dispersed. (In FAST mode, after a few epochs, $\theta_g$ has hardly moved from its starting value of 1.)

# %% [markdown]
# ## Results: do the latent spaces find the cortical layers?
#
# We cluster three 10-dimensional embeddings of the same 2,000 genes into K = 7 groups with the same Gaussian
# mixture (tied covariance, the `mclust` "EEE" model most spatial-domain papers use) and score them against the
# manual layers: the first 10 principal components of the log-normalised expression (the linear baseline), the
# autoencoder's code, and the VAE's latent means $m_i$. None of them sees the spot coordinates. (PCA is computed
# from all spots; the networks learned from 80 % of them, and their encoders embed the rest.) For the figure, each
# cluster is named after the manual layer it overlaps most, one to one (the Hungarian algorithm on the contingency
# table), so that colours match across panels; renaming clusters does not change the ARI.

# %%
def match_to_truth(labels, truth):
    """Rename cluster labels after the truth category they overlap most (a one-to-one matching)."""
    table = pd.crosstab(labels, truth)
    rows, cols = linear_sum_assignment(-table.to_numpy())
    names = dict(zip(table.index[rows], table.columns[cols]))
    return pd.Categorical([names.get(label, np.nan) for label in labels], categories=truth.cat.categories)


embeddings = {"PCA": preprocess.pca(X_log.numpy(), n_latent, seed=cfg.seed), "autoencoder": z_ae,
              "VAE (NB)": z_vae}
scores = {}
for name, z in embeddings.items():
    adata.obs[name] = match_to_truth(cluster.gmm(z, 7, seed=cfg.seed), adata.obs["layer"])
    scores[name] = metrics.domain_scores(adata.obs["layer"], adata.obs[name])
scores = pd.DataFrame(scores).T.round(3)
scores

# %%
fig = plotting.domain_maps(adata, list(embeddings), truth="layer",
                           titles=["manual layers", *[f"{k} + GMM" for k in embeddings]])

# %%
gap = scores.loc["VAE (NB)", "ARI"] - scores.loc["PCA", "ARI"]
print(f"ARI: PCA {scores.loc['PCA', 'ARI']:.3f}, autoencoder {scores.loc['autoencoder', 'ARI']:.3f}, "
      f"VAE {scores.loc['VAE (NB)', 'ARI']:.3f} (VAE - PCA = {gap:+.3f})")

# %% [markdown]
# All three maps recover the broad structure, white matter against grey matter and a sequence of bands through
# the cortex, and all three mix neighbouring layers: L3 and L5 blur into each other, and the thin L4 gets no band
# of its own (the cluster matched to it lies in the deep layers and the white matter), because one spot's
# expression is noisy and none of the methods borrows strength from the neighbouring spots. The count VAE clusters
# better than the autoencoder trained with a squared error, but **it does not beat PCA here**. We checked that
# this is not bad luck: in full mode, over five training seeds, the VAE's ARI ranged from 0.36 to 0.41 and the
# autoencoder's from 0.30 to 0.37, while PCA (deterministic) gives 0.41. A flexible nonlinear model with the
# right likelihood is not automatically a better summary for clustering, and ten principal components of
# log-normalised counts are a strong baseline on a single slide. The strengths of the VAE lie elsewhere: it is a
# generative model of the counts (it scores new spots, simulates slides and imputes genes, see the exercises), and
# it is easy to extend with more inputs, which is how gimVI, DestVI, STACI and Starfysh use it. To find the
# layers, the next step is to use the spatial neighbours ({doc}`c02_gnn_spatial_graphs`,
# {doc}`c05_attention_transformers`).

# %% [markdown]
# ## Exercises

# %% [markdown]
# ```{exercise-start}
# :label: c03-ex-poisson
# ```
# Train the same VAE with a Poisson decoder (`likelihood="poisson"`) instead of the NB. Compare the two models'
# ELBO on the training spots and on the held-out spots, and the ARI of their clusters. Which model describes the
# counts better, and does that carry over to the clustering?
# ```{exercise-end}
# ```

# %% [markdown]
# ```{solution-start} c03-ex-poisson
# :class: dropdown
# ```

# %%
vae_pois, _ = train_vae(likelihood="poisson")
rows = {}
for name, model in [("NB", vae), ("Poisson", vae_pois)]:
    labels = cluster.gmm(latent_mean(model), 7, seed=cfg.seed)
    heldout_terms = elbo_terms(model, X[test])
    rows[name] = {"ELBO, training spots": elbo_terms(model, X[train])["ELBO"],
                  "ELBO, held-out spots": heldout_terms["ELBO"], "KL, held-out spots": heldout_terms["KL"],
                  "ARI": metrics.ari(adata.obs["layer"], labels)}
pd.DataFrame(rows).T.round(3)

# %% [markdown]
# Both ELBOs bound the log-probability of the same integer counts, so they can be compared directly. In full mode
# the Poisson VAE scores a slightly *better* ELBO than the NB VAE on its training spots but a clearly worse one on
# the held-out spots, and it spends more KL: with no dispersion parameter to absorb the extra variance, it pushes
# spot-specific noise into $z$, and that does not carry over to new spots. This is why likelihoods are compared on
# held-out data. The clustering, on the other hand, hardly depends on the likelihood (in full mode the two ARIs are
# nearly equal, much closer than two training seeds of the same model): the latent space is shaped by the main
# axes of variation, which both models see. The likelihood matters when you use the generative side of the model:
# imputation, simulation, differential expression, model comparison.
# ```{solution-end}
# ```

# %% [markdown]
# ```{exercise-start}
# :label: c03-ex-beta
# ```
# Multiply the KL term by $\beta = 10$ (a "$\beta$-VAE"). How do the two terms of the ELBO change on the held-out
# spots, how many latent dimensions stay in use, and what happens to the clustering? Count a dimension as
# *active* when its posterior mean varies across spots ($\mathrm{Var}_i\, m_{ik} > 0.01$).
# ```{exercise-end}
# ```

# %% [markdown]
# ```{solution-start} c03-ex-beta
# :class: dropdown
# ```

# %%
vae_beta, _ = train_vae(likelihood="nb", beta=10.0)
rows = {}
for name, model in [("beta = 1", vae), ("beta = 10", vae_beta)]:
    z = latent_mean(model)
    rows[name] = {**elbo_terms(model, X[test]), "active dimensions": int((z.var(0) > 0.01).sum()),
                  "ARI": metrics.ari(adata.obs["layer"], cluster.gmm(z, 7, seed=cfg.seed))}
pd.DataFrame(rows).T.round(3)

# %% [markdown]
# A larger $\beta$ makes information in $z$ ten times more expensive, and the encoder sends much less of it. In
# full mode the held-out KL falls from about 8 nats to below 1, the reconstruction term gets worse, and all but one
# latent dimension collapse onto the prior (their posterior means no longer vary across spots): *posterior
# collapse*. One dimension cannot separate seven layers, and the ARI drops sharply. The held-out ELBO (with
# $\beta = 1$) is also lower: the model gave up more reconstruction than it saved in KL. A $\beta$ below 1 goes
# the other way, towards a plain autoencoder. Methods tune this weight: ENVI multiplies its KL by 0.3, and STACI
# weights its likelihood 20 times more than its KL, which amounts to $\beta = 1/20$.
# ```{solution-end}
# ```

# %% [markdown]
# ```{exercise-start}
# :label: c03-ex-generate
# ```
# A VAE is a generative model. Simulate a slide from it: draw $z_i \sim \mathcal N(0, I)$ for every spot, decode
# with the spots' observed library sizes and sample NB counts (`torch.distributions.NegativeBinomial`). Compare the
# fraction of zeros per gene of the simulated and the real counts.
# ```{exercise-end}
# ```

# %% [markdown]
# ```{solution-start} c03-ex-generate
# :class: dropdown
# ```

# %%
with torch.no_grad():
    z_prior = torch.randn(n_spots, n_latent, device=cfg.device)
    mu = lib.to(cfg.device) * torch.softmax(vae.decoder(z_prior), dim=-1)
    theta = vae.log_theta.exp()
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=mu.log() - theta.log())
    x_sim = nb.sample().cpu()
zeros_real, zeros_sim = (X == 0).float().mean(0), (x_sim == 0).float().mean(0)
fig, ax = plt.subplots(figsize=(3.5, 3.5))
ax.scatter(zeros_real, zeros_sim, s=3)
ax.plot([0, 1], [0, 1], "k--", lw=1)
ax.set(xlabel="fraction of zeros, real", ylabel="fraction of zeros, simulated", title="one simulated slide")
print(f"mean absolute difference in the fraction of zeros: {(zeros_real - zeros_sim).abs().mean():.3f}")

# %% [markdown]
# The simulated slide reproduces the real fraction of zeros of each gene closely, although nothing in the model
# adds zeros on purpose: library size and NB dispersion are enough (with a trained model; in FAST mode the model
# is barely trained and the match is looser). The same decoder, with $z$ drawn from a spot's posterior instead of
# the prior, is what gimVI uses to impute genes that a spatial assay did not measure.
# ```{solution-end}
# ```

# %% [markdown]
# ## Summary
#
# * An autoencoder is an encoder MLP and a decoder MLP trained to reconstruct their input; `stcore.train.fit`
#   trains any model whose `loss` returns named terms.
# * A VAE adds a Gaussian posterior $q(z \mid x)$, the reparameterisation trick and the ELBO
#   $= \mathbb E_q[\log p(x \mid z)] - \mathrm{KL}(q \,\|\, \mathcal N(0, I))$; with the scVI recipe the decoder
#   outputs proportions that the observed library size scales, and a gene-wise NB dispersion models the extra
#   variance.
# * Real Visium UMI counts are over-dispersed (NB beats Poisson on held-out spots) but not zero-inflated (ZINB adds
#   nothing to NB).
# * Compare likelihoods on held-out data: a Poisson VAE fits its training spots as well as an NB VAE but
#   generalises worse. A large KL weight $\beta$ collapses latent dimensions.
# * For clustering spots into cortical layers, a count VAE beats an MSE autoencoder but not PCA; the spatial
#   layout, used in the next chapters, is what finds the layers.
