"""The CPU training dropout of models/blocks.py (issue #15): given the masks it draws, attention, the
projections and the MLP compute exactly the dropout of torch (values and gradients), and the masks keep
each element with probability 1 - p, rescaled so the expectation is unchanged."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp

from models import blocks


@pytest.fixture
def recorded_masks(monkeypatch):
    """Every mask `keep_mask` draws, in order, as float multipliers (0 or 1/keep probability)."""
    masks = []
    draw = blocks.keep_mask

    def record(shape, p, device):
        keep, scale = draw(shape, p, device)
        masks.append(keep.float() * scale)
        return keep, scale

    monkeypatch.setattr(blocks, "keep_mask", record)
    return masks


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).float().requires_grad_() for s in shapes]


def grads(out, params, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, params, g)


def test_keep_mask_rate_and_rescaling():
    torch.manual_seed(0)
    p = 0.1
    keep, scale = blocks.keep_mask((64, 256, 256), p, torch.device("cpu"))
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5e-4  # 4.2M draws: standard error 1.5e-4
    assert abs(scale * (1 - p) - 1) < 2 ** -16
    x = torch.ones(64, 256, 256)
    assert abs((torch.where(keep, x, 0.0) * scale).mean().item() - 1) < 1e-3
    torch.manual_seed(0)
    again, _ = blocks.keep_mask((64, 256, 256), p, torch.device("cpu"))
    assert torch.equal(keep, again)  # draws come from torch's seeded generator


def test_attention_is_sdpa_with_its_dropout_mask(recorded_masks):
    q, k, v = leaves((2, 4, 24, 16), (2, 4, 40, 16), (2, 4, 40, 16))
    out = blocks.attention(q, k, v, dropout_p=0.25)
    (mask,) = recorded_masks
    weights = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1)
    ref = (weights * mask) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(out, [q, k, v]), grads(ref, [q, k, v])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # without dropout it is SDPA itself
    torch.testing.assert_close(blocks.attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


def test_mlp_and_projection_are_dropout_with_their_masks(recorded_masks):
    torch.manual_seed(0)
    mlp = Mlp(32, 128, act_layer=torch.nn.GELU, drop=0.2).train()
    (x,) = leaves((3, 10, 32))
    out = blocks.mlp_forward(mlp, x)
    m1, m2 = recorded_masks
    ref = mlp.fc2(F.gelu(mlp.fc1(x)) * m1) * m2
    params = [x, mlp.fc1.weight, mlp.fc2.weight, mlp.fc2.bias]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(out, params), grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    recorded_masks.clear()
    proj = blocks.linear_dropout(x, mlp.fc1, 0.3)
    (m,) = recorded_masks
    torch.testing.assert_close(proj, mlp.fc1(x) * m, rtol=1e-5, atol=1e-6)
    assert abs(m.max().item() * 0.7 - 1) < 2 ** -16


def test_off_switch_and_eval_use_torch_dropout(monkeypatch, recorded_masks):
    mlp = Mlp(16, 64, act_layer=torch.nn.GELU, drop=0.2)
    (x,) = leaves((2, 5, 16))
    torch.testing.assert_close(blocks.mlp_forward(mlp.eval(), x), mlp(x), rtol=0, atol=0)
    monkeypatch.setattr(blocks, "FAST_DROPOUT", False)
    mlp.train()
    torch.manual_seed(3)
    out = blocks.mlp_forward(mlp, x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, mlp(x), rtol=0, atol=0)
    assert not recorded_masks
