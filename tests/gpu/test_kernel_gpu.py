"""Triton band kernel on CUDA: large shapes, every pattern, bf16/fp16, D 64/128, vs float64.

Rule (FlagAttention's): error vs the float64 oracle <= 2 x the error of masked SDPA in the
same low precision (forward), resp. of the fp32 masked-SDPA gradient rounded to the dtype
(backward), plus a small tolerance; the log-sum-exp on every checked head (``-inf`` exactly
on empty rows); GQA key/value gradients on every kv head. Big T checks a few heads, one kv
group at a time, to keep the oracle's ``T x T`` memory bounded. Run with
``OLMOE_SPATTN_AUTOTUNE=0`` for speed; ``test_every_launch_config`` covers the tuned space.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import check_compiled_layer, check_heads, max_err

from olmoe_spattn import BandSpec

pytestmark = pytest.mark.gpu

PATTERNS = ["exclusive_bands", "spattention", "gapped_bands", "sliding_window", "dense"]
LOWP = [torch.bfloat16, torch.float16]


def _kernel():
    from olmoe_spattn.kernels import triton_band_attention

    return triton_band_attention


def _inputs(b, tq, tk, h, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda t, n: torch.randn(b, t, n, d, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(tq, h), make(tk, hkv), make(tk, hkv)


def _check_heads(spec, q, k, v, heads=None, *, head_offset=0, **kw):
    """Kernel (all heads) vs the oracle on ``heads`` (default: all), fwd + bwd + lse."""
    return check_heads(_kernel(), spec, q, k, v, heads, head_offset=head_offset, lse=True, **kw)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns(pattern, dtype, head_dim):
    spec = BandSpec(pattern, 8, 1000)
    _check_heads(spec, *_inputs(2, 1000, 1000, 8, 8, head_dim, dtype))


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands"])
def test_dynamic_partition_gqa(pattern):
    spec = BandSpec(pattern, 8, "dynamic")
    _check_heads(spec, *_inputs(2, 1500, 1500, 8, 2, 128, torch.bfloat16))


@pytest.mark.parametrize("pattern", ["spattention", "dense"])
def test_head_offset_tensor_parallel(pattern):
    spec = BandSpec(pattern, 16, 2048)
    _check_heads(spec, *_inputs(1, 2048, 2048, 4, 4, 128, torch.float16), head_offset=8)


@pytest.mark.parametrize("partition_len", [512, "dynamic"])
def test_varlen(partition_len):
    spec = BandSpec("spattention", 8, partition_len)
    cu = torch.tensor([0, 700, 701, 701, 2300, 2500, 3001], device="cuda", dtype=torch.int32)
    _check_heads(spec, *_inputs(1, 3001, 3001, 8, 4, 128, torch.bfloat16), cu_seqlens=cu)


@pytest.mark.parametrize("tq", [1, 7, 16, 200])
@pytest.mark.parametrize("pattern", ["dense", "spattention", "sliding_window"])
def test_decode_and_chunked_prefill(pattern, tq):
    spec = BandSpec(pattern, 16, "dynamic" if pattern == "dense" else 4096)
    q, k, v = _inputs(2, tq, 4097, 16, 4, 128, torch.bfloat16)
    _check_heads(spec, q, k, v)


def test_chunk_rows_equal_full_forward():
    spec = BandSpec("spattention", 16, 4096)
    f = _kernel()
    q, k, v = (x.detach() for x in _inputs(2, 3000, 3000, 16, 16, 128, torch.bfloat16))
    full = f(q, k, v, spec)
    for a, b in ((0, 1), (1000, 1001), (1777, 2300), (2999, 3000)):
        part = f(q[:, a:b], k[:, :b], v[:, :b], spec)
        assert max_err(part, full[:, a:b]) <= 1e-2


@pytest.mark.parametrize("pattern", ["exclusive_bands", "spattention"])
def test_long_sequence_16k(pattern):
    spec = BandSpec(pattern, 16, 16384)
    _check_heads(spec, *_inputs(1, 16384, 16384, 16, 16, 128, torch.bfloat16), heads=[0, 7, 15])


def test_memory_is_linear_in_t():
    spec = BandSpec("dense", 16, 16384)
    q, k, v = _inputs(1, 16384, 16384, 16, 16, 128, torch.bfloat16)
    f = _kernel()
    out = f(q, k, v, spec)
    out.backward(torch.ones_like(out))  # warm-up (compile, tables)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = f(q, k, v, spec)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 8 * q.numel() * q.element_size(), f"{extra / 2**20:.0f} MiB beyond inputs"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_launch_config(head_dim, monkeypatch, no_replays):
    """Each configuration of the tuned space is exact on its own (interpreter != GPU); no call
    replays the launches of the one before, which ran another configuration."""
    from olmoe_spattn.kernels import autotune, launch

    monkeypatch.setenv("OLMOE_SPATTN_AUTOTUNE", "0")
    spec = BandSpec("spattention", 8, 777)
    q, k, v = _inputs(1, 1000, 1000, 8, 4, head_dim, torch.bfloat16)
    real = autotune.fixed_config
    for kind, space in autotune._SPACE.items():
        for bm, bn, w, s in space:
            cfg = autotune.LaunchConfig(bm, bn, w, s)
            if autotune._smem_bytes(kind, cfg, head_dim) > 200 * 1024:
                continue
            monkeypatch.setattr(launch, "fixed_config", lambda k_, d, e, kind=kind, cfg=cfg: cfg if k_ == kind else real(k_, d, e))
            _check_heads(spec, q, k, v, heads=[0, 3, 6, 7])


def test_compiled_model_fullgraph_bf16():
    check_compiled_layer(_kernel(), BandSpec("exclusive_bands", 8, 512))
