"""FlashAttention-4 (``flash-attn-4``, CuTe DSL) driven with a band pattern, for benchmarks.

The band goes to FA4 two ways at once, as FA4 expects for arbitrary masks:

- block sparsity: the 128x128 tiles of FlexAttention's ``BlockMask`` for the same
  spec (``olmoe_spattn.flex.band_block_mask``): ``kv_*`` tensors (per query tile,
  which key tiles to visit) for the forward, ``q_*`` tensors (per key tile, which
  query tiles) for the backward; "full" tiles skip the element mask;
- a ``mask_mod`` for the partial tiles, reading the per-head distance intervals
  (``BandSpec.interval_tensor``) from an auxiliary int32 table ``[H, 4]``
  (``lo0, hi0, lo1, hi1``): key ``j`` is allowed for query ``i`` iff ``i - j`` falls
  in one of the two half-open intervals.

The ``dense`` pattern uses FA4's built-in causal path instead. Nothing here is
imported unless FA4 is installed; :func:`fa4_available` says whether it is.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch

from ..bands import MAX_INTERVALS, BandSpec

#: FlexAttention block size used for the FA4 block-sparsity tensors.
FA4_BLOCK = 128


def fa4_available() -> tuple[bool, str]:
    """(importable, reason): FA4 needs the ``flash_attn.cute`` package and a CUDA GPU."""
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU"
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError or a broken CuTe DSL install
        return False, f"flash_attn.cute not importable ({type(err).__name__}: {str(err)[:120]})"
    return True, "ok"


@functools.cache
def _band_mask_mod() -> Callable:
    """The CuTe ``mask_mod`` (built once; FA4 caches compiled kernels by its hash)."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def band_interval_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        table = aux_tensors[0]  # [H, 4] int32: lo0, hi0, lo1, hi1 (distances, half-open)
        h = head[0]
        lo0 = utils.scalar_to_ssa(table[h, 0], cutlass.Int32)
        hi0 = utils.scalar_to_ssa(table[h, 1], cutlass.Int32)
        lo1 = utils.scalar_to_ssa(table[h, 2], cutlass.Int32)
        hi1 = utils.scalar_to_ssa(table[h, 3], cutlass.Int32)
        dist = m_idx - n_idx
        return ((dist >= lo0) & (dist < hi0)) | ((dist >= lo1) & (dist < hi1))

    return band_interval_mask


def _interval_table(spec: BandSpec, seq_len: int, n_heads: int, device: torch.device) -> torch.Tensor:
    table = spec.interval_tensor(seq_len if spec.is_dynamic else None, n_local_heads=n_heads)
    assert table.shape[1] == MAX_INTERVALS == 2
    return table.reshape(n_heads, 2 * MAX_INTERVALS).contiguous().to(device)  # [H, 4] int32


def make_fa4_band_fn(
    spec: BandSpec, seq_len: int, n_heads: int, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function ``(q, k, v) -> out`` (all ``[B, T, H, D]``) running FA4 with ``spec``'s band.

    Self-attention only (queries and keys are the same ``seq_len`` positions).
    """
    from flash_attn.cute import flash_attn_func

    # CuTe DSL warns on every compile that the aux-tensor bundle is not a JIT argument; harmless.
    warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted")
    if spec.pattern == "dense":

        def fa4_causal(q, k, v):
            out = flash_attn_func(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out

        return fa4_causal

    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from ..flex import band_block_mask

    bm = band_block_mask(spec, seq_len, seq_len, n_local_heads=n_heads, device=device, block_size=FA4_BLOCK)

    def i32(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(torch.int32).contiguous()

    fwd_sparse = BlockSparseTensorsTorch(
        mask_block_cnt=i32(bm.kv_num_blocks),
        mask_block_idx=i32(bm.kv_indices),
        full_block_cnt=i32(bm.full_kv_num_blocks),
        full_block_idx=i32(bm.full_kv_indices),
        block_size=(FA4_BLOCK, FA4_BLOCK),
    )
    bwd_sparse = BlockSparseTensorsTorch(
        mask_block_cnt=i32(bm.q_num_blocks),
        mask_block_idx=i32(bm.q_indices),
        full_block_cnt=i32(bm.full_q_num_blocks),
        full_block_idx=i32(bm.full_q_indices),
        block_size=(FA4_BLOCK, FA4_BLOCK),
    )
    table = _interval_table(spec, seq_len, n_heads, device)
    mask_mod = _band_mask_mod()

    def fa4_band(q, k, v):
        out = flash_attn_func(
            q, k, v,
            softmax_scale=1.0 / math.sqrt(q.shape[-1]),
            mask_mod=mask_mod,
            aux_tensors=[table],
            block_sparse_tensors=fwd_sparse,
            block_sparse_tensors_bwd=bwd_sparse,
        )
        return out[0] if isinstance(out, tuple) else out

    return fa4_band
