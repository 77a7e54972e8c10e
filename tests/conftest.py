"""Fixtures shared by several test files."""

import pytest
import torch

from stcore.nn import TileCNN


@pytest.fixture(scope="module")
def tile_weights(tmp_path_factory):
    """A fixed (untrained) TileCNN saved to disk, so method tests skip the SimCLR training."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiles") / "tilecnn.pt"
    torch.save(TileCNN(n_latent=64).state_dict(), path)
    return str(path)
