"""The PyTorch MoE token permutation (CPU path) against the MoE math written out per token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from olmoe_spattn.olmo import build_model, tiny_model_config
from olmoe_spattn.olmo.moe_cpu import TorchDroplessMLP, use_olmo_core_moe, use_torch_moe


def _moe_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * SwiGLU_{e(t, k)}(x_t), looping over tokens, in float64."""
    with torch.no_grad():
        weights, indices, _, _ = moe.router(x)
    mlp = moe.experts.mlp
    E, Hd, D = mlp.num_experts, mlp.hidden_size, mlp.d_model
    w1, w2, w3 = (w.detach().double().view(E, Hd, D) for w in (mlp.w1, mlp.w2, mlp.w3))
    flat = x.detach().double().reshape(-1, D)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(indices.shape[-1]):
            e = int(indices.reshape(flat.shape[0], -1)[t, k])
            h = F.silu(w1[e] @ flat[t]) * (w3[e] @ flat[t])
            out[t] += float(weights.reshape(flat.shape[0], -1)[t, k]) * (w2[e].T @ h)
    return out.reshape(x.shape)


def test_torch_moe_matches_per_token_reference():
    torch.manual_seed(0)
    model = build_model(tiny_model_config("dense", 128, num_experts=4, top_k=2))
    moe = model.blocks["0"].feed_forward_moe
    assert isinstance(moe.experts, TorchDroplessMLP)
    x = torch.randn(3, 16, 64)
    with torch.no_grad():
        weights, indices, batch_sizes, _ = moe.router(x)
        got = moe.experts(x, weights, indices, batch_sizes)
    torch.testing.assert_close(got.double(), _moe_reference(moe, x), atol=1e-5, rtol=1e-4)


def test_torch_moe_gradients_match_autograd_of_reference_math():
    torch.manual_seed(1)
    model = build_model(tiny_model_config("dense", 128, num_experts=4, top_k=2))
    moe = model.blocks["0"].feed_forward_moe
    x = torch.randn(2, 8, 64, requires_grad=True)
    weights, indices, batch_sizes, _ = moe.router(x)
    out = moe.experts(x, weights, indices, batch_sizes)
    (out * torch.linspace(-1, 1, 64)).sum().backward()
    gx, gw1 = x.grad.clone(), moe.experts.mlp.w1.grad.clone()

    # the same loss through a dense-gather formulation (every expert on every token, masked)
    x2 = x.detach().clone().requires_grad_(True)
    moe.zero_grad()
    weights, indices, _, _ = moe.router(x2)
    mlp = moe.experts.mlp
    E, Hd, D = mlp.num_experts, mlp.hidden_size, mlp.d_model
    w1, w2, w3 = (w.view(E, Hd, D) for w in (mlp.w1, mlp.w2, mlp.w3))
    flat = x2.reshape(-1, D)  # [N, D]
    gate = torch.zeros(flat.shape[0], E).scatter_add(1, indices.reshape(flat.shape[0], -1), weights.reshape(flat.shape[0], -1))
    h = F.silu(torch.einsum("nd,ehd->neh", flat, w1)) * torch.einsum("nd,ehd->neh", flat, w3)
    y = torch.einsum("neh,ehd,ne->nd", h, w2, gate).reshape(x2.shape)
    (y * torch.linspace(-1, 1, 64)).sum().backward()
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw1, mlp.w1.grad, atol=1e-5, rtol=1e-4)


def test_switch_is_reversible_and_parameter_free():
    model = build_model(tiny_model_config("dense", 128), "cpu")
    names = [n for n, _ in model.named_parameters()]
    assert use_olmo_core_moe(model) == 2
    assert use_torch_moe(model) == 2
    assert [n for n, _ in model.named_parameters()] == names


def test_capacity_moe_is_refused_on_cpu():
    from olmo_core.nn.moe import MoEType

    config = tiny_model_config("dense", 128)
    config.block.feed_forward_moe.name = MoEType.default
    with pytest.raises(ValueError, match="capacity-based MoE"):
        build_model(config, "cpu")
