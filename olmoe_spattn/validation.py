"""Input checks shared by every attention backend: clear ``ValueError``s, never a fallback."""

from __future__ import annotations

import torch

from .bands import BandSpec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    *,
    head_offset: int = 0,
    cu_seqlens: torch.Tensor | None = None,
    q_offset: int | None = None,
) -> None:
    """Validates ``q [B, Tq, H, D]``, ``k, v [B, Tk, Hkv, D]`` against ``spec``.

    Raises ``ValueError`` naming the offending value and what is allowed.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} is not supported; allowed: {SUPPORTED_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, _, h, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"q has batch {b} but k has batch {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"q has head_dim {d} but k has head_dim {k.shape[3]}")
    h_kv = k.shape[2]
    if h < 1 or h_kv < 1:
        raise ValueError(f"q and k need at least one head, got {h} query heads and {h_kv} kv heads")
    if h % h_kv != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({h_kv}) for GQA")
    if isinstance(head_offset, bool) or not isinstance(head_offset, int):
        raise ValueError(f"head_offset must be an integer, got {head_offset!r} ({type(head_offset).__name__})")
    if head_offset < 0 or head_offset + h > spec.n_heads:
        raise ValueError(
            f"head_offset={head_offset} with {h} local heads exceeds the spec's n_heads={spec.n_heads}"
        )
    if q_offset is not None:
        check_q_offset(q_offset, q_len=q.shape[1], kv_len=k.shape[1])
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, total=q.shape[1], batch=b)
        if k.shape[1] != q.shape[1]:
            raise ValueError("with cu_seqlens, q and k must have the same (packed) length")


def check_kernel_options(*, q_offset: object, scale: object, cu_seqlens: torch.Tensor | None) -> None:
    """The kernel backends' checks of ``q_offset`` (a non-negative integer, none with packed
    documents) and ``scale`` (positive), before ``q_offset`` is known against the key length."""
    if cu_seqlens is not None and q_offset not in (None, 0):
        raise ValueError(f"q_offset={q_offset} cannot be combined with cu_seqlens")
    if q_offset is not None and (isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0):
        raise ValueError(f"q_offset must be a non-negative integer, got {q_offset!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")


def check_q_offset(q_offset: object, *, q_len: int, kv_len: int) -> None:
    """Queries sit at key positions ``q_offset .. q_offset + q_len - 1``: all must exist."""
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or not 0 <= q_offset <= kv_len - q_len:
        raise ValueError(
            f"q_offset={q_offset!r} is out of range: the {q_len} queries sit at key positions "
            f"q_offset..q_offset+{q_len - 1} of the {kv_len} keys, so allowed: an integer in "
            f"[0, {kv_len - q_len}]" + (" (q is longer than k: no offset fits)" if q_len > kv_len else "")
        )


def capturing_cuda_graph(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s GPU: reading a
    GPU tensor's values on the host (``tolist``, ``item``) is then not allowed."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_cu_seqlens(cu_seqlens: torch.Tensor, *, total: int, batch: int) -> None:
    """``cu_seqlens`` must be an int tensor ``[n_docs + 1]`` from 0 to ``total``, non-decreasing.

    While a CUDA graph is captured only its type and shape are checked: its values live on the
    GPU, and reading them would wait for the GPU, which a capture does not allow."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(
            f"cu_seqlens must be a 1-D integer torch.Tensor [n_docs + 1], got {type(cu_seqlens).__name__}"
        )
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed to size 1, got batch={batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor [n_docs + 1], got {cu_seqlens.dtype} "
            f"shape {tuple(cu_seqlens.shape)}"
        )
    if capturing_cuda_graph(cu_seqlens):
        return
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the packed length {total}, got {values[:8]}"
            + ("..." if len(values) > 8 else "")
        )


def document_spans(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """Non-empty ``(start, end)`` spans of the packed documents."""
    values = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(values, values[1:]) if b > a]
