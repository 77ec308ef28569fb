"""Host side of the one-pass CuTe backward (:mod:`.cute_backward`): which calls take it, and one call.

A call runs three launches per group of heads: :func:`.backward.padded_row_stats_kernel` (once, for
all heads: ``lse2`` and ``delta``, padded to whole 64-row blocks), the backward kernel (``dk``, ``dv``
and the fp32 dQ accumulator) and :class:`.cute_backward.DqFromAccumulator` (``dq``). The fp32
accumulator holds ``Tpad * D`` floats per (batch row, head), twice ``q``'s bytes for all heads. Up to
:data:`ACC_ALWAYS_OK_BYTES` it is allocated whole and all heads run in one launch; above that, and
when it is more than :data:`ACC_MAX_FRACTION` of the call's inputs and gradients, the heads run in
groups whose accumulator stays under that fraction (one buffer, reused): at ``T`` = 65536 with 16
heads, four groups of four, and a peak of 1.07x the call's tensors.

The kernels are compiled once per dtype for any shape (symbolic sizes and strides, TVM FFI calls with
torch tensors on the current stream); the compilation takes a few seconds on first use.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import math
import re

import torch
import triton

from . import direct_launch
from .autotune import device_capability
from .backward import padded_row_stats_kernel
from .common import Problem

HEAD_DIM = 128
ROW_BLOCK = 64  # the kernel's query step: dq_acc, lse2 and delta are padded to whole blocks
#: Largest fp32 dQ accumulator, as a fraction of the bytes of q, k, v, out, dout, dq, dk, dv.
ACC_MAX_FRACTION = 1 / 16
#: An accumulator of at most this many bytes is never split. It lives only while one call's backward
#: runs, so its absolute size is what counts against the GPU's memory; every extra launch leaves its
#: own last wave of programs half empty (32k tokens of 16 heads at head dim 128 take 256 MiB, and
#: one launch instead of four groups ran their backward 1.06-1.11x faster at 8,16,4096,128).
ACC_ALWAYS_OK_BYTES = 256 << 20


#: The versions the kernel is written against (the ``cute`` extra): quack's helpers change between minor versions.
SUPPORTED = {"nvidia-cutlass-dsl": ((4, 8), (5, 0)), "quack-kernels": ((0, 6), (0, 7))}
_log = logging.getLogger(__name__)
_broken: list[str] = []  # why the kernels failed to compile in this process, if they did


def _version(dist: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


@functools.lru_cache(maxsize=1)
def cute_installed() -> bool:
    """Whether ``nvidia-cutlass-dsl`` and ``quack-kernels`` are installed in the supported versions."""
    for dist, (low, high) in SUPPORTED.items():
        version = _version(dist)
        if version is None or not low <= version < high:
            return False
    return all(importlib.util.find_spec(name) is not None for name in ("cutlass", "quack"))


def _tma_ready(x: torch.Tensor) -> bool:
    """Unit stride along D, 16-byte aligned strides and data (what TMA descriptors need)."""
    elt = x.element_size()
    return x.stride(-1) == 1 and all((s * elt) % 16 == 0 for s in x.stride()[:-1]) and x.data_ptr() % 16 == 0


def cute_unsupported_reason(p: Problem, *tensors: torch.Tensor) -> str | None:
    """Why the call's shapes and tensors do not suit the CuTe backward (``None``: they do): it takes
    bf16/fp16, head dim 128, one query head per kv head, and TMA-ready tensors of one dtype."""
    dtype = tensors[0].dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {dtype} (needs bfloat16 or float16)"
    if p.head_dim != HEAD_DIM:
        return f"head dim {p.head_dim} (needs {HEAD_DIM})"
    if p.group != 1:
        return f"{p.group} query heads per kv head (needs 1)"
    if not all(t.dtype == dtype and _tma_ready(t) for t in tensors):
        return "tensors of mixed dtypes, or not unit-stride along D with 16-byte aligned strides"
    return None


def cute_unavailable_reason(p: Problem, *tensors: torch.Tensor) -> str | None:
    """Why this call cannot take the CuTe backward (``None``: it can): it needs an SM90 GPU, the
    ``cute`` extra in a supported version, kernels that compiled, and :func:`cute_unsupported_reason`."""
    x = tensors[0]
    if not x.is_cuda:
        return "needs a CUDA GPU"
    reason = cute_unsupported_reason(p, *tensors)
    if reason is not None:
        return reason
    if device_capability(x.device) != (9, 0):
        return "needs an SM90 (Hopper) GPU"
    if not cute_installed():
        supported = ", ".join(f"{d} {lo[0]}.{lo[1]} to below {hi[0]}.{hi[1]}" for d, (lo, hi) in SUPPORTED.items())
        return f"needs the cute extra ({supported})"
    if _broken:
        return f"its kernels failed to compile in this process ({_broken[0]})"
    return None


def cute_backward_ok(p: Problem, *tensors: torch.Tensor) -> bool:
    """Whether this call can take the CuTe backward (:func:`cute_unavailable_reason` is ``None``)."""
    return cute_unavailable_reason(p, *tensors) is None


def compiled_kernels(dtype: torch.dtype, varlen: bool = False):
    """The compiled kernels for ``dtype`` (and packed documents when ``varlen``), or ``None`` (logged
    once) when they fail to compile, after which :func:`cute_backward_ok` turns every call down and the
    Triton kernels take over."""
    try:
        return _compiled(dtype, varlen)
    except Exception as err:  # a compiler or library mismatch must not stop training
        _broken.append(repr(err))
        _log.warning("the CuTe backward failed to compile (%r); using the Triton backward instead", err)
        return None


def head_groups(n_heads: int, acc_bytes_per_head: int, io_bytes: int) -> list[tuple[int, int]]:
    """``[(h0, h1), ...]``: consecutive head ranges that run one launch each. All heads at once when
    their whole accumulator is at most :data:`ACC_ALWAYS_OK_BYTES` or within :data:`ACC_MAX_FRACTION`
    of ``io_bytes``; otherwise the fewest groups, as even as possible, whose accumulator stays within
    that fraction (at least one head per group)."""
    budget = io_bytes * ACC_MAX_FRACTION
    if n_heads * acc_bytes_per_head <= max(budget, ACC_ALWAYS_OK_BYTES):
        return [(0, n_heads)]
    per_group = max(1, min(n_heads, int(budget // max(acc_bytes_per_head, 1))))
    n_groups = math.ceil(n_heads / per_group)
    size = math.ceil(n_heads / n_groups)
    return [(h0, min(h0 + size, n_heads)) for h0 in range(0, n_heads, size)]


@functools.lru_cache(maxsize=4)
def _compiled(dtype: torch.dtype, varlen: bool = False):
    """``(backward, dq_from_acc)`` compiled for ``dtype`` and any shape, for batch rows or (``varlen``)
    packed documents."""
    import cutlass
    import cutlass.cute as cute
    from quack.compile_utils import make_fake_tensor

    from . import cute_backward as kernels

    elt = cutlass.BFloat16 if dtype == torch.bfloat16 else cutlass.Float16
    sym = cute.sym_int
    b, tq, tk, h, t_pad, acc_len, n_cu, n_tables = sym(), sym(), sym(), sym(), sym(), sym(), sym(), sym()
    per_16_bytes = 8  # elements of 2 bytes in 16 bytes
    q_like = lambda: make_fake_tensor(elt, (b, tq, h, HEAD_DIM), divisibility=per_16_bytes)  # noqa: E731
    k_like = lambda: make_fake_tensor(elt, (b, tk, h, HEAD_DIM), divisibility=per_16_bytes)  # noqa: E731
    stats = lambda: make_fake_tensor(cutlass.Float32, (b, h, t_pad), divisibility=4)  # noqa: E731
    acc = make_fake_tensor(cutlass.Float32, (b, h, acc_len), divisibility=4)
    bands = make_fake_tensor(cutlass.Int32, (n_tables, h, 4), divisibility=4)
    cu_seqlens = make_fake_tensor(cutlass.Int32, (n_cu,), divisibility=1)
    stream = cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
    options = "--enable-tvm-ffi"
    backward = cute.compile(
        kernels.BandBackwardSm90(elt, varlen), q_like(), k_like(), k_like(), q_like(), stats(), stats(), acc,
        k_like(), k_like(), bands, cu_seqlens, cutlass.Float32(1.0), cutlass.Int32(0), cutlass.Int32(0),
        cutlass.Int32(1), stream, options=options)
    finish = cute.compile(kernels.DqFromAccumulator(elt, varlen), acc, q_like(), cu_seqlens, cutlass.Float32(1.0),
                          cutlass.Int32(1), stream, options=options)
    return backward, finish


def padded_start(start, z):
    """Where packed document ``z`` (first row ``start``) begins in the padded row statistics and dQ
    accumulator: ``start + 64 z`` rounded down to a whole 64-row block, so that every document gets
    blocks of its own (``padded_start(cu[z + 1], z + 1) - padded_start(cu[z], z) >= ceil(len / 64) * 64``).
    Plain integer arithmetic: the CuTe kernels call it on their own integers too."""
    return (start + ROW_BLOCK * z) // ROW_BLOCK * ROW_BLOCK


def padded_rows(p: Problem) -> int:
    """Rows of the padded row statistics and dQ accumulator per (batch row, head): ``Tq`` rounded up to
    whole 64-row blocks, or for packed documents room for each document to start a block of its own
    (:func:`padded_start` of one past the last document)."""
    if p.is_varlen:
        return padded_start(p.tq, p.n_docs)
    return triton.cdiv(p.tq, ROW_BLOCK) * ROW_BLOCK


def heads_of(x: torch.Tensor, dim: int, lo: int, hi: int) -> torch.Tensor:
    """Heads ``lo:hi`` of ``x`` along ``dim``: ``x`` itself when that is all of them (a view costs a few
    microseconds of host time, and a call with one group of all heads would take a dozen)."""
    if lo == 0 and hi == x.shape[dim]:
        return x
    return x.narrow(dim, lo, hi - lo)


def run_backward_cute(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, p: Problem, dlse: torch.Tensor | None = None):
    """``(dq, dk, dv)`` of one call that :func:`cute_backward_ok` accepted (``tq, tk > 0``), or
    ``None`` when the kernels cannot be compiled (the caller runs the Triton backward).

    Only the heads :meth:`.Problem.heads_with_work` names are launched; the others' gradients are
    zero (bands that start past every distance of the call: most heads of ``exclusive_bands`` with
    documents shorter than the partition)."""
    kernels = compiled_kernels(q.dtype, p.is_varlen)
    if kernels is None:
        return None
    backward, finish = kernels
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    first, last = p.heads_with_work()
    if last - first < p.n_heads:  # (a few microseconds of host time per slice: only when some head idles)
        for grad in (dq, dk, dv):
            grad[:, :, :first].zero_()
            grad[:, :, last:].zero_()
        if first == last:
            return dq, dk, dv
    b, tq, _, d = q.shape
    h = last - first
    t_pad = padded_rows(p)
    lse2 = torch.empty(b, h, t_pad, device=q.device, dtype=torch.float32)
    delta = torch.empty_like(lse2)
    lse_w = heads_of(lse.contiguous(), 1, first, last)
    dlse_w = lse_w if dlse is None else heads_of(dlse.to(torch.float32).contiguous(), 1, first, last)
    blocks = triton.cdiv(p.max_tq, ROW_BLOCK)  # per batch row, or per document (the longest)
    direct_launch.launch(
        padded_row_stats_kernel, (blocks, h, p.z),
        heads_of(out, 2, first, last), heads_of(do, 2, first, last), lse_w, dlse_w, lse2, delta, p.cu,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        lse_w.stride(0), lse_w.stride(1),
        tq, t_pad,
        HEAD_DIM=d, BLOCK_D=d, BLOCK_M=ROW_BLOCK, HAS_DLSE=dlse is not None, IS_VARLEN=p.is_varlen, num_warps=4,
    )
    bands = p.table.reshape(-1, p.n_heads, 4)  # [tables (one, or one per document), H, 4] int32: lo0, hi0, lo1, hi1
    per_doc = int(p.table_doc_stride != 0)
    io_bytes = 4 * (q.numel() + k.numel()) * q.element_size()  # q, out, do, dq; k, v, dk, dv
    groups = head_groups(h, b * t_pad * d * 4, io_bytes)
    acc = torch.empty(b, groups[0][1] - groups[0][0], t_pad * d, device=q.device, dtype=torch.float32)
    for h0, h1 in groups:
        acc_h = heads_of(acc, 1, 0, h1 - h0)
        acc_h.zero_()
        lo, hi = first + h0, first + h1
        backward(heads_of(q, 2, lo, hi), heads_of(k, 2, lo, hi), heads_of(v, 2, lo, hi), heads_of(do, 2, lo, hi),
                 heads_of(lse2, 1, h0, h1), heads_of(delta, 1, h0, h1), acc_h, heads_of(dk, 2, lo, hi),
                 heads_of(dv, 2, lo, hi), heads_of(bands, 1, lo, hi), p.cu, p.scale, p.q_offset, per_doc, p.max_tk)
        finish(acc_h, heads_of(dq, 2, lo, hi), p.cu, p.scale, p.max_tq)
    return dq, dk, dv
