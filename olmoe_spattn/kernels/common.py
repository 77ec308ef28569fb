"""Pieces shared by the band kernels: interval tables, block ranges, element masks.

Geometry (one head, one document). A query at position ``i`` (key coordinates) may see
key ``j`` iff ``d = i - j`` lies in one of the head's half-open distance intervals
``[lo0, hi0)``, ``[lo1, hi1)`` (sorted, disjoint, from :meth:`BandSpec.interval_tensor`;
``(0, 0)`` = unused) and ``0 <= j < Tk``. A tile of queries ``[i0, i1]`` therefore needs,
per interval, the keys ``[i0 - hi + 1, i1 - lo]``: one contiguous range of key blocks.
Interval 0 (short distances) gives the higher key blocks; interval 1's range is clipped
below interval 0's so no block is visited twice. A key block is *full* when every
(query, key) pair of the tile lies inside one interval and inside ``Tk``; full blocks run
without an element mask, the rest (at most two per interval) with it. The backward
dK/dV kernel uses the mirror image: for keys ``[j0, j1]`` the queries ``[j0 + lo, j1 + hi - 1]``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..bands import MAX_INTERVALS, BandSpec

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=512)
def _cpu_table(spec: BandSpec, seq_len: int | None, head_offset: int, n_local: int) -> torch.Tensor:
    return spec.interval_tensor(seq_len, head_offset=head_offset, n_local_heads=n_local)


@functools.lru_cache(maxsize=128)
def _device_table(
    spec: BandSpec, lengths: tuple[int, ...] | None, head_offset: int, n_local: int, device: str
) -> torch.Tensor:
    if lengths is None:  # fixed partition length: one table for every sequence
        tables = [_cpu_table(spec, None, head_offset, n_local)]
    else:
        tables = [_cpu_table(spec, max(n, 1), head_offset, n_local) for n in lengths]
    return torch.stack(tables).contiguous().to(device)  # [n_tables, H_local, 2, 2]


def interval_table(
    spec: BandSpec,
    *,
    head_offset: int,
    n_local: int,
    device: torch.device,
    kv_len: int,
    doc_lengths: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, int]:
    """``(table [n_tables, H_local, 2, 2] int32, doc_stride)`` for the kernels.

    A fixed partition length needs one table (``doc_stride = 0``); a dynamic one needs a
    table per key length: the call's ``kv_len``, or each packed document's length.
    """
    assert MAX_INTERVALS == 2
    lengths = table_lengths(spec, kv_len, doc_lengths)
    per_doc = spec.is_dynamic and doc_lengths is not None
    return _device_table(spec, lengths, head_offset, n_local, str(device)), n_local * 4 if per_doc else 0


def table_lengths(spec: BandSpec, kv_len: int, doc_lengths: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The key lengths whose interval tables a call needs: none for a fixed partition length (one
    table for every sequence), else the call's ``kv_len`` or each packed document's length."""
    if not spec.is_dynamic:
        return None
    return (kv_len,) if doc_lengths is None else tuple(doc_lengths)


#: :func:`nearest_distances` of a head that allows no distance at all
NO_DISTANCE = 2**31 - 1


@functools.lru_cache(maxsize=512)
def nearest_distances(spec: BandSpec, lengths: tuple[int, ...] | None, head_offset: int,
                      n_local: int) -> tuple[int, ...]:
    """Per local head, the smallest distance any of the call's tables (:func:`table_lengths`)
    allows it (:data:`NO_DISTANCE` when none does): a head whose nearest distance exceeds every
    (query, key) distance of the call has no pair, and zero gradients."""
    lens = [None] if lengths is None else [max(n, 1) for n in lengths]
    tables = [_cpu_table(spec, n, head_offset, n_local) for n in lens]  # each [H_local, 2, 2]
    nearest = []
    for h in range(n_local):
        lows = [int(t[h, s, 0]) for t in tables for s in range(MAX_INTERVALS) if t[h, s, 1] > t[h, s, 0]]
        nearest.append(min(lows, default=NO_DISTANCE))
    return tuple(nearest)


