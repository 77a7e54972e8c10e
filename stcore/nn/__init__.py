"""Neural-network parts: encoders, count likelihoods and losses.

``stcore.nn`` re-exports everything; the integration strategies that combine encoders live in
:mod:`stcore.strategies`.
"""

from stcore.nn.layers import (
    MLP,
    GATStack,
    GCNStack,
    GraphTransformerStack,
    TileCNN,
    TransformerBlock,
    activation,
)
from stcore.nn.likelihoods import nb_log_prob, poisson_log_prob, zinb_log_prob
from stcore.nn.losses import (
    GradientReversal,
    ReadoutDiscriminator,
    dgi_loss,
    gaussian_kl,
    grad_reverse,
    info_nce,
    mmd,
    normal_kl,
    sigmoid_readout,
)

__all__ = [
    "MLP",
    "GATStack",
    "GCNStack",
    "GradientReversal",
    "GraphTransformerStack",
    "ReadoutDiscriminator",
    "TileCNN",
    "TransformerBlock",
    "activation",
    "dgi_loss",
    "gaussian_kl",
    "grad_reverse",
    "info_nce",
    "mmd",
    "nb_log_prob",
    "normal_kl",
    "poisson_log_prob",
    "sigmoid_readout",
    "zinb_log_prob",
]
