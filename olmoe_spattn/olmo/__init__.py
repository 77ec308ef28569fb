"""OLMo-core integration: SPAttention as a registered OLMo-core sequence mixer.

How the band settings live in OLMo-core's config
------------------------------------------------
A band layer's ``TransformerBlockConfig.sequence_mixer`` is a :class:`BandAttentionConfig`:
OLMo-core's own ``AttentionConfig`` (every field unchanged) plus ``band_config_fields``::

    band_pattern:  "spattention" | "exclusive_bands" | "gapped_bands" | "sliding_window" | "dense"
    partition_len: int >= n_heads (normally the training sequence length) or "dynamic"
    band_backend:  "auto" | "triton" | "flex" | "torch"

It is registered in OLMo-core's ``SequenceMixerConfig`` registry as ``"band_attention"``, so
``config.as_config_dict()`` writes ``"type": "band_attention"`` and
``"_CLASS_": "olmoe_spattn.olmo.config.BandAttentionConfig"``, and
``TransformerConfig.from_dict`` / ``from_yaml`` / ``from_json`` rebuild it; OLMo-core's trainer
stores that dict with every checkpoint (``config.json``). ``band_pattern: dense`` builds
OLMo-core's plain dense attention, so that one field toggles dense <-> band; a dense model made by
:func:`with_attention` (``attention="dense"``) holds OLMo-core's plain ``AttentionConfig``. The
parameters never change: one state dict loads in every variant.

Registration happens on ``import olmoe_spattn`` without importing OLMo-core (which is slow):
an import hook registers the config the moment ``olmo_core.nn.attention`` is first imported
(and ``olmoe_spattn.olmo.config`` registers it when imported directly).

API (names are loaded lazily, on first use)
-------------------------------------------
- ``with_attention(config, attention, partition_len=None, backend=None) -> TransformerConfig``
- ``band_spec_of(config) -> BandSpec | None``; ``band_specs_by_layer(config)``
- ``build_model(config, device="cpu") -> Transformer`` (PyTorch MoE permutation off-GPU)
- ``olmoe_config(...)``, ``tiny_model_config(attention="spattention", vocab_size=512, ...)``
- ``load_recipe(path, overrides=()) -> Recipe``; ``Recipe.model_config()`` gives the
  ``TransformerConfig``
- ``use_torch_moe(model)`` / ``use_olmo_core_moe(model)``
- ``BandAttentionConfig``, ``BandAttention``, ``BandAttentionBackend``
"""

from __future__ import annotations

import importlib
from typing import Any

band_config_fields: tuple[str, ...] = ("band_pattern", "partition_len", "band_backend")
REGISTERED_NAME = "band_attention"

_LAZY: dict[str, str] = {
    "BandAttentionConfig": "config",
    "BAND_FIELDS": "config",
    "BandAttention": "attention",
    "BandAttentionBackend": "attention",
    "ATTENTIONS": "model",
    "with_attention": "model",
    "band_spec_of": "model",
    "band_specs_by_layer": "model",
    "build_model": "model",
    "olmoe_config": "model",
    "tiny_model_config": "model",
    "use_torch_moe": "moe_cpu",
    "use_olmo_core_moe": "moe_cpu",
    "TorchDroplessMLP": "moe_cpu",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "RECIPES_DIR": "recipe",
}

__all__ = ["band_config_fields", "REGISTERED_NAME", *_LAZY]

from ._hook import install as _install  # noqa: E402

_install()  # idempotent: registers now if OLMo-core's attention is loaded, else on its import


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
