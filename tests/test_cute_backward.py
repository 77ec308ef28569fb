"""The CuTe one-pass backward on a CPU machine.

What runs here: the Triton kernel that prepares its row statistics (in the interpreter), the head
groups that bound its fp32 dQ accumulator, which calls take it, the step walk each CTA follows (the
CuTe DSL code itself, executed on the host and compared with a brute force over every (query, key)
pair), and the kernels' compilation for SM90 (no GPU needed). Its numbers are checked against the
float64 oracle on the GPU (``tests/gpu/test_cute_backward_gpu.py``).
"""


import ast
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import cute_launch, launch
from olmoe_spattn.kernels.backward import padded_row_stats_kernel
from olmoe_spattn.kernels.common import Problem

LOG2E = math.log2(math.e)


def test_padded_row_stats():
    b, h, tq, d, t_pad = 2, 3, 70, 16, 128
    g = torch.Generator().manual_seed(0)
    out, do = (torch.randn(b, tq, h, d, generator=g) for _ in range(2))
    lse = torch.randn(b, h, tq, generator=g)
    lse[0, 1, :5] = float("-inf")  # rows that attend nothing
    dlse = torch.randn(b, h, tq, generator=g)
    dlse[1, 2, 7] = float("inf")  # a non-finite lse gradient is ignored, as in the other kernels
    lse2, delta = torch.full((b, h, t_pad), 7.0), torch.full((b, h, t_pad), 7.0)
    padded_row_stats_kernel[(t_pad // 64, h, b)](
        out, do, lse, dlse, lse2, delta, torch.zeros(2, dtype=torch.int32),
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), tq, t_pad,
        HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, HAS_DLSE=True,
    )
    want_delta = (out * do).sum(-1).transpose(1, 2) - torch.where(dlse.isinf(), 0.0, dlse)
    torch.testing.assert_close(delta[..., :tq], want_delta, rtol=1e-5, atol=1e-5)
    assert (delta[..., tq:] == 0).all()
    want_lse2 = torch.where(lse.isinf(), float("inf"), lse * LOG2E)
    torch.testing.assert_close(lse2[..., :tq], want_lse2)
    assert (lse2[..., tq:] == float("inf")).all()


