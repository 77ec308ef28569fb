"""Band attention inside OLMo-core: an ``AttentionBackend`` that calls :func:`band_attention`.

:class:`BandAttention` is OLMo-core's own :class:`~olmo_core.nn.attention.Attention` (same
parameters, same projections, RoPE, QK-norm) whose scaled-dot-product step is replaced by
:class:`BandAttentionBackend`. Only the backend differs, so a state dict moves freely between a
dense and a band model.
"""

from __future__ import annotations

from typing import Union

import torch
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.attention import Attention
from olmo_core.nn.attention.backend import AttentionBackend
from olmo_core.nn.attention.kv_cache import KVCacheManager

from ..api import band_attention
from ..bands import BandSpec


class BandAttentionBackend(AttentionBackend):
    """OLMo-core attention backend running SPAttention's per-head band mask.

    Args (beyond :class:`AttentionBackend`'s):
        spec: the band pattern over the *global* heads.
        band_backend: ``band_attention`` backend (``"auto"``, ``"triton"``, ``"fa4"``, ``"flex"``, ``"torch"``).
        head_offset: global index of this rank's first head (set by tensor parallelism).
    """

    def __init__(
        self,
        *,
        spec: BandSpec,
        band_backend: str = "auto",
        head_dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ):
        super().__init__(
            head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, scale=scale, dropout_p=dropout_p
        )
        if dropout_p:
            raise OLMoConfigurationError(
                f"band attention does not support attention dropout (got dropout={dropout_p}); set dropout to 0"
            )
        if spec.n_heads != n_heads:
            raise OLMoConfigurationError(
                f"band spec has n_heads={spec.n_heads} but the attention layer has n_heads={n_heads}"
            )
        self.spec = spec
        self.band_backend = band_backend
        self.head_offset = 0

    # ------------------------------------------------------------------ capabilities
    @classmethod
    def assert_supported(cls) -> None:
        pass

    @classmethod
    def assert_supports_swa(cls) -> None:
        raise OLMoConfigurationError(
            "band attention replaces sliding-window attention: use band_pattern 'sliding_window' "
            "instead of OLMo-core's sliding_window option"
        )

    @classmethod
    def assert_supports_ring_cp(cls) -> None:
        raise OLMoConfigurationError(
            "context parallelism is not supported with band attention yet "
            "(train with cp_config unset, or switch the model to dense attention)"
        )

    @classmethod
    def assert_supports_ulysses_cp(cls) -> None:
        cls.assert_supports_ring_cp()

    @classmethod
    def assert_supports_packed_qkv(cls) -> None:
        raise OLMoConfigurationError("band attention takes separate q, k, v tensors, not packed QKV")

    @classmethod
    def assert_supports_kv_cache(cls) -> None:
        raise OLMoConfigurationError(
            "OLMo-core's KV-cache generation is not wired to band attention; convert the checkpoint "
            "to Hugging Face format (olmoe-spattn convert) and generate there"
        )

    def apply_cp(self, cp_mesh, ring=None, uly=None):  # noqa: D401 - OLMo-core hook
        """Context parallelism is not implemented for band attention: raises a clear error."""
        del cp_mesh, ring, uly
        self.assert_supports_ring_cp()

    def extra_repr(self) -> str:
        return (
            f"pattern={self.spec.pattern}, partition_len={self.spec.partition_len}, "
            f"backend={self.band_backend}, head_offset={self.head_offset}"
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        qkv: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        cu_doc_lens: torch.Tensor | None = None,
        cu_doc_lens_q: torch.Tensor | None = None,
        cu_doc_lens_k: torch.Tensor | None = None,
        max_doc_len: int | None = None,
        max_doc_len_q: int | None = None,
        max_doc_len_k: int | None = None,
        local_k_slice: slice | None = None,
        kv_cache_manager: KVCacheManager | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q [B, T, H_local, D]``, ``k, v [B, T, Hkv_local, D]`` -> ``[B, T, H_local, D]``.

        OLMo-core's ``cu_doc_lens`` index the flattened ``B * T`` tokens, so a packed batch is
        viewed as one ``[1, B * T]`` sequence and passed as ``cu_seqlens``.
        """
        del local_k_slice, max_doc_len_q, max_doc_len_k
        if isinstance(qkv, torch.Tensor):
            self.assert_supports_packed_qkv()
        if kv_cache_manager is not None:
            self.assert_supports_kv_cache()
        if sinks is not None:
            raise OLMoConfigurationError("attention_sinks are not supported with band attention")
        if cu_doc_lens_q is not None or cu_doc_lens_k is not None:
            raise OLMoConfigurationError(
                "band attention supports intra-document masking through cu_doc_lens only "
                "(separate cu_doc_lens_q / cu_doc_lens_k are not supported)"
            )
        q, k, v = qkv  # [B, T, H, D], [B, T, Hkv, D], [B, T, Hkv, D]
        if cu_doc_lens is None:
            return band_attention(
                q, k, v, self.spec, self.band_backend, head_offset=self.head_offset, scale=self.scale
            )
        B, T = q.shape[:2]
        out = band_attention(
            q.reshape(1, B * T, *q.shape[2:]),  # [1, B*T, H, D]
            k.reshape(1, B * T, *k.shape[2:]),
            v.reshape(1, B * T, *v.shape[2:]),
            self.spec,
            self.band_backend,
            head_offset=self.head_offset,
            cu_seqlens=cu_doc_lens,
            max_seqlen=None if max_doc_len is None else int(max_doc_len),
            scale=self.scale,
        )
        return out.view(B, T, *out.shape[2:])  # [B, T, H, D]


class BandAttention(Attention):
    """OLMo-core :class:`Attention` whose backend is :class:`BandAttentionBackend`.

    Built by :class:`~olmoe_spattn.olmo.config.BandAttentionConfig`; parameters are exactly
    those of the dense layer.
    """

    backend: BandAttentionBackend

    @classmethod
    def from_attention(cls, module: Attention, spec: BandSpec, band_backend: str) -> BandAttention:
        """Turns a freshly built dense :class:`Attention` into a band layer, in place."""
        if type(module) is not Attention:
            raise OLMoConfigurationError(
                f"band attention needs OLMo-core's default attention, got {type(module).__name__}"
            )
        if module.window_size is not None:
            BandAttentionBackend.assert_supports_swa()
        dense = module.backend
        module.__class__ = cls
        object.__setattr__(module, "_dense_backend", dense)  # kept out of the module tree
        module.backend = BandAttentionBackend(
            spec=spec,
            band_backend=band_backend,
            head_dim=dense.head_dim,
            n_heads=dense.n_heads,
            n_kv_heads=dense.n_kv_heads,
            scale=dense.scale,
            dropout_p=dense.dropout_p,
        )
        return module  # type: ignore[return-value]

    def to_dense(self) -> Attention:
        """Turns this layer back into OLMo-core's dense :class:`Attention`, in place."""
        self.__class__ = Attention  # type: ignore[assignment]
        self.backend = self.__dict__.pop("_dense_backend")
        return self

    def apply_tp(self, tp_mesh, input_layout=None, output_layout=None, use_local_output=True, float8_enabled=False):
        """Shards heads like OLMo-core and tells the backend which global heads are local."""
        size, rank = tp_mesh.size(), tp_mesh.get_local_rank()
        if self.n_heads % size or self.n_kv_heads % size:
            raise OLMoConfigurationError(
                f"tensor parallel degree {size} must divide n_heads={self.n_heads} and "
                f"n_kv_heads={self.n_kv_heads}"
            )
        self.backend.head_offset = rank * (self.n_heads // size)
        super().apply_tp(
            tp_mesh,
            input_layout=input_layout,
            output_layout=output_layout,
            use_local_output=use_local_output,
            float8_enabled=float8_enabled,
        )

    def apply_cp(self, cp_mesh, ring=None, uly=None):
        """Context parallelism is not supported with band attention: raises a clear error."""
        self.backend.apply_cp(cp_mesh, ring=ring, uly=uly)

    def num_flops_per_token(self, seq_len: int) -> int:
        """Projection FLOPs plus attention FLOPs over the (query, key) pairs the band allows."""
        param_flops = 6 * sum(p.numel() for p in self.parameters())
        pairs = sum(self.backend.spec.covered_pairs(seq_len))  # summed over heads
        attn_flops = 12 * self.head_dim * pairs // seq_len
        return param_flops + attn_flops


def set_model_attention(model: torch.nn.Module, spec: BandSpec | None, band_backend: str = "auto") -> int:
    """Switches every default attention layer of a built model to ``spec`` (``None`` = dense),
    in place, without touching parameters. Returns the number of layers switched."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, BandAttention):
            if spec is None:
                module.to_dense()
            else:
                module.backend.spec = spec
                module.backend.band_backend = band_backend
            count += 1
        elif type(module) is Attention:
            if spec is not None:
                BandAttention.from_attention(module, spec, band_backend)
            count += 1
    return count
