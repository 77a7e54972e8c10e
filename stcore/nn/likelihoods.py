r"""Count likelihoods for expression decoders (element-wise log-probabilities).

All functions take float tensors that broadcast against each other and return the element-wise log-probability
(same shape as the broadcast inputs); sum over genes and average over cells to get a reconstruction loss, e.g.
``-nb_log_prob(x, mu, theta).sum(-1).mean()``. Counts ``x`` are floats holding non-negative integers.

The negative binomial uses the mean / inverse-dispersion parametrisation of scvi-tools (gimVI, DestVI):
``mu`` > 0 is the mean and ``theta`` > 0 the inverse dispersion, so that Var = mu + mu^2 / theta. In
``torch.distributions.NegativeBinomial`` terms this is ``total_count=theta, logits=log(mu) - log(theta)``.
``eps`` guards the logarithms against ``mu = 0`` exactly as scvi-tools does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nb_log_prob", "poisson_log_prob", "zinb_log_prob"]


def poisson_log_prob(x: Tensor, rate: Tensor) -> Tensor:
    r"""Poisson log-probability.

    .. math:: \log p(x \mid \lambda) = x \log\lambda - \lambda - \log\Gamma(x + 1)

    Parameters
    ----------
    x
        Counts, any shape.
    rate
        Rate :math:`\lambda \ge 0`, broadcastable to ``x`` (``x = 0, rate = 0`` gives 0).
    """
    return torch.xlogy(x, rate) - rate - torch.lgamma(x + 1)


def _nb_terms(x: Tensor, mu: Tensor, theta: Tensor, eps: float):
    log_theta_mu = torch.log(theta + mu + eps)
    log_nb0 = theta * (torch.log(theta + eps) - log_theta_mu)  # log NB(0 | mu, theta)
    rest = (
        x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return log_nb0, rest


def nb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Negative binomial log-probability with mean ``mu`` and inverse dispersion ``theta``.

    .. math::
        \log p(x \mid \mu, \theta) = \log\Gamma(x + \theta) - \log\Gamma(\theta) - \log\Gamma(x + 1)
        + \theta \log\frac{\theta}{\theta + \mu} + x \log\frac{\mu}{\theta + \mu}

    Parameters
    ----------
    x
        Counts, any shape.
    mu
        Mean (> 0), broadcastable to ``x``.
    theta
        Inverse dispersion (> 0), broadcastable to ``x``; per gene, shape (n_genes,), is the usual choice.
    eps
        Added inside the logarithms for stability.
    """
    log_nb0, rest = _nb_terms(x, mu, theta, eps)
    return log_nb0 + rest


def zinb_log_prob(x: Tensor, mu: Tensor, theta: Tensor, pi_logits: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Zero-inflated negative binomial log-probability.

    With dropout probability :math:`\pi = \sigma(\ell)` (``pi_logits`` = :math:`\ell`):

    .. math::
        p(x) = \pi\,[x = 0] + (1 - \pi)\,\mathrm{NB}(x \mid \mu, \theta)

    computed stably in log space with :math:`\log\pi = -\mathrm{softplus}(-\ell)`,
    :math:`\log(1-\pi) = -\mathrm{softplus}(\ell)` and, for :math:`x = 0`,
    :math:`\log p(0) = \mathrm{logaddexp}(\log\pi, \log(1-\pi) + \log \mathrm{NB}(0))`.

    Parameters
    ----------
    x, mu, theta, eps
        As in :func:`nb_log_prob`.
    pi_logits
        Logit of the zero-inflation (dropout) probability, broadcastable to ``x``.
    """
    log_nb0, rest = _nb_terms(x, mu, theta, eps)
    log_pi, log_1m_pi = -F.softplus(-pi_logits), -F.softplus(pi_logits)
    case_zero = torch.logaddexp(log_pi, log_1m_pi + log_nb0)
    case_nonzero = log_1m_pi + log_nb0 + rest
    return torch.where(x < 0.5, case_zero, case_nonzero)
