"""The review's four strategies for integrating ST with another modality (Luo et al. 2025, Fig. 2).

Each strategy is a small ``nn.Module`` that takes encoders (or embeddings) as arguments, the way PyG wrappers
take modules, so a method is assembled from parts rather than written from scratch:

============  ==========================================  ===============================================
Strategy      Idea                                        Modules
============  ==========================================  ===============================================
link          put per-modality embeddings side by side    :class:`LinkConcat`
sum           (weighted) sum of per-modality embeddings   :class:`FixedSum`, :class:`AttentionSum`
graph         one modality builds / weights the graph     :class:`NodesAndEdges`, :class:`DualNodes`
fusion        map modalities into one shared space        :class:`SharedEncoder`, :class:`AlignedEncoders`
============  ==========================================  ===============================================

Embeddings are (n, d) tensors whose rows are matched across modalities (the same spots), except in
:class:`DualNodes`, :class:`SharedEncoder` and MMD-aligned :class:`AlignedEncoders`, where the modalities may
have different samples (spots and cells).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from stcore.nn.losses import info_nce, mmd

__all__ = [
    "AlignedEncoders",
    "AttentionSum",
    "DualNodes",
    "FixedSum",
    "LinkConcat",
    "NodesAndEdges",
    "SharedEncoder",
    "dual_edge_index",
]


def _embeddings(zs, what: str, same_shape: bool) -> list[Tensor]:
    """Accept ``f(z1, z2, ...)`` or ``f([z1, z2, ...])`` and check the rows (and widths) match."""
    if len(zs) == 1 and isinstance(zs[0], (list, tuple)):
        zs = zs[0]
    zs = list(zs)
    if not zs:
        raise ValueError(f"{what} needs at least one embedding.")
    shapes = [tuple(z.shape) for z in zs]
    if any(z.dim() != 2 for z in zs) or len({s[0] for s in shapes}) > 1:
        raise ValueError(
            f"{what} needs (n, d) embeddings with the same n (rows = the same spots), got {shapes}."
        )
    if same_shape and len(set(shapes)) > 1:
        raise ValueError(
            f"{what} needs embeddings of the same width, got {shapes}; project them to a common width first "
            "(e.g. with an MLP per modality) or use LinkConcat."
        )
    return zs


class LinkConcat(nn.Module):
    r"""Link strategy: concatenate per-modality embeddings, :math:`z = [w_1 z_1 \,\|\, \dots \,\|\, w_M z_M]`.

    Used by SpaCell (gene and image auto-encoder codes joined in one bottleneck), DeepST (``[feat ||
    gnn_z]``), TransformerST (``[quant(feat) || mu]``) and PRAGA (``[z_1, z_2]`` then an MLP).

    Parameters
    ----------
    weights
        Optional per-modality scale factors (default: all 1).

    Shapes
    ------
    (n, d_1), ..., (n, d_M) -> (n, d_1 + ... + d_M).
    """

    def __init__(self, weights: Sequence[float] | None = None):
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, *zs: Tensor) -> Tensor:
        zs = _embeddings(zs, "LinkConcat", same_shape=False)
        if self.weights is not None:
            if len(self.weights) != len(zs):
                raise ValueError(f"LinkConcat has {len(self.weights)} weights but got {len(zs)} embeddings.")
            zs = [w * z for w, z in zip(self.weights, zs)]
        return torch.cat(zs, dim=-1)


class FixedSum(nn.Module):
    r"""Sum strategy with fixed weights: :math:`z = \sum_m w_m z_m`.

    Used by ConGI (``z = h_gene + 0.1 h_image``) and stMVC-M (mean of the views). The weights are used as
    given (not normalised).

    Shapes
    ------
    M embeddings (n, d) -> (n, d).
    """

    def __init__(self, weights: Sequence[float]):
        super().__init__()
        self.weights = [float(w) for w in weights]
        if not self.weights:
            raise ValueError("FixedSum needs one weight per modality, got none.")

    def forward(self, *zs: Tensor) -> Tensor:
        zs = _embeddings(zs, "FixedSum", same_shape=True)
        if len(zs) != len(self.weights):
            raise ValueError(f"FixedSum has {len(self.weights)} weights but got {len(zs)} embeddings.")
        return sum(w * z for w, z in zip(self.weights, zs))


class AttentionSum(nn.Module):
    r"""Sum strategy with learned per-sample attention over modalities (SpatialGlue, stMVC).

    .. math::
        e_{im} = u^\top \tanh(W z_{im}), \qquad \alpha_{im} = \mathrm{softmax}_m(e_{im}), \qquad
        z_i = \sum_m \alpha_{im} z_{im}

    as SpatialGlue's within- and cross-modality attention layers (no biases) and stMVC's view attention. The
    weights :math:`\alpha` (n, M) show which modality drives each spot.

    Parameters
    ----------
    dim
        Embedding width d.
    hidden
        Width of the scoring layer W (default ``dim``, as SpatialGlue).

    Shapes
    ------
    M embeddings (n, d) -> fused (n, d), weights (n, M) with rows summing to 1.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.project = nn.Linear(dim, hidden, bias=False)
        self.score = nn.Linear(hidden, 1, bias=False)
        self.dim = dim

    def forward(self, *zs: Tensor) -> tuple[Tensor, Tensor]:
        zs = _embeddings(zs, "AttentionSum", same_shape=True)
        z = torch.stack(zs, dim=1)  # (n, M, d)
        if z.size(-1) != self.dim:
            raise ValueError(f"AttentionSum(dim={self.dim}) got embeddings of width {z.size(-1)}.")
        weights = torch.softmax(self.score(torch.tanh(self.project(z))).squeeze(-1), dim=1)
        return (weights.unsqueeze(-1) * z).sum(1), weights


