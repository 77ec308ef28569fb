"""transformers model classes for band-attention OLMoE checkpoints.

These are transformers' FlexOlmo classes (the HF twin of OLMo-core's OLMoE preset)
bound to :class:`OlmoeSpattnConfig`; the only behavioural change is that attention
always goes through :func:`olmoe_spattn.hf.attention.band_attention_forward`. Asking
for another attention implementation (``sdpa``, ``eager``, ...) on a band model is an
error, so a band checkpoint can never silently run dense.
"""

from __future__ import annotations

from transformers.models.flex_olmo.modeling_flex_olmo import (
    FlexOlmoForCausalLM,
    FlexOlmoModel,
    FlexOlmoPreTrainedModel,
)
from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM, OlmoeModel, OlmoePreTrainedModel

from .configuration import ATTN_IMPLEMENTATION, OlmoeSpattnConfig, OlmoeSpattnPrenormConfig


class _BandAttentionMixin:
    """Pins ``config._attn_implementation`` to the band attention function."""

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention in (None, ATTN_IMPLEMENTATION):
            return ATTN_IMPLEMENTATION
        pattern = getattr(self.config, "attention_pattern", None)
        if pattern == "dense":
            return super().get_correct_attn_implementation(requested_attention, is_init_check)  # type: ignore[misc]
        raise ValueError(
            f"attn_implementation={requested_attention!r} would run this {pattern!r} band model as "
            f"dense attention; band models only run with attn_implementation={ATTN_IMPLEMENTATION!r} "
            "(the default)"
        )


class OlmoeSpattnPreTrainedModel(_BandAttentionMixin, FlexOlmoPreTrainedModel):
    """Base class: FlexOlmo weights layout, band attention."""

    config_class = OlmoeSpattnConfig
    config: OlmoeSpattnConfig


class OlmoeSpattnModel(_BandAttentionMixin, FlexOlmoModel):
    """The decoder stack (no LM head)."""

    config_class = OlmoeSpattnConfig
    config: OlmoeSpattnConfig


class OlmoeSpattnForCausalLM(_BandAttentionMixin, FlexOlmoForCausalLM):
    """Causal LM with band attention; load it with ``AutoModelForCausalLM``."""

    config_class = OlmoeSpattnConfig
    config: OlmoeSpattnConfig

    def __init__(self, config: OlmoeSpattnConfig) -> None:
        super().__init__(config)
        self.model = OlmoeSpattnModel(config)
        self.post_init()


class OlmoeSpattnPrenormPreTrainedModel(_BandAttentionMixin, OlmoePreTrainedModel):
    """Base class of the pre-norm (released OLMoE architecture) band model."""

    config_class = OlmoeSpattnPrenormConfig
    config: OlmoeSpattnPrenormConfig


class OlmoeSpattnPrenormModel(_BandAttentionMixin, OlmoeModel):
    """The pre-norm decoder stack (no LM head)."""

    config_class = OlmoeSpattnPrenormConfig
    config: OlmoeSpattnPrenormConfig


class OlmoeSpattnPrenormForCausalLM(_BandAttentionMixin, OlmoeForCausalLM):
    """Pre-norm OLMoE causal LM with band attention; load it with ``AutoModelForCausalLM``."""

    config_class = OlmoeSpattnPrenormConfig
    config: OlmoeSpattnPrenormConfig

    def __init__(self, config: OlmoeSpattnPrenormConfig) -> None:
        super().__init__(config)
        self.model = OlmoeSpattnPrenormModel(config)
        self.post_init()


__all__ = [
    "OlmoeSpattnForCausalLM",
    "OlmoeSpattnModel",
    "OlmoeSpattnPreTrainedModel",
    "OlmoeSpattnPrenormForCausalLM",
    "OlmoeSpattnPrenormModel",
    "OlmoeSpattnPrenormPreTrainedModel",
]
