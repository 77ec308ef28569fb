"""What a CUDA graph capture changes on the host side, checked without a GPU.

While a capture is under way nothing may read GPU values on the host. ``check_cu_seqlens``
then checks only the type and shape of ``cu_seqlens``, and a launch over packed documents that
would need a host read (the longest document, or per-document bands of a dynamic partition)
stops with a message saying what to pass instead. The capture state is simulated here; the
real captures run in ``tests/gpu/test_cuda_graphs_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from olmoe_spattn import BandSpec, validation
from olmoe_spattn.cli import main
from olmoe_spattn.kernels import op, triton_band_attention


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(validation, "capturing_cuda_graph", lambda t: True)
    monkeypatch.setattr(op, "capturing_cuda_graph", lambda t: True)


def _packed(t=40, h=4, d=16):
    q, k, v = (torch.randn(1, t, h, d) for _ in range(3))
    return q, k, v, torch.tensor([0, 15, t], dtype=torch.int32)


def test_outside_a_capture_cu_seqlens_values_are_checked():
    with pytest.raises(ValueError, match="must rise from 0 to the packed length 40"):
        validation.check_cu_seqlens(torch.tensor([0, 30, 20, 40]), total=40, batch=1)


def test_during_a_capture_only_type_and_shape_are_checked(capturing):
    validation.check_cu_seqlens(torch.tensor([0, 30, 20, 40]), total=40, batch=1)  # values not read
    with pytest.raises(ValueError, match="1-D integer tensor"):
        validation.check_cu_seqlens(torch.tensor([0.0, 40.0]), total=40, batch=1)


@pytest.mark.parametrize("spec, max_seqlen, message", [
    (BandSpec("spattention", 4, 16), None, "need max_seqlen"),
    (BandSpec("spattention", 4, "dynamic"), 25, "use a fixed partition_len"),
])
def test_packed_documents_needing_host_reads_fail_clearly(capturing, spec, max_seqlen, message):
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match=message):
        triton_band_attention(q, k, v, spec, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_cu_seqlens_on_another_device_fails_clearly(capturing):
    q, k, _, _ = _packed()
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="cu_seqlens must be on cpu like q, got meta"):
        op._new_problem(q, k, cu, "spattention", 4, 16, 0, 0, 25, 0.25)


def test_capturable_packed_documents_pass_the_guard(capturing):
    q, k, v, cu = _packed()
    p = op._new_problem(q, k, cu, "spattention", 4, 16, 0, 0, 25, 0.25)
    assert (p.n_docs, p.max_tq) == (2, 25)


def test_bench_kernel_cuda_graphs_needs_cuda(capsys):
    assert main(["bench", "kernel", "--device", "cpu", "--cuda-graphs"]) == 2
    assert "--cuda-graphs captures CUDA graphs and needs --device cuda, got --device cpu" in capsys.readouterr().err
