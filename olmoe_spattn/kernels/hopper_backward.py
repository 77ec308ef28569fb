"""dK/dV band kernel for Hopper (SM90), written in Gluon: TMA rings and async wgmma.

The second pass of the two-pass backward (after :func:`backward.dq_kernel`, which stores
``delta``), with the same geometry and results as :func:`backward.dkdv_kernel`: one program per
(key tile, kv head, batch row or packed document); for each query head of the GQA group it walks
the query blocks that see the tile (at most two ranges, the mirror image of the forward's).

* K and V of the tile are loaded once by TMA and stay in shared memory as the A operands of
  ``S^T = K Q^T`` and ``dP^T = V dO^T``. Where the registers allow it (32-query steps at head
  dim 128), K is also loaded once into registers and ``S^T`` reads it from there: with
  32-query steps each 16-deep step of that MMA would read 3 KB of operands from shared memory for
  16 cycles of tensor-core work (more than the 128 bytes per cycle shared memory delivers); with K
  in registers it reads 1 KB. Q and dO tiles stream through ``STAGES``-deep rings,
  each slot with its own mbarrier, and the blocks' lse and delta rows through rings of their own
  (``cp.async``), read from shared memory where they are used instead of held in registers.
* Per query block: both score MMAs are issued asynchronously back to back; ``P^T`` is computed
  while ``dP^T`` is still on the tensor cores; ``dV += P^T dO`` is issued and runs while ``dS^T``
  is computed; then ``dK += dS^T Q``, which (with ``dV``) is waited for only once the next
  block's score MMAs are issued. ``P^T`` and ``dS^T`` stay in registers as A operands.
* Edge tiles take the exact element mask (``P^T`` and ``dS^T`` are 0 outside the band). On a
  sequence's last query block, the Q and dO rows past its end (the next batch row's or document's,
  read by the 2-D descriptor) are zeroed in shared memory, so they add exactly 0.
* dK and dV leave from a row-major register layout (``ROW_MAJOR_STORE``, one trip through shared
  memory) where that was measured faster than storing the MMA layout's 4-byte pairs.

Requires head dim 64 or 128 (the tile's D), bf16 or fp16.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from .common import (
    load_intervals,
    pair_mask_flat,
    pair_mask_t,
    query_block_ranges,
    sequence_geometry,
    tile_is_full,
)
from .hopper_common import (
    barrier_ring,
    blocked_rows_layout,
    cp_async_load,
    cta_barrier,
    issue_load,
    mma_layout,
    output_store_layout,
    query_tile_keys,
    tile_ring,
    tma_load,
    walk_block,
    zero_unused_key_rows,
)


@gluon.jit
def _zero_rows_past_end(ring, slot, first_row, tq, BLOCK_M: gl.constexpr, reg_layout: gl.constexpr):
    """Zeroes the rows ``>= tq`` of the ``[BLOCK_M, D]`` tile ``ring[slot]`` whose first row is ``first_row``."""
    tile = ring.index(slot).load(reg_layout)
    rows = first_row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, reg_layout))
    ring.index(slot).store(gl.where(gl.expand_dims(rows < tq, 1), tile, 0.0))


@gluon.jit
def _load_query_block(q_desc, do_desc, q_bars, do_bars, q_ring, do_ring, lse_ring, delta_ring, slot,
                      q_row0, col, mb, l_base, d_base, offs_vec, tq, pred, BLOCK_M: gl.constexpr):
    """Loads query block ``mb`` of one head into ring slot ``slot`` (when ``pred``): its Q and dO
    tiles by TMA, completing the slot's mbarriers, and its lse and delta rows by ``cp.async`` as
    one commit group (rows past the sequence's end, and every row when not ``pred``, read 0)."""
    row = q_row0 + mb * BLOCK_M
    issue_load(q_desc, row, col, q_bars, q_ring, slot, pred)
    issue_load(do_desc, row, col, do_bars, do_ring, slot, pred)
    rows = mb * BLOCK_M + offs_vec
    ok = (rows < tq) & pred
    cp_async_load(lse_ring.index(slot), l_base + rows, mask=ok)
    cp_async_load(delta_ring.index(slot), d_base + rows, mask=ok)
    async_copy.commit_group()


@gluon.jit
def dkdv_kernel_sm90(
    q_desc, k_desc, v_desc, do_desc, DK, DV, Lse, Delta, Table, CuSeq,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
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
    gl.static_assert(STAGES >= 2)  # a block's slot is refilled while the next block's is in use
    n = gl.program_id(0)
    h_kv = gl.program_id(1)
    z = gl.program_id(2)
    b, seq_start, tq, tk, q_off, tab = sequence_geometry(
        z, CuSeq, Table, table_doc_stride, tq_arg, tk_arg, q_off_arg, IS_VARLEN
    )
    if n * BLOCK_N >= tk:
        return
    j0 = n * BLOCK_N
    j1 = gl.minimum(j0 + BLOCK_N - 1, tk - 1)

    # ---------------------------------------------------------------- layouts
    st_layout: gl.constexpr = mma_layout(num_warps, BLOCK_M)  # [BLOCK_N, BLOCK_M] transposed scores
    kv_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # [BLOCK_N, HEAD_DIM] dK, dV
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    rows_layout: gl.constexpr = blocked_rows_layout(HEAD_DIM, num_warps)
    key_s: gl.constexpr = gl.SliceLayout(1, st_layout)
    query_s: gl.constexpr = gl.SliceLayout(0, st_layout)
    dtype: gl.constexpr = q_desc.dtype
    # K in registers costs HEAD_DIM / 4 of them per thread (a warpgroup's 64 keys). Taken where it
    # was measured faster and checked: 32-query steps at head dim 128. With 64-query steps the dK,
    # dV and score tiles leave no room (it spills and loses). Where the query step is as wide as
    # the head dim (64 at 64), Triton 3.6 computed wrong dK/dV from the register operand.
    K_IN_REGISTERS: gl.constexpr = (BLOCK_M == 32) and (HEAD_DIM == 128)

    # ---------------------------------------------------------------- shared memory, barriers
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ring = tile_ring(q_desc, STAGES)
    do_ring = tile_ring(do_desc, STAGES)
    vec_smem: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # plain [BLOCK_M] fp32 rows
    lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_smem)
    delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], vec_smem)
    offs_vec = gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [num_warps], [0]))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_bars = barrier_ring(STAGES)
    do_bars = barrier_ring(STAGES)
    mbarrier.init(kv_bar, count=1)

    kv_row = (b * tk + seq_start + j0).to(gl.int32)
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma_load(k_desc, [kv_row, h_kv * HEAD_DIM], kv_bar, k_smem)
    tma_load(v_desc, [kv_row, h_kv * HEAD_DIM], kv_bar, v_smem)

    qk_scale = sm_scale * 1.4426950408889634
    keys = j0 + gl.arange(0, BLOCK_N, layout=key_s)
    offs_m0 = gl.arange(0, BLOCK_M, layout=query_s)
    q_row0 = (b * tq + seq_start).to(gl.int32)  # row of [B * Tq (or total), H * D]
    st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dpt = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
    dk = warpgroup_mma_init(gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout))
    dv = warpgroup_mma_init(gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout))
    mbarrier.wait(kv_bar, 0)
    if K_IN_REGISTERS:  # [BLOCK_N, HEAD_DIM] as the A operand of S^T = K Q^T
        k_op = k_smem.load(gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2))
    else:
        k_op = k_smem

    it = 0  # tiles consumed so far (all heads): ring slot and phase
    for g in range(0, group):
        h = h_kv * group + g
        lo0, hi0, lo1, hi1 = load_intervals(tab + h * 4)
        c0, n0, c1, n1 = query_block_ranges(j0, j1, tq, q_off, lo0, hi0, lo1, hi1, BLOCK_M)
        n_q = n0 + n1
        col = h * HEAD_DIM
        l_base = Lse + b.to(gl.int64) * stride_lb + h * stride_lh + seq_start
        d_base = Delta + b.to(gl.int64) * stride_lb + h * stride_lh + seq_start
        async_copy.wait_group(0)  # the previous head's trailing (masked) lse copies are done
        for s in gl.static_range(STAGES):  # fill the rings (empty: every earlier tile is done)
            _load_query_block(q_desc, do_desc, q_bars, do_bars, q_ring, do_ring, lse_ring, delta_ring, (it + s) % STAGES,
                              q_row0, col, walk_block(s, n0, c0, c1), l_base, d_base, offs_vec, tq, s < n_q, BLOCK_M)
        for t in range(0, n_q):
            slot = it % STAGES
            phase = (it // STAGES) & 1
            mb = walk_block(t, n0, c0, c1)
            offs_m = mb * BLOCK_M + offs_m0  # rows relative to the sequence
            # this block's lse and delta are in: the fill committed STAGES groups, each later tile one
            if t == 0:
                async_copy.wait_group(STAGES - 1)
            else:
                async_copy.wait_group(STAGES - 2)
            cta_barrier()  # ... for every thread, and every thread is done with the previous block's
            mbarrier.wait(q_bars.index(slot), phase)
            mbarrier.wait(do_bars.index(slot), phase)
            if mb * BLOCK_M + BLOCK_M > tq:  # rows past the end: another sequence's, zeroed
                _zero_rows_past_end(q_ring, slot, mb * BLOCK_M, tq, BLOCK_M, rows_layout)
                _zero_rows_past_end(do_ring, slot, mb * BLOCK_M, tq, BLOCK_M, rows_layout)
                fence_async_shared()
                cta_barrier()
            st = warpgroup_mma(k_op, q_ring.index(slot).permute((1, 0)), st, use_acc=False, is_async=True)
            dpt = warpgroup_mma(v_smem, do_ring.index(slot).permute((1, 0)), dpt, use_acc=False, is_async=True)
            # groups in flight: [dV, dK of the previous tile,] S^T, dP^T -> all but dP^T are done
            dk, dv, st = warpgroup_mma_wait(1, deps=(dk, dv, st))
            if t > 0:  # the previous block's Q, dO, lse, delta are read: refill its slot (at t = 0 that slot
                # holds a block still to come, which a masked copy would overwrite with zeros)
                nxt = t - 1 + STAGES
                _load_query_block(q_desc, do_desc, q_bars, do_bars, q_ring, do_ring, lse_ring, delta_ring,
                                  (it - 1 + STAGES) % STAGES, q_row0, col, walk_block(nxt, n0, c0, c1), l_base, d_base,
                                  offs_vec, tq, nxt < n_q, BLOCK_M)
            lse = lse_ring.index(slot).load(query_s) * 1.4426950408889634  # rows past the end: 0 (Q, dO zeroed)
            lse = gl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
            pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
            i0 = mb * BLOCK_M + q_off
            i1 = gl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
            full = tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N)
            allowed = (gl.expand_dims(keys, 1) >= 0) & (gl.expand_dims(offs_m0, 0) >= 0)  # edge tiles replace it
            if not full:
                allowed = pair_mask_t(keys, offs_m + q_off, q_off + tq, tk, lo0, hi0, lo1, hi1)
                pt = gl.where(allowed, pt, 0.0)
            dpt = warpgroup_mma_wait(0, deps=(dpt,))
            dv = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do_ring.index(slot), dv, is_async=True)
            dst = pt * (dpt - gl.expand_dims(delta_ring.index(slot).load(query_s), 0))
            if not full:  # a non-finite value of a key outside the band never reaches dK
                dst = gl.where(allowed, dst, 0.0)
            dk = warpgroup_mma(gl.convert_layout(dst.to(dtype), op_layout), q_ring.index(slot), dk, is_async=True)
            it += 1
        dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))  # the head's last MMAs are done: rings reusable
        dk = warpgroup_mma_init(dk)
        dv = warpgroup_mma_init(dv)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))

    mbarrier.invalidate(kv_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(q_bars.index(s))
        mbarrier.invalidate(do_bars.index(s))

    # ---------------------------------------------------------------- epilogue
    out_layout: gl.constexpr = output_store_layout(kv_layout, HEAD_DIM, ROW_MAJOR_STORE)
    dk_o = gl.convert_layout((dk * sm_scale).to(dtype), out_layout)
    dv_o = gl.convert_layout(dv.to(dtype), out_layout)
    keys_o = j0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    kv_mask = gl.expand_dims(keys_o < tk, 1) & gl.expand_dims(offs_d < HEAD_DIM, 0)
    rows = gl.expand_dims((seq_start + keys_o).to(gl.int64), 1)
    dk_ptrs = DK + b.to(gl.int64) * stride_dkb + rows * stride_dkt + h_kv * stride_dkh + gl.expand_dims(offs_d, 0)
    gl.store(dk_ptrs, dk_o, mask=kv_mask)
    dv_ptrs = DV + b.to(gl.int64) * stride_dvb + rows * stride_dvt + h_kv * stride_dvh + gl.expand_dims(offs_d, 0)
    gl.store(dv_ptrs, dv_o, mask=kv_mask)


@gluon.jit
def dq_kernel_sm90(
    q_desc, k_desc, v_desc, do_desc, Out, DQ, Lse, DLse, Delta, Table, CuSeq,
    stride_ob, stride_ot, stride_oh,
    stride_dqb, stride_dqt, stride_dqh,
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
    HAS_DLSE: gl.constexpr,
    num_warps: gl.constexpr,
    ROW_MAJOR_STORE: gl.constexpr = False,
):
    """The first pass of the two-pass backward (as :func:`backward.dq_kernel`): dQ of one query
    tile over the key blocks it sees, and ``delta = rowsum(dO * O) - dlse`` for its rows (stored
    for the dK/dV pass). Q and dO stay in shared memory (at head dim 128 with 64-key tiles Q is
    also held in registers as the A operand of ``S = Q K^T``, which halves that MMA's
    shared-memory reads), K and V stream through rings; per key tile ``S = Q K^T`` and
    ``dP = dO V^T`` are issued back to back, ``P`` is computed while ``dP`` runs, and
    ``dQ += dS K`` stays in flight until the next tile's scores are issued. Edge tiles mask ``P``
    and ``dS``; key rows no query row attends are zeroed in shared memory."""
    gl.static_assert(STAGES >= 2)  # tile t's slots are refilled while tile t + 1's are in use
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
    s_layout: gl.constexpr = mma_layout(num_warps, BLOCK_N)  # [BLOCK_M, BLOCK_N] S, dP
    dq_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # [BLOCK_M, HEAD_DIM] dQ
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dq_layout, k_width=2)
    rows_layout: gl.constexpr = blocked_rows_layout(HEAD_DIM, num_warps)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = q_desc.dtype
    # Q in registers: HEAD_DIM / 4 of them per thread, 1.00-1.03x on an H200 with 64-key tiles at
    # head dim 128. Where the key tile is as wide as the head dim (64 at head dim 64, 128 at 128)
    # Triton 3.6 computed a wrong dQ from the register operand, so those keep Q in shared memory.
    Q_IN_REGISTERS: gl.constexpr = (HEAD_DIM == 128) and (BLOCK_N == 64)

    # ---------------------------------------------------------------- shared memory, barriers
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], do_desc.layout)
    k_ring = tile_ring(k_desc, STAGES)
    v_ring = tile_ring(v_desc, STAGES)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = barrier_ring(STAGES)
    v_bars = barrier_ring(STAGES)
    mbarrier.init(q_bar, count=1)

    q_row = (b * tq + seq_start + m * BLOCK_M).to(gl.int32)
    kv_row0 = (b * tk + seq_start).to(gl.int32)
    kv_col = h_kv * HEAD_DIM
    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma_load(q_desc, [q_row, h * HEAD_DIM], q_bar, q_smem)
    tma_load(do_desc, [q_row, h * HEAD_DIM], q_bar, do_smem)
    for s in gl.static_range(STAGES):  # fill the rings
        row = kv_row0 + walk_block(s, n0, a0, a1) * BLOCK_N
        issue_load(k_desc, row, kv_col, k_bars, k_ring, s, s < n_tot)
        issue_load(v_desc, row, kv_col, v_bars, v_ring, s, s < n_tot)

    # delta = rowsum(dO * O) (minus d lse: d lse_i / d s_ij = P_ij), kept for the dK/dV pass
    offs_mr = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_layout))
    offs_dr = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    o_rows = gl.expand_dims((seq_start + offs_mr).to(gl.int64) * stride_ot, 1)
    o_mask = gl.expand_dims(offs_mr < tq, 1) & gl.expand_dims(offs_dr < HEAD_DIM, 0)
    o = gl.load(Out + b.to(gl.int64) * stride_ob + o_rows + h * stride_oh + gl.expand_dims(offs_dr, 0),
                mask=o_mask, other=0.0)
    mbarrier.wait(q_bar, 0)
    do_r = gl.where(o_mask, do_smem.load(rows_layout), 0.0)
    delta_r = gl.sum(o.to(gl.float32) * do_r.to(gl.float32), 1)
    l_off_r = b.to(gl.int64) * stride_lb + h * stride_lh + seq_start + offs_mr
    if HAS_DLSE:
        dlse = gl.load(DLse + l_off_r, mask=offs_mr < tq, other=0.0)
        delta_r -= gl.where(gl.abs(dlse) < float("inf"), dlse, 0.0)
    gl.store(Delta + l_off_r, delta_r, mask=offs_mr < tq)
    delta = gl.convert_layout(delta_r, row_s)

    offs_m = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    i_pos = offs_m + q_off
    lse = gl.load(Lse + b.to(gl.int64) * stride_lb + h * stride_lh + seq_start + offs_m, mask=offs_m < tq,
                  other=float("inf")) * 1.4426950408889634
    lse = gl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
    offs_n = gl.arange(0, BLOCK_N, layout=col_s)
    qk_scale = sm_scale * 1.4426950408889634
    s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    dp = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    # carried through the loop as an in-flight MMA result (the wait comes with the next tile's scores)
    dq = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout))
    if Q_IN_REGISTERS:  # [BLOCK_M, HEAD_DIM] as the A operand of S = Q K^T
        q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
    else:
        q_op = q_smem

    for t in range(0, n_tot):
        slot = t % STAGES
        phase = (t // STAGES) & 1
        j0 = walk_block(t, n0, a0, a1) * BLOCK_N
        full = tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N)
        if not full:  # before any MMA reads the tile
            zero_unused_key_rows(k_ring, k_bars, slot, phase, j0, i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N, rows_layout)
        mbarrier.wait(k_bars.index(slot), phase)
        s_acc = warpgroup_mma(q_op, k_ring.index(slot).permute((1, 0)), s_acc, use_acc=False, is_async=True)
        mbarrier.wait(v_bars.index(slot), phase)
        dp = warpgroup_mma(do_smem, v_ring.index(slot).permute((1, 0)), dp, use_acc=False, is_async=True)
        # groups in flight: [dQ of tile t - 1,] S, dP -> the first two are done
        dq, s_acc = warpgroup_mma_wait(1, deps=(dq, s_acc))
        prev = (t - 1 + STAGES) % STAGES  # tile t - 1 is fully read: refill its slots
        nxt = t - 1 + STAGES
        row = kv_row0 + walk_block(nxt, n0, a0, a1) * BLOCK_N
        issue_load(k_desc, row, kv_col, k_bars, k_ring, prev, (t > 0) & (nxt < n_tot))
        issue_load(v_desc, row, kv_col, v_bars, v_ring, prev, (t > 0) & (nxt < n_tot))
        p = gl.exp2(s_acc * qk_scale - gl.expand_dims(lse, 1))
        allowed = (gl.expand_dims(i_pos, 1) >= 0) & (gl.expand_dims(offs_n, 0) >= 0)  # edge tiles replace it
        if not full:
            allowed = pair_mask_flat(i_pos, j0 + offs_n, i_end, tk, lo0, hi0, lo1, hi1)
            p = gl.where(allowed, p, 0.0)
        dp = warpgroup_mma_wait(0, deps=(dp,))
        ds = p * (dp - gl.expand_dims(delta, 1))
        if not full:  # a non-finite value of a key outside the band never reaches dQ
            ds = gl.where(allowed, ds, 0.0)
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), k_ring.index(slot), dq, is_async=True)
    dq = warpgroup_mma_wait(0, deps=(dq,))

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(s))
        mbarrier.invalidate(v_bars.index(s))

    out_layout: gl.constexpr = output_store_layout(dq_layout, HEAD_DIM, ROW_MAJOR_STORE)
    dq_o = gl.convert_layout((dq * sm_scale).to(dtype), out_layout)
    offs_mo = m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    offs_do = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    dq_ptrs = (DQ + b.to(gl.int64) * stride_dqb + gl.expand_dims((seq_start + offs_mo).to(gl.int64) * stride_dqt, 1)
               + h * stride_dqh + gl.expand_dims(offs_do, 0))
    dq_mask = gl.expand_dims(offs_mo < tq, 1) & gl.expand_dims(offs_do < HEAD_DIM, 0)
    gl.store(dq_ptrs, dq_o, mask=dq_mask)
