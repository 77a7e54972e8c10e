"""Tests for stcore.nn: encoders, likelihoods and losses, checked against reference computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from stcore import nn as snn
from stcore.nn import (
    MLP,
    GATStack,
    GCNStack,
    GradientReversal,
    GraphTransformerStack,
    ReadoutDiscriminator,
    TileCNN,
    TransformerBlock,
    dgi_loss,
    gaussian_kl,
    grad_reverse,
    info_nce,
    mmd,
    nb_log_prob,
    normal_kl,
    poisson_log_prob,
    sigmoid_readout,
    zinb_log_prob,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ring_graph(n):
    """Undirected ring 0-1-...-(n-1)-0 as a (2, 2n) edge_index, both directions."""
    i = torch.arange(n)
    j = (i + 1) % n
    return torch.stack([torch.cat([i, j]), torch.cat([j, i])])


def dense_adj(edge_index, n, edge_weight=None):
    a = torch.zeros(n, n, dtype=torch.float64)
    w = torch.ones(edge_index.size(1), dtype=torch.float64) if edge_weight is None else edge_weight.double()
    a.index_put_((edge_index[1], edge_index[0]), w, accumulate=True)  # row = target, column = source
    return a


# -------------------------------------------------------------------------------------------- encoders


def test_exports():
    for name in snn.__all__:
        assert hasattr(snn, name), name


def test_mlp_structure_and_values():
    m = MLP([5, 8, 3], dropout=0.1, batch_norm=True)
    kinds = [type(layer).__name__ for layer in m.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert m(torch.randn(7, 5)).shape == (7, 3)
    # one layer = an affine map
    lin = MLP([4, 2])
    x = torch.randn(6, 4)
    w, b = lin.net[0].weight, lin.net[0].bias
    torch.testing.assert_close(lin(x), x @ w.T + b)
    # last_activation makes the output non-negative for relu
    assert (MLP([4, 3, 2], last_activation=True)(torch.randn(50, 4)) >= 0).all()
    assert (MLP([4, 3, 2])(torch.randn(200, 4)) < 0).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dims": [5]}, "at least 2"),
        ({"dims": [5, 0]}, "positive"),
        ({"dims": [2, 2], "activation": "swishy"}, "Unknown"),
    ],
)
def test_mlp_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**kwargs)


def test_gcn_matches_dense_formula():
    n = 6
    ei = ring_graph(n)
    ew = torch.rand(ei.size(1)) + 0.5
    x = torch.randn(n, 3)
    m = GCNStack([3, 2]).double()
    conv = m.convs[0]
    w = conv.lin.weight.double()
    for weight in (None, ew):
        a = dense_adj(ei, n, weight) + torch.eye(n, dtype=torch.float64)
        d = a.sum(1).rsqrt()
        ref = (d[:, None] * a * d[None, :]) @ x.double() @ w.T + conv.bias.double()
        out = m(x.double(), ei, None if weight is None else weight.double())
        torch.testing.assert_close(out, ref)
    # two layers: relu in between, none at the end
    m2 = GCNStack([3, 4, 2]).double()
    h = torch.relu(m2.convs[0](x.double(), ei))
    torch.testing.assert_close(m2(x.double(), ei), m2.convs[1](h, ei))
    # linear GCN without bias (SpatialGlue / GraphST style)
    lin = GCNStack([3, 2], activation=None, bias=False)
    torch.testing.assert_close(lin(2 * x, ei), 2 * lin(x, ei))


def test_gcn_bad_input():
    m = GCNStack([3, 2])
    x, ei = torch.randn(4, 3), ring_graph(4)
    with pytest.raises(ValueError, match="edge_index of shape"):
        m(x, ei.T)
    with pytest.raises(ValueError, match="one weight per edge"):
        m(x, ei, torch.ones(3))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        m(torch.randn(4, 5), ei)


@pytest.mark.parametrize("concat", [False, True])
def test_gat_shapes_heads_and_attention(concat):
    n = 7
    ei = ring_graph(n)
    m = GATStack([4, 5, 3], heads=2, concat=concat)
    assert m.convs[1].in_channels == (10 if concat else 5)
    h, (att_ei, alpha) = m(torch.randn(n, 4), ei, return_attention=True)
    assert h.shape == (n, 3)
    assert alpha.shape == (ei.size(1) + n, 2)  # GATConv adds one self loop per node
    # attention over each node's incoming edges sums to one, per head
    sums = torch.zeros(n, 2).index_add_(0, att_ei[1], alpha)
    torch.testing.assert_close(sums, torch.ones(n, 2))


def test_graph_transformer_attention_normalised():
    n = 6
    ei = ring_graph(n)
    m = GraphTransformerStack([4, 8, 4], heads=2)
    h, (att_ei, alpha) = m(torch.randn(n, 4), ei, return_attention=True)
    assert h.shape == (n, 4) and alpha.shape == (ei.size(1), 2)
    torch.testing.assert_close(torch.zeros(n, 2).index_add_(0, att_ei[1], alpha), torch.ones(n, 2))
    assert m(torch.randn(n, 4), ei).shape == (n, 4)


def test_tile_cnn_shapes_and_input_forms():
    m = TileCNN(n_latent=16, width=8).eval()
    tiles = torch.rand(5, 3, 64, 64)
    assert m(tiles).shape == (5, 16)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    assert m(torch.rand(2, 3, 40, 24)).shape == (2, 16)
    # normalisation is (x - mean) / std per channel
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(m.prepare(tiles), (tiles - mean) / std)
    # uint8 (n, H, W, 3) tiles are converted to the float (n, 3, H, W) form
    u8 = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    torch.testing.assert_close(m(u8), m(u8.permute(0, 3, 1, 2).float() / 255))


@pytest.mark.parametrize(
    "tiles, match",
    [
        (torch.rand(2, 3, 8, 8), "at least 16"),
        (torch.rand(2, 3, 32, 32) * 255, "divide"),
        (torch.rand(2, 4, 32, 32), "channels"),
        (torch.rand(3, 32, 32), r"\(n, C, H, W\)"),
    ],
)
def test_tile_cnn_bad_input(tiles, match):
    with pytest.raises(ValueError, match=match):
        TileCNN(n_latent=4, width=4)(tiles)


def test_tile_cnn_load_pretrained(tmp_path):
    a = TileCNN(n_latent=8, width=4).eval()
    path = tmp_path / "tile.pt"
    torch.save(a.state_dict(), path)
    b = TileCNN(n_latent=8, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))
    assert b.load_pretrained(path) is b
    torch.testing.assert_close(a(x), b(x))
    # a checkpoint dict with a "state_dict" entry also loads
    torch.save({"state_dict": a.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    torch.testing.assert_close(
        TileCNN(n_latent=8, width=4).eval().load_pretrained(tmp_path / "ckpt.pt")(x), a(x)
    )
    with pytest.raises(ValueError, match="wrong shape"):
        TileCNN(n_latent=16, width=4).load_pretrained(path)
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing"):
        TileCNN(n_latent=8, width=4).load_pretrained(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="No weights file"):
        a.load_pretrained(tmp_path / "absent.pt")


def _manual_block(blk, x, mask=None):
    """Reference pre-norm Transformer block written from the equations."""
    dim, heads = blk.dim, blk.attn.num_heads
    h = F.layer_norm(x, (dim,), blk.norm1.weight, blk.norm1.bias)
    q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.view(t.size(0), t.size(1), heads, dim // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    s = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
    if mask is not None:
        s = s.masked_fill(mask[:, None, None, :], float("-inf"))
    w = s.softmax(-1)
    a = (w @ v).transpose(1, 2).reshape(x.shape)
    x = x + blk.attn.out_proj(a)
    return x + blk.ff(F.layer_norm(x, (dim,), blk.norm2.weight, blk.norm2.bias)), w


def test_transformer_block_matches_equations():
    blk = TransformerBlock(8, heads=2).eval()
    x = torch.randn(3, 5, 8)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    out, w = blk(x, key_padding_mask=mask, return_attention=True)
    ref, ref_w = _manual_block(blk, x, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-5)
    assert w.shape == (3, 2, 5, 5)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 5))
    assert (w[1, :, :, 3:] == 0).all()  # padded keys get no attention
    # changing padded tokens does not change the others
    x2 = x.clone()
    x2[1, 3:] = 100.0
    torch.testing.assert_close(blk(x2, key_padding_mask=mask)[1, :3], out[1, :3])
    _, wa = blk(x, return_attention=True, average_heads=True)
    assert wa.shape == (3, 5, 5)
    # a single (L, dim) sequence
    y, ws = blk(x[0], return_attention=True)
    torch.testing.assert_close(y, blk(x[:1])[0])
    assert ws.shape == (2, 5, 5)


def test_transformer_block_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        TransformerBlock(10, heads=4)
    blk = TransformerBlock(8, heads=2)
    with pytest.raises(ValueError, match="expects"):
        blk(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="key_padding_mask"):
        blk(torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- likelihoods


def _count_grid(rng, size=400):
    x = np.concatenate([np.zeros(50), rng.integers(0, 30, size), [1000, 5000, 20000]]).astype(np.float64)
    mu = rng.uniform(0.05, 200, x.size)
    theta = rng.uniform(0.05, 50, x.size)
    return x, mu, theta


def test_poisson_log_prob():
    rng = np.random.default_rng(1)
    x, mu, _ = _count_grid(rng)
    xt, rt = torch.tensor(x), torch.tensor(mu)
    ref = torch.distributions.Poisson(rt).log_prob(xt)
    torch.testing.assert_close(poisson_log_prob(xt, rt), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        poisson_log_prob(xt, rt).numpy(), stats.poisson.logpmf(x, mu), rtol=1e-5, atol=1e-5
    )
    assert poisson_log_prob(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0


def test_nb_log_prob_against_torch_and_scipy():
    rng = np.random.default_rng(2)
    x, mu, theta = _count_grid(rng)
    xt, mt, tt = map(torch.tensor, (x, mu, theta))
    ours = nb_log_prob(xt, mt, tt)
    ref = torch.distributions.NegativeBinomial(total_count=tt, logits=mt.log() - tt.log()).log_prob(xt)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        ours.numpy(), stats.nbinom.logpmf(x, theta, theta / (theta + mu)), rtol=1e-5, atol=1e-5
    )
    # float32 with per-gene theta broadcasting
    x32 = torch.poisson(torch.full((4, 6), 3.0))
    mu32, th32 = torch.rand(4, 6) * 5 + 0.1, torch.rand(6) + 0.5
    assert nb_log_prob(x32, mu32, th32).shape == (4, 6)


def test_zinb_log_prob_against_scipy_mixture():
    rng = np.random.default_rng(3)
    x, mu, theta = _count_grid(rng)
    logits = rng.normal(0, 3, x.size)
    logits[:5] = [-40, -20, 20, 40, 0]
    log_pi, log_1m_pi = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)  # log sigmoid(+-logits)
    nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    ref = np.where(x == 0, np.logaddexp(log_pi, log_1m_pi + nb), log_1m_pi + nb)
    ours = zinb_log_prob(*map(torch.tensor, (x, mu, theta, logits)))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)
    # a proper distribution: probabilities over x = 0..K sum to one
    k = torch.arange(0, 3000, dtype=torch.float64)
    total = (
        zinb_log_prob(
            k,
            torch.tensor(12.0, dtype=torch.float64),
            torch.tensor(0.7, dtype=torch.float64),
            torch.tensor(-0.3, dtype=torch.float64),
        )
        .exp()
        .sum()
    )
    assert abs(total.item() - 1) < 1e-6
    # no pi: reduces to the NB
    xt, mt, tt = map(torch.tensor, (x, mu, theta))
    torch.testing.assert_close(
        zinb_log_prob(xt, mt, tt, torch.full_like(xt, -500.0)), nb_log_prob(xt, mt, tt)
    )


def test_likelihood_gradients_finite_near_zero():
    x = torch.tensor([0.0, 0.0, 3.0, 50.0])
    mu = torch.tensor([1e-7, 2.0, 1e-7, 1e-3], requires_grad=True)
    theta = torch.tensor([0.5, 1e-4, 2.0, 10.0], requires_grad=True)
    logit = torch.tensor([30.0, -30.0, 0.0, 5.0], requires_grad=True)
    loss = -(zinb_log_prob(x, mu, theta, logit).sum() + nb_log_prob(x, mu, theta).sum())
    loss.backward()
    for t in (mu, theta, logit):
        assert torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------------- losses


def test_info_nce_equals_hand_loop():
    z1, z2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    tau = 0.7
    u = [v / np.linalg.norm(v) for v in np.concatenate([z1.numpy(), z2.numpy()])]
    n = 3
    total = 0.0
    for a in range(2 * n):
        p = (a + n) % (2 * n)
        denom = sum(math.exp(u[a] @ u[b] / tau) for b in range(2 * n) if b != a)
        total += -math.log(math.exp(u[a] @ u[p] / tau) / denom)
    assert info_nce(z1, z2, tau).item() == pytest.approx(total / (2 * n), rel=1e-10)
    assert info_nce(z1, z2, tau).item() == pytest.approx(info_nce(z2, z1, tau).item(), rel=1e-10)


def test_info_nce_prefers_aligned_pairs():
    z = torch.randn(64, 16)
    noisy = z + 0.1 * torch.randn_like(z)
    assert info_nce(z, noisy) < info_nce(z, noisy[torch.randperm(64)]) - 1.0
    with pytest.raises(ValueError, match="same shape"):
        info_nce(z, z[:10])
    with pytest.raises(ValueError, match="tau"):
        info_nce(z, z, tau=0)


def test_discriminator_and_dgi_loss():
    d = ReadoutDiscriminator(4).double()
    h, s = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    w, b = d.bilinear.weight[0], d.bilinear.bias
    torch.testing.assert_close(d(h, s), torch.einsum("ni,ij,nj->n", h, w, s) + b)
    g = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(d(h, g), d(h, g.expand(5, 4)))
    with pytest.raises(ValueError, match="must match"):
        d(h, s[:3])
    pos, neg = torch.randn(5), torch.randn(3)
    ref = -(F.logsigmoid(pos).sum() + F.logsigmoid(-neg).sum()) / 8
    torch.testing.assert_close(dgi_loss(pos, neg), ref)
    assert dgi_loss(torch.full((4,), 20.0), torch.full((4,), -20.0)) < 1e-6


def test_sigmoid_readout_global_and_local():
    n = 6
    h = torch.randn(n, 3, dtype=torch.float64)
    torch.testing.assert_close(sigmoid_readout(h), torch.sigmoid(h.mean(0)))
    ei = torch.tensor([[0, 1, 1, 2, 3, 4], [1, 0, 2, 1, 4, 3]])  # node 5 is isolated
    a = dense_adj(ei, n) + torch.eye(n, dtype=torch.float64)
    mean = (a @ h) / a.sum(1, keepdim=True)
    torch.testing.assert_close(sigmoid_readout(h, ei), torch.sigmoid(F.normalize(mean, dim=1)))
    torch.testing.assert_close(sigmoid_readout(h, ei, l2_normalize=False), torch.sigmoid(mean))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        sigmoid_readout(h, ei.T)


def _numpy_mmd(x, y, gammas):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / g) for g in gammas)

    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def test_mmd_matches_numpy():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 3)), rng.normal(0.5, 1.0, size=(15, 3))
    xt, yt = torch.tensor(x), torch.tensor(y)
    sig = (0.5, 1.0, 2.0)
    ref = _numpy_mmd(x, y, [2 * s**2 for s in sig])
    assert mmd(xt, yt, bandwidths=sig).item() == pytest.approx(ref, rel=1e-8)
    # data-driven widths: mean squared distance between distinct rows, divided by 2^2, times 2^s
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    base = d2.sum() / (len(z) ** 2 - len(z)) / 4
    assert mmd(xt, yt).item() == pytest.approx(_numpy_mmd(x, y, [base * 2**i for i in range(5)]), rel=1e-8)


def test_mmd_properties():
    x = torch.randn(200, 4)
    same = torch.randn(200, 4)
    shifted = torch.randn(200, 4) + 1.5
    assert mmd(x, x).abs() < 1e-6
    assert mmd(x, same) < 0.05
    assert mmd(x, shifted) > 10 * mmd(x, same)
    torch.testing.assert_close(mmd(x, shifted), mmd(shifted, x))
    with pytest.raises(ValueError, match="same d"):
        mmd(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="positive"):
        mmd(x, same, bandwidths=(1.0, -1.0))


def test_kl_terms_match_torch_distributions():
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(-1))
    mu2, logvar2 = torch.randn(5, 3), torch.randn(5, 3)
    p2 = torch.distributions.Normal(mu2, (0.5 * logvar2).exp())
    torch.testing.assert_close(
        normal_kl(mu, logvar, mu2, logvar2), torch.distributions.kl_divergence(q, p2).sum(-1)
    )
    torch.testing.assert_close(normal_kl(mu, logvar, torch.zeros(3), torch.zeros(3)), gaussian_kl(mu, logvar))
    assert gaussian_kl(torch.zeros(2, 4), torch.zeros(2, 4)).abs().max() == 0


def test_gradient_reversal():
    x = torch.randn(4, 3, requires_grad=True)
    up = torch.randn(4, 3)
    y = grad_reverse(x, alpha=0.3)
    torch.testing.assert_close(y, x)
    (y * up).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * up)
    layer = GradientReversal(2.0)
    x.grad = None
    (layer(x) * up).sum().backward()
    torch.testing.assert_close(x.grad, -2.0 * up)
    layer.alpha = 0.5  # schedules change alpha in place
    x.grad = None
    (layer(x) * up).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * up)
