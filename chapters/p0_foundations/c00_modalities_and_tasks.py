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
#     review_section: "Data modalities and integration tasks"
#     strategy: "none (overview)"
# ---

# %% [markdown]
# # Modalities and tasks
#
# In this chapter you meet the data of the whole course — spots over an H&E image, a single-cell reference, an
# image-based single-cell section — learn the AnnData structure that holds them, and see what each integration
# task predicts, ending with a first spatial-domain result scored against ground truth.
#
# ```{admonition} Key takeaways
# :class: tip
# * Spatial transcriptomics (ST) comes in two kinds: **spot-based** (Visium, legacy ST: many genes, several cells
#   per spot, an H&E image) and **image-based** (MERFISH, seqFISH: single cells, a few hundred genes).
# * Every integration task of the review is a prediction you can score: domains (labels per spot), cell-type
#   proportions per spot, expression of unmeasured genes, positions of dissociated cells.
# * All data of the course follow one AnnData convention: raw counts in `X`, coordinates in `obsm["spatial"]`,
#   images and scale factors in `uns["spatial"]`, truth in `obs`.
# ```
#
# **Prerequisites:** Python, NumPy, a little pandas. **Run time:** about 1 minute (FAST mode: about 30 s).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import stcore
from stcore.data import synthetic
from stcore.methods import get_method

cfg = stcore.config.get()
cfg

# %% [markdown]
# ## Motivation: one tissue, several modalities
#
# A tissue section can be measured in several ways at once or on neighbouring sections: the H&E stain shows
# morphology at micrometre resolution; spatial transcriptomics counts RNA molecules at known positions;
# dissociated single-cell RNA-seq (scRNA-seq) profiles thousands of genes per cell but loses the positions;
# nuclear stains show chromatin; newer protocols measure chromatin accessibility, histone marks or proteins on the
# same spots. The review behind this course {cite:p}`luo2025review` organises deep-learning methods by which
# modality they add to ST and which task they solve. Its first figure sketches the modalities and tasks; below we
# rebuild it from the real data that ships with the course.
#
# | ST is combined with | task | what is predicted | scored against | methods (chapters) |
# |---|---|---|---|---|
# | H&E image | spatial domains | a label per spot | manual annotation (ARI, NMI) | SpaCell, stLearn, SpaGCN, stMVC, DeepST, ConGI, TESLA, TransformerST |
# | H&E image | reference-free deconvolution | cell-state proportions | pathologist regions | Starfysh |
# | scRNA-seq | deconvolution | cell-type proportions per spot | known composition (RMSE, JSD, PCC) | DSTG, SD², GTAD, CellDART, DestVI, GraphST |
# | scRNA-seq | imputation | unmeasured genes per spot/cell | held-out genes (PCC, SSIM, RMSE, JS) | gimVI, stPlus, ENVI |
# | scRNA-seq | location reconstruction | coordinates of dissociated cells | hidden true positions | STEM |
# | chromatin images | joint representation | shared latent space of nuclei and expression | cell types | STACI |
# | ATAC / histone / protein | multi-omics domains | a label per spot | author clusters | SpatialGlue, PRAGA |

# %% [markdown]
# ## The data
#
# The course ships small, real datasets in `data/` (their sources, licences and the recipes that built them are on
# the {doc}`../../book/data` page). `stcore.data.list_datasets()` lists them:

# %%
stcore.data.list_datasets()[["name", "shape", "description"]].head(8)

# %% [markdown]
# ### Spot-based ST with an H&E image: human DLPFC, Visium slide 151673
#
# The dorsolateral prefrontal cortex data of {cite:t}`maynard2021` is the standard benchmark for spatial domains:
# every spot was assigned by hand to one of the six cortical layers or the white matter.

# %%
adata = stcore.data.load("dlpfc_151673")
adata

# %% [markdown]
# The AnnData object holds everything about the slide:
#
# | field | content | here |
# |---|---|---|
# | `adata.X` | raw UMI counts, spots × genes (sparse) | 3,639 × 5,000 |
# | `adata.obs` | one row per spot: `array_row`, `array_col` (Visium grid), `layer` (truth), `n_nuclei` | |
# | `adata.var` | one row per gene: Ensembl ID as index, `symbol` | |
# | `adata.obsm["spatial"]` | (x, y) of each spot in full-resolution image pixels | 3,639 × 2 |
# | `adata.uns["spatial"]["151673"]` | `images` (`lowres` H&E) and `scalefactors` | 600 × 600 × 3 |
#
# A spot's position on the low-resolution image is its full-resolution position times `tissue_lowres_scalef`:

