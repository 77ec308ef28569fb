"""Model hyper-parameters between OLMo-core's ``TransformerConfig`` and transformers configs.

Two architectures are accepted: OLMo-core's OLMoE preset (``moe_reordered_norm`` blocks:
transformers' FlexOlmo, our ``olmoe_spattn``) and the released OLMoE checkpoints
(pre-norm ``moe`` blocks: transformers' ``olmoe``, our ``olmoe_spattn_prenorm``); both with
q/k RMS-norm over all heads, full RoPE and a softmax router. Anything else raises
``ValueError`` naming the field, rather than producing a HF model that computes something
different. (OLMo-core's ``get_hf_config`` maps MoE models only to FlexOlmo and checks
neither norms nor the router, so these configs are built and checked here; its result is
used for the stock FlexOlmo format.)
"""

from __future__ import annotations

from typing import Any

import torch

from ..bands import BandSpec
from .configuration import OlmoeSpattnConfig, OlmoeSpattnPrenormConfig
from .state import MoEShape

#: OLMo-core block names -> (band HF config class, stock transformers model_type).
BLOCKS = {"moe_reordered_norm": "flex_olmo", "moe": "olmoe"}
#: ``convert to-hf --format`` values.
HF_FORMATS = ("spattn", "olmoe", "flex_olmo")


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
    fmt: str = "spattn",
    max_position_embeddings: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> OlmoeSpattnConfig:
    """Builds the HF config of an OLMo-core OLMoE ``TransformerConfig``.

    ``fmt``: ``spattn`` (our band model types, any attention), ``olmoe`` (stock transformers
    OLMoE: a dense pre-norm model) or ``flex_olmo`` (stock FlexOlmo: a dense reordered-norm one).
    """
    if fmt not in HF_FORMATS:
        raise ValueError(f"unknown Hugging Face format {fmt!r}; allowed: {', '.join(HF_FORMATS)}")
    spec = band_spec_of_model_config(model_config) if spec is None else spec
    block = model_config.block
    _require(not isinstance(block, dict), "per-layer block dicts are not supported")
    _require(not model_config.block_overrides, "block_overrides are not supported")
    _require(model_config.embedding_norm is None, "embedding_norm is not supported")
    _require(model_config.embed_scale is None, "embed_scale is not supported")
    block_name = _name(block.name)
    _require(block_name in BLOCKS, f"block type {block_name!r} (need one of: {', '.join(BLOCKS)})")
    if fmt != "spattn":
        _require(spec.pattern == "dense", f"--format {fmt} holds dense attention only; this model uses "
                 f"{spec.pattern!r} (toggle it to dense first, or use --format spattn)")
        _require(BLOCKS[block_name] == fmt, f"--format {fmt}: this model's {block_name!r} blocks are "
                 f"transformers' {BLOCKS[block_name]!r} architecture; use --format {BLOCKS[block_name]}")
    att = block.sequence_mixer
    n_heads = int(att.n_heads)
    d_model = int(model_config.d_model)
    _require(att.head_dim in (None, d_model // n_heads), f"head_dim={att.head_dim}")
    _require(not att.bias, "attention bias")
    _require(att.clip_qkv is None, f"clip_qkv={att.clip_qkv}")  # OLMo-core clips before q/k norm, HF after
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
    common = dict(
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
    )
    if fmt == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(**common, architectures=["OlmoeForCausalLM"])
    if fmt == "flex_olmo":
        from olmo_core.nn.hf.config import get_hf_config

        with torch.device("meta"):
            hf = get_hf_config(model_config.build(init_device="meta"))
        for key, value in common.items():  # what OLMo-core leaves unset (token ids, context, ...)
            setattr(hf, key, value)
        hf.architectures = ["FlexOlmoForCausalLM"]
        return hf
    cls = OlmoeSpattnConfig if block_name == "moe_reordered_norm" else OlmoeSpattnPrenormConfig
    return cls(
        **common,
        attention_pattern=spec.pattern,
        partition_len=spec.partition_len,
        band_n_heads=spec.n_heads,
        olmo_core_expert_layout=shape.layout,
    )


def moe_shape_of_hf(config: Any) -> MoEShape:
    """Sizes and OLMo-core expert layout of a HF config (stock configs: ``dropless``)."""
    return MoEShape(
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        num_experts=config.num_experts,
        expert_hidden=config.intermediate_size,
        layout=getattr(config, "olmo_core_expert_layout", "dropless"),
    )


def olmo_core_config_from_hf(
    config: Any,
    *,
    attention: str | None = None,
    partition_len: int | str | None = None,
    backend: str | None = None,
) -> Any:
    """The OLMo-core ``TransformerConfig`` of a HF config (``olmoe``, ``flex_olmo`` or ours).

    The model's own attention is kept unless ``attention`` is given; a band pattern on a dense
    source needs ``partition_len`` (the training sequence length, or ``"dynamic"``).
    """
    from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

    model_type = config.model_type
    prenorm = model_type in ("olmoe", OlmoeSpattnPrenormConfig.model_type)
    _require(model_type in ("olmoe", "flex_olmo", OlmoeSpattnConfig.model_type, OlmoeSpattnPrenormConfig.model_type),
             f"model_type {model_type!r}")
    _require(getattr(config, "clip_qkv", None) is None, f"clip_qkv={getattr(config, 'clip_qkv', None)}")
    _require(not getattr(config, "attention_bias", False), "attention bias")
    rope = getattr(config, "rope_parameters", None) or {}
    _require(rope.get("rope_type", "default") == "default", f"RoPE type {rope.get('rope_type')!r} (need plain RoPE)")
    model_config = TransformerConfig.olmoe_1B_7B(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        rope_theta=int(rope.get("rope_theta", 500_000)),
        block_name=TransformerBlockType.moe if prenorm else TransformerBlockType.moe_reordered_norm,
    )
    block = model_config.block
    att = block.sequence_mixer
    if config.num_key_value_heads != config.num_attention_heads:
        att.n_kv_heads = config.num_key_value_heads
    eps = float(config.rms_norm_eps)
    block.layer_norm.eps = eps
    att.qk_norm.eps = eps
    model_config.lm_head.layer_norm.eps = eps
    moe = block.feed_forward_moe
    moe.num_experts = config.num_experts
    moe.hidden_size = config.intermediate_size
    moe.name = getattr(config, "olmo_core_expert_layout", "dropless")
    moe.router.top_k = config.num_experts_per_tok
    moe.router.normalize_expert_weights = 1.0 if config.norm_topk_prob else None
    model_config.tie_word_embeddings = bool(config.tie_word_embeddings)
    own = config.band_spec() if hasattr(config, "band_spec") else None
    if attention is None:
        attention = own.pattern if own is not None else "dense"
    if partition_len is None and own is not None and own.pattern != "dense":
        partition_len = own.partition_len
    if attention == "dense":
        return model_config
    from ..olmo import with_attention

    if partition_len is None:
        raise ValueError(
            f"attention {attention!r} needs a partition length: pass --partition-len (normally the "
            "training sequence length, or 'dynamic')"
        )
    return with_attention(model_config, attention, partition_len, backend or getattr(config, "attention_backend", "auto"))