class NodesAndEdges(nn.Module):
    r"""Graph strategy, one node set: modality A gives node features, modality B decides the edges or their
    weights.

    Used by SpaGCN (H&E colour as a third coordinate in the Gaussian edge weights), TransformerST (colour in
    the kNN graph), stMVC (a histology-similarity graph beside the spatial graph) and, as weights on a
    smoothing graph, stLearn SME and DeepST (spatial x morphology x expression similarity).

    Parameters
    ----------
    encoder
        Graph encoder called as ``encoder(x, edge_index, edge_weight)`` (e.g. :class:`stcore.nn.GCNStack`).
    edge_weight_fn
        Optional ``f(edge_index, features) -> (E,)`` that turns modality-B features into edge weights (e.g.
        ``stcore.graphs.histology_weights``); used when ``forward`` gets ``edge_features``.

    Shapes
    ------
    x (n, d_in), edge_index (2, E), edge_weight (E,) >= 0, edge_features (n, f) -> encoder output (n, d_out).
    Given both ``edge_weight`` and ``edge_features``, the two weights are multiplied.
    """

    def __init__(self, encoder: nn.Module, edge_weight_fn: Callable[[Tensor, Tensor], Tensor] | None = None):
        super().__init__()
        self.encoder = encoder
        self.edge_weight_fn = edge_weight_fn

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor | None = None,
        edge_features: Tensor | None = None,
    ) -> Tensor:
        if edge_features is not None:
            if self.edge_weight_fn is None:
                raise ValueError(
                    "edge_features were given but NodesAndEdges has no edge_weight_fn to use them."
                )
            w = self.edge_weight_fn(edge_index, edge_features)
            edge_weight = w if edge_weight is None else edge_weight * w
        if edge_weight is not None:
            if edge_weight.shape != (edge_index.size(1),):
                raise ValueError(
                    f"edge_weight must have shape ({edge_index.size(1)},), got {tuple(edge_weight.shape)}."
                )
            if not torch.isfinite(edge_weight).all() or (edge_weight < 0).any():
                raise ValueError(
                    "edge_weight must be finite and non-negative; check the histology features / scale."
                )
        return self.encoder(x, edge_index, edge_weight)


