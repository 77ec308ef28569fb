"""Hugging Face integration: config/model classes, band attention function, conversion.

Importing this module registers, once:

* ``OlmoeSpattnConfig`` / ``OlmoeSpattnForCausalLM`` (model_type ``olmoe_spattn``) and the
  pre-norm ``OlmoeSpattnPrenorm*`` classes (``olmoe_spattn_prenorm``) with transformers'
  ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``, and transformers' checkpoint
  conversion of their base models (``flex_olmo`` / ``olmoe``: per-expert weights on disk,
  fused expert tensors in memory);
* the band attention function and its mask builder under the attention
  implementation name ``olmoe_spattn``.
"""

from __future__ import annotations

from .attention import band_attention_forward, register_attention
from .configuration import (
    ATTN_IMPLEMENTATION,
    HOW_TO_LOAD,
    MODEL_TYPE,
    MODEL_TYPE_PRENORM,
    OlmoeSpattnConfig,
    OlmoeSpattnPrenormConfig,
)
from .modeling import (
    OlmoeSpattnForCausalLM,
    OlmoeSpattnModel,
    OlmoeSpattnPrenormForCausalLM,
    OlmoeSpattnPrenormModel,
    OlmoeSpattnPreTrainedModel,
)

_REGISTERED = False


def register() -> None:
    """Registers the classes and attention function with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, OlmoeSpattnConfig, exist_ok=True)
    AutoModel.register(OlmoeSpattnConfig, OlmoeSpattnModel, exist_ok=True)
    AutoModelForCausalLM.register(OlmoeSpattnConfig, OlmoeSpattnForCausalLM, exist_ok=True)
    AutoConfig.register(MODEL_TYPE_PRENORM, OlmoeSpattnPrenormConfig, exist_ok=True)
    AutoModel.register(OlmoeSpattnPrenormConfig, OlmoeSpattnPrenormModel, exist_ok=True)
    AutoModelForCausalLM.register(OlmoeSpattnPrenormConfig, OlmoeSpattnPrenormForCausalLM, exist_ok=True)
    _register_weight_conversions()
    register_attention()
    _REGISTERED = True


def _register_weight_conversions() -> None:
    """Our model types load and save weights exactly like their transformers bases."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for ours, base in ((MODEL_TYPE, "flex_olmo"), (MODEL_TYPE_PRENORM, "olmoe")):
        mapping = get_checkpoint_conversion_mapping(base)
        if mapping is not None and get_checkpoint_conversion_mapping(ours) is None:
            register_checkpoint_conversion_mapping(ours, mapping)


register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HOW_TO_LOAD",
    "MODEL_TYPE",
    "MODEL_TYPE_PRENORM",
    "OlmoeSpattnConfig",
    "OlmoeSpattnPrenormConfig",
    "OlmoeSpattnPrenormForCausalLM",
    "OlmoeSpattnPrenormModel",
    "OlmoeSpattnForCausalLM",
    "OlmoeSpattnModel",
    "OlmoeSpattnPreTrainedModel",
    "band_attention_forward",
    "register",
]
