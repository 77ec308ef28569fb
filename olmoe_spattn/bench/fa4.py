"""FlashAttention-4 rows of the kernel benchmark: ``band_attention(..., backend="fa4")``.

The benchmark times exactly the backend ``auto`` can pick (``olmoe_spattn.fa4``: the band
as a CuTe ``mask_mod`` plus block-sparse tables built from the band's intervals, cached
per geometry), so its results can be turned into a dispatch table. Nothing here imports
flash-attn-4 unless it is installed; :func:`fa4_available` says whether it can run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..bands import BandSpec


def fa4_available() -> tuple[bool, str]:
    """(can run, reason): FA4 needs flash-attn-4 and an SM90+ CUDA GPU."""
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    from ..fa4.support import FA4_ARCH_MAJORS, device_arch, fa4_import_error

    why = fa4_import_error()
    if why:
        return False, f"flash_attn.cute not importable ({why})"
    arch = device_arch(torch.cuda.current_device())
    if arch // 10 not in FA4_ARCH_MAJORS:
        return False, f"needs compute capability 9.0, 10.x or 11.x, this GPU is {arch // 10}.{arch % 10}"
    return True, "ok"


def make_fa4_band_fn(
    spec: BandSpec, seq_len: int, n_heads: int, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function ``(q, k, v) -> out`` (all ``[B, T, H, D]``) running ``backend="fa4"`` with ``spec``.

    ``seq_len``, ``n_heads`` and ``device`` describe the benchmarked geometry (self-attention);
    the block tables are built on the first call and cached.
    """
    from ..fa4 import fa4_band_attention

    del seq_len, n_heads, device

    def fa4_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fa4_band_attention(q, k, v, spec)

    return fa4_band