def dual_edge_index(
    n_a: int,
    n_b: int,
    edges_aa: Tensor | None = None,
    edges_bb: Tensor | None = None,
    edges_ab: Tensor | None = None,
    symmetric: bool = True,
) -> Tensor:
    """Join two node sets into one graph with nodes ``0..n_a-1`` (set A) then ``n_a..n_a+n_b-1`` (set B).

    Parameters
    ----------
    n_a, n_b
        Sizes of the two node sets.
    edges_aa, edges_bb
        (2, E) edges within A and within B, each indexed from 0 in its own set (used as given).
    edges_ab
        (2, P) cross edges: row 0 indexes A, row 1 indexes B (e.g. mutual nearest neighbours).
    symmetric
        Also add each cross edge in the B -> A direction.

    Returns
    -------
    edge_index (2, E_aa + E_bb + P (or 2P)) over n_a + n_b nodes; B's indices are offset by ``n_a``.
    """
    empty = torch.empty(2, 0, dtype=torch.long)
    parts = []
    for name, e, (na, nb) in (
        ("edges_aa", edges_aa, (n_a, n_a)),
        ("edges_bb", edges_bb, (n_b, n_b)),
        ("edges_ab", edges_ab, (n_a, n_b)),
    ):
        e = empty if e is None else torch.as_tensor(e, dtype=torch.long)
        if e.dim() != 2 or e.size(0) != 2:
            raise ValueError(
                f"{name} must have shape (2, E), got {tuple(e.shape)}; transpose an (E, 2) array."
            )
        if e.numel() and (e.min() < 0 or e[0].max() >= na or e[1].max() >= nb):
            raise ValueError(
                f"{name} has indices outside its node set(s) (sizes {na} and {nb}); index each set from 0 "
                "(edges_ab: row 0 = set A, row 1 = set B)."
            )
        parts.append(e)
    e_aa, e_bb, e_ab = parts
    e_bb = e_bb + n_a
    cross = torch.stack([e_ab[0], e_ab[1] + n_a])
    if symmetric:
        cross = torch.cat([cross, cross.flip(0)], dim=1)
    return torch.cat([e_aa, e_bb, cross], dim=1)


