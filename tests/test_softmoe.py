import math

import pytest
import torch

from rsretrieve.models.softmoe import SoftMoE, entropy_loss, expert_usage, slot_repulsion_loss, usage_entropy


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return SoftMoE(dim=32, num_experts=4, slots_per_expert=3, hidden_dim=64)


def test_routing_weights_normalised(layer):
    x = torch.randn(5, 11, 32)
    y, w = layer(x, return_weights=True)
    assert y.shape == (5, 11, 32)
    assert w.dispatch.shape == w.combine.shape == (5, 11, 4, 3)
    # dispatch: each slot is a convex combination of tokens -> sums to 1 over tokens (dim 1)
    torch.testing.assert_close(w.dispatch.sum(dim=1), torch.ones(5, 4, 3))
    # combine: each token is a convex combination of slots -> sums to 1 over all slots
    torch.testing.assert_close(w.combine.sum(dim=(2, 3)), torch.ones(5, 11))
    assert (w.dispatch >= 0).all() and (w.combine >= 0).all()


def test_matches_naive_reference(layer):
    """The batched implementation equals a per-expert, per-slot loop written from the definition."""
    x = torch.randn(2, 7, 32)
    y = layer(x)
    phi = torch.nn.functional.normalize(layer.phi.reshape(32, -1), dim=0) * layer.scale
    logits = torch.nn.functional.normalize(x, dim=-1) @ phi
    d, c = logits.softmax(dim=1), logits.softmax(dim=2)
    slots = torch.einsum("bms,bmd->bsd", d, x)
    outs = []
    for s in range(layer.num_slots):
        e = s // layer.slots_per_expert
        h = torch.nn.functional.gelu(slots[:, s] @ layer.fc1_weight[e] + layer.fc1_bias[e])
        outs.append(h @ layer.fc2_weight[e] + layer.fc2_bias[e])
    ref = torch.einsum("bms,bsd->bmd", c, torch.stack(outs, dim=1))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_batch_invariance(layer):
    x = torch.randn(6, 9, 32)
    full = layer(x)
    for i in range(6):
        torch.testing.assert_close(layer(x[i : i + 1]), full[i : i + 1], atol=1e-6, rtol=1e-5)


def test_token_permutation_equivariant(layer):
    x = torch.randn(2, 9, 32)
    perm = torch.randperm(9)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], atol=1e-6, rtol=1e-5)


def test_gradients_reach_phi_and_scale(layer):
    x = torch.randn(3, 8, 32)
    y, w = layer(x, return_weights=True)
    loss = y.pow(2).mean() + 0.1 * entropy_loss(w.combine) + 0.1 * slot_repulsion_loss(layer.phi)
    loss.backward()
    for p in (layer.phi, layer.scale, layer.fc1_weight, layer.fc2_bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_record_weights(layer):
    layer.record_weights = True
    layer(torch.randn(1, 5, 32))
    assert layer.last_weights is not None and layer.last_weights.combine.shape == (1, 5, 4, 3)


def test_entropy_loss():
    uniform = torch.full((2, 10, 4, 3), 1 / 12)
    peaked = torch.zeros(2, 10, 4, 3)
    peaked[..., 0, :] = 1 / 3
    torch.testing.assert_close(usage_entropy(uniform), torch.tensor(math.log(4)), atol=1e-4, rtol=0)
    torch.testing.assert_close(expert_usage(uniform), torch.full((4,), 0.25))
    assert entropy_loss(uniform) < entropy_loss(torch.softmax(torch.randn(2, 10, 12), -1).view(2, 10, 4, 3))
    # one expert takes everything: entropy ~0, loss finite (eps keeps log(0) away)
    assert torch.isfinite(entropy_loss(peaked)) and abs(float(entropy_loss(peaked))) < 1e-4
    assert float(entropy_loss(uniform)) == pytest.approx(-math.log(4), abs=1e-4)


def test_slot_repulsion_loss():
    eye = torch.eye(8).view(8, 2, 4)  # orthogonal slot embeddings
    assert float(slot_repulsion_loss(eye)) == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(8, 2, 4)  # all slots identical
    assert float(slot_repulsion_loss(same)) == pytest.approx(1.0, abs=1e-6)
    rnd = torch.randn(64, 4, 3, requires_grad=True)
    loss = slot_repulsion_loss(rnd)
    assert 0 < float(loss.detach()) < 1
    loss.backward()
    assert torch.isfinite(rnd.grad).all()
    # a gradient step decorrelates the slots
    with torch.no_grad():
        stepped = rnd - 5.0 * rnd.grad
    assert float(slot_repulsion_loss(stepped)) < float(loss.detach())


def test_no_python_loop_over_experts():
    """Expert compute is two batched matmuls whatever the number of experts."""
    from torch.utils.flop_counter import FlopCounterMode

    for e in (2, 8):
        layer = SoftMoE(16, e, 2, 32)
        with FlopCounterMode(display=False) as fc:
            layer(torch.randn(1, 6, 16))
        ops = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        # total expert MACs = 2 matmuls * slots * d * h
        assert ops["aten.baddbmm"] == 2 * 2 * (e * 2) * 16 * 32
