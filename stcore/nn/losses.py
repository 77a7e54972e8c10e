r"""Losses shared by the methods: contrastive (InfoNCE, DGI), distribution matching (MMD), VAE KL terms and
gradient reversal for adversarial training.

=======================  ==================================================  ======================
Loss                     Definition                                          Used by
=======================  ==================================================  ======================
:func:`info_nce`         SimCLR NT-Xent over matched pairs                   ConGI, SimCLR tiles
:func:`dgi_loss`         BCE(D(h, s) -> 1, D(h~, s) -> 0)                    GraphST (DGI-style)
:func:`mmd`              multi-kernel RBF MMD^2 (biased)                     STEM
:func:`gaussian_kl`      KL(N(mu, sigma^2) || N(0, I))                       gimVI, DestVI, DeepST, ENVI
:func:`grad_reverse`     identity forward, -alpha * grad backward            CellDART, gimVI, DeepST
=======================  ==================================================  ======================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GradientReversal",
    "ReadoutDiscriminator",
    "dgi_loss",
    "gaussian_kl",
    "grad_reverse",
    "info_nce",
    "mmd",
    "normal_kl",
    "sigmoid_readout",
]


def info_nce(z1: Tensor, z2: Tensor, tau: float = 0.5) -> Tensor:
    r"""Symmetric InfoNCE / NT-Xent loss of SimCLR (Chen et al. 2020); rows ``i`` of ``z1`` and ``z2`` are
    positives.

    Stack the L2-normalised rows into :math:`u_1..u_{2n}` and let :math:`s_{ab} = u_a^\top u_b / \tau`. For
    each row a with positive p(a) (its partner in the other view),

    .. math::
        \ell_a = -\log \frac{\exp s_{a,p(a)}}{\sum_{b \ne a} \exp s_{ab}}, \qquad
        L = \frac{1}{2n}\sum_a \ell_a

    i.e. a cross-entropy over the 2n - 1 other rows. Dense in n: use mini-batches.

    Parameters
    ----------
    z1, z2
        Embeddings (n, d) of the two views / modalities, row-matched.
    tau
        Temperature (> 0).

    Returns
    -------
    Scalar loss.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            "info_nce needs two (n, d) tensors of the same shape (row i of each = a positive pair), "
            f"got {tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}.")
    n = z1.size(0)
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = u @ u.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(u.device)
    return F.cross_entropy(sim, target)


class ReadoutDiscriminator(nn.Module):
    r"""Bilinear discriminator of Deep Graph Infomax, :math:`D(h, s) = h^\top W s + b` (a logit).

    Parameters
    ----------
    n_hidden
        Width of node embeddings ``h`` and summaries ``s``.

    Shapes
    ------
    h (n, n_hidden), s (n, n_hidden) (local summaries) or (n_hidden,) (one global summary) -> logits (n,).
    """

    def __init__(self, n_hidden: int):
        super().__init__()
        self.bilinear = nn.Bilinear(n_hidden, n_hidden, 1)
        nn.init.xavier_uniform_(self.bilinear.weight)
        nn.init.zeros_(self.bilinear.bias)

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        if s.dim() == 1:
            s = s.expand_as(h)
        if h.shape != s.shape:
            raise ValueError(
                f"h {tuple(h.shape)} and s {tuple(s.shape)} must match (or s be one (d,) summary)."
            )
        return self.bilinear(h, s).squeeze(-1)


def dgi_loss(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    r"""Binary cross-entropy of a DGI discriminator: positives labelled 1, negatives 0.

    .. math:: L = -\frac{1}{n_+ + n_-}\Big[\sum \log\sigma(D^+) + \sum \log(1 - \sigma(D^-))\Big]

    the mean over the concatenated logits, as DGI and GraphST compute it.
    """
    logits = torch.cat([pos_logits.reshape(-1), neg_logits.reshape(-1)])
    labels = torch.cat([torch.ones_like(pos_logits.reshape(-1)), torch.zeros_like(neg_logits.reshape(-1))])
    return F.binary_cross_entropy_with_logits(logits, labels)


def sigmoid_readout(h: Tensor, edge_index: Tensor | None = None, l2_normalize: bool | None = None) -> Tensor:
    r"""Summary vector(s) for a DGI discriminator.

    * Global (``edge_index=None``, DGI): :math:`s = \sigma(\frac1n \sum_i h_i)`, shape (d,).
    * Local (GraphST): :math:`s_i = \sigma\big(\mathrm{L2norm}(\frac{1}{|N(i)|+1}\sum_{j \in N(i)\cup\{i\}}
      h_j)\big)`, shape (n, d), where :math:`N(i)` are the sources of the edges into i. Computed with a sparse
      scatter, never an N x N matrix.

    Parameters
    ----------
    h
        Node embeddings (n, d) (GraphST passes ReLU(Z)).
    edge_index
        (2, E) graph for the local summary, or ``None`` for the global one.
    l2_normalize
        L2-normalise the mean before the sigmoid. Default ``None`` follows the originals: True for the local
        summary (GraphST), False for the global one (DGI).
    """
    if edge_index is None:
        s = h.mean(0)
        return torch.sigmoid(F.normalize(s, dim=0) if l2_normalize else s)
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(edge_index.shape)}.")
    src, dst = edge_index
    total = h.clone().index_add_(0, dst, h[src])
    count = torch.ones(h.size(0), dtype=h.dtype, device=h.device).index_add_(
        0, dst, torch.ones_like(dst, dtype=h.dtype)
    )
    s = total / count.unsqueeze(1)
    if l2_normalize is None or l2_normalize:
        s = F.normalize(s, dim=1)
    return torch.sigmoid(s)


