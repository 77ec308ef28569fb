"""Forward band kernel for Hopper (SM90), written in Gluon: TMA ring buffers and async wgmma.

Same geometry, masking and results as :func:`forward.fwd_kernel` (one program per query tile,
head and batch row or packed document; at most two ranges of key blocks per tile; element
masks only on tiles that straddle an interval edge, ``Tk`` or the last query row), but the
schedule is explicit instead of left to Triton's pipeliner:

* Q is loaded once by TMA and then held in registers as the A operand of every score MMA (so
  each MMA reads only K from shared memory); K and V tiles stream through ``STAGES``-deep shared-memory rings,
  each slot with its own mbarrier, K and V separately (a K slot is refilled as soon as the
  score MMA that read it is done, a V slot once the P·V MMA that read it is done).
* Scores of key tile ``t`` (``S = Q K^T``) and ``O += P V`` of tile ``t - 1`` are issued as
  asynchronous warpgroup MMAs back to back; the softmax of tile ``t`` runs while the P·V
  MMA of tile ``t - 1`` is still on the tensor cores (FlashAttention-3's intra-warpgroup
  overlap). P stays in registers as the MMA's A operand.
* Edge tiles: scores outside the band become ``-inf``; value rows no query row of the tile
  attends are zeroed in shared memory before the P·V MMA reads them (``0 * NaN`` would reach
  rows that never attend that key), only on tiles that have such rows.

Rows past a sequence's end: a 2-D descriptor over ``[B * T, H * D]`` reads them from the next
batch row or document (or TMA's zero fill past the tensor). Such key tiles are never full, so
they take the exact mask and the value zeroing; such query rows feed only their own rows,
which are never stored. Requires head dim 64 or 128 (the tile's D), bf16 or fp16.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .common import load_intervals, sequence_geometry
from .hopper_common import (
    barrier_ring,
    blocked_rows_layout,
    issue_load,
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


@gluon.jit
def fwd_kernel_sm90(
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
    gl.static_assert(STAGES >= 2)  # tile t's V slot is refilled after tile t + 1's scores are issued
    # ---------------------------------------------------------------- which tile
    m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (latest) tiles first
    h = gl.program_id(1)
    z = gl.program_id(2)
    b, seq_start, tq, tk, q_off, tab = sequence_geometry(
        z, CuSeq, Table, table_doc_stride, tq_arg, tk_arg, q_off_arg, IS_VARLEN
    )
    if m * BLOCK_M >= tq:
        return
    h_kv = h // group
    lo0, hi0, lo1, hi1 = load_intervals(tab + h * 4)
    i0, i1, i_end, a0, n0, a1, n1 = query_tile_keys(m, q_off, tq, tk, lo0, hi0, lo1, hi1, BLOCK_M, BLOCK_N)
    n_tot = n0 + n1

    # ---------------------------------------------------------------- layouts
    s_layout: gl.constexpr = mma_layout(num_warps, BLOCK_N)  # [BLOCK_M, BLOCK_N] scores
    o_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # [BLOCK_M, HEAD_DIM] output
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    v_reg_layout: gl.constexpr = blocked_rows_layout(HEAD_DIM, num_warps)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_desc.dtype

    # ---------------------------------------------------------------- shared memory, barriers
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_ring = tile_ring(k_desc, STAGES)
    v_ring = tile_ring(v_desc, STAGES)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = barrier_ring(STAGES)
    v_bars = barrier_ring(STAGES)
    mbarrier.init(q_bar, count=1)

    q_row = (b * tq + seq_start + m * BLOCK_M).to(gl.int32)
    kv_row0 = (b * tk + seq_start).to(gl.int32)
    q_col = h * HEAD_DIM
    kv_col = h_kv * HEAD_DIM
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, q_col], q_bar, q_smem)
    for s in gl.static_range(STAGES):  # fill the rings
        row = kv_row0 + walk_block(s, n0, a0, a1) * BLOCK_N
        issue_load(k_desc, row, kv_col, k_bars, k_ring, s, s < n_tot)
        issue_load(v_desc, row, kv_col, v_bars, v_ring, s, s < n_tot)

    qk_scale = sm_scale * 1.4426950408889634
    i_pos = i0 + gl.arange(0, BLOCK_M, layout=row_s)  # query positions in key coordinates
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)  # scores; each MMA overwrites it
    mbarrier.wait(q_bar, 0)
    # Q as the register A operand of every score MMA: only K is read from shared memory per MMA
    q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))

    if n_tot > 0:
        # tile 0: scores and softmax only; its P·V is issued with tile 1's scores
        kb = walk_block(0, n0, a0, a1)
        mbarrier.wait(k_bars.index(0), 0)
        s_acc = warpgroup_mma(q_op, k_ring.index(0).permute((1, 0)), s_acc, use_acc=False, is_async=True)
        s_acc = warpgroup_mma_wait(0, deps=(s_acc,))
        nxt = STAGES
        issue_load(k_desc, kv_row0 + walk_block(nxt, n0, a0, a1) * BLOCK_N, kv_col, k_bars, k_ring, 0, nxt < n_tot)
        s_acc = masked_scores(s_acc, v_ring, v_bars, 0, 0, kb * BLOCK_N, i0, i1, i0, i1, i_pos, offs_n, i_end, tk,
                              lo0, hi0, lo1, hi1, BLOCK_N, v_reg_layout)
        p, m_i, l_i = softmax_first_tile(s_acc, qk_scale)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for t in range(1, n_tot):
            slot = t % STAGES
            phase = (t // STAGES) & 1
            prev = (t - 1) % STAGES
            prev_phase = ((t - 1) // STAGES) & 1
            kb = walk_block(t, n0, a0, a1)
            mbarrier.wait(k_bars.index(slot), phase)
            s_acc = warpgroup_mma(q_op, k_ring.index(slot).permute((1, 0)), s_acc, use_acc=False, is_async=True)
            mbarrier.wait(v_bars.index(prev), prev_phase)
            acc = warpgroup_mma(p_op, v_ring.index(prev), acc, is_async=True)
            s_acc = warpgroup_mma_wait(1, deps=(s_acc,))  # the scores (issued first) are done
            nxt = t + STAGES
            issue_load(k_desc, kv_row0 + walk_block(nxt, n0, a0, a1) * BLOCK_N, kv_col, k_bars, k_ring, slot,
                        nxt < n_tot)
            s_acc = masked_scores(s_acc, v_ring, v_bars, slot, phase, kb * BLOCK_N, i0, i1, i0, i1, i_pos, offs_n, i_end,
                                  tk, lo0, hi0, lo1, hi1, BLOCK_N, v_reg_layout)
            p, alpha, m_i, l_i = softmax_next_tile(s_acc, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(0, deps=(acc,))  # P·V of tile t - 1 done: its V slot is free
            nxt = t - 1 + STAGES
            issue_load(v_desc, kv_row0 + walk_block(nxt, n0, a0, a1) * BLOCK_N, kv_col, v_bars, v_ring, prev,
                        nxt < n_tot)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = (n_tot - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_tot - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_ring.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(s))
        mbarrier.invalidate(v_bars.index(s))

    # ---------------------------------------------------------------- epilogue
    out_base = b.to(gl.int64) * stride_ob + seq_start.to(gl.int64) * stride_ot + h * stride_oh
    lse_base = b.to(gl.int64) * stride_lb + h * stride_lh + seq_start
    store_output_rows(acc, m_i, l_i, Out, Lse, out_base, lse_base, stride_ot, m * BLOCK_M, tq, ROW_MAJOR_STORE)