class DualNodes(nn.Module):
    r"""Graph strategy, two node sets: A and B (e.g. pseudo-spots built from scRNA-seq and real spots) become
    the nodes of one graph with within-set and cross-set edges, and one graph encoder runs over it.

    Used by DSTG (GCN over pseudo-spot and real-spot kNN graphs joined by mutual nearest neighbours), SD^2 and
    GTAD (graphs over pseudo and real spots), and in spirit GraphST's deconvolution (cells mapped onto spots).

    Parameters
    ----------
    encoder
        Graph encoder called as ``encoder(x, edge_index)``.
    symmetric
        Add cross edges in both directions (see :func:`dual_edge_index`).

    Shapes
    ------
    x_a (n_a, d), x_b (n_b, d) (the same features, e.g. shared genes), edges as in :func:`dual_edge_index`
    -> h_a (n_a, d_out), h_b (n_b, d_out).
    """

    def __init__(self, encoder: nn.Module, symmetric: bool = True):
        super().__init__()
        self.encoder = encoder
        self.symmetric = symmetric

    def forward(
        self,
        x_a: Tensor,
        x_b: Tensor,
        edges_aa: Tensor | None = None,
        edges_bb: Tensor | None = None,
        edges_ab: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if x_a.dim() != 2 or x_b.dim() != 2 or x_a.size(1) != x_b.size(1):
            raise ValueError(
                "DualNodes needs x_a (n_a, d) and x_b (n_b, d) with the same features, "
                f"got {tuple(x_a.shape)} and "
                f"{tuple(x_b.shape)}; restrict both to shared genes first."
            )
        n_a = x_a.size(0)
        edge_index = dual_edge_index(n_a, x_b.size(0), edges_aa, edges_bb, edges_ab, self.symmetric)
        h = self.encoder(torch.cat([x_a, x_b]), edge_index.to(x_a.device))
        return h[:n_a], h[n_a:]


class SharedEncoder(nn.Module):
    r"""Fusion strategy: one encoder maps every modality into the same latent space,
    :math:`z_m = E(P_m(x_m))`, with optional per-modality projections :math:`P_m` to a common width.

    Used by STEM (one MLP for spots and cells), CellDART (one embedder for pseudo-spots and real spots) and
    gimVI (dataset-specific first layers, then shared layers, as scvi-tools' ``MultiEncoder``). Pair it with
    an alignment term (:func:`stcore.nn.mmd`, or a discriminator behind :class:`stcore.nn.GradientReversal`).

    Parameters
    ----------
    encoder
        The shared encoder.
    projections
        Optional one module per modality (e.g. ``nn.Linear(n_genes_m, width)``), applied first.

    Shapes
    ------
    x_1 (n_1, d_1), ..., x_M (n_M, d_M) -> tuple z_1 (n_1, d_out), ..., z_M (n_M, d_out). Keyword arguments
    are passed to the encoder for every modality.
    """

    def __init__(self, encoder: nn.Module, projections: Sequence[nn.Module] | None = None):
        super().__init__()
        self.encoder = encoder
        self.projections = None if projections is None else nn.ModuleList(projections)

    def forward(self, *xs: Tensor, **kwargs) -> tuple[Tensor, ...]:
        if len(xs) == 1 and isinstance(xs[0], (list, tuple)):
            xs = tuple(xs[0])
        if self.projections is not None:
            if len(xs) != len(self.projections):
                raise ValueError(
                    f"SharedEncoder has {len(self.projections)} projections but got {len(xs)} inputs."
                )
            xs = tuple(p(x) for p, x in zip(self.projections, xs))
        return tuple(self.encoder(x, **kwargs) for x in xs)


class AlignedEncoders(nn.Module):
    r"""Fusion strategy: one encoder per modality, trained so that their latent spaces agree.

    * ``align="contrastive"``: :func:`stcore.nn.info_nce` over matched rows (the same spot seen by two
      modalities), as ConGI aligns gene and image embeddings.
    * ``align="mmd"``: :func:`stcore.nn.mmd` between the two sets of embeddings (no pairing needed), as STEM
      aligns spot and cell embeddings.

    Adversarial alignment (CellDART, gimVI) uses a discriminator behind :class:`stcore.nn.GradientReversal`.

    Parameters
    ----------
    encoder_a, encoder_b
        The two encoders (output widths must agree).
    align
        ``"contrastive"`` or ``"mmd"``.
    tau
        InfoNCE temperature.
    bandwidths
        MMD kernel widths (``None``: data-driven, see :func:`stcore.nn.mmd`).

    Shapes
    ------
    ``forward(x_a, x_b, args_a=(), args_b=())`` -> z_a (n_a, d), z_b (n_b, d), where ``args_*`` are extra
    positional arguments of each encoder (e.g. ``(edge_index,)``); ``loss(z_a, z_b)`` -> scalar.
    """

    def __init__(
        self,
        encoder_a: nn.Module,
        encoder_b: nn.Module,
        align: str = "contrastive",
        tau: float = 0.5,
        bandwidths: Sequence[float] | None = None,
    ):
        super().__init__()
        if align not in ("contrastive", "mmd"):
            raise ValueError(f"align must be 'contrastive' or 'mmd', got {align!r}.")
        self.encoder_a, self.encoder_b = encoder_a, encoder_b
        self.align, self.tau, self.bandwidths = align, float(tau), bandwidths

    def forward(
        self, x_a: Tensor, x_b: Tensor, args_a: tuple = (), args_b: tuple = ()
    ) -> tuple[Tensor, Tensor]:
        return self.encoder_a(x_a, *args_a), self.encoder_b(x_b, *args_b)

    def loss(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if self.align == "contrastive":
            if z_a.shape != z_b.shape:
                raise ValueError(
                    "Contrastive alignment needs row-matched embeddings of the same shape, "
                    f"got {tuple(z_a.shape)} "
                    f"and {tuple(z_b.shape)}; use align='mmd' for unpaired samples."
                )
            return info_nce(z_a, z_b, self.tau)
        return mmd(z_a, z_b, self.bandwidths)
