"""``torch.library`` custom ops (namespace ``olmoe_spattn``) with fake impls and autograd.

``torch.ops.olmoe_spattn.band_attn`` returns ``(out, lse)`` and
``torch.ops.olmoe_spattn.band_attn_backward`` returns ``(dq, dk, dv)``. Both are opaque
to ``torch.compile`` (no graph break: the fake impls give shapes), and the forward has a
registered autograd formula, so a compiled model that calls :func:`triton_band_attention`
traces through in one graph. Eager calls take an equivalent ``autograd.Function`` over the
same launchers (fewer dispatch layers; tests check the two paths agree bit for bit).
"""

from __future__ import annotations

import math

import torch

from ..bands import DYNAMIC, BandSpec
from ..validation import capturing_cuda_graph, check_kernel_options, check_qkv
from . import launch as _launch
from .autotune import interpreting
from .common import Problem
from .replay import Replays

MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _spec(pattern: str, n_heads: int, partition_len: int) -> BandSpec:
    return BandSpec(pattern, n_heads, DYNAMIC if partition_len < 0 else partition_len)


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


_PROBLEMS: dict[tuple, Problem] = {}
_MAX_CACHED_PROBLEMS = 256


def _problem(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale):
    """The launch geometry of one call; cached by shape for unpacked batches, whose repeat calls replay
    the launches of earlier ones (:mod:`.replay`)."""
    if cu_seqlens is None:
        key = (q.shape, k.shape, q.dtype, q.device, pattern, n_heads, partition_len, head_offset, q_offset, scale)
        p = _PROBLEMS.get(key)
        if p is None:
            if len(_PROBLEMS) >= _MAX_CACHED_PROBLEMS:
                _PROBLEMS.clear()
            p = _PROBLEMS[key] = _new_problem(
                q, k, None, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale
            )
            p.replays = Replays()
        return p
    return _new_problem(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale)


def _new_problem(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale):
    spec = _spec(pattern, n_heads, partition_len)
    if cu_seqlens is not None and capturing_cuda_graph(q):
        _check_capturable_documents(cu_seqlens, spec, max_seqlen, q.device)
    if cu_seqlens is not None and max_seqlen < 0:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return Problem(
        q, k, spec, head_offset=head_offset, q_offset=q_offset, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen, scale=scale,
    )


def _check_capturable_documents(cu_seqlens: torch.Tensor, spec: BandSpec, max_seqlen: int,
                                device: torch.device) -> None:
    """Packed documents inside a CUDA graph capture: everything the launch reads on the host
    must come from arguments, not from ``cu_seqlens``'s values on the GPU."""
    if cu_seqlens.device != device:
        raise ValueError(
            f"under CUDA graph capture cu_seqlens must be on {device} like q, got {cu_seqlens.device} "
            "(copying it to the GPU is not allowed while capturing)"
        )
    if max_seqlen < 0:
        raise ValueError(
            "under CUDA graph capture packed documents (cu_seqlens) need max_seqlen: finding the "
            "longest document would read cu_seqlens on the host, which a capture does not allow"
        )
    if spec.is_dynamic:
        raise ValueError(
            "a dynamic partition (partition_len='dynamic') with packed documents (cu_seqlens) cannot be "
            "captured in a CUDA graph: each document's bands are computed on the host from its length; "
            "use a fixed partition_len"
        )


@torch.library.custom_op("olmoe_spattn::band_attn", mutates_args=())
def band_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    pattern: str,
    n_heads: int,
    partition_len: int,
    head_offset: int,
    q_offset: int,
    max_seqlen: int,
    scale: float,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Band attention forward: ``(out [B, Tq, H, D], lse [B, H, Tq] fp32)``.

    ``partition_len < 0`` means dynamic; ``max_seqlen < 0`` means unknown.
    """
    q, k, v = _contig(q), _contig(k), _contig(v)
    p = _problem(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale)
    return _launch.run_forward(q, k, v, p)


@band_attn.register_fake
def _(q, k, v, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale,
      deterministic=False):
    b, tq, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, tq), dtype=torch.float32)


@torch.library.custom_op("olmoe_spattn::band_attn_backward", mutates_args=())
def band_attn_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    pattern: str,
    n_heads: int,
    partition_len: int,
    head_offset: int,
    q_offset: int,
    max_seqlen: int,
    scale: float,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`band_attn`."""
    q, k, v, out, grad_out = (_contig(x) for x in (q, k, v, out, grad_out))
    p = _problem(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, max_seqlen, scale)
    return _launch.run_backward(grad_out, q, k, v, out, lse, p, dlse=grad_lse, deterministic=deterministic)


