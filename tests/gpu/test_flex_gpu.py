"""FlexAttention backend on CUDA (compiled): forward and backward vs the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from attention_checks import CASES, assert_within_rule, lowp_sdpa, max_err, reference_outputs

from olmoe_spattn import BandSpec, band_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flex_forward_backward_cuda(case, dtype):
    q, k, v = case.tensors(dtype, device="cuda", requires_grad=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_outputs(case, q64, k64, v64)
    out = band_attention(q, k, v, case.spec, "flex", **case.kwargs("cuda"))
    assert_within_rule(case.name, out, lowp_sdpa(case, q.detach(), k.detach(), v.detach()), ref, dtype)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    base = torch.autograd.grad(lowp_sdpa(case, qf, kf, vf), (qf, kf, vf), g.float())
    for name, a, b, c in zip("qkv", got, want, base):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        err, base_err = max_err(a, b), max_err(c.to(dtype), b)
        assert err <= 2 * base_err + 0.02 * max(b.abs().max().item(), 1.0), f"d{name}: {err:.3g} vs {base_err:.3g}"


def test_flex_compiled_repeat_calls_across_shapes():
    spec = BandSpec("spattention", 8, 512)
    for t in (256, 384, 512, 300):
        q, k, v = (torch.randn(1, t, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = band_attention(q, k, v, spec, "flex")
        ref = band_attention(q.float(), k.float(), v.float(), spec, "torch")
        assert max_err(out, ref) < 3e-2
