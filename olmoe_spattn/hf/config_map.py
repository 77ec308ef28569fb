"""Model hyper-parameters between OLMo-core's ``TransformerConfig`` and ``OlmoeSpattnConfig``.

Only the architecture transformers' FlexOlmo can express is accepted (OLMo-core's
OLMoE preset: ``moe_reordered_norm`` blocks, q/k RMS-norm over all heads, full RoPE,
softmax router); anything else raises ``ValueError`` naming the field, rather than
producing a HF model that computes something different.
"""

from __future__ import annotations

from typing import Any

from ..bands import BandSpec
from .configuration import OlmoeSpattnConfig
from .state import MoEShape


def _name(value: Any) -> str:
    """Enum or string -> plain string."""
    return str(getattr(value, "value", value))


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"cannot convert to Hugging Face: {what}")


def band_spec_of_model_config(model_config: Any) -> BandSpec:
    """The band of an OLMo-core model config (``dense`` for plain attention).

    Uses :func:`olmoe_spattn.olmo.band_spec_of` (the OLMo-core integration); a config
    whose attention it does not know is an error, never "dense".
    """
    att = model_config.block.sequence_mixer
    n_heads = int(att.n_heads)
    try:
        from ..olmo import band_spec_of
    except ImportError:
        band_spec_of = None
    if band_spec_of is not None:
        spec = band_spec_of(model_config)
        return BandSpec("dense", n_heads, n_heads) if spec is None else spec
    if type(att).__name__ == "AttentionConfig":
        return BandSpec("dense", n_heads, n_heads)
    raise ValueError(f"cannot tell the attention pattern of sequence mixer {type(att).__name__}")


def moe_shape_of(model_config: Any) -> MoEShape:
    """Sizes and expert layout of an OLMo-core OLMoE config."""
    moe = model_config.block.feed_forward_moe
    _require(moe is not None, "the model has no MoE feed-forward (feed_forward_moe is None)")
    return MoEShape(
        n_layers=int(model_config.n_layers),
        d_model=int(model_config.d_model),
        num_experts=int(moe.num_experts),
        expert_hidden=int(moe.hidden_size),
        layout=_name(moe.name),
    )


def hf_config_from_olmo_core(
    model_config: Any,
    *,
    spec: BandSpec | None = None,
    max_position_embeddings: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> OlmoeSpattnConfig:
    """Builds the HF config of an OLMo-core OLMoE ``TransformerConfig``."""
    spec = band_spec_of_model_config(model_config) if spec is None else spec
    block = model_config.block
    _require(not isinstance(block, dict), "per-layer block dicts are not supported")
    _require(not model_config.block_overrides, "block_overrides are not supported")
    _require(model_config.embedding_norm is None, "embedding_norm is not supported")
    _require(model_config.embed_scale is None, "embed_scale is not supported")
    _require(_name(block.name) == "moe_reordered_norm", f"block type {_name(block.name)!r} (need 'moe_reordered_norm')")
    att = block.sequence_mixer
    n_heads = int(att.n_heads)
    d_model = int(model_config.d_model)
    _require(att.head_dim in (None, d_model // n_heads), f"head_dim={att.head_dim}")
    _require(not att.bias, "attention bias")
    _require(att.clip_qkv is None, f"clip_qkv={att.clip_qkv}")
    _require(att.qk_norm is not None and not att.use_head_qk_norm, "q/k norm must be RMS over all heads")
    _require(getattr(att, "gate", None) is None, "gated attention")
    _require(getattr(att, "sliding_window", None) is None, "sliding-window attention")
    rope = att.rope
    _require(rope is not None and _name(rope.name) == "default" and rope.scaling is None, "RoPE must be plain (no scaling)")
    _require(float(rope.partial_rotary_factor or 1.0) == 1.0, "partial RoPE")
    eps = float(block.layer_norm.eps)
    _require(float(att.qk_norm.eps) == eps, f"q/k norm eps {att.qk_norm.eps} != layer norm eps {eps}")
    head_norm = model_config.lm_head.layer_norm
    _require(head_norm is not None and float(head_norm.eps) == eps, "LM head norm must match the block norm eps")
    moe = block.feed_forward_moe
    shape = moe_shape_of(model_config)
    router = moe.router
    _require(_name(router.gating_function) == "softmax", f"router gating {_name(router.gating_function)!r}")
    _require(router.normalize_expert_weights in (None, 1.0), f"normalize_expert_weights={router.normalize_expert_weights}")
    _require(getattr(moe, "shared_mlp", None) is None, "shared expert MLP")
    _require(spec.n_heads == n_heads, f"band spec has {spec.n_heads} heads, model has {n_heads}")
    if max_position_embeddings is None:
        max_position_embeddings = spec.partition_len if isinstance(spec.partition_len, int) and spec.pattern != "dense" else 4096
    return OlmoeSpattnConfig(
        vocab_size=int(model_config.vocab_size),
        hidden_size=d_model,
        intermediate_size=shape.expert_hidden,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=int(att.n_kv_heads or n_heads),
        rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.theta)},
        num_experts=shape.num_experts,
        num_experts_per_tok=int(router.top_k),
        norm_topk_prob=router.normalize_expert_weights is not None,
        tie_word_embeddings=bool(model_config.tie_word_embeddings),
        max_position_embeddings=int(max_position_embeddings),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        attention_pattern=spec.pattern,
        partition_len=spec.partition_len,
        band_n_heads=spec.n_heads,
        olmo_core_expert_layout=shape.layout,
    )


def moe_shape_of_hf(config: OlmoeSpattnConfig) -> MoEShape:
    """Sizes and OLMo-core expert layout recorded in a HF config."""
    return MoEShape(
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        num_experts=config.num_experts,
        expert_hidden=config.intermediate_size,
        layout=config.olmo_core_expert_layout,
    )
