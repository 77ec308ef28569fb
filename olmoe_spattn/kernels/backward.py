"""Backward band kernels.

Two schedules compute the same gradients:

* **Two-pass, deterministic** (no atomics; always used under
  ``torch.use_deterministic_algorithms(True)``):
* :func:`dq_kernel`: one program per (query tile, head), the forward's loop over the key
  blocks the tile can see, recomputing ``P`` from the saved log-sum-exp. It also computes
  ``delta = rowsum(dO * O)`` (minus the log-sum-exp's gradient, if any) for its rows and
  stores it (fp32 ``[B, H, Tq]``) for the next pass.
* :func:`dkdv_kernel` (launched after it): one program per (key tile, kv head); for each query head of its GQA
  group it loops over the query blocks that can see the tile (the mirror image of the
  forward's ranges). Every output element is written by exactly one program.

* **One-pass** (``ATOMIC_DQ``): :func:`delta_kernel` first, then :func:`dkdv_kernel` alone,
  which also multiplies each ``dS`` tile by its keys and adds the result into an fp32 dQ
  buffer with atomic adds: the two GEMMs that recompute ``S`` and ``dP`` for dQ disappear,
  at the price of an fp32 ``[B, Tq, H, D]`` buffer and run-to-run rounding differences.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    attended_columns,
    attended_rows,
    key_block_ranges,
    load_intervals,
    pair_mask,
    pair_mask_t,
    query_block_ranges,
    sequence_geometry,
    tile_is_full,
)


@triton.jit
def row_delta(
    Out, DO, DLse, b, h, seq_start, offs_m, tq,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """``(delta, l_off)``: ``delta = rowsum(dO * O) - dlse`` (fp32, 0 past ``tq``) of rows ``offs_m``
    (from ``seq_start``) of head ``h``, and those rows' offsets in ``[B, H, Tq]`` statistics."""
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < tq
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    b = b.to(tl.int64)
    rows = (seq_start + offs_m).to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    l_off = b * stride_lb + h * stride_lh + seq_start + offs_m
    if HAS_DLSE:
        dlse = tl.load(DLse + l_off, mask=row_ok, other=0.0)
        delta -= tl.where(tl.abs(dlse) < float("inf"), dlse, 0.0)
    return delta, l_off


