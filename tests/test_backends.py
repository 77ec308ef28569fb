"""The torch (masked SDPA) and flex backends against the float64 reference, on odd shapes."""

from __future__ import annotations

import pytest
import torch
from attention_checks import CASES, assert_within_rule, lowp_sdpa, max_err, reference_outputs

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.api import resolve_backend

LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_backend_fp32_matches_reference(case):
    q, k, v = case.tensors(torch.float32)
    ref, _ = reference_outputs(case, q, k, v)
    out = band_attention(q, k, v, case.spec, "torch", **case.kwargs())
    assert out.shape == q.shape and out.dtype == torch.float32
    assert max_err(out, ref) < 2e-6


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_backend_low_precision_forward_and_backward(case, dtype):
    q, k, v = case.tensors(dtype, requires_grad=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_outputs(case, q64, k64, v64)
    out = band_attention(q, k, v, case.spec, "torch", **case.kwargs())
    # comparator: the exact result rounded once to the low precision (the best any dtype can do)
    assert_within_rule(case.name, out, ref.to(dtype), ref, dtype)
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    # low-precision gradient comparator: the fp32 masked-SDPA gradient rounded to dtype
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    outf = band_attention(qf, kf, vf, case.spec, "torch", **case.kwargs())
    base = torch.autograd.grad(outf, (qf, kf, vf), grad_out.float())
    for name, g, w, b in zip("qkv", got, want, base):
        scale = max(w.abs().max().item(), 1.0)
        err, base_err = max_err(g, w), max_err(b.to(dtype), w)
        assert not torch.isnan(g).any()
        assert err <= 2 * base_err + 0.02 * scale, f"d{name}: {err:.3g} vs {base_err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_backend_fp64_gradients_match_reference(case):
    q, k, v = case.tensors(torch.float64, requires_grad=True)
    ref, _ = reference_outputs(case, q, k, v)
    out = band_attention(q, k, v, case.spec, "torch", **case.kwargs())
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert max_err(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_flex_backend_forward_on_cpu(case, dtype):
    q, k, v = case.tensors(dtype)
    ref, _ = reference_outputs(case, q, k, v)
    out = band_attention(q, k, v, case.spec, "flex", **case.kwargs())
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_rule(case.name, out, lowp_sdpa(case, q, k, v), ref, dtype)


def test_empty_rows_are_zero_and_gradients_finite():
    spec = BandSpec("exclusive_bands", 4, 32)
    q, k, v = (torch.randn(1, 32, 4, 8, requires_grad=True) for _ in range(3))
    out = band_attention(q, k, v, spec, "torch")
    empty = ~spec.mask(32).any(-1)  # [H, T]
    assert empty.any()
    assert torch.all(out.transpose(1, 2)[0][empty] == 0)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.all(q.grad.transpose(1, 2)[0][empty] == 0)


def test_decode_rows_equal_rows_of_the_full_forward():
    spec = BandSpec("spattention", 4, 16)
    q, k, v = (torch.randn(1, 40, 4, 8) for _ in range(3))
    full = band_attention(q, k, v, spec, "torch")
    for backend in ("torch", "flex"):
        last = band_attention(q[:, -1:], k, v, spec, backend)
        chunk = band_attention(q[:, 10:18], k[:, :18], v[:, :18], spec, backend)
        assert torch.allclose(last, full[:, -1:], atol=1e-6)
        assert torch.allclose(chunk, full[:, 10:18], atol=1e-6)


def test_head_offset_equals_slice_of_all_heads():
    spec = BandSpec("spattention", 8, 24)
    q, k, v = (torch.randn(2, 30, 8, 8) for _ in range(3))
    full = band_attention(q, k, v, spec, "torch")
    shard = band_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], spec, "flex", head_offset=4)
    assert torch.allclose(shard, full[:, :, 4:], atol=1e-6)


def test_flex_block_mask_is_cached():
    from olmoe_spattn.flex import band_block_mask

    spec = BandSpec("spattention", 4, 64)
    assert band_block_mask(spec, 100, 100) is band_block_mask(spec, 100, 100)
    assert band_block_mask(spec, 100, 100) is not band_block_mask(spec, 99, 99)


def test_flex_refuses_cpu_backward():
    spec = BandSpec("spattention", 2, 8)
    q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="no backward on CPU"):
        band_attention(q, k, v, spec, "flex")


def test_auto_backend_on_cpu_is_the_masked_reference():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda q, k, v: (q, k[..., :4], v[..., :4]), "head_dim"),
        (lambda q, k, v: (q, k.half(), v.half()), "share a dtype"),
        (lambda q, k, v: (q[0], k, v), "4 dims"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), "multiple of kv heads"),
        (lambda q, k, v: (q.int(), k, v), "dtype"),
        (lambda q, k, v: (q, k, v[:, :5]), "same shape"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, needle):
    spec = BandSpec("spattention", 4, 8)
    q, k, v = mutate(*(torch.randn(1, 8, 4, 8) for _ in range(3)))
    with pytest.raises(ValueError, match=needle):
        band_attention(q, k, v, spec, "torch")


def test_bad_backend_head_offset_and_cu_seqlens():
    spec = BandSpec("spattention", 4, 8)
    q, k, v = (torch.randn(1, 8, 4, 8) for _ in range(3))
    with pytest.raises(ValueError, match="'cuda-fast'"):
        band_attention(q, k, v, spec, "cuda-fast")
    with pytest.raises(ValueError, match="head_offset=2"):
        band_attention(q, k, v, spec, "torch", head_offset=2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        band_attention(q, k, v, spec, "torch", cu_seqlens=torch.tensor([0, 5, 7]))
    with pytest.raises(ValueError, match="batch"):
        band_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), spec,
                       "torch", cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="BandSpec"):
        band_attention(q, k, v, "spattention", "torch")
