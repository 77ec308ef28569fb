"""Gluon pieces shared by the Hopper kernels (``hopper_forward.py``, ``hopper_backward.py``)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from .common import key_block_ranges, keys_used, tile_keys_all_used

# names that changed after Triton 3.6: the TMA tile load and the per-thread ``cp.async`` copy
# (``async_copy_global_to_shared`` -> ``async_load``), the CTA-wide barrier (``thread_barrier`` ->
# ``barrier``)
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
cp_async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.constexpr_function
def blocked_rows_layout(head_dim, num_warps):
    """A register layout for a ``[rows, head_dim]`` tile with 16-byte vectors along D."""
    lanes_d = max(1, min(32, head_dim // 8))
    return gl.BlockedLayout([1, 8], [32 // lanes_d, lanes_d], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def mma_layout(num_warps, n):
    """Accumulator layout of a warpgroup MMA with ``n`` output columns, warps stacked along rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def query_tile_keys(m, q_off, tq, tk, lo0, hi0, lo1, hi1, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """``(i0, i1, i_end, a0, n0, a1, n1)`` of query tile ``m``: its first and last row and the
    first position past the sequence (key coordinates), and its two key-block ranges."""
    i0 = m * BLOCK_M + q_off
    i1 = gl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
    a0, n0, a1, n1 = key_block_ranges(i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N)
    return i0, i1, q_off + tq, a0, n0, a1, n1


@gluon.jit
def issue_load(desc, row, col, bars, ring, slot, pred):
    """TMA load of one ``[rows, D]`` tile into ``ring[slot]``, completing ``bars[slot]``."""
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma_load(desc, [row, col], bar, ring.index(slot), pred=pred)


@gluon.jit
def zero_unused_key_rows(ring, bars, slot, phase, j0, i0, i1, tk, lo0, hi0, lo1, hi1,
                         BLOCK_N: gl.constexpr, reg_layout: gl.constexpr):
    """Zeroes, in the key tile ``ring[slot]`` (keys ``j0..j0+BLOCK_N-1``, after waiting for its
    load), the rows of keys that no query row ``i0..i1`` attends, when the tile has any: a
    non-finite value there would otherwise reach other rows through ``0 * NaN`` in an MMA."""
    if not tile_keys_all_used(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N):
        mbarrier.wait(bars.index(slot), phase)
        tile = ring.index(slot).load(reg_layout)
        keys = j0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, reg_layout))
        keep = keys_used(keys, i0, i1, tk, lo0, hi0, lo1, hi1)
        ring.index(slot).store(gl.where(gl.expand_dims(keep, 1), tile, 0.0))
        fence_async_shared()
        cta_barrier()


@gluon.jit
def walk_block(t, n0, a0, a1):
    """Block index of the ``t``-th tile of a walk over two block ranges: ``a0 .. a0 + n0 - 1``
    first, then from ``a1`` on (the key blocks of a query tile, or the query blocks of a key tile)."""
    return gl.where(t < n0, a0 + t, a1 + (t - n0))
