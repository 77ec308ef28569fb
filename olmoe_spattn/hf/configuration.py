"""``OlmoeSpattnConfig`` / ``OlmoeSpattnPrenormConfig``: transformers configs plus the band fields.

OLMo-core's OLMoE preset (``TransformerConfig.olmoe_1B_7B``) builds a
``MoEReorderedNormTransformerBlock`` (OLMo-2 style: norms *after* attention and MoE,
q/k RMS-norm over all heads, softmax router without re-normalisation). In
transformers that architecture is ``FlexOlmo`` (OLMo-core's own ``get_hf_config``
maps the preset there), so the band model subclasses FlexOlmo's config and model and
only replaces the attention function.

Released OLMoE checkpoints (transformers' ``olmoe``, e.g. allenai/OLMoE-1B-7B-0924) are
*pre-norm* (OLMo-core's ``moe`` block); a band model converted from one keeps that
architecture as ``OlmoeSpattnPrenormConfig`` (model_type ``olmoe_spattn_prenorm``), a
subclass of transformers' ``OlmoeConfig``.

The distinct ``model_type`` (``olmoe_spattn``) is what keeps a band checkpoint from
ever loading as a dense FlexOlmo/OLMoE model: plain transformers does not know it.
"""

from __future__ import annotations

from transformers.models.flex_olmo.configuration_flex_olmo import FlexOlmoConfig
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig

from ..bands import DYNAMIC, PATTERNS, BandSpec

MODEL_TYPE = "olmoe_spattn"
#: The pre-norm (released OLMoE architecture) band model.
MODEL_TYPE_PRENORM = "olmoe_spattn_prenorm"
#: Name registered with transformers' AttentionInterface and AttentionMaskInterface.
ATTN_IMPLEMENTATION = "olmoe_spattn"
#: Message for anyone who meets a band checkpoint without this package.
HOW_TO_LOAD = (
    "this is an SPAttention (band attention) checkpoint of model_type 'olmoe_spattn'; "
    "install the package (`pip install olmoe-spattn`) and `import olmoe_spattn.hf` before "
    "AutoModelForCausalLM.from_pretrained(...), or pass trust_remote_code=True"
)


class _BandConfigMixin:
    """What both band configs add to their transformers base: the band fields are filled in and
    checked after ``__init__``, and read as a :class:`BandSpec`."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.band_n_heads is None:
            self.band_n_heads = self.num_attention_heads
        self.validate_band()

    def validate_band(self) -> None:
        """Raises ``ValueError`` when the band fields are inconsistent."""
        if self.attention_pattern not in PATTERNS:
            raise ValueError(f"attention_pattern={self.attention_pattern!r} is not a known pattern; "
                             f"allowed: {', '.join(PATTERNS)}")
        if self.band_n_heads != self.num_attention_heads:
            raise ValueError(f"band_n_heads={self.band_n_heads} must equal num_attention_heads={self.num_attention_heads}")
        if self.partition_len != DYNAMIC and not isinstance(self.partition_len, int):
            raise ValueError(f"partition_len must be an int or 'dynamic', got {self.partition_len!r}")
        from ..api import BACKENDS

        if self.attention_backend not in BACKENDS:
            raise ValueError(
                f"attention_backend={self.attention_backend!r} is unknown; allowed: {', '.join(BACKENDS)}"
            )
        self.band_spec()  # BandSpec checks N >= n_heads etc.

    def band_spec(self) -> BandSpec:
        """The :class:`BandSpec` every attention layer of this model follows."""
        return BandSpec(self.attention_pattern, int(self.band_n_heads), self.partition_len)  # type: ignore[arg-type]


class OlmoeSpattnConfig(_BandConfigMixin, FlexOlmoConfig):
    """FlexOlmo config with SPAttention's band fields.

    Extra fields (stored in ``config.json``):
        attention_pattern: one of :data:`olmoe_spattn.PATTERNS` (``"dense"`` = causal).
        partition_len: the band partition length ``N`` (int) or ``"dynamic"``.
        band_n_heads: number of query heads the bands are defined over (the
            model's ``num_attention_heads``; stored explicitly so the band geometry is
            readable from the file alone).
        attention_backend: backend passed to :func:`olmoe_spattn.band_attention`
            (``"auto"``: Triton on CUDA, masked SDPA on CPU).
        olmo_core_expert_layout: OLMo-core MoE type the weights came from (``dropless``
            or ``default``), so ``convert from-hf`` restores the same layout.
    """

    model_type = MODEL_TYPE

    attention_pattern: str = "spattention"
    partition_len: int | str = 4096
    band_n_heads: int | None = None
    attention_backend: str = "auto"
    olmo_core_expert_layout: str = "dropless"


class OlmoeSpattnPrenormConfig(_BandConfigMixin, OlmoeConfig):
    """transformers' OLMoE config (pre-norm blocks) with the same band fields as
    :class:`OlmoeSpattnConfig` (experts always OLMo-core ``dropless``)."""

    model_type = MODEL_TYPE_PRENORM

    attention_pattern: str = "spattention"
    partition_len: int | str = 4096
    band_n_heads: int | None = None
    attention_backend: str = "auto"
    olmo_core_expert_layout: str = "dropless"


__all__ = [
    "ATTN_IMPLEMENTATION",
    "HOW_TO_LOAD",
    "MODEL_TYPE",
    "MODEL_TYPE_PRENORM",
    "OlmoeSpattnConfig",
    "OlmoeSpattnPrenormConfig",
]
