"""Tests for stcore.strategies: the four integration strategies (link, sum, graph, fusion)."""

import pytest
import torch
from torch import nn

from stcore.nn import MLP, GCNStack, info_nce, mmd
from stcore.strategies import (
    AlignedEncoders,
    AttentionSum,
    DualNodes,
    FixedSum,
    LinkConcat,
    NodesAndEdges,
    SharedEncoder,
    dual_edge_index,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SumNeighbours(nn.Module):
    """h_i = sum of x_j over edges j -> i (a transparent 'encoder' to check which nodes are linked)."""

    def forward(self, x, edge_index, edge_weight=None):
        w = torch.ones(edge_index.size(1)) if edge_weight is None else edge_weight
        return torch.zeros_like(x).index_add_(0, edge_index[1], x[edge_index[0]] * w[:, None])


# ------------------------------------------------------------------------------------------------ link


def test_link_concat_values():
    z1, z2 = torch.randn(4, 3), torch.randn(4, 2)
    torch.testing.assert_close(LinkConcat()(z1, z2), torch.cat([z1, z2], 1))
    torch.testing.assert_close(LinkConcat([1.0, 0.5])([z1, z2]), torch.cat([z1, 0.5 * z2], 1))
    with pytest.raises(ValueError, match="same n"):
        LinkConcat()(z1, torch.randn(5, 2))
    with pytest.raises(ValueError, match="2 weights but got 3"):
        LinkConcat([1, 1])(z1, z2, z2)


# ------------------------------------------------------------------------------------------------- sum


def test_fixed_sum_equals_manual_weighted_sum():
    z1, z2, z3 = torch.randn(3, 5, 4).unbind(0)
    torch.testing.assert_close(FixedSum([1.0, 0.1, -2.0])(z1, z2, z3), z1 + 0.1 * z2 - 2.0 * z3)
    torch.testing.assert_close(FixedSum([1.0, 0.1])([z1, z2]), z1 + 0.1 * z2)
    with pytest.raises(ValueError, match="same width"):
        FixedSum([1, 1])(z1, torch.randn(5, 3))
    with pytest.raises(ValueError, match="2 weights but got 3"):
        FixedSum([1, 1])(z1, z2, z3)


def test_attention_sum_weights_and_fusion():
    att = AttentionSum(4, hidden=6)
    zs = [torch.randn(7, 4) for _ in range(3)]
    fused, w = att(*zs)
    assert fused.shape == (7, 4) and w.shape == (7, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(7))
    torch.testing.assert_close(fused, sum(w[:, m : m + 1] * zs[m] for m in range(3)))
    # weights follow the defining equation softmax_m(u^T tanh(W z_m))
    e = torch.stack([att.score(torch.tanh(att.project(z))).squeeze(-1) for z in zs], 1)
    torch.testing.assert_close(w, e.softmax(1))
    # weights respond to the input
    assert not torch.allclose(w, att(*[torch.randn(7, 4) for _ in range(3)])[1])
    with pytest.raises(ValueError, match="width"):
        att(torch.randn(7, 5), torch.randn(7, 5))


def test_attention_sum_learns_to_weight_informative_modality():
    n, d = 256, 8
    x1, x2 = torch.randn(n, 10), torch.randn(n, 10)
    y = x1[:, :2].sum(1, keepdim=True)  # target depends on modality 1 only
    enc1, enc2 = MLP([10, d]), MLP([10, d])
    att, head = AttentionSum(d), nn.Linear(d, 1)
    params = [*enc1.parameters(), *enc2.parameters(), *att.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    w0 = att(enc1(x1), enc2(x2))[1].mean(0)[0].item()
    for _ in range(150):
        fused, _ = att(enc1(x1), enc2(x2))
        loss = (head(fused) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w1 = att(enc1(x1), enc2(x2))[1].mean(0)[0].item()
    assert 0.3 < w0 < 0.7
    assert w1 > 0.8 and w1 > w0 + 0.2


# ----------------------------------------------------------------------------------------------- graph


def test_nodes_and_edges_uses_weights_from_second_modality():
    n = 5
    ei = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4], [1, 0, 2, 1, 3, 2, 4, 3]])
    x = torch.randn(n, 3)
    colour = torch.tensor([[0.0], [0.0], [0.0], [5.0], [5.0]])  # an "H&E" feature splitting 0-2 from 3-4

    def weight_fn(edge_index, f):
        return torch.exp(-(f[edge_index[0]] - f[edge_index[1]]).pow(2).sum(1))

    model = NodesAndEdges(SumNeighbours(), edge_weight_fn=weight_fn)
    w = weight_fn(ei, colour)
    torch.testing.assert_close(model(x, ei, edge_features=colour), SumNeighbours()(x, ei, w))
    torch.testing.assert_close(
        model(x, ei, 2 * torch.ones(8), edge_features=colour), SumNeighbours()(x, ei, 2 * w)
    )
    # the edge across the colour boundary (2 <-> 3) is cut: node 3 hears only from node 4
    h = model(x, ei, edge_features=colour)
    torch.testing.assert_close(h[3], x[4] + torch.exp(torch.tensor(-25.0)) * x[2])
    # with a real GCN: output equals the encoder on the weighted graph
    gcn = GCNStack([3, 2])
    torch.testing.assert_close(NodesAndEdges(gcn, weight_fn)(x, ei, edge_features=colour), gcn(x, ei, w))
    with pytest.raises(ValueError, match="non-negative"):
        model(x, ei, -torch.ones(8))
    with pytest.raises(ValueError, match="no edge_weight_fn"):
        NodesAndEdges(gcn)(x, ei, edge_features=colour)
    with pytest.raises(ValueError, match="shape"):
        model(x, ei, torch.ones(3))


