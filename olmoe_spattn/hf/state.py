"""Weights between OLMo-core's OLMoE state dict and Hugging Face, through OLMo-core's converter.

The weight maps are OLMo-core's own (``olmo_core.nn.hf.convert.convert_state_from_hf`` /
``convert_state_to_hf``), applied to the Hugging Face *on-disk* layout: per-expert
``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`` tensors, which is what
transformers writes (``save_pretrained``) and reads back into its fused in-memory
``gate_up_proj`` / ``down_proj`` (its checkpoint conversion of ``olmoe`` / ``flex_olmo``,
registered for our model types by :mod:`olmoe_spattn.hf`). Two small additions, each where
OLMo-core has no entry:

* Norm names of the pre-norm ``olmoe`` architecture (``input_layernorm`` before attention,
  ``post_attention_layernorm`` before the MoE): OLMo-core's tables have no ``olmoe`` entry,
  and its default reads ``post_attention_layernorm`` as the reordered-norm (FlexOlmo/OLMo 2)
  attention norm. The entries registered here are OLMo-core's ``qwen3`` ones (the same
  pre-norm naming), under ``olmoe`` and ``olmoe_spattn_prenorm``.
* Expert layout: OLMo-core's expert templates produce the ``MoEMLP`` (``default``) layout,
  ``w1``/``w3`` as ``[E*D, I]``; the ``dropless`` experts OLMoE trains with hold them as
  ``[E*I, D]``. :func:`to_dropless` / :func:`from_dropless` are that transpose.

Every step is a pure reshape/transpose/rename: converting there and back is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: OLMo-core MoE types and how their w1/w3 are laid out.
EXPERT_LAYOUTS = ("dropless", "default")
#: HF model types whose blocks are pre-norm (OLMo-core block ``moe``).
PRENORM_MODEL_TYPES = ("olmoe", "olmoe_spattn_prenorm")


@dataclass(frozen=True)
class MoEShape:
    """The sizes the expert tensors are reshaped with."""

    n_layers: int
    d_model: int
    num_experts: int
    expert_hidden: int
    layout: str = "dropless"

    def __post_init__(self) -> None:
        if self.layout not in EXPERT_LAYOUTS:
            raise ValueError(f"unknown OLMo-core expert layout {self.layout!r}; allowed: {', '.join(EXPERT_LAYOUTS)}")


def register_prenorm_norm_names() -> None:
    """Adds the pre-norm ``olmoe`` norm names to OLMo-core's conversion tables (idempotent)."""
    from olmo_core.nn.hf import convert as oc

    for table in (
        oc.MODEL_TYPE_SPECIFIC_HF_TO_OLMO_CORE_WEIGHT_MAPPINGS,
        oc.MODEL_TYPE_SPECIFIC_HF_TO_OLMO_CORE_MODULE_MAPPINGS,
        oc.MODEL_TYPE_SPECIFIC_OLMO_CORE_TO_HF_TEMPLATE_MAPPINGS,
    ):
        for model_type in PRENORM_MODEL_TYPES:
            table.setdefault(model_type, dict(table["qwen3"]))


def _expert_keys(state: dict[str, Any]) -> list[str]:
    return [k for k in state if k.endswith(("feed_forward_moe.experts.mlp.w1", "feed_forward_moe.experts.mlp.w3"))]


def to_dropless(state: dict[str, torch.Tensor], shape: MoEShape) -> dict[str, torch.Tensor]:
    """OLMo-core ``default`` expert layout (w1/w3 ``[E*D, I]``) -> ``shape.layout``."""
    if shape.layout == "default":
        return state
    e, i, d = shape.num_experts, shape.expert_hidden, shape.d_model
    out = dict(state)
    for key in _expert_keys(state):
        _check_shape(key, state[key], (e * d, i))
        out[key] = state[key].view(e, d, i).transpose(1, 2).reshape(e * i, d).contiguous()
    return out


def from_dropless(state: dict[str, torch.Tensor], shape: MoEShape) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_dropless`."""
    if shape.layout == "default":
        return state
    e, i, d = shape.num_experts, shape.expert_hidden, shape.d_model
    out = dict(state)
    for key in _expert_keys(state):
        _check_shape(key, state[key], (e * i, d))
        out[key] = state[key].view(e, i, d).transpose(1, 2).reshape(e * d, i).contiguous()
    return out


def _check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{key} has shape {tuple(tensor.shape)}, expected {expected}")


def _check_keys(got: dict[str, Any], expected: set[str] | None, what: str) -> None:
    if expected is None:
        return
    missing, extra = sorted(expected - set(got)), sorted(set(got) - expected)
    if missing or extra:
        raise ValueError(
            f"{what} weights do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )


def olmo_core_to_hf(
    state: dict[str, torch.Tensor],
    hf_config: Any,
    shape: MoEShape,
    *,
    expected_keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """OLMo-core state dict -> HF on-disk state dict (per-expert tensors), by OLMo-core's converter.

    ``expected_keys`` (the OLMo-core model's state-dict keys), when given, must match exactly
    (OLMo-core's converter skips what it does not find).
    """
    from olmo_core.nn.hf.convert import convert_state_to_hf

    _check_keys(state, expected_keys, "checkpoint")
    register_prenorm_norm_names()
    state = from_dropless(dict(state), shape)
    if getattr(hf_config, "tie_word_embeddings", False):
        state.pop("lm_head.w_out.weight", None)
    out = convert_state_to_hf(hf_config, state)
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_olmo_core(
    state: dict[str, torch.Tensor],
    hf_config: Any,
    shape: MoEShape,
    *,
    expected_keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """HF on-disk state dict -> OLMo-core state dict in ``shape.layout``, by OLMo-core's converter.

    ``expected_keys`` (the OLMo-core model's state-dict keys), when given, must match exactly.
    """
    from olmo_core.nn.hf.convert import convert_state_from_hf

    register_prenorm_norm_names()
    model_type = hf_config.model_type
    for key in state:
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            raise ValueError(
                f"{key}: fused expert tensors; expected the per-expert layout transformers saves "
                "(model.layers.L.mlp.experts.E.gate_proj.weight ...). Re-save the model with "
                "transformers' save_pretrained"
            )
    try:
        out = convert_state_from_hf(hf_config, state, model_type=model_type)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"cannot map the {model_type!r} weights to OLMo-core: {err}") from err
    out = to_dropless(out, shape)
    _check_keys(out, expected_keys, "converted")
    return out
