"""Reference attention: the boolean oracle in float64, and the masked-SDPA backend.

``reference_attention`` defines correctness for every backend: it materialises the
``[H, Tq, Tk]`` mask from :meth:`BandSpec.mask` and computes softmax attention in
float64. ``sdpa_band_attention`` is the ``"torch"`` backend: the same mask fed to
``torch.nn.functional.scaled_dot_product_attention`` in the input dtype, with
autograd, on any device. Both are O(T^2) in memory by design.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .bands import BandSpec
from .validation import check_qkv, document_spans


def band_mask_for(
    spec: BandSpec,
    tq: int,
    tk: int,
    *,
    q_offset: int,
    head_offset: int,
    n_local_heads: int,
    device: torch.device,
) -> torch.Tensor:
    """Mask ``[H_local, Tq, Tk]`` for queries at ``q_offset..q_offset+Tq-1``."""
    return spec.mask(
        tk,
        q_len=tq,
        q_offset=q_offset,
        head_offset=head_offset,
        n_local_heads=n_local_heads,
        device=device,
    )


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, Hkv, D] -> [B, T, H, D]``: query head h reads kv head h // (H // Hkv)."""
    groups = n_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _segments(q, k, cu_seqlens, q_offset):
    """Yields (batch, q_slice, k_slice, q_offset) for each independent attention segment."""
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            yield b, slice(0, q.shape[1]), slice(0, k.shape[1]), q_offset
    else:
        for start, end in document_spans(cu_seqlens):
            yield 0, slice(start, end), slice(start, end), 0


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    *,
    head_offset: int = 0,
    q_offset: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 band attention; returns ``(out [B, Tq, H, D], lse [B, H, Tq])``.

    Empty rows (no allowed key) give zero output and ``lse = -inf``. ``q_offset`` places
    the queries inside the key sequence (default: the last ``Tq`` key positions).
    ``cu_seqlens`` (int, ``[n_docs + 1]``) splits a packed ``B = 1`` batch into documents
    that attend only within themselves, each with its own distances. Output is float64
    and differentiable (empty rows get zero gradient), so it is the gradient oracle too.
    """
    check_qkv(q, k, v, spec, head_offset=head_offset, cu_seqlens=cu_seqlens, q_offset=q_offset)
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    h = q.shape[2]
    k64, v64 = _expand_kv(k64, h), _expand_kv(v64, h)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tq, tk = q.shape[1], k.shape[1]
    default_offset = tk - tq if q_offset is None else q_offset
    outs, lses = [], []
    for bi, qs, ks, off in _segments(q, k, cu_seqlens, default_offset):
        qq = q64[bi, qs].transpose(0, 1)  # [H, Tq, D]
        kk = k64[bi, ks].transpose(0, 1)  # [H, Tk, D]
        vv = v64[bi, ks].transpose(0, 1)  # [H, Tk, Dv]
        mask = band_mask_for(
            spec, qq.shape[1], kk.shape[1], q_offset=off, head_offset=head_offset,
            n_local_heads=h, device=q.device,
        )  # [H, Tq, Tk]
        scores = (torch.einsum("hqd,hkd->hqk", qq, kk) * scale).masked_fill(~mask, float("-inf"))
        has_key = mask.any(dim=-1, keepdim=True)  # [H, Tq, 1]
        row_max = torch.where(has_key, scores.amax(dim=-1, keepdim=True), 0.0).detach()
        weights = torch.exp(scores - row_max)  # exactly 0 where masked, finite gradients
        total = weights.sum(dim=-1, keepdim=True)  # [H, Tq, 1]
        out = torch.einsum("hqk,hkd->hqd", weights, vv) / torch.where(has_key, total, 1.0)
        outs.append(out.transpose(0, 1))  # [Tq, H, Dv]
        lses.append((torch.log(total) + row_max).squeeze(-1))  # [H, Tq]; -inf on empty rows
    if cu_seqlens is None:
        return torch.stack(outs), torch.stack(lses)
    return torch.cat(outs)[None], torch.cat(lses, dim=-1)[None]


def sdpa_band_attention(
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
    """The ``"torch"`` backend: masked SDPA in the input dtype, differentiable.

    Same arguments as :func:`reference_attention`; returns ``[B, Tq, H, D]``. Rows with
    no allowed key are computed against one dummy key and then zeroed, so outputs and
    gradients stay finite (zero) there. A NaN or Inf in a key or value reaches exactly the
    rows that attend it (as NaN), never the others: such keys are zeroed before SDPA, whose
    matmuls would otherwise carry them into every row.
    """
    check_qkv(q, k, v, spec, head_offset=head_offset, cu_seqlens=cu_seqlens, q_offset=q_offset)
    h = q.shape[2]
    tq, tk = q.shape[1], k.shape[1]
    default_offset = tk - tq if q_offset is None else q_offset
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    outs = []
    for bi, qs, ks, off in _segments(q, k, cu_seqlens, default_offset):
        qq = q[bi : bi + 1, qs].transpose(1, 2)  # [1, H, Tq, D]
        kk = k[bi : bi + 1, ks].transpose(1, 2)  # [1, H, Tk, D]
        vv = v[bi : bi + 1, ks].transpose(1, 2)
        mask = band_mask_for(
            spec, qq.shape[2], kk.shape[2], q_offset=off, head_offset=head_offset,
            n_local_heads=h, device=q.device,
        )  # [H, Tq, Tk]
        has_key = mask.any(dim=-1, keepdim=True)  # [H, Tq, 1]
        # SDPA adds the mask to the scores and multiplies the weights by V, so one NaN/Inf key
        # or value would reach every row; such keys are zeroed and only the rows that attend
        # them get NaN, as exact attention gives
        bad = ~(torch.isfinite(kk).all(dim=-1) & torch.isfinite(vv).all(dim=-1))  # [1, H, Tk]
        reached = None
        if bad.any():
            reached = (mask[None] & bad[:, :, None, :]).any(dim=-1, keepdim=True)  # [1, H, Tq, 1]
            kk, vv = kk.masked_fill(bad[..., None], 0), vv.masked_fill(bad[..., None], 0)
        safe_mask = mask.clone()
        safe_mask[..., 0] |= ~has_key[..., 0]
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=safe_mask[None], scale=scale)
        o = o * has_key[None].to(o.dtype)  # [1, H, Tq, D]
        if reached is not None:
            o = o.masked_fill(reached, float("nan"))
        outs.append(o.transpose(1, 2))  # [1, Tq, H, D]
    if not outs:  # empty batch
        return q.new_zeros(q.shape)
    if cu_seqlens is None:
        return torch.cat(outs, dim=0)
    return torch.cat(outs, dim=1)