@functools.lru_cache(maxsize=512)
def band_extent(spec: BandSpec, kv_len: int, head_offset: int, n_local: int) -> int:
    """Largest number of distinct distances one local head allows (dense: ``kv_len``)."""
    table = _cpu_table(spec, kv_len if spec.is_dynamic else None, head_offset, n_local)
    hi = table[:, :, 1].clamp(max=kv_len)
    lo = table[:, :, 0].clamp(max=kv_len)
    return int((hi - lo).clamp(min=0).sum(dim=1).max())


# ----------------------------------------------------------------------------- device side
@triton.jit
def sequence_geometry(z, CuSeq, Table, table_doc_stride, tq_arg, tk_arg, q_off_arg, IS_VARLEN: tl.constexpr):
    """``(b, seq_start, tq, tk, q_off, table)`` of grid index ``z``: a batch row, or a packed
    document (``B = 1``, ``CuSeq`` offsets, its own interval table when the partition is dynamic)."""
    if IS_VARLEN:
        b = z * 0
        seq_start = tl.load(CuSeq + z)
        tq = tl.load(CuSeq + z + 1) - seq_start
        tk = tq
        q_off = seq_start * 0
        tab = Table + z * table_doc_stride
    else:
        b = z
        seq_start = z * 0
        tq = tq_arg + z * 0
        tk = tk_arg + z * 0
        q_off = q_off_arg + z * 0
        tab = Table
    return b, seq_start, tq, tk, q_off, tab


@triton.jit
def load_intervals(tab_ptr):
    """The four int32 bounds ``lo0, hi0, lo1, hi1`` of one head (``tab_ptr`` -> its row)."""
    lo0 = tl.load(tab_ptr + 0)
    hi0 = tl.load(tab_ptr + 1)
    lo1 = tl.load(tab_ptr + 2)
    hi1 = tl.load(tab_ptr + 3)
    return lo0, hi0, lo1, hi1


@triton.jit
def _key_range(i0, i1, tk, lo, hi, BLOCK_N: tl.constexpr):
    """Key blocks ``[a, a + n)`` holding keys at distance ``[lo, hi)`` from rows ``i0..i1``."""
    jlo = tl.maximum(i0 - hi + 1, 0)
    jhi = tl.minimum(i1 - lo, tk - 1)
    ok = (hi > lo) & (jhi >= jlo)
    a = tl.maximum(jlo, 0) // BLOCK_N
    b = tl.maximum(jhi, 0) // BLOCK_N + 1
    return a, tl.where(ok, b - a, 0)


@triton.jit
def key_block_ranges(i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N: tl.constexpr):
    """Key-block ranges ``[a0, a0 + n0)`` and ``[a1, a1 + n1)`` (disjoint) for query rows ``i0..i1``."""
    a0, n0 = _key_range(i0, i1, tk, lo0, hi0, BLOCK_N)
    a1, n1 = _key_range(i0, i1, tk, lo1, hi1, BLOCK_N)
    # interval 1 (longer distances) lies below interval 0 in key space: clip its top
    n1 = tl.where(n0 > 0, tl.maximum(tl.minimum(a1 + n1, a0) - a1, 0), n1)
    return a0, n0, a1, n1


@triton.jit
def _query_range(j0, j1, tq, q_off, lo, hi, BLOCK_M: tl.constexpr):
    """Query blocks ``[c, c + n)`` (rows relative to ``q_off``) at distance ``[lo, hi)`` from keys ``j0..j1``."""
    rlo = tl.maximum(j0 + lo - q_off, 0)
    rhi = tl.minimum(j1 + (hi - 1) - q_off, tq - 1)
    ok = (hi > lo) & (rhi >= rlo)
    c = tl.maximum(rlo, 0) // BLOCK_M
    d = tl.maximum(rhi, 0) // BLOCK_M + 1
    return c, tl.where(ok, d - c, 0)


