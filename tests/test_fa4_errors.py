"""``backend="fa4"`` refuses what FlashAttention-4 cannot run, with a clear error (CPU tests).

The GPU, its compute capability and the flash-attn-4 import are mocked where needed: only
``q``'s dtype, device and head_dim reach the checks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.fa4 import check_fa4, fa4_band_attention, fa4_problem, support

SPEC = BandSpec("spattention", 4, 64)


def _cuda_q(head_dim=128, dtype=torch.bfloat16):
    """Stands in for a CUDA tensor ``[1, 64, 4, head_dim]`` (the checks read only these fields)."""
    return SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0), shape=(1, 64, 4, head_dim))


@pytest.fixture
def gpu(monkeypatch):
    """flash-attn-4 importable and a GPU of the returned arch (set ``gpu.arch``)."""
    state = SimpleNamespace(arch=90)
    monkeypatch.setattr(support, "_import_error", lambda: "")
    monkeypatch.setattr(support, "_device_arch", lambda index: state.arch)
    return state


def test_cpu_tensors_are_refused():
    q = torch.randn(1, 64, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend='fa4' needs CUDA tensors.*got device cpu"):
        band_attention(q, q, q, SPEC, backend="fa4")


def test_float32_is_refused():
    q = torch.randn(1, 64, 4, 64)
    with pytest.raises(ValueError, match="takes dtypes float16 and bfloat16, got torch.float32"):
        band_attention(q, q, q, SPEC, backend="fa4")


def test_missing_flash_attn_4_names_the_extra(monkeypatch):
    monkeypatch.setattr(support, "_import_error", lambda: "ModuleNotFoundError: No module named 'flash_attn'")
    with pytest.raises(ImportError, match=r'flash-attn-4.*No module named .flash_attn.*pip install "olmoe-spattn\[fa4\]"'):
        check_fa4(_cuda_q())
    assert fa4_problem(_cuda_q())[0] == "missing"


@pytest.mark.parametrize("arch", [80, 86, 89, 120])
def test_gpus_without_fa4_masked_kernels_are_refused(gpu, arch):
    gpu.arch = arch
    with pytest.raises(ValueError, match=rf"compute capability 9.0 .*got {arch // 10}\.{arch % 10}"):
        check_fa4(_cuda_q())


@pytest.mark.parametrize("arch,head_dim,ok", [
    (90, 64, True), (90, 128, True), (90, 256, True), (90, 8, True),
    (90, 12, False), (90, 264, False), (90, 4, False),
    (100, 128, True), (100, 192, False), (103, 96, True),
])
def test_head_dims(gpu, arch, head_dim, ok):
    gpu.arch = arch
    if ok:
        check_fa4(_cuda_q(head_dim))
        assert fa4_problem(_cuda_q(head_dim)) == ("", "")
    else:
        with pytest.raises(ValueError, match=f"head_dim .* multiples of 8 .*got head_dim={head_dim}"):
            check_fa4(_cuda_q(head_dim))


def test_call_arguments_are_checked_before_the_gpu():
    q = torch.randn(1, 64, 4, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 30, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_offset=3 cannot be combined with cu_seqlens"):
        fa4_band_attention(q, q, q, SPEC, cu_seqlens=cu, q_offset=3)
    with pytest.raises(ValueError, match="scale must be a positive float"):
        fa4_band_attention(q, q, q, SPEC, scale=0.0)
    with pytest.raises(ValueError, match="spec must be a BandSpec"):
        fa4_band_attention(q, q, q, "spattention")  # type: ignore[arg-type]


def test_bench_reports_why_fa4_rows_are_missing(monkeypatch):
    from olmoe_spattn.bench.fa4 import fa4_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fa4_available() == (False, "needs a CUDA GPU")