# %%
library = adata.uns["spatial"]["151673"]
scale = library["scalefactors"]["tissue_lowres_scalef"]
print("image:", library["images"]["lowres"].shape, " lowres scale factor:", round(scale, 4))
print("spot diameter on this image: %.1f px" % (library["scalefactors"]["spot_diameter_fullres"] * scale))
print("counts of spot 0:", int(adata.X[0].sum()), "UMIs over", adata.X[0].nnz, "detected genes")
adata.obs[["array_row", "array_col", "layer", "n_nuclei"]].head()

# %% [markdown]
# A spot is 55 µm across and holds a few cells: the nuclei counted under each spot on the H&E tell how many.

# %%
print(adata.obs["n_nuclei"].describe()[["mean", "50%", "max"]].round(1).to_string())
adata.obs["layer"].value_counts(dropna=False).sort_index()

# %% [markdown]
# ### A single-cell reference and an image-based section of the same brain region
#
# {cite:t}`moffitt2018` profiled the mouse hypothalamic preoptic region twice: by droplet scRNA-seq (dissociated
# cells, whole transcriptome, no positions; we ship 1,308 cells restricted to the 134 genes of the imaging panel)
# and by MERFISH (11,162 cells in two sections, 135 genes, positions in µm). Together they form a real
# reference/spatial pair for deconvolution, imputation and location reconstruction.

# %%
reference = stcore.data.load("moffitt_scrna")
cells = stcore.data.load("merfish_hypothalamus")
shared = stcore.validation.shared_genes(cells, reference)
print(reference.shape, "reference;", cells.shape, "MERFISH;", len(shared), "shared genes")
print("median molecules per cell: scRNA-seq %d, MERFISH %d" % (
    np.median(reference.X.sum(1).A1), np.median(cells.X.sum(1).A1)))

# %% [markdown]
# ### What the tasks predict
#
# The spatial prediction tasks all need ground truth to be scored. MERFISH provides it: summing the cells that fall
# into square windows turns the section into "spots" whose cell-type composition is known exactly (the protocol of
# {cite:t}`li2022benchmark`), and any measured gene can be hidden and predicted back.

# %%
section = cells[cells.obs["z"] == cells.obs["z"].max()].copy()
spots = synthetic.grid_spots(section, spot_size=cfg.pick(100.0, 200.0), cell_type_key="cell_class")
print(spots.n_obs, "grid spots; cells per spot: median", int(spots.obs["n_cells"].median()),
      "range", int(spots.obs["n_cells"].min()), "-", int(spots.obs["n_cells"].max()))
spots.obsm["proportions"].iloc[:3, :6].round(2)

# %% [markdown]
# Now the course's first figure — the review's Figure 1 remade from these data: (a) Visium spots over the H&E,
# (b) the domain task's ground truth, (c) the single-cell reference, (d) the image-based section, (e) a
# deconvolution target (the share of mature oligodendrocytes in each grid spot), (f) an imputation target (one
# gene's measured expression).

# %%
fig, axes = plt.subplots(2, 3, figsize=(13, 8))
adata.obs["total counts"] = adata.X.sum(1).A1
stcore.plotting.spatial(adata, "total counts", ax=axes[0, 0], size=1.5, alpha=0.6, cmap="Greys",
                        title="(a) Visium spots over H&E")
stcore.plotting.spatial(adata, "layer", ax=axes[0, 1], image=False, size=4, title="(b) domains: manual layers")
ref_pcs = stcore.preprocess.pca(stcore.preprocess.log_normalize(reference).X, 20, seed=cfg.seed)
stcore.plotting.embedding(ref_pcs, reference.obs["cell_type"], method="tsne", ax=axes[0, 2],
                          title="(c) scRNA-seq reference (t-SNE)")
stcore.plotting.spatial(section, "cell_class", ax=axes[1, 0], size=2, title="(d) MERFISH cells (µm)")
od = spots.obsm["proportions"].filter(like="OD Mature").sum(1)
spots.obs["OD mature share"] = od.to_numpy()
stcore.plotting.spatial(spots, "OD mature share", ax=axes[1, 1], size=cfg.pick(28, 110),
                        title="(e) deconvolution target")
gene = "Ermn"  # an oligodendrocyte gene measured by MERFISH
stcore.plotting.spatial(section, gene, ax=axes[1, 2], size=2, cmap="Reds", vmax=np.percentile(
    section[:, gene].X.toarray(), 99), title=f"(f) imputation target: {gene} counts")
fig.tight_layout()

# %% [markdown]
# Spots and cells live in different units (image pixels for Visium, micrometres for MERFISH), which is why every
# method reads them from `obsm["spatial"]` and never assumes a scale. The H&E of a breast-cancer section of
# {cite:t}`andersson2021her2` shows what the image modality adds at full resolution: each legacy-ST spot (100 µm)
# comes with a tile of tissue that the histology chapters feed to convolutional networks.

