"""Encoders: the building blocks every method in the course is assembled from.

All encoders take sizes and return ``nn.Module`` objects. Graph encoders take a PyG-style ``edge_index`` of
shape (2, E) (row 0 = source, row 1 = target) and stay sparse, so they scale to 100k+ spots.

=====================  =============================================  ===============================
Module                 Input -> output                                Used by (for example)
=====================  =============================================  ===============================
:class:`MLP`           (n, dims[0]) -> (n, dims[-1])                  CellDART, STEM, ConGI, gimVI
:class:`GCNStack`      (n, dims[0]), (2, E) -> (n, dims[-1])          SpaGCN, GraphST, SpatialGlue, DSTG
:class:`GATStack`      (n, dims[0]), (2, E) -> (n, dims[-1])          stMVC, DeepST, GTAD
:class:`GraphTransformerStack`  as GATStack                           TransformerST
:class:`TileCNN`       (n, 3, H, W) in [0, 1] -> (n, n_latent)        H&E tile encoders (SimCLR, ConGI)
:class:`TransformerBlock`  (B, L, dim) -> (B, L, dim)                 attention over tokens / modalities
=====================  =============================================  ===============================
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv, GCNConv, TransformerConv

__all__ = [
    "MLP",
    "GATStack",
    "GCNStack",
    "GraphTransformerStack",
    "TileCNN",
    "TransformerBlock",
    "activation",
]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "prelu": nn.PReLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
    "none": nn.Identity,
}


def activation(name: str | None) -> nn.Module:
    """Return a fresh activation module by name.

    Parameters
    ----------
    name
        One of ``relu, elu, leaky_relu, gelu, tanh, sigmoid, prelu, softplus, identity``; ``None`` or
        ``"none"`` gives the identity.
    """
    key = "none" if name is None else str(name).lower()
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}: use one of {sorted(_ACTIVATIONS)} (or None for none)."
        )
    return _ACTIVATIONS[key]()


_act = activation  # constructors below take an ``activation`` argument that shadows the function


def _check_dims(dims: Sequence[int], what: str) -> list[int]:
    dims = [int(d) for d in dims]
    if len(dims) < 2:
        raise ValueError(f"{what} needs dims=[in, ..., out] with at least 2 sizes, got {dims}.")
    if any(d <= 0 for d in dims):
        raise ValueError(f"{what}: every size in dims must be a positive integer, got {dims}.")
    return dims


class MLP(nn.Module):
    r"""Stack of fully connected layers.

    Each layer is ``Linear -> [BatchNorm1d] -> activation -> [Dropout]``; the last layer is a plain ``Linear``
    unless ``last_activation=True`` (then it gets the same BatchNorm/activation/Dropout as the others).

    Parameters
    ----------
    dims
        ``[in, h1, ..., out]``.
    activation
        Name of the activation (see :func:`activation`).
    dropout
        Dropout probability after each activation.
    batch_norm
        Insert ``BatchNorm1d`` before each activation.
    last_activation
        Treat the output layer like the hidden layers.
    bias
        Use a bias in the ``Linear`` layers.

    Shapes
    ------
    (n, dims[0]) -> (n, dims[-1]); any leading batch dimensions work when ``batch_norm=False``.
    """

    def __init__(
        self,
        dims: Sequence[int],
        activation: str | None = "relu",
        dropout: float = 0.0,
        batch_norm: bool = False,
        last_activation: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        dims = _check_dims(dims, "MLP")
        _act(activation)  # fail early on an unknown name
        self.dims = dims
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out, bias=bias))
            if i < len(dims) - 2 or last_activation:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(_act(activation))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GCNStack(nn.Module):
    r"""Stack of graph convolutions (Kipf & Welling 2017).

    One layer computes :math:`H' = \sigma(\hat D^{-1/2} (A + I) \hat D^{-1/2} H W)` with PyG's ``GCNConv``
    (sparse message passing; the edge weights enter :math:`A`). Activation and dropout follow every layer
    except the last (unless ``last_activation=True``).

    Parameters
    ----------
    dims
        ``[in, h1, ..., out]``.
    activation, dropout, last_activation
        As in :class:`MLP`. ``activation=None`` gives a linear GCN (SpatialGlue, GraphST).
    cached
        Cache the normalised adjacency (only for a fixed graph in transductive training).
    bias
        Add a bias in each ``GCNConv``.
    **conv_kwargs
        Passed to every ``GCNConv`` (``normalize``, ``add_self_loops``, ``improved``).

    Shapes
    ------
    x (n, dims[0]), edge_index (2, E), edge_weight (E,) -> (n, dims[-1]).
    """

    def __init__(
        self,
        dims: Sequence[int],
        activation: str | None = "relu",
        dropout: float = 0.0,
        last_activation: bool = False,
        cached: bool = False,
        bias: bool = True,
        **conv_kwargs,
    ):
        super().__init__()
        dims = _check_dims(dims, "GCNStack")
        self.dims = dims
        self.convs = nn.ModuleList(
            GCNConv(a, b, cached=cached, bias=bias, **conv_kwargs) for a, b in pairwise(dims)
        )
        self.act = _act(activation)
        self.dropout = float(dropout)
        self.last_activation = last_activation

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Tensor:
        _check_graph_input(x, edge_index, edge_weight, self.dims[0], "GCNStack")
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index, edge_weight)
            if i < len(self.convs) - 1 or self.last_activation:
                x = F.dropout(self.act(x), p=self.dropout, training=self.training)
        return x


def _check_graph_input(x, edge_index, edge_weight, d_in, what):
    if x.dim() != 2 or x.size(1) != d_in:
        raise ValueError(f"{what} expects x of shape (n, {d_in}), got {tuple(x.shape)}; check dims[0].")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(
            f"{what} expects edge_index of shape (2, E), got {tuple(edge_index.shape)}; "
            "transpose an (E, 2) array with .T."
        )
    if edge_weight is not None and edge_weight.shape != (edge_index.size(1),):
        raise ValueError(
            f"{what}: edge_weight must have shape ({edge_index.size(1)},) (one weight per edge), "
            f"got {tuple(edge_weight.shape)}."
        )


class _AttentionGraphStack(nn.Module):
    """Shared body of :class:`GATStack` and :class:`GraphTransformerStack`."""

    conv_cls: type = GATConv

    def __init__(
        self, dims, heads, activation, dropout, last_activation, concat, attn_dropout, **conv_kwargs
    ):
        super().__init__()
        dims = _check_dims(dims, type(self).__name__)
        if int(heads) < 1:
            raise ValueError(f"heads must be >= 1, got {heads}.")
        self.dims, self.heads, self.concat = dims, int(heads), bool(concat)
        self.convs = nn.ModuleList()
        d_in = dims[0]
        for i, d_out in enumerate(dims[1:]):
            last = i == len(dims) - 2
            cat = self.concat and not last
            self.convs.append(
                self.conv_cls(d_in, d_out, heads=self.heads, concat=cat, dropout=attn_dropout, **conv_kwargs)
            )
            d_in = d_out * self.heads if cat else d_out
        self.act = _act(activation)
        self.dropout = float(dropout)
        self.last_activation = last_activation

    def forward(
        self, x: Tensor, edge_index: Tensor, return_attention: bool = False, edge_attr: Tensor | None = None
    ):
        _check_graph_input(x, edge_index, None, self.dims[0], type(self).__name__)
        attention = None
        for i, conv in enumerate(self.convs):
            last = i == len(self.convs) - 1
            if last and return_attention:
                x, attention = conv(x, edge_index, edge_attr, return_attention_weights=True)
            else:
                x = conv(x, edge_index, edge_attr)
            if not last or self.last_activation:
                x = F.dropout(self.act(x), p=self.dropout, training=self.training)
        return (x, attention) if return_attention else x


class GATStack(_AttentionGraphStack):
    r"""Stack of graph attention layers (Veličković et al. 2018), PyG ``GATConv``.

    Per head, :math:`h_i' = \sum_{j \in N(i) \cup \{i\}} \alpha_{ij} W h_j` with
    :math:`\alpha_{ij} = \mathrm{softmax}_j(\mathrm{LeakyReLU}(a^\top [W h_i \| W h_j]))`.

    Heads: with ``concat=False`` (default) every layer **averages** its heads, so layer widths are exactly
    ``dims``. With ``concat=True`` the hidden layers **concatenate** their heads (a hidden layer then outputs
    ``heads * dims[i]`` features, and the next layer takes that many) and the last layer averages, as in the
    GAT paper and stMVC (2 heads x 25 concatenated = 50).

    Parameters
    ----------
    dims
        ``[in, h1, ..., out]`` (per-head widths).
    heads
        Number of attention heads per layer.
    activation, dropout, last_activation
        Feature activation/dropout between layers, as in :class:`MLP`.
    concat
        Concatenate heads in hidden layers (see above).
    attn_dropout
        Dropout on the attention coefficients (``GATConv(dropout=...)``).
    **conv_kwargs
        Passed to every ``GATConv`` (``add_self_loops``, ``edge_dim``, ``negative_slope``, ...).

    Shapes
    ------
    x (n, dims[0]), edge_index (2, E) -> (n, dims[-1]). With ``return_attention=True`` also returns the last
    layer's ``(edge_index, alpha)``: edge_index (2, E') including the self loops GATConv adds and
    alpha (E', heads). ``edge_attr`` (E, edge_dim) is used when built with ``edge_dim``.
    """

    conv_cls = GATConv

    def __init__(
        self,
        dims: Sequence[int],
        heads: int = 1,
        activation: str | None = "elu",
        dropout: float = 0.0,
        last_activation: bool = False,
        concat: bool = False,
        attn_dropout: float = 0.0,
        **conv_kwargs,
    ):
        super().__init__(
            dims, heads, activation, dropout, last_activation, concat, attn_dropout, **conv_kwargs
        )


class GraphTransformerStack(_AttentionGraphStack):
    r"""Stack of graph Transformer layers (Shi et al. 2021), PyG ``TransformerConv``, as TransformerST uses.

    Per head, :math:`h_i' = W_1 h_i + \sum_{j \in N(i)} \alpha_{ij} W_2 h_j` with
    :math:`\alpha_{ij} = \mathrm{softmax}_j\big((W_3 h_i)^\top (W_4 h_j) / \sqrt{d}\big)`: scaled dot-product
    attention restricted to graph edges (sparse, never N x N). Heads are averaged or concatenated exactly as
    in :class:`GATStack`.

    Parameters
    ----------
    dims, heads, activation, dropout, last_activation, concat, attn_dropout
        As in :class:`GATStack`.
    **conv_kwargs
        Passed to every ``TransformerConv`` (``beta``, ``edge_dim``, ``root_weight``).

    Shapes
    ------
    As :class:`GATStack`; the returned attention is over the given edges (no self loops are added).
    """

    conv_cls = TransformerConv

    def __init__(
        self,
        dims: Sequence[int],
        heads: int = 1,
        activation: str | None = "relu",
        dropout: float = 0.0,
        last_activation: bool = False,
        concat: bool = False,
        attn_dropout: float = 0.0,
        **conv_kwargs,
    ):
        super().__init__(
            dims, heads, activation, dropout, last_activation, concat, attn_dropout, **conv_kwargs
        )


class TileCNN(nn.Module):
    """Small CNN that encodes H&E spot tiles into feature vectors.

    A stride-2 ``Conv3x3 -> BatchNorm -> ReLU`` stem (width ``w``), two ``Conv3x3 -> BatchNorm -> ReLU ->
    MaxPool2`` blocks (``w``, ``2w``), a last conv block (``4w``), global average pooling (so any tile of at
    least 16 x 16 px works) and a ``Linear`` head. Inputs are standardised per channel inside the model, so
    pass raw tiles in [0, 1]. About 0.1 M parameters at ``width=32``; one forward + backward pass over 256
    tiles of 64 px takes about 1 s on one CPU core, so SimCLR-style training on a few thousand tiles takes
    minutes. It stands in for the ImageNet ResNet/DenseNet backbones of the original methods, which cannot be
    downloaded here; use :meth:`load_pretrained` for weights you trained before.

    Parameters
    ----------
    n_latent
        Output feature size.
    width
        Channels of the first block.
    in_channels
        Image channels (3 for RGB).
    mean, std
        Per-channel statistics used to standardise inputs (default: ImageNet's, a reasonable choice for H&E).

    Shapes
    ------
    tiles (n, C, H, W) float in [0, 1], or (n, H, W, C) uint8 (converted) -> (n, n_latent); H, W >= 16.
    """

    min_size = 16

    def __init__(
        self,
        n_latent: int = 64,
        width: int = 32,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if n_latent < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"n_latent, width and in_channels must be >= 1, got {n_latent}, {width}, {in_channels}."
            )
        mean = [0.485, 0.456, 0.406][:in_channels] if mean is None else list(mean)
        std = [0.229, 0.224, 0.225][:in_channels] if std is None else list(std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean and std need {in_channels} values (one per channel); pass them explicitly."
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.in_channels, self.n_latent = in_channels, n_latent

        def block(c_in, c_out, pool=True, stride=1):
            conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)] + ([nn.MaxPool2d(2)] if pool else [])

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w, pool=False, stride=2),
            *block(w, w),
            *block(w, 2 * w),
            *block(2 * w, 4 * w, pool=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, n_latent)

    def prepare(self, tiles: Tensor) -> Tensor:
        """Convert tiles to standardised (n, C, H, W) float (uint8 channel-last tiles are accepted)."""
        if not torch.is_tensor(tiles):
            tiles = torch.as_tensor(tiles)
        if tiles.dim() != 4:
            raise ValueError(
                f"TileCNN expects a batch of tiles (n, C, H, W), got shape {tuple(tiles.shape)}."
            )
        if tiles.dtype == torch.uint8:
            if tiles.size(-1) == self.in_channels and tiles.size(1) != self.in_channels:
                tiles = tiles.permute(0, 3, 1, 2)
            tiles = tiles.float() / 255.0
        if tiles.size(1) != self.in_channels:
            raise ValueError(
                f"TileCNN expects {self.in_channels} channels in dim 1, got shape {tuple(tiles.shape)}; "
                "for (n, H, W, C) float tiles use tiles.permute(0, 3, 1, 2)."
            )
        if min(tiles.shape[-2:]) < self.min_size:
            raise ValueError(
                f"Tiles must be at least {self.min_size} x {self.min_size} px, got {tuple(tiles.shape[-2:])}."
            )
        tiles = tiles.to(self.mean.dtype)
        if tiles.numel() and tiles.max() > 1.5:
            raise ValueError("Float tiles must lie in [0, 1]; divide 0-255 images by 255 (or pass uint8).")
        return (tiles - self.mean) / self.std

    def forward(self, tiles: Tensor) -> Tensor:
        return self.head(self.features(self.prepare(tiles)))

    def load_pretrained(self, path: str | Path, strict: bool = True) -> TileCNN:
        """Load weights saved with ``torch.save(model.state_dict(), path)``.

        A checkpoint dict with a ``"state_dict"`` entry is also accepted. Raises ``ValueError`` listing
        missing, unexpected and wrongly shaped keys when the file does not fit this architecture
        (``strict=False`` loads the matching keys only). Returns ``self``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No weights file at {path}. Pretrained downloads are not available: train a TileCNN "
                "(e.g. with stcore.images) and save it with torch.save(model.state_dict(), path)."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if bad_shape or (strict and (missing or unexpected)):

            def few(keys):
                return keys[:5] + (["..."] if len(keys) > 5 else [])

            raise ValueError(
                f"Weights in {path} do not fit this TileCNN: missing {few(missing)}, unexpected "
                f"{few(unexpected)}, wrong shape {few(bad_shape)}. Build the model with the n_latent, width "
                "and in_channels it was saved with (or pass strict=False to load matching keys only)."
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
        return self


class TransformerBlock(nn.Module):
    r"""Pre-norm Transformer encoder block (multi-head self-attention + feed-forward, both residual).

    .. math::
        h = x + \mathrm{MHA}(\mathrm{LN}(x)), \qquad y = h + W_2\,\mathrm{GELU}(W_1\,\mathrm{LN}(h))

    with :math:`\mathrm{MHA}` = softmax(Q K^T / sqrt(dim / heads)) V per head. Attention is dense over the L
    tokens of each sequence, so keep L small (tokens = patches, modalities or a spot's neighbours).

    Parameters
    ----------
    dim
        Token width (divisible by ``heads``).
    heads
        Attention heads.
    ff_mult
        Hidden width of the feed-forward part is ``ff_mult * dim``.
    dropout
        Dropout on attention weights and after each residual branch.

    Shapes
    ------
    x (B, L, dim) or (L, dim) (one sequence); ``key_padding_mask`` (B, L) bool, True = padding (ignored).
    Returns (B, L, dim); with ``return_attention=True`` also the weights (B, heads, L, L), or (B, L, L) with
    ``average_heads=True`` (leading B dropped for (L, dim) input). Rows of the weights sum to 1.
    """

    def __init__(self, dim: int, heads: int = 4, ff_mult: int = 2, dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}; change one of them.")
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.dim = dim

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        return_attention: bool = False,
        average_heads: bool = False,
    ):
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.reshape(1, -1)
        if x.dim() != 3 or x.size(-1) != self.dim:
            raise ValueError(
                f"TransformerBlock expects (B, L, {self.dim}) or (L, {self.dim}), got {tuple(x.shape)}."
            )
        if key_padding_mask is not None and key_padding_mask.shape != x.shape[:2]:
            raise ValueError(
                f"key_padding_mask must have shape {tuple(x.shape[:2])} (B, L), "
                f"got {tuple(key_padding_mask.shape)}."
            )
        h = self.norm1(x)
        a, w = self.attn(
            h,
            h,
            h,
            key_padding_mask=key_padding_mask,
            need_weights=return_attention,
            average_attn_weights=average_heads,
        )
        x = x + self.drop(a)
        x = x + self.drop(self.ff(self.norm2(x)))
        if single:
            x = x.squeeze(0)
            w = w.squeeze(0) if w is not None else None
        return (x, w) if return_attention else x
