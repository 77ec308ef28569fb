"""Model presets, the dense <-> band toggle and a CPU-safe model builder."""

from __future__ import annotations

import copy
import warnings
from typing import Union

import torch
from olmo_core.nn.attention import AttentionConfig
from olmo_core.nn.moe import MoEType
from olmo_core.nn.transformer import Transformer, TransformerBlockConfig, TransformerConfig

from ..api import BACKENDS
from ..bands import PATTERNS, BandSpec
from .config import BandAttentionConfig

#: Values accepted by :func:`with_attention` (and the recipes' ``attention:`` key).
ATTENTIONS: tuple[str, ...] = PATTERNS  # "dense" plus the four band patterns

PartitionLen = Union[int, str, None]


def _block_configs(config: TransformerConfig) -> list[TransformerBlockConfig]:
    """Every block config object held by ``config`` (``block``, named blocks, overrides)."""
    blocks: list[TransformerBlockConfig] = []
    if isinstance(config.block, dict):
        blocks.extend(config.block.values())
    else:
        blocks.append(config.block)
    if config.block_overrides:
        blocks.extend(config.block_overrides.values())
    return blocks


def _switch_mixer(
    mixer: object, attention: str, partition_len: PartitionLen, backend: str | None
) -> object:
    if not isinstance(mixer, AttentionConfig):  # recurrent/conv mixers are left alone
        return mixer
    if attention == "dense":
        return mixer.to_attention_config() if isinstance(mixer, BandAttentionConfig) else mixer
    if isinstance(mixer, BandAttentionConfig):
        partition_len = mixer.partition_len if partition_len is None else partition_len
        backend = backend or mixer.band_backend
        base = mixer.to_attention_config()
    else:
        base = mixer
    if partition_len is None:
        raise ValueError(
            f"attention {attention!r} needs partition_len (the training sequence length, an int "
            ">= n_heads, or 'dynamic')"
        )
    return BandAttentionConfig.from_attention_config(
        base, band_pattern=attention, partition_len=partition_len, band_backend=backend or "auto"
    )


def with_attention(
    config: TransformerConfig,
    attention: str,
    partition_len: PartitionLen = None,
    backend: str | None = None,
) -> TransformerConfig:
    """A copy of ``config`` whose attention layers use ``attention``.

    Args:
        config: any OLMo-core ``TransformerConfig`` (e.g. ``TransformerConfig.olmoe_1B_7B``).
        attention: ``"dense"`` (OLMo-core's plain ``AttentionConfig``) or a band pattern
            (``"spattention"``, ``"exclusive_bands"``, ``"gapped_bands"``, ``"sliding_window"``).
        partition_len: band partition length ``N`` (int >= n_heads, normally the training
            sequence length, or ``"dynamic"``); kept from ``config`` when already banded.
        backend: ``band_attention`` backend (``"auto"`` default, ``"triton"``, ``"flex"``,
            ``"torch"``).

    Only the sequence-mixer configs change, so models built from the input and the output have
    exactly the same parameters (names, shapes) and load each other's state dicts.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; allowed: {', '.join(ATTENTIONS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    out = copy.deepcopy(config)
    for block in _block_configs(out):
        block.sequence_mixer = _switch_mixer(block.sequence_mixer, attention, partition_len, backend)
    return out


def band_specs_by_layer(config: TransformerConfig) -> list[BandSpec | None]:
    """The :class:`BandSpec` of each layer (``None`` where attention is dense or not attention)."""
    specs: list[BandSpec | None] = []
    for block in config.resolved_block_configs:
        mixer = block.sequence_mixer
        specs.append(mixer.band_spec() if isinstance(mixer, BandAttentionConfig) else None)
    return specs


def band_spec_of(config: TransformerConfig) -> BandSpec | None:
    """The model's :class:`BandSpec`, or ``None`` for a dense model.

    Raises ``ValueError`` when layers use different band specs (use :func:`band_specs_by_layer`).
    """
    distinct = {spec for spec in band_specs_by_layer(config) if spec is not None}
    if not distinct:
        return None
    if len(distinct) > 1 or None in band_specs_by_layer(config):
        raise ValueError("layers use different attention settings; use band_specs_by_layer()")
    return distinct.pop()


def needs_torch_moe(device: torch.device) -> bool:
    """True when OLMo-core's Triton MoE permutation cannot run on ``device``."""
    return device.type != "cuda"