def _rbf_bandwidths(d2: Tensor, bandwidths, kernel_mul: float, kernel_num: int) -> list:
    if bandwidths is not None:
        bw = [float(b) for b in bandwidths]
        if not bw or min(bw) <= 0:
            raise ValueError(f"bandwidths must be positive numbers, got {bandwidths}.")
        return [2 * b**2 for b in bw]
    n = d2.size(0)
    base = (d2.sum() / (n * n - n)).clamp_min(1e-12) / kernel_mul ** (kernel_num // 2)
    return [base * kernel_mul**i for i in range(kernel_num)]


def mmd(
    x: Tensor,
    y: Tensor,
    bandwidths: Sequence[float] | None = None,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
) -> Tensor:
    r"""Multi-kernel RBF maximum mean discrepancy (biased estimator of MMD^2).

    .. math::
        \mathrm{MMD}^2 = \overline{K_{xx}} + \overline{K_{yy}} - 2\,\overline{K_{xy}}, \qquad
        k(a, b) = \sum_s \exp\!\Big(-\frac{\lVert a - b\rVert^2}{2\sigma_s^2}\Big)

    where bars are means over all pairs (diagonals included). With ``bandwidths=None`` the kernel widths
    follow the data as in DAN / STEM: :math:`2\sigma_s^2 = \gamma\,m^{s - \lfloor K/2 \rfloor}`, s = 0..K-1,
    with :math:`\gamma` the mean squared distance between distinct rows of [x; y], m = ``kernel_mul``, K =
    ``kernel_num``; gradients flow through :math:`\gamma` (STEM's official code holds it constant, as
    :func:`stcore.methods.stem.stem_mmd` does). Dense in n_x + n_y: subsample large sets (STEM uses 1000 cells).

    Parameters
    ----------
    x, y
        Samples (n_x, d) and (n_y, d).
    bandwidths
        Fixed kernel widths :math:`\sigma_s`; ``None`` for the data-driven widths above.
    kernel_mul, kernel_num
        Multiplier and number of the data-driven widths.

    Returns
    -------
    Scalar MMD^2 (>= 0 up to rounding).
    """
    if x.dim() != 2 or y.dim() != 2 or x.size(1) != y.size(1):
        raise ValueError(
            "mmd needs (n_x, d) and (n_y, d) tensors with the same d, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if x.size(0) < 1 or y.size(0) < 1:
        raise ValueError("mmd needs at least one sample in each set.")
    z = torch.cat([x, y])
    sq = z.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
    k = sum(torch.exp(-d2 / g) for g in _rbf_bandwidths(d2, bandwidths, kernel_mul, kernel_num))
    n = x.size(0)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    r"""KL(N(mu, diag exp(logvar)) || N(0, I)), summed over the last (latent) dimension.

    .. math:: \mathrm{KL} = \tfrac12 \sum_k \big(\sigma_k^2 + \mu_k^2 - 1 - \log\sigma_k^2\big)

    Shapes: (n, n_latent) -> (n,).
    """
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)


def normal_kl(mu1: Tensor, logvar1: Tensor, mu2: Tensor, logvar2: Tensor) -> Tensor:
    r"""KL(N(mu1, diag exp(logvar1)) || N(mu2, diag exp(logvar2))), summed over the last dimension.

    .. math:: \mathrm{KL} = \tfrac12 \sum_k \Big(\log\frac{\sigma_{2k}^2}{\sigma_{1k}^2}
              + \frac{\sigma_{1k}^2 + (\mu_{1k} - \mu_{2k})^2}{\sigma_{2k}^2} - 1\Big)

    Shapes: broadcastable (..., n_latent) -> (...).
    """
    return 0.5 * (logvar2 - logvar1 + (logvar1.exp() + (mu1 - mu2).pow(2)) / logvar2.exp() - 1.0).sum(-1)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.alpha * grad, None


def grad_reverse(x: Tensor, alpha: float = 1.0) -> Tensor:
    r"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, :math:`-\alpha\,\partial L/\partial x`
    backward.

    Put it between a feature extractor and a domain discriminator: minimising the discriminator's loss then
    trains the features to fool it.
    """
    return _GradReverse.apply(x, float(alpha))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; ``alpha`` is a plain attribute, so a schedule may change it."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