def test_padded_row_stats_of_packed_documents():
    """Each document's rows land in blocks of its own, from ``padded_start``; pad rows get lse2 = +inf
    and delta = 0, and no document's statistics overwrite another's."""
    from olmoe_spattn.kernels.cute_launch import padded_start

    lengths = [70, 0, 130, 5, 64]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    total, h, d = int(cu[-1]), 3, 16
    p, _, _ = _problem(shape=(1, total, h, 128), cu_seqlens=cu)
    t_pad = cute_launch.padded_rows(p)
    g = torch.Generator().manual_seed(1)
    out, do = (torch.randn(1, total, h, d, generator=g) for _ in range(2))
    lse = torch.randn(1, h, total, generator=g)
    lse[0, 2, 75] = float("-inf")  # a row (of document 2) that attends nothing
    lse2, delta = torch.full((1, h, t_pad), 7.0), torch.full((1, h, t_pad), 7.0)
    padded_row_stats_kernel[(-(-max(lengths) // 64), h, len(lengths))](
        out, do, lse, lse, lse2, delta, cu,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), total, t_pad,
        HEAD_DIM=d, BLOCK_D=d, BLOCK_M=64, HAS_DLSE=False, IS_VARLEN=True,
    )
    written = torch.zeros(t_pad, dtype=torch.int32)
    for z, n in enumerate(lengths):
        start, pad = int(cu[z]), padded_start(int(cu[z]), z)
        assert pad % 64 == 0 and pad + -(-n // 64) * 64 <= t_pad
        rows, padded = slice(pad, pad + n), slice(pad + n, pad + -(-n // 64) * 64)
        want_delta = (out[0, start:start + n] * do[0, start:start + n]).sum(-1).T
        torch.testing.assert_close(delta[0, :, rows], want_delta, rtol=1e-5, atol=1e-5)
        part = lse[0, :, start:start + n]
        torch.testing.assert_close(lse2[0, :, rows], torch.where(part.isinf(), float("inf"), part * LOG2E))
        assert (lse2[0, :, padded] == float("inf")).all() and (delta[0, :, padded] == 0).all()
        written[pad: pad + -(-n // 64) * 64] += 1
    assert written.max() <= 1  # no block shared by two documents
    assert (lse2[0, :, written == 0] == 7.0).all()  # nothing written outside the documents' blocks


@pytest.mark.parametrize("lengths", [[1], [64, 64, 64], [63, 1, 65, 0, 200], [0, 0, 5], [129] * 7])
def test_padded_documents_fit_and_do_not_overlap(lengths):
    from olmoe_spattn.kernels.cute_launch import padded_start

    cu = [0, *np.cumsum(lengths).tolist()]
    p = SimpleNamespace(is_varlen=True, tq=cu[-1], n_docs=len(lengths))  # what padded_rows reads of a Problem
    ends = 0
    for z, n in enumerate(lengths):
        pad = padded_start(cu[z], z)
        assert pad % 64 == 0 and pad >= ends
        ends = pad + -(-n // 64) * 64
    assert ends <= cute_launch.padded_rows(p)


def _working_heads(spec, tq, tk, q_off, head_offset, n_local, docs=None):
    """Brute force over the oracle masks: the local heads with at least one (query, key) pair."""
    if docs is None:
        masks = [spec.mask(tk, q_len=tq, q_offset=q_off, head_offset=head_offset, n_local_heads=n_local)]
    else:
        masks = [spec.mask(n, head_offset=head_offset, n_local_heads=n_local) for n in docs if n > 0]
    return [h for h in range(n_local) if any(m[h].any() for m in masks)]


@pytest.mark.parametrize(("spec", "tq", "tk", "q_off", "head_offset", "n_local", "docs"), [
    (BandSpec("exclusive_bands", 8, 1024), 300, 300, 0, 0, 8, None),  # bands past T: heads 3..7 idle
    (BandSpec("exclusive_bands", 8, 1024), 100, 700, 600, 2, 6, None),  # queries late in the keys
    (BandSpec("gapped_bands", 4, 1030), 1030, 1030, 0, 0, 4, None),
    (BandSpec("spattention", 8, 4096), 500, 500, 0, 0, 8, None),
    (BandSpec("exclusive_bands", 16, 16384), 0, 0, 0, 0, 16, (455, 910, 3640, 1)),  # packed documents
    (BandSpec("exclusive_bands", 4, "dynamic"), 0, 0, 0, 0, 4, (3, 50, 9)),  # a table per document
    (BandSpec("exclusive_bands", 8, 64), 0, 0, 0, 0, 8, (1, 2)),  # one- and two-row documents
    (BandSpec("exclusive_bands", 8, 64), 9, 9, 0, 0, 8, None),  # head 1's one pair: distance 8 = T - 1
    (BandSpec("exclusive_bands", 8, 64), 8, 8, 0, 0, 8, None),  # head 1 starts at distance 8 = T: idle
    (BandSpec("exclusive_bands", 8, 64), 0, 0, 0, 0, 8, (8, 9, 3)),  # the same inside packed documents
])
def test_heads_with_work_hold_every_head_with_a_pair(spec, tq, tk, q_off, head_offset, n_local, docs):
    cu = None
    if docs is not None:
        cu = torch.tensor([0, *np.cumsum(docs)], dtype=torch.int32)
        tq = tk = int(cu[-1])
    q = torch.zeros(1, tq, n_local, 128)
    k = torch.zeros(1, tk, n_local, 128)
    p = Problem(q, k, spec, head_offset=head_offset, q_offset=q_off, cu_seqlens=cu,
                max_seqlen=max(docs) if docs else tq, scale=1.0)
    working = _working_heads(spec, tq, tk, q_off, head_offset, n_local, docs)
    first, last = p.heads_with_work()
    assert working, "a case without any pair tests nothing"
    assert first <= working[0] and working[-1] < last  # never skips a head with work
    assert (first, last) == (working[0], working[-1] + 1)  # and skips the idle heads at both ends


def test_run_backward_cute_launches_only_heads_with_work(monkeypatch):
    spec = BandSpec("exclusive_bands", 8, 1024)  # 128 distances per head: heads 3..7 idle at T = 300
    q = torch.ones(1, 300, 8, 128, dtype=torch.bfloat16)
    p = Problem(q, q, spec, head_offset=0, q_offset=0, cu_seqlens=None, max_seqlen=300, scale=1.0)
    launched = []

    def backward(q, k, v, do, lse2, delta, acc, dk, dv, bands, *rest):
        launched.append(q.shape[2])
        for grad in (dk, dv):
            grad.fill_(1.0)

    def finish(acc, dq, *rest):
        dq.fill_(1.0)

    monkeypatch.setattr(cute_launch, "compiled_kernels", lambda dtype, varlen=False: (backward, finish))
    stats_grids = []

    class StatsKernel:  # kernel[grid](...) as Triton launches it
        def __getitem__(self, grid):
            stats_grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(cute_launch, "padded_row_stats_kernel", StatsKernel())
    dq, dk, dv = cute_launch.run_backward_cute(q, q, q, q, q, torch.zeros(1, 8, 300), p)
    assert launched == [3] and stats_grids == [(5, 3, 1)]  # heads 0..2, one group; 5 row blocks of 64
    for grad in (dq, dk, dv):
        assert (grad[:, :, :3] == 1).all() and (grad[:, :, 3:] == 0).all()


@pytest.mark.parametrize(("n_heads", "per_head", "io", "want"), [
    (16, 32 << 20, 2 << 30, [(0, 4), (4, 8), (8, 12), (12, 16)]),  # 1,16,65536,128: 512 MiB, kept to 1/16 of io
    (16, 16 << 20, 1 << 30, [(0, 16)]),  # 8,16,4096,128: 256 MiB in all, one launch
    (16, 17 << 20, 1 << 30, [(h, min(h + 3, 16)) for h in range(0, 16, 3)]),  # just past 256 MiB: 64 MiB groups
    (16, 1 << 20, 2 << 30, [(0, 16)]),  # small accumulators: one launch
    (6, 100 << 20, 100 << 20, [(h, h + 1) for h in range(6)]),  # past 256 MiB, 6.25 MiB budget: one head each
    (7, 1 << 30, 1 << 20, [(h, h + 1) for h in range(7)]),  # never fewer than one head per group
    (5, 100 << 20, 4 << 30, [(0, 2), (2, 4), (4, 5)]),  # 500 MiB, 256 MiB budget: as even as possible
    (4, 100 << 20, 8 << 30, [(0, 4)]),  # 400 MiB but within 1/16 of io: one launch
])
def test_head_groups(n_heads, per_head, io, want):
    assert cute_launch.head_groups(n_heads, per_head, io) == want


def _problem(shape=(1, 64, 4, 128), kv_heads=None, dtype=torch.bfloat16, cu_seqlens=None):
    b, t, h, d = shape
    q = torch.zeros(b, t, h, d, dtype=dtype)
    k = torch.zeros(b, t, kv_heads or h, d, dtype=dtype)
    p = Problem(q, k, BandSpec("spattention", h, t), head_offset=0, q_offset=0, cu_seqlens=cu_seqlens,
                max_seqlen=t, scale=d ** -0.5)
    return p, q, k


def test_calls_the_kernel_supports():
    p, q, k = _problem()
    assert cute_launch.cute_unsupported_reason(p, q, k) is None
    p16, q16, k16 = _problem(dtype=torch.float16)
    assert cute_launch.cute_unsupported_reason(p16, q16, k16) is None
    for (p, q, k), why in ((_problem(dtype=torch.float32), "dtype torch.float32"),
                           (_problem(shape=(1, 64, 4, 64)), "head dim 64"),
                           (_problem(kv_heads=2), "2 query heads per kv head")):
        assert why in cute_launch.cute_unsupported_reason(p, q, k)
    p, q, k = _problem(cu_seqlens=torch.tensor([0, 30, 64]))  # packed documents
    assert cute_launch.cute_unsupported_reason(p, q, k) is None
    p, q, k = _problem()
    assert "mixed dtypes" in cute_launch.cute_unsupported_reason(p, q, k, k.to(torch.float16))
    wide = torch.zeros(1, 64, 4, 132, dtype=torch.bfloat16)[..., :128]  # heads 264 bytes apart: not 16-aligned
    assert "16-byte" in cute_launch.cute_unsupported_reason(p, wide, k)
    assert cute_launch.cute_unavailable_reason(p, q, k) == "needs a CUDA GPU"  # CPU tensors
    assert not cute_launch.cute_backward_ok(p, q, k)


def test_unavailable_reasons_on_a_gpu(monkeypatch):
    p, q, k = _problem()

    class OnGpu:  # the attributes cute_unavailable_reason reads, as a CUDA tensor has them
        is_cuda = True
        device = None
        dtype = q.dtype

        def stride(self, dim=None):
            return q.stride() if dim is None else q.stride(dim)

        def element_size(self):
            return q.element_size()

        def data_ptr(self):
            return 0

    x = OnGpu()
    monkeypatch.setattr(cute_launch, "_broken", [])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert cute_launch.cute_unavailable_reason(p, x) == "needs an SM90 (Hopper) GPU"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cute_launch, "cute_installed", lambda: False)
    assert "needs the cute extra (nvidia-cutlass-dsl 4.8 to below 5.0" in cute_launch.cute_unavailable_reason(p, x)
    monkeypatch.setattr(cute_launch, "cute_installed", lambda: True)
    assert cute_launch.cute_unavailable_reason(p, x) is None
    monkeypatch.setattr(cute_launch, "_broken", ["RuntimeError('x')"])
    assert "failed to compile" in cute_launch.cute_unavailable_reason(p, x)


@pytest.fixture
def accepting(monkeypatch):
    """``launch`` sees every call as one the CuTe kernel can run; no schedule forced."""
    monkeypatch.setattr(launch, "cute_backward_ok", lambda p, *tensors: True)
    for name in ("OLMOE_SPATTN_BWD", "OLMOE_SPATTN_TRITON_FEATURES"):
        monkeypatch.delenv(name, raising=False)
    return _problem()[0]


def test_schedule_choice(accepting, monkeypatch):
    p = accepting
    assert launch.use_cute_backward(p, False)
    assert not launch.use_cute_backward(p, True)  # deterministic=True
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not launch.use_cute_backward(p, False)
    finally:
        torch.use_deterministic_algorithms(before)
    for schedule, cute in (("auto", True), ("cute", True), ("one_pass", False), ("two_pass", False)):
        monkeypatch.setenv("OLMOE_SPATTN_BWD", schedule)
        assert launch.use_cute_backward(p, False) is cute, schedule
        assert launch.use_one_pass(False) is (schedule == "one_pass"), schedule
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "auto")
    monkeypatch.setenv("OLMOE_SPATTN_TRITON_FEATURES", "tma")  # forcing Triton kernels keeps them
    assert not launch.use_cute_backward(p, False)
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "cute")  # unless the CuTe kernel is asked for by name
    assert launch.use_cute_backward(p, False)
    monkeypatch.delenv("OLMOE_SPATTN_TRITON_FEATURES")
    monkeypatch.delenv("OLMOE_SPATTN_BWD")
    monkeypatch.setattr(launch, "AUTO_CUTE_BWD_MIN_EXTENT", p.extent + 1)
    assert not launch.use_cute_backward(p, False)
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "cute")
    assert launch.use_cute_backward(p, False)
    monkeypatch.setattr(launch, "cute_backward_ok", lambda p, *tensors: False)
    assert not launch.use_cute_backward(p, False)


def test_unknown_schedule_names_the_allowed_ones(monkeypatch):
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "cutlass")
    with pytest.raises(ValueError, match="OLMOE_SPATTN_BWD='cutlass'; allowed: auto, cute, one_pass, two_pass"):
        launch.use_cute_backward(_problem()[0], False)


def test_run_backward_takes_the_cute_kernel_where_chosen(accepting, monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "run_backward_cute", lambda *args, **kw: calls.append(args) or (1, 2, 3))
    p, q, k = _problem()
    lse = torch.zeros(1, 4, 64)
    assert launch.run_backward(q, q, k, k, q, lse, p) == (1, 2, 3)
    assert len(calls) == 1
    dq, dk, dv = launch.run_backward(q.float(), q.float(), k.float(), k.float(), q.float(), lse, p,
                                     deterministic=True)
    assert len(calls) == 1 and dq.shape == q.shape
    # kernels that failed to compile (``None``): the Triton backward gives the gradients
    monkeypatch.setattr(launch, "run_backward_cute", lambda *args, **kw: calls.append(args))
    args = (q.float(), q.float(), k.float(), k.float(), q.float(), lse, p)
    got = launch.run_backward(*args)
    assert len(calls) == 2
    want = launch.run_backward(*args, deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ----------------------------------------------------------------------------- the step walk
def _needs_cute():
    """The CuTe DSL and quack (the ``cute`` extra, part of ``dev``)."""
    pytest.importorskip("cutlass.cute", reason="the CuTe DSL (nvidia-cutlass-dsl) is not installed")
    pytest.importorskip("quack", reason="quack-kernels is not installed")


def _walks(bands: torch.Tensor, tq: int, tk: int, q_off: int) -> np.ndarray:
    """``[H, key tiles, 12]``: :func:`cute_backward.step_walk` of every (head, key tile), run on the host."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import from_dlpack

    from olmoe_spattn.kernels import cute_backward as kernels

    @cute.jit
    def walks(bands: cute.Tensor, out: cute.Tensor, tq: cutlass.Int32, tk: cutlass.Int32, q_off: cutlass.Int32):
        for h in cutlass.range(out.shape[0]):
            for n in cutlass.range(out.shape[1]):
                bounds = (bands[h, 0], bands[h, 1], bands[h, 2], bands[h, 3])
                edge, full = kernels.step_walk(bounds, n, tq, tk, q_off, kernels.TILE_M, kernels.TILE_N)
                for i in cutlass.range_constexpr(8):
                    out[h, n, i] = edge[i]
                for i in cutlass.range_constexpr(4):
                    out[h, n, 8 + i] = full[i]

    out = torch.zeros(bands.shape[0], -(-tk // 128), 12, dtype=torch.int32)
    walks(from_dlpack(bands.contiguous()), from_dlpack(out), tq, tk, q_off)
    return out.numpy()


WALK_CASES = [
    (BandSpec("spattention", 4, 700), 700, 700, 0),
    (BandSpec("exclusive_bands", 5, 512), 777, 777, 0),  # partition_len != T, empty rows
    (BandSpec("gapped_bands", 4, 1030), 1030, 1030, 0),  # two intervals per head
    (BandSpec("sliding_window", 3, 300), 650, 650, 0),
    (BandSpec("dense", 2, 600), 600, 600, 0),
    (BandSpec("spattention", 8, 900), 300, 900, 600),  # queries at the end of longer keys
    (BandSpec("exclusive_bands", 4, "dynamic"), 333, 333, 0),
    (BandSpec("dense", 2, 1000), 1000, 650, 0),  # queries past the last (partial) key tile
]


def _attended(bands: torch.Tensor, tq: int, tk: int, q_off: int) -> np.ndarray:
    """``[H, Tk]`` bool: :func:`cute_backward.key_attended` of every (head, key), run on the host."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import from_dlpack

    from olmoe_spattn.kernels import cute_backward as kernels

    @cute.jit
    def attended(bands: cute.Tensor, out: cute.Tensor, tq: cutlass.Int32, q_off: cutlass.Int32):
        for h in cutlass.range(out.shape[0]):
            for j in cutlass.range(out.shape[1]):
                out[h, j] = cutlass.Int32(0)
                if kernels.key_attended(j, tq, q_off, bands[h, 0], bands[h, 1], bands[h, 2], bands[h, 3]):
                    out[h, j] = cutlass.Int32(1)

    out = torch.zeros(bands.shape[0], tk, dtype=torch.int32)
    attended(from_dlpack(bands.contiguous()), from_dlpack(out), tq, q_off)
    return out.numpy().astype(bool)


@pytest.mark.parametrize(("spec", "tq", "tk", "q_off"), WALK_CASES, ids=lambda x: getattr(x, "pattern", None))
def test_step_walk_visits_exactly_the_needed_blocks(spec, tq, tk, q_off):
    _needs_cute()
    table = spec.interval_tensor(tk if spec.is_dynamic else None, head_offset=0, n_local_heads=spec.n_heads)
    bands = table.reshape(spec.n_heads, 4).to(torch.int32)
    walks = _walks(bands, tq, tk, q_off)
    attended = _attended(bands, tq, tk, q_off)
    rows, keys = np.arange(tq)[:, None] + q_off, np.arange(tk)[None, :]
    for h in range(spec.n_heads):
        lo0, hi0, lo1, hi1 = bands[h].tolist()
        dist = rows - keys
        allowed = ((dist >= lo0) & (dist < hi0)) | ((dist >= lo1) & (dist < hi1))  # [Tq, Tk]
        # the keys whose K and V rows the kernel zeroes (no query sees them)
        assert (attended[h] == allowed.any(axis=0)).all(), f"head {h}: attended keys"
        for n in range(walks.shape[1]):
            w = walks[h, n]
            edge = [m for s, c in zip(w[0:8:2], w[1:8:2]) for m in range(s, s + c)]
            full = [m for s, c in zip(w[8:12:2], w[9:12:2]) for m in range(s, s + c)]
            assert len(set(edge + full)) == len(edge) + len(full), f"head {h} tile {n}: a block twice"
            tile = allowed[:, n * 128: (n + 1) * 128]
            needed = {m for m in range(-(-tq // 64)) if tile[m * 64: (m + 1) * 64].any()}
            assert set(edge + full) == needed, f"head {h} tile {n}"
            for m in full:  # no mask: every pair of the tile inside the band, Tq and Tk
                assert (n + 1) * 128 <= tk and (m + 1) * 64 <= tq, f"head {h} tile {n} block {m}"
                assert tile[m * 64: (m + 1) * 64].all(), f"head {h} tile {n} block {m}"


_COMPILE = r"""
import os, shutil, sys, torch
from olmoe_spattn.kernels import cute_launch
dump = sys.argv[1]
counts = []
for varlen in (False, True):
    for dtype in (torch.bfloat16, torch.float16):
        cute_launch._compiled(dtype, varlen)
        ptx = [n for n in os.listdir(dump) if n.endswith(".ptx")]
        text = [open(os.path.join(dump, n)).read() for n in ptx if "BandBackward" in n]
        counts.append((len(text), [t.count("wgmma.mma_async") for t in text],
                       [t.count("cp.reduce.async.bulk") for t in text], [t.count("st.global") for t in text]))
        for n in ptx:
            os.remove(os.path.join(dump, n))
print(counts)
"""


def test_kernels_compile_for_sm90(tmp_path):
    _needs_cute()
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx", CUTE_DSL_DUMP_DIR=str(tmp_path),
               CUTE_DSL_NO_CACHE="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = ast.literal_eval(done.stdout.strip().split("\n")[-1])  # [(files, wgmma, bulk reduce-adds, global stores)]
    assert len(counts) == 4, done.stdout
    for files, wgmma, reduces, _stores in counts:
        # each step body twice (edge and full steps) x five MMAs x their k-steps; two dQ reduce-adds
        assert (files, wgmma, reduces) == (1, [64], [2]), done.stdout
    # dK and dV rows stored from registers: zeros of empty walks; packed documents also a document's last tile
    rows, docs = counts[0][3][0], counts[2][3][0]
    assert 0 < rows < docs and counts[1][3][0] == rows and counts[3][3][0] == docs, done.stdout


@pytest.mark.parametrize(("versions", "ok"), [
    ({"nvidia-cutlass-dsl": (4, 8), "quack-kernels": (0, 6)}, True),
    ({"nvidia-cutlass-dsl": (4, 7), "quack-kernels": (0, 6)}, False),
    ({"nvidia-cutlass-dsl": (4, 9), "quack-kernels": (0, 7)}, False),  # quack's helpers change between minors
    ({"nvidia-cutlass-dsl": None, "quack-kernels": (0, 6)}, False),
])
def test_only_supported_versions_count_as_installed(versions, ok, monkeypatch):
    monkeypatch.setattr(cute_launch, "_version", versions.get)
    monkeypatch.setattr(cute_launch.importlib.util, "find_spec", lambda name: object())
    cute_launch.cute_installed.cache_clear()
    try:
        assert cute_launch.cute_installed() is ok
    finally:
        monkeypatch.undo()
        cute_launch.cute_installed.cache_clear()


def test_a_kernel_that_fails_to_compile_hands_over_to_triton(monkeypatch, caplog):
    def broken(dtype, varlen=False):
        raise RuntimeError("compiler says no")

    monkeypatch.setattr(cute_launch, "_compiled", broken)
    monkeypatch.setattr(cute_launch, "_broken", [])
    p, q, k = _problem()
    lse = torch.zeros(1, 4, 64)
    with caplog.at_level("WARNING"):
        assert cute_launch.run_backward_cute(q, q, k, k, q, lse, p) is None
    assert "compiler says no" in caplog.text and "Triton backward" in caplog.text
    assert cute_launch._broken  # from now on every call is turned down
    monkeypatch.setattr(cute_launch, "cute_unsupported_reason", lambda p, *t: None)
    monkeypatch.setattr(cute_launch, "cute_installed", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    class FakeCuda:
        is_cuda = True
        device = None

    assert not cute_launch.cute_backward_ok(p, FakeCuda())
    monkeypatch.setattr(cute_launch, "_broken", [])
    assert cute_launch.cute_backward_ok(p, FakeCuda())