def build_model(
    config: TransformerConfig,
    device: Union[str, torch.device] = "cpu",
    *,
    init_weights: bool = True,
    max_seq_len: int | None = None,
) -> Transformer:
    """Builds (and by default initialises) ``config`` on ``device``.

    On a device other than CUDA the dropless MoE layers switch to the PyTorch token permutation
    (:mod:`olmoe_spattn.olmo.moe_cpu`), since OLMo-core's Triton MoE kernels need a GPU.
    """
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Grouped GEMM not available")
        model = config.build(init_device="meta" if init_weights else str(device))
    if needs_torch_moe(device):
        from .moe_cpu import use_torch_moe

        use_torch_moe(model)
    if init_weights:
        model.init_weights(device=device, max_seq_len=max_seq_len)
    return model


def _moe_config(
    *, num_experts: int, top_k: int, hidden_size: int, lb_loss_weight: float, z_loss_weight: float
):
    from olmo_core.nn.moe import MoEConfig, MoERouterConfig

    return MoEConfig(
        name=MoEType.dropless,
        num_experts=num_experts,
        hidden_size=hidden_size,
        router=MoERouterConfig(top_k=top_k),
        lb_loss_weight=lb_loss_weight,
        z_loss_weight=z_loss_weight,
    )


def olmoe_config(
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    num_experts: int,
    top_k: int,
    expert_hidden_size: int,
    attention: str = "dense",
    partition_len: PartitionLen = None,
    backend: str | None = None,
    lb_loss_weight: float = 0.01,
    z_loss_weight: float = 0.001,
    rope_theta: int = 500_000,
    block: str = "moe_reordered_norm",
    layer_norm_eps: float = 1e-6,
) -> TransformerConfig:
    """An OLMoE-architecture config (OLMo-core's ``olmoe_1B_7B`` recipe at any size).

    Reordered-norm MoE blocks (``block="moe"``: pre-norm, as released OLMoE checkpoints),
    QK-norm, RoPE (theta 500k by default), dropless top-k routing with
    load-balancing and router z-loss, then :func:`with_attention`.
    """
    config = TransformerConfig.olmoe_1B_7B(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, rope_theta=rope_theta,
        block_name=block,
    )
    assert isinstance(config.block, TransformerBlockConfig)
    config.block.layer_norm.eps = layer_norm_eps
    config.block.sequence_mixer.qk_norm.eps = layer_norm_eps
    config.lm_head.layer_norm.eps = layer_norm_eps
    config.block.feed_forward_moe = _moe_config(
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=expert_hidden_size,
        lb_loss_weight=lb_loss_weight,
        z_loss_weight=z_loss_weight,
    )
    return with_attention(config, attention, partition_len=partition_len, backend=backend)


def tiny_model_config(
    attention: str = "spattention",
    vocab_size: int = 512,
    *,
    partition_len: PartitionLen = 64,
    backend: str | None = None,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    num_experts: int = 4,
    top_k: int = 2,
    expert_hidden_size: int = 64,
) -> TransformerConfig:
    """A tiny OLMoE (d_model 64, 2 layers, 4 heads, 4 experts top-2) for tests and CPU demos."""
    return olmoe_config(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden_size=expert_hidden_size,
        attention=attention,
        partition_len=partition_len,
        backend=backend,
    )


def architecture_of(config: TransformerConfig) -> dict[str, object]:
    """What makes two OLMoE configs' weights compute the same function (attention pattern and
    RoPE theta excluded: a checkpoint may continue with other attention or a longer context)."""
    block = config.block
    assert isinstance(block, TransformerBlockConfig)
    att, moe = block.sequence_mixer, block.feed_forward_moe
    return {
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "n_layers": config.n_layers,
        "block": str(getattr(block.name, "value", block.name)),
        "layer_norm_eps": float(block.layer_norm.eps),
        "n_heads": att.n_heads,
        "n_kv_heads": att.n_kv_heads or att.n_heads,
        "num_experts": moe.num_experts if moe else None,
        "expert_hidden_size": moe.hidden_size if moe else None,
        "top_k": moe.router.top_k if moe else None,
        "normalize_expert_weights": moe.router.normalize_expert_weights if moe else None,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }
