"""Triton band-attention kernels (forward, backward, decode) and their ``torch.library`` op.

``triton_band_attention(q, k, v, spec, ...)`` computes any :class:`~olmoe_spattn.BandSpec`
pattern exactly, visiting only the key blocks each head's distance intervals intersect.
Importing this package needs no GPU; running it needs CUDA, or ``TRITON_INTERPRET=1`` set
before Triton is first imported (Triton fixes compiled vs interpreted at definition time).
"""

from __future__ import annotations

from .op import band_attn, band_attn_backward, triton_band_attention

__all__ = ["band_attn", "band_attn_backward", "triton_band_attention"]
