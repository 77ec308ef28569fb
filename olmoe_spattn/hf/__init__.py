"""Hugging Face integration: config/model classes, band attention function, conversion.

Importing this module registers, once:

* ``OlmoeSpattnConfig`` / ``OlmoeSpattnForCausalLM`` with transformers' ``AutoConfig``,
  ``AutoModel`` and ``AutoModelForCausalLM`` (model_type ``olmoe_spattn``);
* the band attention function and its mask builder under the attention
  implementation name ``olmoe_spattn``.
"""

from __future__ import annotations

from .attention import band_attention_forward, register_attention
from .configuration import ATTN_IMPLEMENTATION, HOW_TO_LOAD, MODEL_TYPE, OlmoeSpattnConfig
from .modeling import OlmoeSpattnForCausalLM, OlmoeSpattnModel, OlmoeSpattnPreTrainedModel

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
    register_attention()
    _REGISTERED = True


register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "HOW_TO_LOAD",
    "MODEL_TYPE",
    "OlmoeSpattnConfig",
    "OlmoeSpattnForCausalLM",
    "OlmoeSpattnModel",
    "OlmoeSpattnPreTrainedModel",
    "band_attention_forward",
    "register",
]
