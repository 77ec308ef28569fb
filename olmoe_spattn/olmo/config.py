"""``BandAttentionConfig``: SPAttention registered in OLMo-core's ``SequenceMixerConfig`` registry.

It is OLMo-core's :class:`~olmo_core.nn.attention.AttentionConfig` plus three fields::

    band_pattern:  "spattention" | "exclusive_bands" | "gapped_bands" | "sliding_window" | "dense"
    partition_len: int >= n_heads (normally the training sequence length) or "dynamic"
    band_backend:  "auto" | "triton" | "fa4" | "flex" | "torch"

Registered name: ``"band_attention"`` (``type: band_attention`` in a dict/YAML config).
``band_pattern: dense`` builds OLMo-core's own dense attention (its own backend), so flipping that
one field toggles dense <-> band with identical parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import AttentionBackendName, AttentionConfig, AttentionType
from olmo_core.nn.attention.base import SequenceMixerConfig
from olmo_core.nn.buffer_cache import BufferCache

from ..api import BACKENDS
from ..bands import DYNAMIC, PATTERNS, BandSpec

REGISTERED_NAME = "band_attention"

#: The fields BandAttentionConfig adds to OLMo-core's AttentionConfig.
BAND_FIELDS: tuple[str, ...] = ("band_pattern", "partition_len", "band_backend")


@SequenceMixerConfig.register(REGISTERED_NAME)
@dataclass
class BandAttentionConfig(AttentionConfig):
    """OLMo-core attention config whose layers use SPAttention band masks.

    See the module docstring for the three added fields.
    """

    band_pattern: str = "spattention"
    partition_len: Union[int, str] | None = None
    band_backend: str = "auto"

    def __post_init__(self, type: str | None = None) -> None:  # noqa: A002 - Registrable InitVar
        del type
        if self.band_pattern not in PATTERNS:
            raise OLMoConfigurationError(
                f"unknown band_pattern {self.band_pattern!r}; allowed: {', '.join(PATTERNS)}"
            )
        if self.band_backend not in BACKENDS:
            raise OLMoConfigurationError(
                f"unknown band_backend {self.band_backend!r}; allowed: {', '.join(BACKENDS)}"
            )
        if isinstance(self.partition_len, str) and self.partition_len.isdigit():
            self.partition_len = int(self.partition_len)  # from a --set override or dotlist
        if self.band_pattern != "dense":
            if self.partition_len is None:
                raise OLMoConfigurationError(
                    f"band_pattern {self.band_pattern!r} needs partition_len: the training sequence "
                    f"length (an int >= n_heads) or {DYNAMIC!r}"
                )
            try:
                self.band_spec()
            except ValueError as err:
                raise OLMoConfigurationError(str(err)) from err
            if self.name != AttentionType.default:
                raise OLMoConfigurationError(
                    f"band attention needs attention name 'default', got {self.name!r}"
                )
            if self.sliding_window is not None:
                raise OLMoConfigurationError(
                    "band attention cannot be combined with OLMo-core's sliding_window option; "
                    "use band_pattern 'sliding_window' instead"
                )
            if self.attention_sinks:
                raise OLMoConfigurationError("attention_sinks are not supported with band attention")
            if self.dropout:
                raise OLMoConfigurationError(
                    f"band attention does not support attention dropout (got dropout={self.dropout})"
                )

    def band_spec(self) -> BandSpec | None:
        """The :class:`BandSpec` of these layers, or ``None`` for ``band_pattern: dense``."""
        if self.band_pattern == "dense":
            return None
        return BandSpec(self.band_pattern, self.n_heads, self.partition_len)  # type: ignore[arg-type]

    def to_attention_config(self) -> AttentionConfig:
        """The plain OLMo-core ``AttentionConfig`` with every non-band field unchanged."""
        kwargs = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(AttentionConfig)
            if f.init and f.name not in BAND_FIELDS
        }
        return AttentionConfig(**kwargs)

    @classmethod
    def from_attention_config(
        cls,
        config: AttentionConfig,
        *,
        band_pattern: str,
        partition_len: Union[int, str] | None,
        band_backend: str = "auto",
    ) -> BandAttentionConfig:
        """Wraps a plain ``AttentionConfig``, keeping all of its fields."""
        kwargs = {
            f.name: getattr(config, f.name)
            for f in dataclasses.fields(AttentionConfig)
            if f.init and f.name not in BAND_FIELDS
        }
        return cls(
            **kwargs, band_pattern=band_pattern, partition_len=partition_len, band_backend=band_backend
        )

    def build(
        self,
        d_model: int,
        *,
        layer_idx: int,
        n_layers: int,
        init_device: str = "cpu",
        cache: BufferCache | None = None,
    ):
        """Builds OLMo-core's attention layer, then gives it the band backend (unless dense)."""
        from .attention import BandAttention

        base = self.to_attention_config()
        spec = self.band_spec()
        if spec is not None:  # the dense backend is replaced: never require flash-attn & co.
            base = dataclasses.replace(base, backend=AttentionBackendName.torch, use_flash=None)
        module = base.build(d_model, layer_idx=layer_idx, n_layers=n_layers, init_device=init_device, cache=cache)
        if spec is None:
            return module
        return BandAttention.from_attention(module, spec, self.band_backend)
