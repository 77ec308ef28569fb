"""Gluon pieces shared by the Hopper kernels (``hopper_forward.py``, ``hopper_backward.py``)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from .common import key_block_ranges, keys_used, pair_mask_flat, tile_is_full, tile_keys_all_used

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
def tile_ring(desc, STAGES: gl.constexpr):
    """``STAGES`` slots in shared memory for tiles of ``desc``'s block shape and layout."""
    return gl.allocate_shared_memory(desc.dtype, [STAGES] + desc.block_type.shape, desc.layout)


@gluon.jit
def barrier_ring(STAGES: gl.constexpr, count: gl.constexpr = 1):
    """``STAGES`` initialized mbarriers, each of a phase that ``count`` arrivals complete (with
    the bytes of a TMA load that expects them)."""
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=count)
    return bars


@gluon.jit
def softmax_first_tile(s_acc, qk_scale):
    """The online softmax's first key tile: ``(p, m, l)`` from scores ``s_acc`` (``-inf`` where
    masked; rows with nothing allowed keep ``m = -inf`` and get ``p = 0``)."""
    m_new = gl.maximum(gl.max(s_acc, 1) * qk_scale, float("-inf"))  # (a NaN row max reads -inf, as later)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
    p = gl.exp2(s_acc * qk_scale - gl.expand_dims(m_sub, 1))
    return p, m_new, gl.sum(p, 1)


@gluon.jit
def softmax_next_tile(s_acc, m_i, l_i, qk_scale):
    """One more key tile of the online softmax: ``(p, alpha, m, l)``, where ``alpha`` rescales
    the output accumulated so far."""
    m_new = gl.maximum(m_i, gl.max(s_acc, 1) * qk_scale)
    m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s_acc * qk_scale - gl.expand_dims(m_sub, 1))
    alpha = gl.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.constexpr_function
def output_store_layout(mma, head_dim, row_major):
    """The register layout an output tile in MMA layout ``mma`` is stored from: ``mma`` itself, or
    with ``row_major`` the row-major :func:`blocked_rows_layout` for its warps, where each thread
    writes 16 contiguous bytes (whole 32-byte sectors; see ``autotune.row_major_store``)."""
    return blocked_rows_layout(head_dim, mma.warps_per_cta[0]) if row_major else mma


@gluon.jit
def store_output_rows(acc, m_i, l_i, Out, Lse, out_base, lse_base, stride_ot, first_row, tq,
                      ROW_MAJOR: gl.constexpr = False):
    """Normalizes the ``[rows, D]`` accumulator ``acc`` and stores it with its log-sum-exp for
    rows ``first_row ..`` (relative to the sequence; those ``>= tq`` are skipped). Rows that
    attend nothing (``l = 0``) get output 0 and log-sum-exp ``-inf``. With ``ROW_MAJOR`` the
    output is stored from a row-major layout (whole 32-byte sectors, after one trip through shared
    memory) instead of from the MMA layout."""
    o_layout: gl.constexpr = acc.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_o)
    empty = l_o == 0.0
    st_layout: gl.constexpr = output_store_layout(o_layout, acc.type.shape[1], ROW_MAJOR)
    out = gl.convert_layout((acc / gl.expand_dims(gl.where(empty, 1.0, l_o), 1)).to(Out.dtype.element_ty), st_layout)
    offs_mo = first_row + gl.arange(0, acc.type.shape[0], layout=gl.SliceLayout(1, st_layout))
    offs_do = gl.arange(0, acc.type.shape[1], layout=gl.SliceLayout(0, st_layout))
    o_ptrs = Out + out_base + gl.expand_dims(offs_mo.to(gl.int64) * stride_ot, 1) + gl.expand_dims(offs_do, 0)
    o_mask = gl.expand_dims(offs_mo < tq, 1) & gl.expand_dims(offs_do < acc.type.shape[1], 0)
    gl.store(o_ptrs, out, mask=o_mask)
    m_o = gl.convert_layout(m_i, row_o)
    lse = gl.where(empty, float("-inf"), (m_o + gl.log2(gl.where(empty, 1.0, l_o))) * 0.6931471805599453)
    offs_ml = first_row + gl.arange(0, acc.type.shape[0], layout=row_o)
    gl.store(Lse + lse_base + offs_ml, lse, mask=offs_ml < tq)


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
def masked_scores(s_acc, v_ring, v_bars, slot, phase, j0, i0w, i1w, i0, i1, i_pos, offs_n, i_end, tk,
                  lo0, hi0, lo1, hi1, BLOCK_N: gl.constexpr, v_reg_layout: gl.constexpr):
    """Scores of key tile ``j0..`` for query rows ``i0w..i1w`` (positions ``i_pos``) with
    disallowed pairs at ``-inf``; on such edge tiles, value rows that no row ``i0..i1`` of the
    whole program attends are zeroed in ``v_ring[slot]`` (after its load). A program whose rows
    are split over warpgroups passes its own rows as ``i0..i1`` and each group's as ``i0w..i1w``."""
    if not tile_is_full(i0w, i1w, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N):
        allowed = pair_mask_flat(i_pos, j0 + offs_n, i_end, tk, lo0, hi0, lo1, hi1)
        s_acc = gl.where(allowed, s_acc, float("-inf"))
        zero_unused_key_rows(v_ring, v_bars, slot, phase, j0, i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N, v_reg_layout)
    return s_acc


@gluon.jit
def walk_block(t, n0, a0, a1):
    """Block index of the ``t``-th tile of a walk over two block ranges: ``a0 .. a0 + n0 - 1``
    first, then from ``a1`` on (the key blocks of a query tile, or the query blocks of a key tile)."""
    return gl.where(t < n0, a0 + t, a1 + (t - n0))
