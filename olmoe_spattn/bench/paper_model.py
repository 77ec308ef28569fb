"""The small dense-FFN transformer of the paper's Table 2, built from OLMo-core blocks.

Table 2 of the paper compares attention variants inside "an 8-head, 8-layer Transformer with
1024-dimensional hidden states". :func:`table2_config` builds that shape with OLMo-core's own
``TransformerConfig.llama_like`` (reordered-norm blocks, QK-norm, RoPE, SwiGLU feed-forward),
so only the attention differs between variants.

Two ways to change the attention of such a model:

- :func:`~olmoe_spattn.olmo.model.with_attention` on the config (band patterns; what the
  quality study and checkpoints use), or
- :func:`set_attention_core` on a built model: every attention layer's scaled-dot-product
  step becomes a given function ``(q, k, v) -> out`` (all ``[B, T, H, D]``), with
  projections, RoPE and QK-norm untouched. The throughput benchmark uses this to switch one
  model between dense SDPA, Flex baselines and band kernels, so every variant runs the
  same weights on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from olmo_core.nn.attention import Attention
from olmo_core.nn.attention.backend import AttentionBackend
from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelShape:
    """Size of the Table 2 model (defaults: the paper's 8 layers, 8 heads, d_model 1024)."""

    d_model: int = 1024
    n_layers: int = 8
    n_heads: int = 8
    vocab_size: int = 50304

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict[str, int]:
        """Plain-data form stored next to checkpoints."""
        return asdict(self)


#: a CPU smoke-test shape (seconds per step on one core)
TINY_SHAPE = ModelShape(d_model=64, n_layers=2, n_heads=4, vocab_size=512)


def table2_config(shape: ModelShape) -> TransformerConfig:
    """OLMo-core ``TransformerConfig`` of the Table 2 model at ``shape`` (dense attention).

    OLMo-2-style blocks (reordered norm, QK-norm, RoPE theta 500k) with a SwiGLU feed-forward
    of hidden size ``8/3 * d_model`` (rounded to a multiple of 16).
    """
    return TransformerConfig.llama_like(
        d_model=shape.d_model,
        vocab_size=shape.vocab_size,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        block_name=TransformerBlockType.reordered_norm,
        qk_norm=True,
        rope_theta=500_000,
        hidden_size_multiple_of=16,
        layer_norm_eps=1e-6,
    )


class CallableAttentionBackend(AttentionBackend):
    """An OLMo-core attention backend that calls ``fn(q, k, v)`` on ``[B, T, H, D]`` tensors.

    Self-attention over full sequences only: no document masking, KV cache, context or
    packed-QKV support (each raises a clear error).
    """

    def __init__(self, fn: AttnFn, *, head_dim: int, n_heads: int, n_kv_heads: int | None = None,
                 scale: float | None = None):
        super().__init__(head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, scale=scale)
        self.fn = fn

    @classmethod
    def assert_supported(cls) -> None:
        pass

    @classmethod
    def assert_supports_swa(cls) -> None:
        raise ValueError("CallableAttentionBackend does not take OLMo-core's sliding_window option")

    @classmethod
    def assert_supports_ring_cp(cls) -> None:
        raise ValueError("CallableAttentionBackend does not support context parallelism")

    @classmethod
    def assert_supports_ulysses_cp(cls) -> None:
        cls.assert_supports_ring_cp()

    @classmethod
    def assert_supports_packed_qkv(cls) -> None:
        raise ValueError("CallableAttentionBackend takes separate q, k, v tensors")

    @classmethod
    def assert_supports_kv_cache(cls) -> None:
        raise ValueError("CallableAttentionBackend has no KV cache")

    def forward(self, qkv, cu_doc_lens=None, cu_doc_lens_q=None, cu_doc_lens_k=None, max_doc_len=None,
                max_doc_len_q=None, max_doc_len_k=None, local_k_slice=None, kv_cache_manager=None,
                sinks=None) -> torch.Tensor:
        """``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` -> ``[B, T, H, D]``."""
        if isinstance(qkv, torch.Tensor):
            self.assert_supports_packed_qkv()
        if any(x is not None for x in (cu_doc_lens, cu_doc_lens_q, cu_doc_lens_k, kv_cache_manager, sinks)):
            raise ValueError("CallableAttentionBackend supports plain self-attention only "
                             "(no document masking, KV cache or sinks)")
        q, k, v = qkv
        return self.fn(q, k, v)


def attention_layers(model: torch.nn.Module) -> list[Attention]:
    """Every OLMo-core :class:`Attention` layer of ``model`` (band layers included), in order."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def set_attention_core(model: torch.nn.Module, fn: AttnFn) -> int:
    """Makes every attention layer of ``model`` compute its core with ``fn``, in place.

    Parameters are untouched; returns the number of layers switched. Works on dense and
    band layers alike (the backend module is replaced, nothing else).
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError("the model has no OLMo-core attention layers")
    for layer in layers:
        old = layer.backend
        layer.backend = CallableAttentionBackend(
            fn, head_dim=old.head_dim, n_heads=old.n_heads, n_kv_heads=old.n_kv_heads, scale=old.scale
        )
    return len(layers)


# ---------------------------------------------------------------- checkpoints
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "model_config.json"


def save_small_model(out_dir, model: torch.nn.Module, shape: ModelShape, attention: str,
                     partition_len: int, extra: dict | None = None):
    """Writes ``model.safetensors`` (weights only: loading never runs code) and
    ``model_config.json`` (shape, attention, partition length, ``extra``) under ``out_dir``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / CHECKPOINT_WEIGHTS))
    meta = {"shape": shape.to_dict(), "attention": attention, "partition_len": partition_len, **(extra or {})}
    (out / CHECKPOINT_CONFIG).write_text(json.dumps(meta, indent=2))
    return out


def load_small_model(ckpt_dir, device: torch.device | str = "cpu", backend: str = "auto"):
    """Inverse of :func:`save_small_model`: ``(model, meta)`` with the saved attention.

    Raises ``ValueError`` when the folder lacks either file or the weights do not fit.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from ..olmo.model import build_model, with_attention

    path = Path(ckpt_dir)
    for name in (CHECKPOINT_WEIGHTS, CHECKPOINT_CONFIG):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a small-model checkpoint: {name} is missing "
                             "(checkpoints are written by 'olmoe-spattn bench quality')")
    meta = json.loads((path / CHECKPOINT_CONFIG).read_text())
    shape = ModelShape(**meta["shape"])
    config = with_attention(table2_config(shape), meta["attention"], partition_len=meta["partition_len"],
                            backend=backend if meta["attention"] != "dense" else None)
    model = build_model(config, device, init_weights=False)
    state = load_file(str(path / CHECKPOINT_WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.eval()
    return model, meta
