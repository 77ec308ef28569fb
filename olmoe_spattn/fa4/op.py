"""``backend="fa4"``: band attention through FlashAttention-4, as ``torch.library`` ops.

``torch.ops.olmoe_spattn.fa4_band_attn`` returns ``(out, lse)`` and
``torch.ops.olmoe_spattn.fa4_band_attn_backward`` returns ``(dq, dk, dv)``; both have fake
implementations and the forward a registered autograd formula, so ``torch.compile`` traces
a model calling :func:`fa4_band_attention` in one graph. Inside, each call runs FA4's
forward/backward kernels (``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd``)
with:

- the ``dense`` pattern with no documents and the default query offset: FA4's own
  causal path;
- everything else: the band ``mask_mod`` (``masks``) on partial tiles plus block-sparse
  tables (``blocks``), cached per geometry. Packed documents (``cu_seqlens``) stay one
  sequence of batch 1; the mask keeps pairs inside a document (FA4's varlen mode has no
  block-sparse backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..bands import DYNAMIC, BandSpec
from ..flex import unattended_kv_rows, zero_kv_rows
from ..flex_blocks import device_key
from ..validation import check_kernel_options, check_qkv
from .blocks import band_aux_tensors, band_block_tables, block_size_for, canonical
from .support import check_fa4, device_arch


@dataclass(frozen=True)
class _Plan:
    """How one call runs on FA4: causal flag, mask, its data, fwd and bwd sparse tensors."""

    causal: bool
    mask_mod: object = None
    aux: list | None = None
    fwd: object = None
    bwd: object = None
    unused_kv: torch.Tensor | None = None  # [R] rows of [B, Tk * Hkv, D] no query of the group attends


def _spec(pattern: str, n_heads: int, partition_len: int) -> BandSpec:
    return BandSpec(pattern, n_heads, DYNAMIC if partition_len < 0 else partition_len)


def _plan(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset) -> _Plan:
    spec = _spec(pattern, n_heads, partition_len)
    tq, tk, h = q.shape[1], k.shape[1], q.shape[2]
    cu = None if cu_seqlens is None else tuple(int(x) for x in cu_seqlens.tolist())
    if spec.pattern == "dense" and cu is None and q_offset == tk - tq:
        return _Plan(causal=True)
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from .masks import band_mask_mod, document_band_mask_mod

    index = q.device.index or 0  # CUDA tensors always carry their device index
    block = block_size_for(device_arch(index), q.shape[-1])
    t = band_block_tables(
        spec, tq, tk, q_offset=q_offset, head_offset=head_offset, n_local_heads=h, cu_seqlens=cu,
        block_size=block, device=q.device,
    )
    aux = band_aux_tensors(
        spec, tk, q_offset=q_offset, head_offset=head_offset, n_local_heads=h, cu_seqlens=cu, device=q.device
    )
    fwd = BlockSparseTensorsTorch(
        mask_block_cnt=t.fwd_mask_cnt, mask_block_idx=t.fwd_mask_idx,
        full_block_cnt=t.fwd_full_cnt, full_block_idx=t.fwd_full_idx, block_size=block,
    )
    bwd = BlockSparseTensorsTorch(
        mask_block_cnt=t.bwd_mask_cnt, mask_block_idx=t.bwd_mask_idx,
        full_block_cnt=t.bwd_full_cnt, full_block_idx=t.bwd_full_idx, block_size=block,
    )
    mask_mod = band_mask_mod() if cu is None else document_band_mask_mod()
    unused = unattended_kv_rows(spec, tq, tk, q_offset, head_offset, h, k.shape[2], cu, device_key(q.device))
    return _Plan(causal=False, mask_mod=mask_mod, aux=list(aux), fwd=fwd, bwd=bwd, unused_kv=unused)


def _without_unattended(plan: _Plan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V with the keys no query attends zeroed: FA4 multiplies their zero weights by V
    inside partially masked blocks, so a NaN there would reach rows that never attend it
    (and their gradients). The gradients of those keys are zero either way."""
    return zero_kv_rows(k, plan.unused_kv), zero_kv_rows(v, plan.unused_kv)


def _interface():
    from flash_attn.cute import interface

    return interface


