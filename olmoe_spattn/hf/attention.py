"""The band attention function that transformers calls for ``olmoe_spattn`` models.

Registered under :data:`ATTN_IMPLEMENTATION` with transformers' ``AttentionInterface``
(the attention itself) and ``AttentionMaskInterface`` (the mask builder: transformers'
SDPA mask builder, which returns ``None`` when the batch has no padding so the fast
path runs).

* No padding mask: :func:`olmoe_spattn.band_attention` with ``backend="auto"``
  (Triton on CUDA, masked SDPA on CPU) and ``q_offset = Tk - Tq``, so a prefill chunk
  or a decoding step against the KV cache sees exactly the keys a full forward pass
  would give it.
* A padding mask (a batch of different lengths): the band mask AND the padding mask
  through masked SDPA. Band distances are index differences, and padding shifts query
  and key indices alike, so left or right padding does not change any real token's
  band.
* ``partition_len="dynamic"`` re-derives ``N`` from each call's key length; against a
  KV cache (``Tk > Tq``) or with padding that would silently differ from a full
  forward pass over the real tokens, so both raise ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..api import band_attention
from ..bands import BandSpec

#: transformers passes the model's ``config.attention_backend`` through this attribute.
DEFAULT_BACKEND = "auto"


def _spec_of(module: torch.nn.Module) -> BandSpec:
    config = getattr(module, "config", None)
    band_spec = getattr(config, "band_spec", None)
    if band_spec is None:
        raise ValueError(
            "the olmoe_spattn attention function needs a module whose config is an "
            f"OlmoeSpattnConfig, got {type(config).__name__}"
        )
    return band_spec()


def _allowed_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A transformers 4D mask (bool or additive float) as bool ``[B, 1|H, Tq, Tk]``."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def _masked_band_sdpa(
    query: torch.Tensor,  # [B, H, Tq, D]
    key: torch.Tensor,  # [B, H, Tk, D] (kv heads already expanded)
    value: torch.Tensor,  # [B, H, Tk, D]
    band: torch.Tensor,  # [H, Tq, Tk] bool
    allowed: torch.Tensor,  # [B, 1|H, Tq, Tk] bool
    scaling: float,
) -> torch.Tensor:
    mask = band[None] & allowed  # [B, H, Tq, Tk]
    has_key = mask.any(dim=-1, keepdim=True)  # [B, H, Tq, 1]
    safe = mask.clone()
    safe[..., 0] |= ~has_key[..., 0]  # a dummy key keeps empty rows finite; zeroed below
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=safe, scale=scaling)
    return out * has_key.to(out.dtype)  # [B, H, Tq, D]


def band_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, Tq, D]``, ``key/value [B, Hkv, Tk, D]``.

    Returns ``(out [B, Tq, H, D], None)`` as transformers expects (no attention weights).
    """
    if dropout:
        raise ValueError(f"attention dropout={dropout} is not supported by band attention; use 0.0")
    spec = _spec_of(module)
    tq, tk = query.shape[2], key.shape[2]
    if spec.is_dynamic and tk != tq:
        raise ValueError(
            "partition_len='dynamic' re-derives the band partition from each call's length, "
            f"so decoding against a KV cache (query length {tq}, key length {tk}) cannot match a "
            "full forward pass; generate with use_cache=False, or convert with a fixed partition_len"
        )
    backend = getattr(module.config, "attention_backend", DEFAULT_BACKEND) or DEFAULT_BACKEND
    if attention_mask is None:
        out = band_attention(
            query.transpose(1, 2),  # [B, Tq, H, D]
            key.transpose(1, 2),  # [B, Tk, Hkv, D]
            value.transpose(1, 2),
            spec,
            backend=backend,
            q_offset=tk - tq,
            scale=scaling,
        )
        return out, None
    allowed = _allowed_from_mask(attention_mask)
    if spec.is_dynamic and not bool(allowed.any(dim=-2).all()):
        raise ValueError(
            "partition_len='dynamic' cannot run on a padded batch: the padded length would set "
            "the partition; evaluate with batch size 1 or convert with a fixed partition_len"
        )
    n_heads = query.shape[1]
    groups = n_heads // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)  # [B, H, Tk, D]
        value = value.repeat_interleave(groups, dim=1)
    band = spec.mask(tk, q_len=tq, q_offset=tk - tq, device=query.device)  # [H, Tq, Tk]
    out = _masked_band_sdpa(query, key, value, band, allowed, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None  # [B, Tq, H, D]


def register_attention() -> None:
    """Registers the attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .configuration import ATTN_IMPLEMENTATION

    AttentionInterface.register(ATTN_IMPLEMENTATION, band_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
