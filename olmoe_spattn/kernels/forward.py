"""Forward band kernel: FlashAttention-style online softmax over the allowed key blocks only.

One program per (query tile, head, batch-or-document[, split]). The program derives from
its head's distance intervals the (at most two) ranges of key blocks its rows can see,
walks them in one pipelined loop, and masks elements only in the blocks that straddle an
interval edge, ``Tk`` or the causal diagonal. Scores are kept in the log2 domain
(``exp2``); accumulation is fp32. Rows with no allowed key end with ``l = 0``: output 0,
``lse = -inf``.

With ``SPLIT`` (decode: few query rows, long key ranges) the loop of every program is cut
into ``n_split`` contiguous pieces run by separate programs, each writing an fp32 partial
output and its log-sum-exp; :func:`combine_kernel` merges them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    attended_columns,
    key_block_ranges,
    load_intervals,
    pair_mask,
    pair_mask_flat,
    tile_is_full,
)


@triton.jit
def fwd_kernel(
    Q, K, V, Out, Lse, Table, CuSeq,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    table_doc_stride,
    tq_arg, tk_arg, q_off_arg,
    group, n_split,
    sm_scale,
    autotune_key,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    FLAT_MASK: tl.constexpr = False,
):
    # ---------------------------------------------------------------- which tile
    m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) tiles first
    h = tl.program_id(1)
    z = tl.program_id(2)
    if SPLIT:
        split = z % n_split
        z = z // n_split
    if IS_VARLEN:
        b = z * 0
        seq_start = tl.load(CuSeq + z)
        tq = tl.load(CuSeq + z + 1) - seq_start
        tk = tq
        q_off = 0
        tab = Table + z * table_doc_stride + h * 4
    else:
        b = z
        seq_start = z * 0
        tq = tq_arg
        tk = tk_arg
        q_off = q_off_arg
        tab = Table + h * 4
    if m * BLOCK_M >= tq:
        return
    h_kv = h // group
    lo0, hi0, lo1, hi1 = load_intervals(tab)

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows, relative to the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < tq
    d_ok = offs_d < HEAD_DIM
    i_pos = offs_m + q_off  # query positions in key coordinates
    i0 = m * BLOCK_M + q_off
    i1 = tl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
    i_end = q_off + tq  # first position past the last query row

    a0, n0, a1, n1 = key_block_ranges(i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N)
    n_tot = n0 + n1
    t_lo = 0
    t_hi = n_tot
    if SPLIT:
        chunk = tl.cdiv(n_tot, n_split)
        t_lo = tl.minimum(split * chunk, n_tot)
        t_hi = tl.minimum(t_lo + chunk, n_tot)

    if USE_TMA:
        # Q is a 2-D descriptor over [B * Tq (or total), H * D]; rows past the sequence's end
        # hold other data or TMA's zeros: they only feed their own rows, which are never stored
        q = Q.load([(b * tq + seq_start + m * BLOCK_M).to(tl.int32), h * HEAD_DIM])
    else:
        q_base = Q + b.to(tl.int64) * stride_qb + (seq_start + offs_m).to(tl.int64)[:, None] * stride_qt
        q = tl.load(q_base + h * stride_qh + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if USE_TMA:
        # K, V are 2-D descriptors over [B * Tk (or total), Hkv * D]; rows past this
        # sequence's end (the next sequence, or TMA's zero fill) are masked below exactly
        # like the pointer path's, because such key blocks are never full tiles
        kv_row0 = (b * tk + seq_start).to(tl.int32)
        kv_col = h_kv * HEAD_DIM
    else:
        k_base = K + b.to(tl.int64) * stride_kb + seq_start.to(tl.int64) * stride_kt + h_kv * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + seq_start.to(tl.int64) * stride_vt + h_kv * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for t in range(t_lo, t_hi):
        kb = tl.where(t < n0, a0 + t, a1 + (t - n0))
        j0 = kb * BLOCK_N
        cols = j0 + offs_n
        if USE_TMA:
            k = K.load([kv_row0 + j0, kv_col])
        else:
            kv_mask = (cols < tk)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if USE_TMA:
            v = V.load([kv_row0 + j0, kv_col])
        else:
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        if FLAT_MASK:  # no data-dependent branch in the loop body: every tile is masked
            allowed = pair_mask_flat(i_pos, cols, i_end, tk, lo0, hi0, lo1, hi1)
            qk = tl.where(allowed, qk, float("-inf"))
            v = tl.where(attended_columns(allowed)[:, None], v, 0.0)
        else:
            if not tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N):
                allowed = pair_mask(i_pos, cols, i_end, tk, lo0, hi0, lo1, hi1)
                qk = tl.where(allowed, qk, float("-inf"))
                # values no row of the tile attends never reach the output (0 * NaN would)
                v = tl.where(attended_columns(allowed)[:, None], v, 0.0)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
        p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if SPLIT:
        # partials: Out [B, H, n_split, Tq, BLOCK_D] fp32, Lse [B, H, n_split, Tq]
        part = (b * tl.num_programs(1) + h) * n_split + split
        o_ptrs = Out + (part.to(tl.int64) * tq + offs_m)[:, None] * BLOCK_D + offs_d[None, :]
        tl.store(o_ptrs, out, mask=row_ok[:, None])
        tl.store(Lse + part.to(tl.int64) * tq + offs_m, lse, mask=row_ok)
    else:
        o_base = Out + b.to(tl.int64) * stride_ob + (seq_start + offs_m).to(tl.int64)[:, None] * stride_ot
        tl.store(
            o_base + h * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        l_ptrs = Lse + b.to(tl.int64) * stride_lb + h * stride_lh + seq_start + offs_m
        tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def combine_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    n_heads, tq, n_split,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merges ``n_split`` partial results of one (query row, head, batch)."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < n_split
    part = ((b * n_heads + h) * n_split + offs_s).to(tl.int64) * tq + row  # [BLOCK_S]
    lse_s = tl.load(LsePart + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_sub)  # 0 for empty splits
    total = tl.sum(w, 0)
    o = tl.load(OutPart + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), m_sub + tl.log(tl.where(total == 0.0, 1.0, total)))
    o_ptrs = Out + b.to(tl.int64) * stride_ob + row.to(tl.int64) * stride_ot + h * stride_oh + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h * stride_lh + row, lse)