@triton.jit
def query_block_ranges(j0, j1, tq, q_off, lo0, hi0, lo1, hi1, BLOCK_M: tl.constexpr):
    """Query-block ranges ``[c0, c0 + n0)`` and ``[c1, c1 + n1)`` (disjoint) that see keys ``j0..j1``."""
    c0, n0 = _query_range(j0, j1, tq, q_off, lo0, hi0, BLOCK_M)
    c1, n1 = _query_range(j0, j1, tq, q_off, lo1, hi1, BLOCK_M)
    # interval 1 reaches later queries than interval 0: clip its bottom
    start = tl.where(n0 > 0, tl.maximum(c1, c0 + n0), c1)
    n1 = tl.maximum(c1 + n1 - start, 0)
    return c0, n0, start, n1


@triton.jit
def tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N: tl.constexpr):
    """True when every pair (rows ``i0..i1``, keys ``j0..j0+BLOCK_N-1``) is allowed."""
    dmin = i0 - (j0 + BLOCK_N - 1)
    dmax = i1 - j0
    inside = ((dmin >= lo0) & (dmax < hi0)) | ((dmin >= lo1) & (dmax < hi1))
    return inside & (j0 + BLOCK_N <= tk)


@triton.jit
def _in_interval(first, second, lo, hi):
    """``lo <= first[:, None] - second[None, :] < hi`` as one subtract and one unsigned compare."""
    d = (first - lo)[:, None] - second[None, :]
    return tl.cast(d, tl.uint32, bitcast=True) < tl.cast(hi - lo, tl.uint32, bitcast=True)


@triton.jit
def pair_mask(i_pos, j_pos, i_end, tk, lo0, hi0, lo1, hi1):
    """Element mask ``[len(i_pos), len(j_pos)]``: distance inside an interval, query before
    ``i_end`` and key inside ``Tk`` (exact, so rows past the end never mark a key as used)."""
    ok = _in_interval(i_pos, j_pos, lo0, hi0)
    if hi1 > lo1:
        ok = ok | _in_interval(i_pos, j_pos, lo1, hi1)
    return ok & (j_pos < tk)[None, :] & (i_pos < i_end)[:, None]


@triton.jit
def pair_mask_flat(i_pos, j_pos, i_end, tk, lo0, hi0, lo1, hi1):
    """:func:`pair_mask` without a data-dependent branch (an unused interval ``(0, 0)``
    matches nothing: its unsigned width is 0), for loops that must be branch-free."""
    ok = _in_interval(i_pos, j_pos, lo0, hi0) | _in_interval(i_pos, j_pos, lo1, hi1)
    return ok & (j_pos < tk)[None, :] & (i_pos < i_end)[:, None]


@triton.jit
def attended_columns(allowed):
    """``[N]`` bool: columns of an ``[M, N]`` pair mask that at least one row allows."""
    return tl.max(allowed.to(tl.int32), 0) > 0


@triton.jit
def keys_used(j_pos, i0, i1, tk, lo0, hi0, lo1, hi1):
    """``[len(j_pos)]`` bool: keys that at least one query row ``i0..i1`` attends, in closed
    form (equal to ``attended_columns(pair_mask(...))`` for the rows ``i0..i1``): key ``j`` is
    seen through interval ``[lo, hi)`` by some row iff ``i0 - hi < j <= i1 - lo``."""
    in0 = (j_pos > i0 - hi0) & (j_pos <= i1 - lo0) & (hi0 > lo0)
    in1 = (j_pos > i0 - hi1) & (j_pos <= i1 - lo1) & (hi1 > lo1)
    return (in0 | in1) & (j_pos < tk) & (j_pos >= 0)


@triton.jit
def tile_keys_all_used(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N: tl.constexpr):
    """True when every key ``j0..j0+BLOCK_N-1`` is attended by some row ``i0..i1`` (scalar form
    of ``keys_used(...).all()``): the tile lies inside one interval's key range, or inside the
    union of both when they touch, and inside ``Tk``."""
    j1 = j0 + BLOCK_N - 1
    s0 = i0 - hi0 + 1
    e0 = i1 - lo0
    s1 = i0 - hi1 + 1
    e1 = i1 - lo1
    ok0 = hi0 > lo0
    ok1 = hi1 > lo1
    in0 = ok0 & (j0 >= s0) & (j1 <= e0)
    in1 = ok1 & (j0 >= s1) & (j1 <= e1)
    touch = ok0 & ok1 & (s0 <= e1 + 1) & (s1 <= e0 + 1)
    in_union = touch & (j0 >= tl.minimum(s0, s1)) & (j1 <= tl.maximum(e0, e1))
    return (in0 | in1 | in_union) & (j1 < tk) & (j0 >= 0)


