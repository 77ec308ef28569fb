"""Per-GPU memory estimate of a training recipe (what ``train --dry-run`` prints).

The estimate adds, per GPU:

* **model states** (FSDP-sharded over the data-parallel degree): fp32 master weights (4 B),
  fp32 gradients (4 B) and AdamW's two fp32 moments (8 B) per parameter = 16 B / parameter;
* **gathered parameters**: FSDP unshards one block at a time in the compute dtype and prefetches
  the next, so two blocks' parameters in bf16 (2 B) are resident;
* **activations** kept for the backward pass of one micro-batch (``rank_microbatch_size``
  sequences of ``sequence_length`` tokens) in bf16, per layer:
  attention ``9 d`` per token (block input, q/k/v before and after the q/k norm and RoPE as
  ``3 d + 2 d``, attention output, output projection, norm) -- or ``1 d`` (the input) when
  attention is activation-checkpointed (``activation_checkpointing: attention``); MoE
  ``2 d + 2 k d + 4 k h`` (norm and residual; the ``k`` routed copies of each token in and out;
  the expert MLP's w1, w3, SiLU and product, hidden size ``h``) plus fp32 router logits
  ``4 E`` bytes. With ``selected_ops`` (OLMo-core checkpoints whole blocks and saves only every
  second ``aten.mm`` output; grouped expert matmuls and attention kernels are recomputed) a layer
  keeps ``3 d`` per token (block input plus half the attention projections) and the router logits;
* **logits**: bf16 logits plus their fp32 copy for the loss, ``6 V`` bytes per token;
* **overhead**: CUDA context, NCCL buffers and allocator slack, 3 GiB + 10%.

It is an estimate to plan with (which GPU, how many), not a measurement: the real peak
depends on the allocator, compile and kernel workspaces.
"""

from __future__ import annotations

from dataclasses import dataclass

from .recipe import Recipe

GIB = 1024**3
#: GPU sizes the report plans for: name -> usable bytes (the marketing GB figure).
GPU_SIZES: dict[str, int] = {"80 GB (A100/H100)": 80 * 10**9, "141 GB (H200)": 141 * 10**9}
BYTES_PER_PARAM_STATE = 16  # fp32 weight + fp32 grad + 2 fp32 AdamW moments
OVERHEAD_FIXED = 3 * GIB
OVERHEAD_FRACTION = 0.10
MAX_GPUS = 4096


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by component, at one data-parallel (FSDP) degree."""

    dp_degree: int
    model_states: int
    gathered_params: int
    activations: int
    logits: int

    @property
    def subtotal(self) -> int:
        return self.model_states + self.gathered_params + self.activations + self.logits

    @property
    def total(self) -> int:
        return int(self.subtotal * (1 + OVERHEAD_FRACTION)) + OVERHEAD_FIXED


def activation_bytes_per_token_per_layer(recipe: Recipe, mode: str | None) -> int:
    """bf16 activation bytes one layer keeps per token for the backward pass (see module doc);
    ``mode`` is ``train.activation_checkpointing`` (None, ``attention`` or ``selected_ops``)."""
    m = recipe.model
    d, k, h = m.d_model, m.top_k, m.expert_hidden_size
    router = 4 * m.num_experts
    if mode == "selected_ops":
        return 2 * 3 * d + router
    attention = (1 if mode == "attention" else 9) * d
    moe = 2 * d + 2 * k * d + 4 * k * h
    return 2 * (attention + moe) + router


def block_params(recipe: Recipe) -> int:
    """Parameters of one transformer block (attention, norms, router, experts)."""
    m = recipe.model
    d = m.d_model
    return 4 * d * d + 2 * d + 2 * d + m.num_experts * d + 3 * m.num_experts * m.expert_hidden_size * d


def estimate(recipe: Recipe, dp_degree: int) -> MemoryEstimate:
    """Per-GPU memory of ``recipe`` trained with FSDP over ``dp_degree`` GPUs."""
    if dp_degree < 1:
        raise ValueError(f"dp_degree must be >= 1, got {dp_degree}")
    t, m = recipe.train, recipe.model
    n_params = recipe.model_config().num_params
    tokens = t.rank_microbatch_size * t.sequence_length
    per_layer = activation_bytes_per_token_per_layer(recipe, t.activation_checkpointing)
    shards = dp_degree if t.data_parallel in ("fsdp", "hsdp") else 1
    return MemoryEstimate(
        dp_degree=dp_degree,
        model_states=-(-n_params * BYTES_PER_PARAM_STATE // shards),
        gathered_params=2 * 2 * block_params(recipe) if shards > 1 else 0,
        activations=tokens * m.n_layers * per_layer,
        logits=tokens * m.vocab_size * 6,
    )


def gpus_needed(recipe: Recipe, capacity: int) -> int | None:
    """Smallest power-of-two FSDP degree whose estimate fits ``capacity`` bytes (None: none does,
    because activations of one micro-batch alone exceed it)."""
    n = 1
    while n <= MAX_GPUS:
        if estimate(recipe, n).total <= capacity:
            return n
        n *= 2
    return None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def report(recipe: Recipe) -> list[str]:
    """Lines of the ``--dry-run`` memory section."""
    t = recipe.train
    ac = t.activation_checkpointing or "none"
    lines = [
        f"per GPU at seq {t.sequence_length:,} x micro-batch {t.rank_microbatch_size}, "
        f"{t.data_parallel}, activation checkpointing: {ac}",
    ]
    tokens_layers = t.rank_microbatch_size * t.sequence_length * recipe.model.n_layers
    by_mode = ", ".join(
        f"{mode or 'none'} {_gib(activation_bytes_per_token_per_layer(recipe, mode) * tokens_layers)}"
        for mode in (None, "attention", "selected_ops")
    )
    lines.append(f"activations by checkpointing mode: {by_mode} (activations do not shrink with more GPUs)")
    for n in (1, 2, 4, 8):
        e = estimate(recipe, n)
        lines.append(
            f"  {n} GPU{'s' if n > 1 else ' '}: model states {_gib(e.model_states)} + gathered params "
            f"{_gib(e.gathered_params)} + activations {_gib(e.activations)} + logits {_gib(e.logits)} "
            f"-> ~{_gib(e.total)} with overhead"
        )
    one = estimate(recipe, 1)
    parts = {"model states": one.model_states, "activations": one.activations, "logits": one.logits}
    largest = max(parts, key=parts.get)
    lines.append(
        f"largest part on one GPU: {largest} ({_gib(parts[largest])}); more FSDP GPUs shrink only "
        "the model states, checkpointing and a smaller micro-batch shrink activations and logits"
    )
    for name, cap in GPU_SIZES.items():
        n = gpus_needed(recipe, cap)
        if n is None:
            lines.append(
                f"needs: does not fit {name} GPUs at any FSDP degree (one micro-batch's activations "
                "and logits alone are too large): lower train.rank_microbatch_size or enable "
                "train.activation_checkpointing=selected_ops"
            )
        else:
            lines.append(f"needs: {n} x {name} GPU{'s' if n > 1 else ''} (FSDP degree {n})")
    return lines
