"""``backend="fa4"`` (FlashAttention-4) on an SM90+ GPU: every pattern vs the float64 oracle.

Same rule as the Triton kernel's GPU tests (``attention_checks.check_heads``): forward error
<= 2 x masked SDPA's in the same dtype, gradients <= 2 x the fp32 masked-SDPA gradient's
rounded to the dtype. Skipped (with the reason) where flash-attn-4 is not installed or the
GPU is older than SM90. Shapes reuse a few kernel variants (dtype, head_dim, GQA ratio,
batch 1 vs 2, mask kind) because FA4 compiles each variant on first use.
"""

from __future__ import annotations

import json

import pytest
import torch
from attention_checks import check_compiled_layer, check_heads

from olmoe_spattn import BandSpec, band_attention


def _fa4_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    from olmoe_spattn.fa4 import fa4_import_error

    why = fa4_import_error()
    if why:
        return f"flash-attn-4 (flash_attn.cute) is not installed ({why}): pip install 'olmoe-spattn[fa4]'"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10, 11):
        return f"FA4's masked kernels need compute capability 9.0, 10.x or 11.x, this GPU is {major}.{minor}"
    return ""


_REASON = _fa4_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=_REASON or "-")]

PATTERNS = ["exclusive_bands", "spattention", "gapped_bands", "sliding_window", "dense"]


def _fa4(q, k, v, spec, **kw):
    return band_attention(q, k, v, spec, backend="fa4", **kw)


def _inputs(b, tq, tk, h, hkv, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda t, n: torch.randn(b, t, n, d, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(tq, h), make(tk, hkv), make(tk, hkv)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_odd_t_not_divisible_by_h(pattern):
    # T = 999 (odd, 999 % 6 == 3): uneven band widths, partial last tiles, exclusive_bands' empty rows
    spec = BandSpec(pattern, 6, 999)
    check_heads(_fa4, spec, *_inputs(2, 999, 999, 6, 6, 128))


def test_float16_head_dim_64():
    spec = BandSpec("spattention", 8, 1000)
    check_heads(_fa4, spec, *_inputs(2, 1000, 1000, 8, 8, 64, torch.float16))


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands"])
def test_dynamic_partition_gqa(pattern):
    spec = BandSpec(pattern, 8, "dynamic")
    check_heads(_fa4, spec, *_inputs(2, 1500, 1500, 8, 2, 128))


def test_head_offset_tensor_parallel():
    spec = BandSpec("spattention", 16, 2048)
    check_heads(_fa4, spec, *_inputs(2, 2048, 2048, 4, 4, 128), head_offset=8)


@pytest.mark.parametrize("partition_len", [512, "dynamic"])
def test_packed_documents(partition_len):
    # an empty document, a one-token document, documents that straddle tiles
    spec = BandSpec("spattention", 8, partition_len)
    cu = torch.tensor([0, 700, 701, 701, 2300, 2500, 3001], device="cuda", dtype=torch.int32)
    check_heads(_fa4, spec, *_inputs(1, 3001, 3001, 8, 2, 128), cu_seqlens=cu)


@pytest.mark.parametrize("tq", [1, 200])
@pytest.mark.parametrize("pattern", ["dense", "spattention"])
def test_decode_and_chunked_prefill(pattern, tq):
    spec = BandSpec(pattern, 8, 4096)
    check_heads(_fa4, spec, *_inputs(2, tq, 4097, 8, 2, 128))


def test_dense_with_an_explicit_query_offset():
    # queries 50..149 of 300 keys: not FA4's bottom-right causal alignment, so the mask path
    spec = BandSpec("dense", 6, 300)
    check_heads(_fa4, spec, *_inputs(2, 100, 300, 6, 6, 128), q_offset=50)


def test_empty_rows_and_heads_give_zeros_not_nan():
    # W = 1, so gapped_bands' band W // 2 is empty: every row of every head has no key
    spec = BandSpec("gapped_bands", 6, 6)
    q, k, v = _inputs(2, 999, 999, 6, 6, 128)
    out = _fa4(q, k, v, spec)
    out.float().sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for g in (q.grad, k.grad, v.grad):
        assert torch.equal(g, torch.zeros_like(g))
    spec = BandSpec("exclusive_bands", 6, 999)  # rows i < S_h are empty for heads h > 0
    out = check_heads(_fa4, spec, *_inputs(2, 999, 999, 6, 6, 128, seed=1))
    starts = spec.starts()
    for h in range(1, 6):
        assert torch.equal(out[:, : starts[h], h], torch.zeros_like(out[:, : starts[h], h]))


def test_long_sequence_16k():
    spec = BandSpec("spattention", 16, 16384)
    check_heads(_fa4, spec, *_inputs(2, 16384, 16384, 16, 16, 128), heads=[0, 7, 15])


def test_block_tables_are_built_on_the_gpu():
    from olmoe_spattn.fa4.blocks import band_aux_tensors, band_block_tables

    spec = BandSpec("spattention", 8, 4096)
    t = band_block_tables(spec, 4096, 4096, q_offset=0, head_offset=0, n_local_heads=8, cu_seqlens=None,
                          block_size=(128, 128), device="cuda")
    aux = band_aux_tensors(spec, 4096, q_offset=0, head_offset=0, n_local_heads=8, cu_seqlens=None, device="cuda")
    assert all(x.is_cuda for x in (t.fwd_mask_cnt, t.fwd_mask_idx, t.bwd_full_idx, *aux))


def test_compiled_model_fullgraph():
    check_compiled_layer(_fa4, BandSpec("exclusive_bands", 8, 512))


def test_auto_follows_the_dispatch_table(tmp_path, monkeypatch):
    from olmoe_spattn import dispatch

    table = {"format": 1, "gpu": torch.cuda.get_device_name(), "entries": [
        {"pattern": "spattention", "head_dim": 128, "width": 128, "train": "fa4", "infer": "fa4"},
        {"pattern": "exclusive_bands", "head_dim": 128, "width": 128, "train": "triton", "infer": "triton"},
    ]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(dispatch.ENV_TABLE, str(path))
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    dispatch.reset()
    try:
        q, k, v = (x.detach() for x in _inputs(2, 1024, 1024, 8, 8, 128))
        for pattern, want in (("spattention", "fa4"), ("exclusive_bands", "triton")):
            spec = BandSpec(pattern, 8, 1024)
            assert dispatch.auto_backend(q, k, spec) == want
            auto = band_attention(q, k, v, spec)
            assert torch.equal(auto, band_attention(q, k, v, spec, backend=want))
    finally:
        dispatch.reset()
