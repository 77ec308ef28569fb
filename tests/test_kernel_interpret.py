"""Triton band kernel on small shapes: forward, backward, every feature, vs the float64 oracle.

On a CPU machine the kernels run through Triton's interpreter (``TRITON_INTERPRET=1`` is
set by ``conftest.py`` before Triton loads, and tiles shrink to 16x16 so small shapes
still span several blocks); on a GPU machine the same tests run compiled on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import ATOL, CASES, Case, max_err

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.kernels import triton_band_attention
from olmoe_spattn.reference import reference_attention, sdpa_band_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _tensors(b, tq, tk, h, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda t, n: torch.randn(b, t, n, d, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return make(tq, h), make(tk, hkv), make(tk, hkv)


def _check(spec, q, k, v, *, lse_check=True, grads=True, **kw):
    """Kernel vs float64 oracle (output, lse, dq, dk, dv) under the 2x-of-low-precision rule."""
    dtype = q.dtype
    out, lse = triton_band_attention(q, k, v, spec, return_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    kw.pop("max_seqlen", None)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, spec, **kw)
    lowp = sdpa_band_attention(q.detach(), k.detach(), v.detach(), spec, **kw)
    assert torch.isfinite(out).all()
    assert max_err(out, ref) <= 2 * max_err(lowp, ref) + ATOL[dtype], (max_err(out, ref), max_err(lowp, ref))
    if lse_check:
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "lse must be -inf exactly on empty rows"
        assert (out.detach()[empty.transpose(1, 2)] == 0).all(), "empty rows must output zeros"
        if (~empty).any():
            # q64, k64 hold exactly the rounded q, k values and the kernel accumulates scores in
            # fp32 (fp16 products are exact in fp32), so only fp32 accumulation error (~1e-6 at
            # these sizes) separates its lse from the float64 one
            lse_tol = 2e-5
            lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
            assert lse_err <= lse_tol, f"lse: {lse_err:.3g} > {lse_tol:.3g}"
    if not grads:
        return out, lse
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    base = torch.autograd.grad(sdpa_band_attention(qf, kf, vf, spec, **kw), (qf, kf, vf), g.float())
    for name, a, w, c in zip("qkv", got, want, base):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        err, base_err = max_err(a, w), max_err(c.to(dtype), w)
        tol = 2 * base_err + (1e-4 if dtype == torch.float32 else 0.01) * max(w.abs().max().item(), 1.0)
        assert err <= tol, f"d{name}: {err:.3g} > {tol:.3g}"
    return out, lse


# ----------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("partition_len", [24, "dynamic"])
@pytest.mark.parametrize("pattern", ["exclusive_bands", "spattention", "gapped_bands", "sliding_window", "dense"])
def test_patterns_fp32(pattern, partition_len):
    spec = BandSpec(pattern, 3, partition_len)
    _check(spec, *_tensors(2, 37, 37, 3, 3, 16, torch.float32))


@pytest.mark.parametrize("pattern", ["exclusive_bands", "spattention", "gapped_bands", "sliding_window", "dense"])
def test_patterns_fp16_t100_d32(pattern):
    spec = BandSpec(pattern, 4, 100)
    _check(spec, *_tensors(1, 100, 100, 4, 4, 32, torch.float16, seed=1))


# tiny head dims (< 16) run in fp32 only: fp16 dots need K >= 16 in Triton
SHARED = [(c, d) for c in CASES for d in DTYPES if c.head_dim >= 16 or d == torch.float32]


@pytest.mark.parametrize(("case", "dtype"), SHARED, ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_shared_cases(case: Case, dtype):
    """The cases every backend is checked on (GQA, offsets, varlen, empty rows, odd T)."""
    q, k, v = case.tensors(dtype, device=DEVICE, requires_grad=True)
    _check(case.spec, q, k, v, **case.kwargs(DEVICE))


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("n_kv", [1, 2])
def test_gqa(n_kv):
    spec = BandSpec("spattention", 4, 64)
    _check(spec, *_tensors(2, 100, 100, 4, n_kv, 16, torch.float32))


def test_head_offset_matches_global_heads():
    spec = BandSpec("spattention", 8, 64)
    q, k, v = _tensors(1, 100, 100, 8, 8, 16, torch.float32)
    full = triton_band_attention(q, k, v, spec)
    part = _check(spec, q[:, :, 5:].detach().requires_grad_(), k[:, :, 5:].detach().requires_grad_(),
                  v[:, :, 5:].detach().requires_grad_(), head_offset=5)[0]
    torch.testing.assert_close(part, full[:, :, 5:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("partition_len", [48, "dynamic"])
@pytest.mark.parametrize("max_seqlen", [None, 70])
def test_varlen(partition_len, max_seqlen):
    spec = BandSpec("spattention", 3, partition_len)
    cu = torch.tensor([0, 30, 31, 31, 100, 130], dtype=torch.int32, device=DEVICE)
    _check(spec, *_tensors(1, 130, 130, 3, 3, 16, torch.float32), cu_seqlens=cu, max_seqlen=max_seqlen)


def test_varlen_equals_separate_documents():
    spec = BandSpec("exclusive_bands", 3, "dynamic")
    q, k, v = _tensors(1, 100, 100, 3, 3, 16, torch.float32)
    cu = torch.tensor([0, 37, 100], device=DEVICE)
    packed = triton_band_attention(q, k, v, spec, cu_seqlens=cu)
    for a, b in ((0, 37), (37, 100)):
        alone = triton_band_attention(q[:, a:b], k[:, a:b], v[:, a:b], spec)
        torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_offset", [None, 50, 0])
def test_query_offset(q_offset):
    spec = BandSpec("spattention", 4, 64)
    _check(spec, *_tensors(2, 37, 130, 4, 2, 16, torch.float32), q_offset=q_offset)


@pytest.mark.parametrize("pattern", ["spattention", "dense"])
def test_chunked_prefill_equals_full_forward(pattern):
    spec = BandSpec(pattern, 4, 64)
    q, k, v = _tensors(1, 130, 130, 4, 4, 16, torch.float32)
    full, full_lse = triton_band_attention(q, k, v, spec, return_lse=True)
    for start, stop in ((0, 37), (37, 100), (100, 130), (129, 130)):
        part, lse = triton_band_attention(q[:, start:stop], k[:, :stop], v[:, :stop], spec, return_lse=True)
        torch.testing.assert_close(part, full[:, start:stop], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, full_lse[:, :, start:stop], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["dense", "sliding_window", "spattention", "exclusive_bands"])
@pytest.mark.parametrize("tq", [1, 5])
def test_decode_split_path(pattern, tq, monkeypatch):
    from olmoe_spattn.kernels import decode

    splits = []
    real = decode.choose_split
    monkeypatch.setattr(decode, "choose_split", lambda *a: splits.append(real(*a)) or splits[-1])
    spec = BandSpec(pattern, 2, "dynamic")
    _check(spec, *_tensors(1, tq, 130, 2, 1, 16, torch.float32))
    assert splits and (pattern == "exclusive_bands" or splits[0] > 1 or DEVICE == "cuda")


def test_single_token_and_tiny_shapes():
    spec = BandSpec("spattention", 4, 16)
    _check(spec, *_tensors(2, 1, 1, 4, 4, 16, torch.float32))
    _check(BandSpec("exclusive_bands", 1, 1), *_tensors(1, 3, 3, 1, 1, 16, torch.float32))


def test_empty_rows_zero_output_zero_grad_no_nan():
    spec = BandSpec("exclusive_bands", 4, 128)  # head 3 starts at distance 96: rows < 96 empty
    q, k, v = _tensors(1, 130, 130, 4, 4, 16, torch.float32)
    out, lse = triton_band_attention(q, k, v, spec, return_lse=True)
    assert torch.isneginf(lse[0, 3, :96]).all() and torch.isfinite(lse[0, 3, 96:]).all()
    assert (out[0, :96, 3] == 0).all()
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert (dq[0, :96, 3] == 0).all() and torch.isfinite(dq).all()
    assert (dk[0, 130 - 96:, 3] == 0).all() and (dv[0, 130 - 96:, 3] == 0).all()


def test_blocks_outside_the_band_are_never_loaded():
    """Poisoned (NaN) key/value blocks and query tiles that no allowed pair needs leave results exact."""
    spec = BandSpec("exclusive_bands", 2, 130)  # head 1: distances [65, 130)
    tile = 16 if DEVICE == "cpu" else 64  # largest tile of the fixed configurations
    q, k, v = (x.detach() for x in _tensors(1, 130, 130, 2, 2, 16, torch.float32))
    ref, _ = reference_attention(q, k, v, spec)
    qp, kp, vp = q.clone(), k.clone(), v.clone()
    first_unseen = -(-65 // tile) * tile  # keys > 64 are never seen by head 1; 64's block is loaded
    kp[:, first_unseen:, 1] = float("nan")
    vp[:, first_unseen:, 1] = float("nan")
    qp[:, :64, 1] = float("nan")  # rows < 65 of head 1 see nothing
    qp, kp, vp = (x.requires_grad_() for x in (qp, kp, vp))
    out = triton_band_attention(qp, kp, vp, spec)
    assert max_err(out, ref) < 1e-5
    out.sum().backward()
    for x in (qp, kp, vp):
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("head_dim", [8, 24, 40])
def test_odd_head_dims(head_dim):
    _check(BandSpec("spattention", 3, 32), *_tensors(1, 37, 37, 3, 3, head_dim, torch.float32))


def test_backward_is_deterministic():
    spec = BandSpec("spattention", 4, 64)
    q, k, v = _tensors(2, 100, 100, 4, 2, 16, torch.float16)
    g = torch.randn(2, 100, 4, 16, dtype=torch.float16, device=DEVICE)
    first = torch.autograd.grad(triton_band_attention(q, k, v, spec), (q, k, v), g)
    second = torch.autograd.grad(triton_band_attention(q, k, v, spec), (q, k, v), g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_lse_is_differentiable():
    spec = BandSpec("spattention", 3, 24)
    q, k, v = _tensors(1, 37, 37, 3, 3, 16, torch.float32)
    out, lse = triton_band_attention(q, k, v, spec, return_lse=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, spec)
    w = torch.randn_like(ref_lse)
    loss = out.sum() + (torch.where(torch.isinf(lse), 0.0, lse) * w.float()).sum()
    ref_loss = ref.sum() + (torch.where(torch.isinf(ref_lse), 0.0, ref_lse) * w).sum()
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q64, k64, v64))):
        assert max_err(a, b) < 1e-4


def test_custom_scale_and_api_dispatch():
    spec = BandSpec("sliding_window", 2, 16)
    q, k, v = _tensors(1, 37, 37, 2, 2, 16, torch.float32)
    _check(spec, q, k, v, scale=0.3)
    out = band_attention(q, k, v, spec, backend="triton")
    torch.testing.assert_close(out, triton_band_attention(q, k, v, spec))


# ----------------------------------------------------------------------------- op / compile
def test_eager_path_equals_custom_op(monkeypatch):
    from olmoe_spattn.kernels import op

    spec = BandSpec("spattention", 4, 64)
    q, k, v = _tensors(1, 100, 100, 4, 2, 16, torch.float32)
    g = torch.randn(1, 100, 4, 16, device=DEVICE)
    results = []
    for use_op in (False, True):
        monkeypatch.setattr(op, "_USE_OP", use_op)
        out, lse = triton_band_attention(q, k, v, spec, return_lse=True)
        results.append((out, lse, *torch.autograd.grad((out * g).sum() + lse[:, :, :3].sum(), (q, k, v))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_custom_op_opcheck():
    spec_args = ("spattention", 3, 24, 0, 0, -1, 0.25)
    q, k, v = (x.detach().requires_grad_() for x in _tensors(1, 20, 20, 3, 3, 16, torch.float32))
    torch.library.opcheck(
        torch.ops.olmoe_spattn.band_attn.default, (q, k, v, None, *spec_args),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_compile_fullgraph_no_graph_break():
    spec = BandSpec("spattention", 4, 32)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 3 * 64)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.proj(x).view(b, t, 3, 4, 16).unbind(2)
            return triton_band_attention(q, k, v, spec).reshape(b, t, 64).square().sum()

    torch.manual_seed(0)
    model = Block().to(DEVICE)
    x = torch.randn(2, 37, 64, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad)


# ----------------------------------------------------------------------------- validation
def test_clear_errors():
    spec = BandSpec("spattention", 4, 64)
    q, k, v = (x.detach() for x in _tensors(1, 20, 20, 4, 4, 16, torch.float32))
    with pytest.raises(ValueError, match="float64"):
        triton_band_attention(q.double(), k.double(), v.double(), spec)
    big = torch.zeros(1, 4, 4, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        triton_band_attention(big, big, big, spec)
    with pytest.raises(ValueError, match="scale"):
        triton_band_attention(q, k, v, spec, scale=0.0)
    with pytest.raises(ValueError, match="q_offset"):
        triton_band_attention(q, k, v, spec, q_offset=3, cu_seqlens=torch.tensor([0, 20], device=DEVICE))
    with pytest.raises(ValueError, match="multiple"):
        triton_band_attention(q, k[:, :, :3], v[:, :, :3], spec)
