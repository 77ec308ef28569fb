"""The attention variants ``bench kernel`` times: band backends and dense causal baselines.

Every variant is a function ``(q, k, v) -> out`` on ``[B, T, H, D]`` tensors, or ``None``
with the reason it cannot run here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..bands import BandSpec
from .kernel import BAND_BACKENDS, Shape
from .timing import describe_error

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dense_sdpa_fn(kind: str) -> AttnFn:
    """Dense causal SDPA on ``[B, T, H, D]`` tensors, pinned to one SDPA backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {"cudnn_dense": SDPBackend.CUDNN_ATTENTION, "flash_dense": SDPBackend.FLASH_ATTENTION}.get(kind)

    def fn(q, k, v):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, T, D] views
        if pinned is None:
            out = F.scaled_dot_product_attention(*args, is_causal=True)
        else:
            with sdpa_kernel(pinned):
                out = F.scaled_dot_product_attention(*args, is_causal=True)
        return out.transpose(1, 2)  # [B, T, H, D]

    return fn


def triton_status() -> tuple[bool, str]:
    """Whether our Triton kernel is importable (``olmoe_spattn.kernels.triton_band_attention``)."""
    try:
        from ..kernels import triton_band_attention  # noqa: F401
    except Exception as err:  # noqa: BLE001 - missing module or a broken partial kernel
        return False, f"not available ({describe_error(err)})"
    return True, "ok"


def ours_backward(spec: BandSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> str:
    """The backward schedule our kernel takes for these tensors (``cute``, ``one_pass`` or
    ``two_pass``): which kernels the ``ours`` rows timed, recorded with them."""
    from ..kernels import launch
    from ..kernels.common import Problem

    p = Problem(q, k, spec, head_offset=0, q_offset=0, cu_seqlens=None, max_seqlen=q.shape[1],
                scale=q.shape[-1] ** -0.5)
    if launch.use_cute_backward(p, False, q, k, v, dout, dout):
        return "cute"
    return "one_pass" if launch.use_one_pass(False) else "two_pass"


def build_band_fn(
    backend: str, spec: BandSpec, shape: Shape, device: torch.device, fa4_ok: tuple[bool, str]
) -> tuple[AttnFn | None, str]:
    """(function, "ok") for a band backend, or (None, reason it cannot run here)."""
    from ..api import band_attention

    b, h, t, d = shape
    if backend == "ours":
        ok, why = triton_status()
        if not ok:
            return None, why
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return None, "not available (Triton needs CUDA or TRITON_INTERPRET=1)"
        return (lambda q, k, v: band_attention(q, k, v, spec, backend="triton")), "ok"
    if backend == "flex":
        return (lambda q, k, v: band_attention(q, k, v, spec, backend="flex")), "ok"
    if backend == "torch":
        mask_bytes = 10 * h * t * t  # bool mask + the float bias SDPA may expand it to
        if device.type == "cuda" and mask_bytes > 0.4 * torch.cuda.mem_get_info(device)[0]:
            return None, f"skipped: dense [H,T,T] mask needs ~{mask_bytes / 2**30:.0f} GiB"
        return (lambda q, k, v: band_attention(q, k, v, spec, backend="torch")), "ok"
    if backend == "fa4":
        if not fa4_ok[0]:
            return None, f"not available ({fa4_ok[1]})"
        from .fa4 import make_fa4_band_fn

        try:
            return make_fa4_band_fn(spec, t, h, device), "ok"
        except Exception as err:  # noqa: BLE001
            return None, f"error: {describe_error(err)}"
    raise ValueError(f"unknown band backend {backend!r}; allowed: {', '.join(BAND_BACKENDS)}")


def build_dense_fn(backend: str, device: torch.device) -> tuple[AttnFn | None, str]:
    """(function, "ok") for a dense causal baseline, or (None, reason)."""
    if backend in ("cudnn_dense", "flash_dense") and device.type != "cuda":
        return None, "not available (needs CUDA)"
    return dense_sdpa_fn(backend), "ok"


def supports_backward(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether the variant has a backward on ``device`` (and why not)."""
    if backend == "flex" and device.type == "cpu":
        return False, "no CPU backward in torch's FlexAttention"
    return True, ""
