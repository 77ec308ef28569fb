"""Weight mapping between OLMo-core's OLMoE state dict and transformers' FlexOlmo layout.

OLMo-core (``MoETransformer`` with ``moe_reordered_norm`` blocks) and transformers 5
(``FlexOlmoForCausalLM``) hold the same numbers under different names and, for the
experts, different shapes:

=============================================  ============================================
OLMo-core                                      transformers
=============================================  ============================================
``embeddings.weight``                          ``model.embed_tokens.weight``
``blocks.L.attention.w_{q,k,v,out}.weight``    ``model.layers.L.self_attn.{q,k,v,o}_proj.weight``
``blocks.L.attention.{q,k}_norm.weight``       ``model.layers.L.self_attn.{q,k}_norm.weight``
``blocks.L.attention_norm.weight``             ``model.layers.L.post_attention_layernorm.weight``
``blocks.L.feed_forward_norm.weight``          ``model.layers.L.post_feedforward_layernorm.weight``
``blocks.L.feed_forward_moe.router.weight``    ``model.layers.L.mlp.gate.weight`` ``[E, D]``
``...experts.mlp.w1, w3`` ``[E*I, D]``         ``model.layers.L.mlp.experts.gate_up_proj`` ``[E, 2I, D]``
``...experts.mlp.w2`` ``[E*I, D]``             ``model.layers.L.mlp.experts.down_proj`` ``[E, D, I]``
``lm_head.norm.weight``                        ``model.norm.weight``
``lm_head.w_out.weight``                       ``lm_head.weight``
=============================================  ============================================

OLMo-core's ``dropless`` experts store ``w1``/``w3`` as ``[E, I, D]`` (used transposed),
the ``default`` experts as ``[E, D, I]``; ``w2`` is ``[E, I, D]`` in both. (OLMo-core's
own ``olmo_core.nn.hf`` tables target the older per-expert HF layout
``mlp.experts.N.gate_proj``, which transformers 5 replaced by the fused tensors, so
this small explicit table is used instead.) Every mapping is a pure reshape/transpose:
converting there and back gives bit-identical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: OLMo-core MoE types and how their w1/w3 are laid out.
EXPERT_LAYOUTS = ("dropless", "default")

_ONE_TO_ONE = {
    "attention.w_q.weight": "self_attn.q_proj.weight",
    "attention.w_k.weight": "self_attn.k_proj.weight",
    "attention.w_v.weight": "self_attn.v_proj.weight",
    "attention.w_out.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "post_attention_layernorm.weight",
    "feed_forward_norm.weight": "post_feedforward_layernorm.weight",
}
_TOP = {
    "embeddings.weight": "model.embed_tokens.weight",
    "lm_head.norm.weight": "model.norm.weight",
    "lm_head.w_out.weight": "lm_head.weight",
}


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
            raise ValueError(f"expert layout {self.layout!r} is unknown; allowed: {', '.join(EXPERT_LAYOUTS)}")


def _take(state: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"checkpoint is missing the weight {key!r}")
    used.add(key)
    return state[key]


def _check_all_used(state: dict[str, torch.Tensor], used: set[str], side: str) -> None:
    extra = sorted(set(state) - used)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ValueError(f"{side} state has {len(extra)} weight(s) this conversion does not know: {shown}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"weight {name!r} has shape {tuple(t.shape)}, expected {shape}")


def olmo_core_to_hf(state: dict[str, torch.Tensor], shape: MoEShape) -> dict[str, torch.Tensor]:
    """Maps an OLMo-core model state dict to FlexOlmo names and shapes (no copies of data
    beyond what the reshapes need)."""
    used: set[str] = set()
    e, i, d = shape.num_experts, shape.expert_hidden, shape.d_model
    out = {hf: _take(state, oc, used) for oc, hf in _TOP.items()}
    for layer in range(shape.n_layers):
        src, dst = f"blocks.{layer}.", f"model.layers.{layer}."
        for oc, hf in _ONE_TO_ONE.items():
            out[dst + hf] = _take(state, src + oc, used)
        router = _take(state, src + "feed_forward_moe.router.weight", used)
        out[dst + "mlp.gate.weight"] = router.reshape(e, d)  # [E, D]
        w1, w2, w3 = (_take(state, f"{src}feed_forward_moe.experts.mlp.{w}", used) for w in ("w1", "w2", "w3"))
        for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
            _check_shape(src + name, w, (e * i, d))
        if shape.layout == "dropless":
            gate, up = w1.view(e, i, d), w3.view(e, i, d)  # [E, I, D]
        else:
            gate, up = w1.view(e, d, i).transpose(1, 2), w3.view(e, d, i).transpose(1, 2)
        out[dst + "mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()  # [E, 2I, D]
        out[dst + "mlp.experts.down_proj"] = w2.view(e, i, d).transpose(1, 2).contiguous()  # [E, D, I]
    _check_all_used(state, used, "OLMo-core")
    return out


def hf_to_olmo_core(state: dict[str, torch.Tensor], shape: MoEShape) -> dict[str, torch.Tensor]:
    """Inverse of :func:`olmo_core_to_hf`."""
    used: set[str] = set()
    e, i, d = shape.num_experts, shape.expert_hidden, shape.d_model
    out = {oc: _take(state, hf, used) for oc, hf in _TOP.items()}
    for layer in range(shape.n_layers):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        for oc, hf in _ONE_TO_ONE.items():
            out[dst + oc] = _take(state, src + hf, used)
        out[dst + "feed_forward_moe.router.weight"] = _take(state, src + "mlp.gate.weight", used).reshape(e * d)
        gate_up = _take(state, src + "mlp.experts.gate_up_proj", used)
        down = _take(state, src + "mlp.experts.down_proj", used)
        _check_shape(src + "mlp.experts.gate_up_proj", gate_up, (e, 2 * i, d))
        _check_shape(src + "mlp.experts.down_proj", down, (e, d, i))
        gate, up = gate_up[:, :i], gate_up[:, i:]  # [E, I, D]
        if shape.layout == "dropless":
            w1, w3 = gate.reshape(e * i, d), up.reshape(e * i, d)
        else:
            w1 = gate.transpose(1, 2).reshape(e * i, d)
            w3 = up.transpose(1, 2).reshape(e * i, d)
        out[dst + "feed_forward_moe.experts.mlp.w1"] = w1.contiguous()
        out[dst + "feed_forward_moe.experts.mlp.w3"] = w3.contiguous()
        out[dst + "feed_forward_moe.experts.mlp.w2"] = down.transpose(1, 2).reshape(e * i, d).contiguous()
    _check_all_used(state, used, "Hugging Face")
    return out
