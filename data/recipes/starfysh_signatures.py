"""Starfysh breast-cancer gene signatures (He et al. 2024) -> data/starfysh_breast_signatures.h5ad.

Raw files (under ``--raw``, folder ``starfysh_breast_signatures/``; BSD-3-Clause, azizilab/starfysh):

* ``full_sigs.csv``: 25 immune, stromal and epithelial cell states of breast tumours (one column of marker genes
  per state, ordered, ragged: shorter columns padded with empty cells);
* ``tnbc_signature.csv``: 5 coarse states used in the TNBC tutorial (CAFs, Cancer Epithelial, Myeloid, Normal
  Epithelial, T-cells), 30 genes each.

Output: an AnnData with one observation per state (``obs_names`` ``"<set>:<state>"``, ``obs["signature_set"]``
``"full"`` or ``"tnbc"``, ``obs["state"]`` the column name, ``obs["n_genes"]``) and one variable per gene of the
union; ``X[k, g]`` (CSR float32) is the rank of gene g in state k's list (1 = first), 0 when absent. A gene listed
twice in a column keeps its first rank. ``stcore.methods.starfysh.read_signatures`` turns it back into
``{state: [genes]}`` in list order.
"""

from __future__ import annotations

import _common as C
import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

ROOT = "starfysh_breast_signatures"
FILES = {  # signature set -> (raw file, upstream commit)
    "full": ("full_sigs.csv", "4b616b301017cc3f3abcd3c3e05debbe66b5b4f4"),
    "tnbc": ("tnbc_signature.csv", "5a7cfdad74fbedab058f8656fc833b14d8ab3a00"),
}
META = {
    "citation": ("He S, Jin Y, Nazaret A, et al. Starfysh integrates spatial transcriptomic and histologic data to "
                 "reveal heterogeneous tumor-immune hubs. Nat Biotechnol (2024). doi:10.1038/s41587-024-02173-8"),
    "licence": "BSD-3-Clause (azizilab/starfysh)",
    "recipe": "data/recipes/starfysh_signatures.py",
}


def read_lists(path) -> dict[str, list[str]]:
    table = pd.read_csv(path, index_col=0)
    out = {}
    for col in table.columns:
        genes = [str(g).strip() for g in table[col].tolist() if isinstance(g, str) and str(g).strip()]
        out[str(col)] = list(dict.fromkeys(genes))
    return out


def build(raw, out, registry: bool = True) -> None:
    lists = {s: read_lists(raw / ROOT / f) for s, (f, _) in FILES.items()}
    genes = sorted({g for sigs in lists.values() for gs in sigs.values() for g in gs})
    col = {g: j for j, g in enumerate(genes)}
    rows, cols, vals, obs = [], [], [], []
    for s, sigs in lists.items():
        for state, gs in sigs.items():
            for rank, g in enumerate(gs, start=1):
                rows.append(len(obs))
                cols.append(col[g])
                vals.append(rank)
            obs.append({"name": f"{s}:{state}", "signature_set": s, "state": state, "n_genes": len(gs)})
    obs = pd.DataFrame(obs).set_index("name")
    obs.index.name = None
    obs["n_genes"] = obs["n_genes"].astype(np.int32)
    X = sparse.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(len(obs), len(genes)))
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name=None)))

    file = "starfysh_breast_signatures.h5ad"
    C.write_h5ad(adata, out / file)
    C.report(out, [file])
    print(f"  shape {adata.shape}: " + ", ".join(f"{s} {len(v)} states" for s, v in lists.items()))
    if registry:
        upstream = [{"path": f"{ROOT}/{f}",
                     "url": f"https://raw.githubusercontent.com/azizilab/starfysh/{commit}/data/{f}",
                     "sha256": C.sha256(raw / ROOT / f)} for f, commit in FILES.values()]
        C.register(
            "starfysh_breast_signatures", out, file, adata.shape,
            {**META, "description": (f"Starfysh breast-tumour cell-state marker lists: {len(lists['full'])} states "
                                     f"(full_sigs.csv) + {len(lists['tnbc'])} coarse TNBC states "
                                     f"(tnbc_signature.csv); X = rank of the gene in each state's list")},
            upstream)


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    build(args.raw, args.out, registry=not args.no_registry)


if __name__ == "__main__":
    main()
