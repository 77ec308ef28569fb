"""``band_attention``: one entry point, several interchangeable backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bands import BandSpec

if TYPE_CHECKING:  # torch loads with the first call, so importing the package stays fast
    import torch

BACKENDS: tuple[str, ...] = ("auto", "triton", "fa4", "flex", "torch")


def triton_available(device: torch.device) -> bool:
    """True when the Triton band kernel can run on ``device`` (CUDA, or the interpreter)."""
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from .kernels import triton_band_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Validates explicit names; maps ``"auto"`` to the rule used where no dispatch table
    applies (``triton`` on CUDA, ``flex`` without Triton, ``torch`` elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton" if triton_available(device) else "flex"
    return "torch"


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: BandSpec,
    backend: str = "auto",
    *,
    head_offset: int = 0,
    q_offset: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Causal band attention following ``spec``.

    Args:
        q: queries ``[B, Tq, H, D]``; ``H`` local heads are global heads
            ``head_offset .. head_offset + H - 1`` of ``spec``.
        k, v: keys and values ``[B, Tk, Hkv, D]`` with ``H % Hkv == 0`` (GQA).
        spec: the band pattern.
        backend: ``"auto"`` (per call the faster of ``triton`` and ``fa4`` on a GPU with a
            measured dispatch table, see :mod:`olmoe_spattn.dispatch`; else Triton on CUDA,
            masked SDPA elsewhere), ``"triton"``, ``"fa4"`` (FlashAttention-4, SM90+),
            ``"flex"`` (FlexAttention) or ``"torch"`` (masked SDPA, runs anywhere).
        head_offset: global index of the first local head (tensor parallelism).
        q_offset: position of the first query inside the key sequence; default
            ``Tk - Tq`` (prefill chunks and decoding against a KV cache).
        cu_seqlens: int ``[n_docs + 1]`` cumulative document lengths of a packed
            ``B = 1`` batch; each document attends only within itself.
        max_seqlen: longest document (optional hint for ``cu_seqlens``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        deterministic: Triton backend: keep the two-pass backward (bit-identical gradients
            run to run) where the one-pass kernels would run (on SM90 the CuTe backward by
            default, ``OLMOE_SPATTN_BWD=one_pass`` elsewhere), whose fp32 dQ adds land in any
            order; also on whenever ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``[B, Tq, H, D]`` in the dtype of ``q``. Rows with no allowed key are zero.
    """
    if not isinstance(spec, BandSpec):
        raise ValueError(f"spec must be a BandSpec, got {type(spec).__name__}")
    from .validation import check_qkv

    check_qkv(q, k, v, spec, head_offset=head_offset, cu_seqlens=cu_seqlens, q_offset=q_offset)
    if cu_seqlens is not None and q_offset not in (None, 0):
        raise ValueError(f"q_offset={q_offset} cannot be combined with cu_seqlens")
    if q.shape[0] == 0:  # an empty batch attends nothing
        resolve_backend(backend, q.device)  # an unknown backend name is still refused
        return q.new_zeros(q.shape)
    if backend == "auto":
        from .dispatch import auto_backend

        name = auto_backend(q, k, spec)
    else:
        name = resolve_backend(backend, q.device)
    kwargs = dict(head_offset=head_offset, q_offset=q_offset, cu_seqlens=cu_seqlens, scale=scale)
    if name == "torch":
        from .reference import sdpa_band_attention

        return sdpa_band_attention(q, k, v, spec, **kwargs)
    if name == "flex":
        from .flex import flex_band_attention

        return flex_band_attention(q, k, v, spec, **kwargs)
    if name == "fa4":
        from .fa4 import fa4_band_attention

        return fa4_band_attention(q, k, v, spec, **kwargs)
    from .kernels import triton_band_attention

    return triton_band_attention(q, k, v, spec, max_seqlen=max_seqlen, deterministic=deterministic, **kwargs)