@torch.library.custom_op("olmoe_spattn::fa4_band_attn", mutates_args=())
def fa4_band_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    pattern: str,
    n_heads: int,
    partition_len: int,
    head_offset: int,
    q_offset: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 band attention forward: ``(out [B, Tq, H, D], lse [B, H, Tq] fp32)``.

    ``partition_len < 0`` means dynamic.
    """
    q, k, v = canonical(q), canonical(k), canonical(v)
    plan = _plan(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset)
    k, v = _without_unattended(plan, k, v)
    out, lse = _interface()._flash_attn_fwd(
        q, k, v,
        softmax_scale=scale,
        causal=plan.causal,
        mask_mod=plan.mask_mod,
        aux_tensors=plan.aux,
        block_sparse_tensors=plan.fwd,
        return_lse=True,
    )[:2]
    return canonical(out), canonical(lse)


@fa4_band_attn.register_fake
def _(q, k, v, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, scale):
    b, tq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, tq), dtype=torch.float32)


@torch.library.custom_op("olmoe_spattn::fa4_band_attn_backward", mutates_args=())
def fa4_band_attn_backward(
    grad_out: torch.Tensor,
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
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`fa4_band_attn`."""
    q, k, v, out, grad_out = (canonical(x) for x in (q, k, v, out, grad_out))
    plan = _plan(q, k, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset)
    k, v = _without_unattended(plan, k, v)
    dq, dk, dv = _interface()._flash_attn_bwd(
        q, k, v, out, grad_out, canonical(lse),
        softmax_scale=scale,
        causal=plan.causal,
        mask_mod=plan.mask_mod,
        aux_tensors=plan.aux,
        block_sparse_tensors=plan.bwd,
    )[:3]
    return canonical(dq), canonical(dk), canonical(dv)


@fa4_band_attn_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, pattern, n_heads, partition_len, head_offset, q_offset, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *meta = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.meta = tuple(meta)


def _backward(ctx, grad_out, grad_lse):
    del grad_lse  # lse is internal to band_attention; it never carries a gradient
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = fa4_band_attn_backward(grad_out, q, k, v, out, lse, cu_seqlens, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None, None


fa4_band_attn.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry
def fa4_band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    *,
    head_offset: int = 0,
    q_offset: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Band attention through FlashAttention-4 (same contract as ``band_attention``).

    Args:
        q: ``[B, Tq, H, D]`` float16/bfloat16 on an SM90+ GPU (``D`` a multiple of 8,
            ``8..256`` on Hopper, ``8..128`` on Blackwell); local heads are global heads
            ``head_offset .. head_offset + H - 1`` of ``spec``.
        k, v: ``[B, Tk, Hkv, D]``, ``H % Hkv == 0``.
        q_offset: position of query 0 in the key sequence, default ``Tk - Tq``.
        cu_seqlens: int ``[n_docs + 1]`` offsets of packed documents (``B = 1``).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, Tq, H, D]``; rows with no allowed key are zero (zero gradient).

    Raises:
        ImportError: flash-attn-4 is not installed (``pip install "olmoe-spattn[fa4]"``).
        ValueError: CPU tensors, float32/64, a GPU older than SM90, or a head_dim FA4 does
            not take.
    """
    if not isinstance(spec, BandSpec):
        raise ValueError(f"spec must be a BandSpec, got {type(spec).__name__}")
    if torch.compiler.is_compiling() and cu_seqlens is not None:
        check_qkv(q, k, v, spec, head_offset=head_offset)  # value checks would break the graph
    else:
        check_qkv(q, k, v, spec, head_offset=head_offset, cu_seqlens=cu_seqlens)
    check_kernel_options(q_offset=q_offset, scale=scale, cu_seqlens=cu_seqlens)
    check_fa4(q)
    tq, tk = q.shape[1], k.shape[1]
    offset = 0 if cu_seqlens is not None else (tk - tq if q_offset is None else int(q_offset))
    if offset < 0:
        raise ValueError(f"q_offset={offset}: queries ({tq}) cannot outnumber keys ({tk}) without an explicit offset")
    out, _ = fa4_band_attn(
        q, k, v, cu_seqlens,
        spec.pattern, spec.n_heads, -1 if spec.is_dynamic else int(spec.partition_len),
        int(head_offset), offset,
        float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
    )
    return out