@triton.jit
def delta_kernel(
    Out, DO, DLse, Delta, CuSeq,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    tq_arg,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """``delta = rowsum(dO * O) - dlse`` (fp32 ``[B, H, Tq]``) ahead of the one-pass backward."""
    m = tl.program_id(0)
    h = tl.program_id(1)
    z = tl.program_id(2)
    b, seq_start, tq, _tk, _q_off, _tab = sequence_geometry(z, CuSeq, CuSeq, 0, tq_arg, tq_arg, 0, IS_VARLEN)
    if m * BLOCK_M >= tq:
        return
    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    delta, l_off = row_delta(Out, DO, DLse, b, h, seq_start, offs_m, tq,
                             stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                             stride_lb, stride_lh, HEAD_DIM, BLOCK_D, HAS_DLSE)
    tl.store(Delta + l_off, delta, mask=offs_m < tq)


@triton.jit
def padded_row_stats_kernel(
    Out, DO, Lse, DLse, Lse2, Delta, CuSeq,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_lb, stride_lh,
    tq_arg, t_pad,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    IS_VARLEN: tl.constexpr = False,
):
    """Row statistics of the CuTe backward, fp32 ``[B, H, t_pad]`` (contiguous): ``lse2 = lse *
    log2(e)``, ``+inf`` on rows that attend nothing and rows past ``Tq`` (so their ``P`` is 0),
    and ``delta = rowsum(dO * O) - dlse``, 0 past ``Tq``. Grid ``(blocks, H, B)``; with ``IS_VARLEN``
    ``(blocks of the longest document, H, documents)``, each document's rows written from
    ``(cu[z] + BLOCK_M z)`` rounded down to a whole block (``cute_launch.padded_start``) and padded to
    whole blocks, so no two documents share a block."""
    m = tl.program_id(0)
    h = tl.program_id(1)
    z = tl.program_id(2)
    b, seq_start, tq, _tk, _q_off, _tab = sequence_geometry(z, CuSeq, CuSeq, 0, tq_arg, tq_arg, 0, IS_VARLEN)
    if IS_VARLEN:
        pad_start = (seq_start + BLOCK_M * z) // BLOCK_M * BLOCK_M
    else:
        pad_start = z * 0
    if m * BLOCK_M < tq:  # a shorter document has fewer blocks than the grid (batch rows: always true)
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        delta, l_off = row_delta(Out, DO, DLse, b, h, seq_start, offs_m, tq,
                                 stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                                 stride_lb, stride_lh, HEAD_DIM, BLOCK_D, HAS_DLSE)
        lse = tl.load(Lse + l_off, mask=offs_m < tq, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        p_off = (b.to(tl.int64) * tl.num_programs(1) + h) * t_pad + pad_start + offs_m
        tl.store(Lse2 + p_off, lse2)
        tl.store(Delta + p_off, delta)


@triton.jit
def dq_kernel(
    Q, K, V, Out, DO, DQ, Lse, DLse, Delta, Table, CuSeq,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    table_doc_stride,
    tq_arg, tk_arg, q_off_arg,
    group,
    sm_scale,
    autotune_key,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    z = tl.program_id(2)
    b, seq_start, tq, tk, q_off, tab = sequence_geometry(
        z, CuSeq, Table, table_doc_stride, tq_arg, tk_arg, q_off_arg, IS_VARLEN
    )
    if m * BLOCK_M >= tq:
        return
    h_kv = h // group

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < tq
    d_ok = offs_d < HEAD_DIM
    i_pos = offs_m + q_off
    i0 = m * BLOCK_M + q_off
    i1 = tl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
    i_end = q_off + tq  # first position past the last query row

    rows = (seq_start + offs_m).to(tl.int64)[:, None]
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + rows * stride_qt + h * stride_qh + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=qd_mask, other=0.0)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=qd_mask, other=0.0)
    l_off = b.to(tl.int64) * stride_lb + h * stride_lh + seq_start + offs_m
    # delta = rowsum(dO * O) (minus d lse: d lse_i / d s_ij = P_ij), kept for the dK/dV pass
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        dlse = tl.load(DLse + l_off, mask=row_ok, other=0.0)
        delta -= tl.where(tl.abs(dlse) < float("inf"), dlse, 0.0)
    tl.store(Delta + l_off, delta, mask=row_ok)
    lse = tl.load(Lse + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
    lo0, hi0, lo1, hi1 = load_intervals(tab + h * 4)
    a0, n0, a1, n1 = key_block_ranges(i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N)
    if USE_TMA:
        # K, V: 2-D descriptors over [B * Tk (or total), Hkv * D]; rows past this sequence's
        # end only occur in edge tiles, where dS is masked and unattended keys are zeroed
        kv_row0 = (b * tk + seq_start).to(tl.int32)
        kv_col = h_kv * HEAD_DIM
    else:
        k_base = K + b.to(tl.int64) * stride_kb + seq_start.to(tl.int64) * stride_kt + h_kv * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + seq_start.to(tl.int64) * stride_vt + h_kv * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, n0 + n1):
        kb = tl.where(t < n0, a0 + t, a1 + (t - n0))
        j0 = kb * BLOCK_N
        cols = j0 + offs_n
        if USE_TMA:
            k = K.load([kv_row0 + j0, kv_col])
            v = V.load([kv_row0 + j0, kv_col])
        else:
            kv_mask = (cols < tk)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if not tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N):
            allowed = pair_mask(i_pos, cols, i_end, tk, lo0, hi0, lo1, hi1)
            ds = tl.where(allowed, ds, 0.0)
            # keys no row of the tile attends never reach dQ (0 * NaN would)
            k = tl.where(attended_columns(allowed)[:, None], k, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(
        DQ + b.to(tl.int64) * stride_dqb + rows * stride_dqt + h * stride_dqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=qd_mask,
    )


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, DK, DV, DQAcc, Lse, Delta, Table, CuSeq,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_qacc_b, stride_qacc_t, stride_qacc_h,
    stride_lb, stride_lh,
    table_doc_stride,
    tq_arg, tk_arg, q_off_arg,
    group,
    sm_scale,
    autotune_key,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    TMA_REDUCE: tl.constexpr = False,
):
    n = tl.program_id(0)
    h_kv = tl.program_id(1)
    z = tl.program_id(2)
    b, seq_start, tq, tk, q_off, tab = sequence_geometry(
        z, CuSeq, Table, table_doc_stride, tq_arg, tk_arg, q_off_arg, IS_VARLEN
    )
    if n * BLOCK_N >= tk:
        return

    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < tk
    d_ok = offs_d < HEAD_DIM
    j0 = n * BLOCK_N
    j1 = tl.minimum(j0 + BLOCK_N - 1, tk - 1)

    cols = (seq_start + offs_n).to(tl.int64)[:, None]
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + cols * stride_kt + h_kv * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + cols * stride_vt + h_kv * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = h_kv * group + g
        lo0, hi0, lo1, hi1 = load_intervals(tab + h * 4)
        c0, n0, c1, n1 = query_block_ranges(j0, j1, tq, q_off, lo0, hi0, lo1, hi1, BLOCK_M)
        q_row0 = (b * tq + seq_start).to(tl.int32)  # row of [B * Tq (or total), H * D] (descriptors)
        if not USE_TMA:
            q_base = Q + b.to(tl.int64) * stride_qb + seq_start.to(tl.int64) * stride_qt + h * stride_qh
            do_base = DO + b.to(tl.int64) * stride_dob + seq_start.to(tl.int64) * stride_dot + h * stride_doh
        l_base = b.to(tl.int64) * stride_lb + h * stride_lh + seq_start
        for t in range(0, n0 + n1):
            mb = tl.where(t < n0, c0 + t, c1 + (t - n0))
            offs_m = mb * BLOCK_M + offs_m0
            row_ok = offs_m < tq
            qd_mask = row_ok[:, None] & d_ok[None, :]
            rows = offs_m.to(tl.int64)[:, None]
            if USE_TMA:
                q = Q.load([q_row0 + mb * BLOCK_M, h * HEAD_DIM])
                do = DO.load([q_row0 + mb * BLOCK_M, h * HEAD_DIM])
                if mb * BLOCK_M + BLOCK_M > tq:  # rows past the end: the next sequence's, zeroed
                    q = tl.where(row_ok[:, None], q, 0.0)
                    do = tl.where(row_ok[:, None], do, 0.0)
            else:
                q = tl.load(q_base + rows * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)
                do = tl.load(do_base + rows * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(Lse + l_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(Delta + l_base + offs_m, mask=row_ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
            i0 = mb * BLOCK_M + q_off
            i1 = tl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
            full = tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N)
            maskT = (offs_n[:, None] >= 0) & (offs_m0[None, :] >= 0)  # all True; edge tiles replace it
            if not full:
                maskT = pair_mask_t(offs_n, offs_m + q_off, q_off + tq, tk, lo0, hi0, lo1, hi1)
                pT = tl.where(maskT, pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
            dsT = pT * (dpT - delta[None, :])
            k_dq = k
            if not full:
                dsT = tl.where(maskT, dsT, 0.0)  # a NaN value never reaches keys that rows skip
                if ATOMIC_DQ:
                    k_dq = tl.where(attended_rows(maskT)[:, None], k, 0.0)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:  # this key tile's share of dQ, summed over key tiles in fp32
                dq = tl.dot(tl.trans(dsT.to(k.dtype)), k_dq, input_precision=DOT_PRECISION) * sm_scale
                if TMA_REDUCE:  # one bulk reduction (TMA reduce-add) per tile instead of per-element atomics
                    if mb * BLOCK_M + BLOCK_M > tq:  # rows past the end belong to the next sequence
                        dq = tl.where(row_ok[:, None], dq, 0.0)
                    DQAcc.atomic_add([q_row0 + mb * BLOCK_M, h * HEAD_DIM], dq)
                else:
                    dq_ptrs = DQAcc + b.to(tl.int64) * stride_qacc_b + (seq_start + rows) * stride_qacc_t
                    tl.atomic_add(dq_ptrs + h * stride_qacc_h + offs_d[None, :], dq, mask=qd_mask, sem="relaxed")

    dk = dk * sm_scale
    tl.store(
        DK + b.to(tl.int64) * stride_dkb + cols * stride_dkt + h_kv * stride_dkh + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b.to(tl.int64) * stride_dvb + cols * stride_dvt + h_kv * stride_dvh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )
