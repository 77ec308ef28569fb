"""Warp-specialized forward band kernel for Hopper (SM90), written in Gluon.

Same geometry, masks and results as :func:`hopper_forward.fwd_kernel_sm90`, but one program
takes a query tile of ``2 * BLOCK_M`` rows and splits it over partitions of its own warps
(``gl.warp_specialize``):

* a producer warp loads the two ``[BLOCK_M, D]`` Q tiles once and streams the K and V tiles of
  the whole ``2 * BLOCK_M``-row tile through ``STAGES``-deep rings by TMA; each slot has a
  "ready" mbarrier (completed by the TMA bytes) and an "empty" one (one arrival per consumer);
* two consumer warpgroups, one per ``BLOCK_M`` rows, each run the online softmax of
  :func:`hopper_forward.fwd_kernel_sm90` over the same key tiles: the softmax of key tile ``t``
  overlaps the P·V MMA of tile ``t - 1``, and a consumer frees a K slot as soon as its score
  MMA is done and a V slot once its P·V MMA is done.

Both consumers read each K and V tile once from shared memory, so the tile crosses L2 once per
``2 * BLOCK_M`` query rows instead of once per ``BLOCK_M``, and no consumer waits on a load it
issued. The key range is that of the whole tile: on a band's edges a consumer computes tiles
that are masked for all its rows (a few percent of a wide band's work, more of a narrow one:
``auto`` takes this kernel for bands wider than ``launch.AUTO_GLUON_WS_MIN_EXTENT``). Value rows
that no row of the whole tile attends are zeroed in shared memory by both consumers (the same
zeros, before either P·V MMA reads the slot).

Registers: 12 warps (two consumer warpgroups and the producer's warpgroup) launched at
``MAX_REGISTERS`` each, then rebalanced by ``setmaxnreg``: 24 for the producer, 240 for each
consumer. Requires head dim 64 or 128, bf16 or fp16.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from .common import load_intervals, sequence_geometry
from .hopper_common import (
    barrier_ring,
    blocked_rows_layout,
    masked_scores,
    mma_layout,
    query_tile_keys,
    softmax_first_tile,
    softmax_next_tile,
    store_output_rows,
    tile_ring,
    tma_load,
    walk_block,
)

#: registers per thread at launch: 65536 / (3 warpgroups x 128 threads), rounded down to 8
MAX_REGISTERS = 168
CONSUMER_WARPS = gl.constexpr(4)


@gluon.jit
def _produce(q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty,
             q_row, q_col, kv_row0, kv_col, n_tot, n0, a0, a1):
    """The producer warp: both Q tiles, then every key tile's K and V into the rings."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    STAGES: gl.constexpr = k_ring.type.shape[0]
    BLOCK_N: gl.constexpr = k_ring.type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, q_col], q_bar, q_smem.index(0))
    tma_load(q_desc, [q_row + BLOCK_M, q_col], q_bar, q_smem.index(1))
    for t in range(0, n_tot):
        slot = t % STAGES
        phase = (t // STAGES) & 1
        row = kv_row0 + walk_block(t, n0, a0, a1) * BLOCK_N
        # a fresh mbarrier counts as having completed the phase before its first: the first
        # STAGES waits pass at once
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma_load(k_desc, [row, kv_col], k_ready.index(slot), k_ring.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma_load(v_desc, [row, kv_col], v_ready.index(slot), v_ring.index(slot))


@gluon.jit
def _consume(WG: gl.constexpr, ROW_MAJOR: gl.constexpr, q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty,
             Out, Lse, out_base, lse_base, stride_ot, m_row0, tq, tk, i0, i1, i_end, n_tot, n0, a0, a1,
             lo0, hi0, lo1, hi1, sm_scale):
    """Consumer warpgroup ``WG``: rows ``WG * BLOCK_M ..`` of the tile, output and log-sum-exp."""
    # sizes from the buffers' types (constexpr arguments of partitions are not plain values
    # in every Triton version)
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    HEAD_DIM: gl.constexpr = q_smem.type.shape[2]
    STAGES: gl.constexpr = k_ring.type.shape[0]
    BLOCK_N: gl.constexpr = k_ring.type.shape[1]
    s_layout: gl.constexpr = mma_layout(CONSUMER_WARPS, BLOCK_N)  # [BLOCK_M, BLOCK_N] scores
    o_layout: gl.constexpr = mma_layout(CONSUMER_WARPS, HEAD_DIM)  # [BLOCK_M, HEAD_DIM] output
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    v_reg_layout: gl.constexpr = blocked_rows_layout(HEAD_DIM, CONSUMER_WARPS)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype

    i0w = i0 + WG * BLOCK_M  # this consumer's rows, in key coordinates
    i1w = gl.minimum(i0w + BLOCK_M - 1, i_end - 1)
    qk_scale = sm_scale * 1.4426950408889634
    i_pos = i0w + gl.arange(0, BLOCK_M, layout=row_s)
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)  # scores; each MMA overwrites it
    q_tile = q_smem.index(WG)
    mbarrier.wait(q_bar, 0)

    if n_tot > 0:
        # tile 0: scores and softmax only; its P·V is issued with tile 1's scores
        kb = walk_block(0, n0, a0, a1)
        mbarrier.wait(k_ready.index(0), 0)
        s_acc = warpgroup_mma(q_tile, k_ring.index(0).permute((1, 0)), s_acc, use_acc=False, is_async=True)
        s_acc = warpgroup_mma_wait(0, deps=(s_acc,))
        mbarrier.arrive(k_empty.index(0), count=1)
        s_acc = masked_scores(s_acc, v_ring, v_ready, 0, 0, kb * BLOCK_N, i0w, i1w, i0, i1, i_pos, offs_n, i_end,
                              tk, lo0, hi0, lo1, hi1, BLOCK_N, v_reg_layout)
        p, m_i, l_i = softmax_first_tile(s_acc, qk_scale)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for t in range(1, n_tot):
            slot = t % STAGES
            phase = (t // STAGES) & 1
            prev = (t - 1) % STAGES
            prev_phase = ((t - 1) // STAGES) & 1
            kb = walk_block(t, n0, a0, a1)
            mbarrier.wait(k_ready.index(slot), phase)
            s_acc = warpgroup_mma(q_tile, k_ring.index(slot).permute((1, 0)), s_acc, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(prev), prev_phase)
            acc = warpgroup_mma(p_op, v_ring.index(prev), acc, is_async=True)
            s_acc = warpgroup_mma_wait(1, deps=(s_acc,))  # the scores (issued first) are done
            mbarrier.arrive(k_empty.index(slot), count=1)
            s_acc = masked_scores(s_acc, v_ring, v_ready, slot, phase, kb * BLOCK_N, i0w, i1w, i0, i1, i_pos, offs_n,
                                  i_end, tk, lo0, hi0, lo1, hi1, BLOCK_N, v_reg_layout)
            p, alpha, m_i, l_i = softmax_next_tile(s_acc, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(0, deps=(acc,))  # P·V of tile t - 1 done: its V slot is free
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        last = (n_tot - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_tot - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_ring.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(last), count=1)

    store_output_rows(acc, m_i, l_i, Out, Lse, out_base, lse_base, stride_ot, m_row0 + WG * BLOCK_M, tq, ROW_MAJOR)


@gluon.jit
def fwd_kernel_sm90_ws(
    q_desc, k_desc, v_desc, Out, Lse, Table, CuSeq,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    table_doc_stride,
    tq_arg, tk_arg, q_off_arg,
    group,
    sm_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    IS_VARLEN: gl.constexpr,
    num_warps: gl.constexpr,
    ROW_MAJOR_STORE: gl.constexpr = False,
):
    """One program per ``2 * BLOCK_M``-row query tile, head and batch row or packed document
    (grid as :func:`hopper_forward.fwd_kernel_sm90`'s with twice the rows per tile); launch with
    ``num_warps=4`` (the first consumer) and ``maxnreg=MAX_REGISTERS``."""
    gl.static_assert(num_warps == CONSUMER_WARPS)
    TILE_M: gl.constexpr = 2 * BLOCK_M
    m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (latest) tiles first
    h = gl.program_id(1)
    z = gl.program_id(2)
    b, seq_start, tq, tk, q_off, tab = sequence_geometry(
        z, CuSeq, Table, table_doc_stride, tq_arg, tk_arg, q_off_arg, IS_VARLEN
    )
    if m * TILE_M >= tq:
        return
    h_kv = h // group
    lo0, hi0, lo1, hi1 = load_intervals(tab + h * 4)
    i0, i1, i_end, a0, n0, a1, n1 = query_tile_keys(m, q_off, tq, tk, lo0, hi0, lo1, hi1, TILE_M, BLOCK_N)
    n_tot = n0 + n1
    dtype: gl.constexpr = q_desc.dtype

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_ring = tile_ring(k_desc, STAGES)
    v_ring = tile_ring(v_desc, STAGES)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = barrier_ring(STAGES)
    v_ready = barrier_ring(STAGES)
    k_empty = barrier_ring(STAGES, 2)  # one arrival per consumer
    v_empty = barrier_ring(STAGES, 2)
    mbarrier.init(q_bar, count=1)

    q_row = (b * tq + seq_start + m * TILE_M).to(gl.int32)  # row of [B * Tq (or total), H * D]
    kv_row0 = (b * tk + seq_start).to(gl.int32)
    out_base = b.to(gl.int64) * stride_ob + seq_start.to(gl.int64) * stride_ot + h * stride_oh
    lse_base = b.to(gl.int64) * stride_lb + h * stride_lh + seq_start
    m_row0 = m * TILE_M
    consumer_args = (q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty,
                     Out, Lse, out_base, lse_base, stride_ot, m_row0, tq, tk, i0, i1, i_end, n_tot, n0, a0, a1,
                     lo0, hi0, lo1, hi1, sm_scale)
    gl.warp_specialize([
        (_consume, (0, ROW_MAJOR_STORE) + consumer_args),  # the default partition: this program's own warps
        (_consume, (1, ROW_MAJOR_STORE) + consumer_args),
        (_produce, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, v_ready, k_empty, v_empty,
                    q_row, h * HEAD_DIM, kv_row0, h_kv * HEAD_DIM, n_tot, n0, a0, a1)),
    ], [CONSUMER_WARPS, 1], [240, 24])