@band_attn_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, pattern, n_heads, partition_len, head_offset,
      q_offset, max_seqlen, scale, deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *meta = inputs  # meta: pattern .. scale, deterministic
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.meta = tuple(meta)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = band_attn_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


band_attn.register_autograd(_backward, setup_context=_setup_context)


class _EagerBandAttn(torch.autograd.Function):
    """The same computation as :func:`band_attn` for eager mode, without the custom op's
    dispatch layers (tens of microseconds a call, which small shapes would feel)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, meta, deterministic):
        q, k, v = _contig(q), _contig(k), _contig(v)
        p = _problem(q, k, cu_seqlens, *meta)
        ctx.deterministic = deterministic
        out, lse = _launch.run_forward(q, k, v, p)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = p
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _launch.run_backward(
            _contig(grad_out), q, k, v, out, lse, ctx.problem, dlse=grad_lse, deterministic=ctx.deterministic
        )
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------- public entry
def _check_kernel_inputs(q, k, v, spec, head_offset, q_offset, cu_seqlens, scale) -> None:
    if torch.compiler.is_compiling() and cu_seqlens is not None:
        check_qkv(q, k, v, spec, head_offset=head_offset)  # value checks would break the graph
    else:
        check_qkv(q, k, v, spec, head_offset=head_offset, cu_seqlens=cu_seqlens)
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"backend='triton' takes dtypes {KERNEL_DTYPES}, got {q.dtype}; use backend='torch' for float64"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' takes head_dim <= {MAX_HEAD_DIM}, got head_dim={q.shape[-1]}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}"
        )
    check_kernel_options(q_offset=q_offset, scale=scale, cu_seqlens=cu_seqlens)


def triton_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    *,
    max_seqlen: int | None = None,
    head_offset: int = 0,
    q_offset: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
):
    """Band attention through the Triton kernel (same contract as ``band_attention``).

    Args:
        q: ``[B, Tq, H, D]`` (fp16, bf16 or fp32; ``D <= 256``); local heads are global
            heads ``head_offset .. head_offset + H - 1`` of ``spec``.
        k, v: ``[B, Tk, Hkv, D]``, ``H % Hkv == 0``.
        max_seqlen: longest document under ``cu_seqlens`` (computed when omitted).
        q_offset: position of query 0 in the key sequence, default ``Tk - Tq``.
        cu_seqlens: int ``[n_docs + 1]`` offsets of packed documents (``B = 1``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the per-row log-sum-exp ``[B, H, Tq]`` (fp32,
            ``-inf`` on empty rows); it is differentiable too.
        deterministic: bit-identical gradients run to run (the two-pass backward without
            atomics); also on whenever ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``out [B, Tq, H, D]``, or ``(out, lse)`` with ``return_lse``.
    """
    if not isinstance(spec, BandSpec):
        raise ValueError(f"spec must be a BandSpec, got {type(spec).__name__}")
    _check_kernel_inputs(q, k, v, spec, head_offset, q_offset, cu_seqlens, scale)
    tq, tk = q.shape[1], k.shape[1]
    meta = (
        spec.pattern, spec.n_heads, -1 if spec.is_dynamic else int(spec.partition_len),
        int(head_offset),
        0 if cu_seqlens is not None else (tk - tq if q_offset is None else int(q_offset)),
        -1 if max_seqlen is None else int(max_seqlen),
        float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
    )
    deterministic = bool(deterministic)
    if torch.compiler.is_compiling() or _USE_OP:
        out, lse = band_attn(q, k, v, cu_seqlens, *meta, deterministic)
    else:
        out, lse = _EagerBandAttn.apply(q, k, v, cu_seqlens, meta, deterministic)
    return (out, lse) if return_lse else out


#: Route eager calls through the custom op too (tests compare the two paths).
_USE_OP = False