# %%
tumour = stcore.data.load("her2st_C2")
tiles = tumour.obsm["tiles"]
print("tiles:", tiles.shape, tiles.dtype)
fig, axes = plt.subplots(1, 6, figsize=(11, 2))
for ax, i in zip(axes, np.linspace(0, len(tiles) - 1, 6).astype(int)):
    ax.imshow(tiles[i])
    ax.set_title(f"spot {tumour.obs_names[i]}", fontsize=7)
    ax.axis("off")

# %% [markdown]
# ## A first result: spatial domains from expression alone
#
# Every method of the course is registered by task and runs the same way from Python or the shell
# (`stcore run gmm slide.h5ad -o out.h5ad --n-domains 7`). The two expression-only baselines — a Gaussian
# mixture and Leiden on the PCA of expression — are the yardsticks every deep method is compared with.

# %%
stcore.methods.available()[["method", "task", "summary"]]

# %%
scores = {}
for name in ["gmm", "leiden"]:
    get_method(name)(n_domains=7, seed=cfg.seed).run(adata)
    scores[name] = stcore.metrics.domain_scores(adata.obs["layer"], adata.obs[f"domain_{name}"])
get_method("gmm")(n_domains=7, seed=cfg.seed, refine=True).run(adata)
adata.obs["domain_gmm_refined"] = adata.obs.pop("domain_gmm")
scores["gmm + refinement"] = stcore.metrics.domain_scores(adata.obs["layer"], adata.obs["domain_gmm_refined"])
pd.DataFrame(scores).T.round(3)

# %%
adata.obs["domain_gmm"] = adata.obs["domain_gmm_refined"]  # shown below with its ARI
fig = stcore.plotting.domain_maps(adata, ["domain_leiden", "domain_gmm_refined"], truth="layer", image=False,
                                  titles=["manual layers", "Leiden on PCA", "GMM on PCA + refinement"], size=4)

# %% [markdown]
# Expression alone recovers the broad structure (white matter, the deep and upper layers) but not clean, thin
# layers: the ARI in the table is far from 1, and the maps are speckled. The rest of the course asks what other
# modalities and network designs add to this — and, honestly, when they do not. Note already two things that
# move such numbers without any deep learning: the clustering algorithm (GMM vs Leiden) and a spatial majority-vote
# refinement.
#
# ## Exercises
#
# ```{exercise-start}
# :label: c00-ex-scale
# ```
# Find the pixel of the low-resolution H&E image under spot `adata.obs_names[100]` using only `obsm["spatial"]`
# and the scale factor, and check that its colour is tissue (not the white glass background).
# ```{exercise-end}
# ```
#
# ```{solution-start} c00-ex-scale
# :class: dropdown
# ```

# %%
x, y = adata.obsm["spatial"][100] * scale
pixel = library["images"]["lowres"][int(round(y)), int(round(x))]
print("image pixel (row, col) =", (int(round(y)), int(round(x))), "RGB =", pixel)
assert pixel.mean() < 235, "a spot in tissue should not sit on white glass"

# %% [markdown]
# `obsm["spatial"]` holds (x, y) = (column, row) in full-resolution pixels; multiplying by
# `tissue_lowres_scalef` gives the position on the 600 px image, where rows index y.
# ```{solution-end}
# ```
#
# ```{exercise-start}
# :label: c00-ex-grid
# ```
# Grid the MERFISH section with 50 µm and with 200 µm windows. How do the number of spots and the median
# number of cells per spot change, and what does that mean for a deconvolution method?
# ```{exercise-end}
# ```
#
# ```{solution-start} c00-ex-grid
# :class: dropdown
# ```

# %%
for size in (50.0, 200.0):
    g = synthetic.grid_spots(section, spot_size=size, cell_type_key="cell_class")
    print(f"{size:>5.0f} µm: {g.n_obs:5d} spots, median {g.obs['n_cells'].median():.0f} cells per spot, "
          f"{(g.obsm['proportions'] > 0).sum(1).median():.0f} cell classes per spot")

# %% [markdown]
# Small windows hold one to a few cells (close to single-cell data, little mixing); large ones hold dozens of
# cells of many classes, so the proportions are smoother but harder to resolve. Visium's 55 µm spots sit in
# between.
# ```{solution-end}
# ```
#
# ## Summary
#
# * The course's data: Visium DLPFC slides with manual layers and H&E, HER2+ breast-cancer sections with
#   full-resolution tiles, and a MERFISH section with its scRNA-seq reference — all real, all in `data/`.
# * AnnData holds counts (`X`), positions (`obsm["spatial"]`), images (`uns["spatial"]`) and truth (`obs`);
#   methods write their outputs next to them (`obs["domain_<method>"]`, `obsm["proportions_<method>"]`, ...).
# * Each task has a ground truth and metrics, and simple baselines set the bar the deep methods must clear.
