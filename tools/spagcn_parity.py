"""Run SpaGCN on DLPFC 151673 (K = 7, image, tutorial defaults) with stcore or with the official package.

    python tools/spagcn_parity.py stcore 0          # stcore.methods.spagcn, seed 0
    python tools/spagcn_parity.py official 0        # the official SpaGCN 1.2.7 (pip install SpaGCN==1.2.7 louvain,
                                                    # in an environment of its own: louvain conflicts with leidenalg)

Both get the same inputs: the spots' full-resolution pixel positions, and the 600-pixel low-resolution H&E with
a 49-pixel colour window (the official ``x_pixel``/``y_pixel`` are the positions on that image). Prints one CSV row:
implementation, seed, ARI, ARI_refined (6-nearest-spot majority vote), n_clusters, resolution, wall_s. The official
timing starts after its adjacency matrix is built; the stcore timing includes everything.
"""

import random
import sys
import time
import warnings

import numpy as np
import torch

import stcore
from stcore import cluster, metrics


def run_stcore(adata, seed):
    from stcore.methods.spagcn import SpaGCN

    start = time.perf_counter()
    model = SpaGCN(n_domains=7, histology=True, seed=seed, progress=False)
    model.run(adata)
    return np.asarray(adata.obs["domain_spagcn"]), model.resolution_, time.perf_counter() - start


def run_official(adata, seed):
    import scanpy as sc
    import SpaGCN as spg

    expr = sc.AnnData(adata.X.toarray().astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    if "symbol" in adata.var:                          # MT- genes are recognised by their symbols
        expr.var_names = adata.var["symbol"].astype(str).to_numpy()
        expr.var_names_make_unique()
    x, y = adata.obsm["spatial"][:, 0], adata.obsm["spatial"][:, 1]
    library = next(iter(adata.uns["spatial"]))
    image = adata.uns["spatial"][library]["images"]["lowres"]
    scale = adata.uns["spatial"][library]["scalefactors"]["tissue_lowres_scalef"]
    col, row = (x * scale).astype(int), (y * scale).astype(int)
    adj = spg.calculate_adj_matrix(x=x.astype(int).tolist(), y=y.astype(int).tolist(), x_pixel=row.tolist(),
                                   y_pixel=col.tolist(), image=image, beta=49, alpha=1, histology=True)
    spg.prefilter_genes(expr, min_cells=3)
    spg.prefilter_specialgenes(expr)
    sc.pp.normalize_per_cell(expr)
    sc.pp.log1p(expr)
    start = time.perf_counter()
    length = spg.search_l(0.5, adj, start=0.01, end=1000, tol=0.01, max_run=100)
    resolution = spg.search_res(expr, adj, length, 7, start=0.7, step=0.1, tol=5e-3, lr=0.05, max_epochs=20,
                                r_seed=seed, t_seed=seed, n_seed=seed)
    model = spg.SpaGCN()
    model.set_l(length)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.train(expr, adj, init_spa=True, init="louvain", res=resolution, tol=5e-3, lr=0.05, max_epochs=200)
    labels, _ = model.predict()
    return np.asarray(labels), resolution, time.perf_counter() - start


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    implementation, seed = sys.argv[1], int(sys.argv[2])
    adata = stcore.data.load("dlpfc_151673")
    labels, resolution, wall = {"stcore": run_stcore, "official": run_official}[implementation](adata, seed)
    refined = cluster.refine(labels, coords=adata.obsm["spatial"], k=6)
    print(f"{implementation},{seed},{metrics.ari(adata.obs['layer'], labels):.4f},"
          f"{metrics.ari(adata.obs['layer'], refined):.4f},{len(np.unique(labels))},{resolution:.4f},{wall:.1f}")