def test_dual_edge_index_offsets():
    e_aa = torch.tensor([[0, 1], [1, 0]])
    e_bb = torch.tensor([[0, 2], [2, 0]])
    e_ab = torch.tensor([[1], [2]])  # spot 1 of A <-> node 2 of B
    ei = dual_edge_index(2, 3, e_aa, e_bb, e_ab)
    expected = torch.tensor([[0, 1, 2, 4, 1, 4], [1, 0, 4, 2, 4, 1]])
    torch.testing.assert_close(ei, expected)
    assert dual_edge_index(2, 3, e_aa, e_bb, e_ab, symmetric=False).size(1) == 5
    assert dual_edge_index(2, 3, edges_ab=e_ab).tolist() == [[1, 4], [4, 1]]
    with pytest.raises(ValueError, match="outside"):
        dual_edge_index(2, 3, edges_ab=torch.tensor([[2], [0]]))  # row 0 indexes A (size 2)
    with pytest.raises(ValueError, match="outside"):
        dual_edge_index(2, 3, edges_bb=torch.tensor([[0], [3]]))
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        dual_edge_index(2, 3, edges_aa=torch.tensor([[0, 1, 1]]))


def test_dual_nodes_cross_edges_connect_intended_nodes():
    n_a, n_b = 3, 4
    x = torch.eye(n_a + n_b)  # one-hot ids: h_i shows exactly which nodes send to i
    x_a, x_b = x[:n_a], x[n_a:]
    e_ab = torch.tensor([[0, 2], [3, 1]])  # A0 <-> B3, A2 <-> B1
    h_a, h_b = DualNodes(SumNeighbours())(x_a, x_b, edges_ab=e_ab)
    assert h_a.shape == (n_a, n_a + n_b) and h_b.shape == (n_b, n_a + n_b)
    assert h_b[3].nonzero().flatten().tolist() == [0]  # B3 hears A0
    assert h_b[1].nonzero().flatten().tolist() == [2]  # B1 hears A2
    assert h_a[0].nonzero().flatten().tolist() == [n_a + 3]  # A0 hears B3
    assert h_a[1].abs().sum() == 0 and h_b[0].abs().sum() == 0
    # within-B edges are offset too: B0 <-> B2
    _, h_b = DualNodes(SumNeighbours())(x_a, x_b, edges_bb=torch.tensor([[0, 2], [2, 0]]))
    assert h_b[0].nonzero().flatten().tolist() == [n_a + 2]
    # a GCN over the joined graph gives per-set outputs
    h_a, h_b = DualNodes(GCNStack([5, 2]))(torch.randn(3, 5), torch.randn(4, 5), edges_ab=e_ab)
    assert h_a.shape == (3, 2) and h_b.shape == (4, 2)
    with pytest.raises(ValueError, match="shared genes"):
        DualNodes(SumNeighbours())(torch.randn(3, 5), torch.randn(4, 6))


# ---------------------------------------------------------------------------------------------- fusion


def test_shared_encoder():
    enc = MLP([6, 4])
    proj = [nn.Linear(10, 6), nn.Linear(3, 6)]
    model = SharedEncoder(enc, proj)
    xa, xb = torch.randn(5, 10), torch.randn(7, 3)
    za, zb = model(xa, xb)
    torch.testing.assert_close(za, enc(proj[0](xa)))
    torch.testing.assert_close(zb, enc(proj[1](xb)))
    # without projections, identical inputs map identically (one set of weights)
    z1, z2 = SharedEncoder(enc)([xa[:, :6], xa[:, :6].clone()])
    torch.testing.assert_close(z1, z2)
    with pytest.raises(ValueError, match="2 projections but got 1"):
        model(xa)


def _paired_data(n=128):
    latent = torch.randn(n, 4)
    xa = latent @ torch.randn(4, 20) + 0.1 * torch.randn(n, 20)
    xb = torch.tanh(latent @ torch.randn(4, 12)) + 0.1 * torch.randn(n, 12)
    return xa, xb


def test_aligned_encoders_contrastive_loss_decreases():
    xa, xb = _paired_data()
    model = AlignedEncoders(MLP([20, 32, 8]), MLP([12, 32, 8]), align="contrastive", tau=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    za, zb = model(xa, xb)
    torch.testing.assert_close(model.loss(za, zb), info_nce(za, zb, 0.5))
    first = model.loss(za, zb).item()
    for _ in range(60):
        loss = model.loss(*model(xa, xb))
        opt.zero_grad()
        loss.backward()
        opt.step()
    za, zb = model(xa, xb)
    assert model.loss(za, zb).item() < first - 1.5
    # matched pairs are retrieved: the nearest image-side embedding of spot i is spot i for most spots
    sim = torch.nn.functional.normalize(za, dim=1) @ torch.nn.functional.normalize(zb, dim=1).T
    assert (sim.argmax(1) == torch.arange(len(xa))).float().mean() > 0.7
    with pytest.raises(ValueError, match="align='mmd'"):
        model.loss(za, zb[:10])


def test_aligned_encoders_mmd_and_args():
    xa, xb = _paired_data()
    model = AlignedEncoders(MLP([20, 8]), GCNStack([12, 8]), align="mmd")
    ei = torch.tensor([[0, 1], [1, 0]])
    za, zb = model(xa, xb, args_b=(ei,))
    assert za.shape == (128, 8) and zb.shape == (128, 8)
    torch.testing.assert_close(model.loss(za, zb[:50]), mmd(za, zb[:50]))  # unpaired sets are fine
    with pytest.raises(ValueError, match="contrastive' or 'mmd'"):
        AlignedEncoders(MLP([2, 2]), MLP([2, 2]), align="adversarial")