@triton.jit
def attended_rows(allowed):
    """``[M]`` bool: rows of an ``[M, N]`` pair mask that allow at least one column."""
    return tl.max(allowed.to(tl.int32), 1) > 0


@triton.jit
def pair_mask_t(j_pos, i_pos, i_end, tk, lo0, hi0, lo1, hi1):
    """Transposed :func:`pair_mask`: ``[len(j_pos), len(i_pos)]``."""
    j_neg = -j_pos  # d = i - j = (-j)[:, None] - (-i)[None, :]
    ok = _in_interval(j_neg, -i_pos, lo0, hi0)
    if hi1 > lo1:
        ok = ok | _in_interval(j_neg, -i_pos, lo1, hi1)
    return ok & (j_pos < tk)[:, None] & (i_pos < i_end)[None, :]


# ----------------------------------------------------------------------------- launch geometry
class Problem:
    """Everything a launch needs to know about one call, resolved once on the host."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        spec: BandSpec,
        *,
        head_offset: int,
        q_offset: int,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int,
        scale: float,
    ) -> None:
        self.batch, self.tq, self.n_heads, self.head_dim = q.shape
        self.tk, self.n_kv_heads = k.shape[1], k.shape[2]
        self.group = self.n_heads // self.n_kv_heads
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.scale = float(scale)
        self.q_offset = int(q_offset)
        self.is_varlen = cu_seqlens is not None
        self.dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
        if self.is_varlen:
            self.cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            self.n_docs = cu_seqlens.numel() - 1
            self.max_seqlen = int(max_seqlen)
            lengths = None
            if spec.is_dynamic:
                values = cu_seqlens.tolist()
                lengths = tuple(b - a for a, b in zip(values, values[1:]))
            self.table, self.table_doc_stride = interval_table(
                spec, head_offset=head_offset, n_local=self.n_heads, device=q.device,
                kv_len=self.tk, doc_lengths=lengths,
            )
            self._bands = (spec, table_lengths(spec, self.tk, lengths), head_offset, self.n_heads)
            self.z = self.n_docs
            self.max_tq = self.max_seqlen
            self.max_tk = self.max_seqlen
            ext_len = self.max_seqlen
        else:
            self.cu = self._dummy_cu(q.device)
            self.table, self.table_doc_stride = interval_table(
                spec, head_offset=head_offset, n_local=self.n_heads, device=q.device, kv_len=self.tk
            )
            self._bands = (spec, table_lengths(spec, self.tk, None), head_offset, self.n_heads)
            self.z = self.batch
            self.max_tq = self.tq
            self.max_tk = self.tk
            ext_len = self.tk
        self.extent = band_extent(spec, max(ext_len, 1), head_offset, self.n_heads) if ext_len > 0 else 0
        #: the launches of earlier calls, for calls that repeat them (:mod:`.replay`); ``None``: not kept
        #: (a Problem made for one call; cached Problems get a store)
        self.replays = None
        self._heads_with_work: tuple[int, int] | None = None

    def heads_with_work(self) -> tuple[int, int]:
        """``(a, b)``: local heads ``a .. b - 1`` hold every head that has a (query, key) pair in this
        call (``(0, 0)``: none has). A head whose nearest allowed distance exceeds the largest
        distance of the call (the last query position; the longest document's length - 1 with
        packed documents) has none, and zero gradients."""
        if self._heads_with_work is None:  # a few microseconds of host time: once per Problem
            reach = self.max_seqlen - 1 if self.is_varlen else self.q_offset + self.tq - 1
            working = [h for h, d in enumerate(nearest_distances(*self._bands)) if d <= reach]
            self._heads_with_work = (working[0], working[-1] + 1) if working else (0, 0)
        return self._heads_with_work

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def _dummy_cu(device: torch.device) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.int32, device=device)
