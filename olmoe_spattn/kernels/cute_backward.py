"""One-pass band attention backward for Hopper (SM90), written in CuTe DSL.

Needs ``nvidia-cutlass-dsl`` and ``quack-kernels`` (the ``cute`` extra); the host side that
prepares, launches and finishes a call is :mod:`.cute_launch`.

One CTA of 384 threads owns 128 keys of one (batch row, head) and walks the 64-query steps that
see them: at most two ranges of query blocks, one per distance interval of the head (the mirror
image of the forward's key ranges, :func:`query_steps`). Warp roles:

* warp 0 loads: K and V of the tile once, then Q and dO of every step with their row statistics
  (``lse2``, ``delta``) by TMA into two-deep rings (an mbarrier pipeline each);
* warp 1 writes dQ: it adds each step's fp32 dQ share from shared memory into ``dq_acc`` with one
  bulk reduce-add (``cp.reduce.async.bulk .add.f32``) per warpgroup;
* warpgroups 1 and 2 compute, 64 keys each. Per step:
  ``S^T = K Q^T`` and ``dP^T = V dO^T`` (both operands in shared memory, issued back to back),
  ``P^T = exp2(S^T * scale * log2(e) - lse2)`` and ``dS^T = P^T (dP^T - delta)`` in registers;
  ``dV += P^T dO`` and ``dK += dS^T Q`` take ``P^T`` and ``dS^T`` from registers; ``dS^T`` also goes
  to shared memory, where ``dQ = dS K`` (each warpgroup one half of the head dim) reads all 128
  keys of it; the fp32 dQ share is copied to shared memory in the MMA's register order and handed
  to warp 1. dK and dV stay in registers for the whole tile and leave once by TMA.

A tile walks its edge steps first (the 64 x 128 tile crosses a band edge or ``Tk``: ``S`` is set to
``-inf`` outside the band), then its full steps (inside one distance interval: no mask), each
kind as its own straight-line copy of the step (:func:`step_walk`). Query rows past ``Tq`` need no
mask: their ``lse2`` is ``+inf``, so ``P = 0`` there (the same holds for rows that attend nothing).
The K and V rows of keys that no query attends are zeroed in shared memory before the first step,
so NaN or Inf there reaches no gradient (``0 * NaN`` in the dQ product would).

Tensors (``T`` = ``Tq`` for queries, ``Tk`` for keys; ``D = 128``):
``q, do [B, Tq, H, D]``, ``k, v, dk, dv [B, Tk, H, D]`` (bf16 or fp16, unit stride along D);
``lse2, delta [B, H, Tpad]`` fp32 with ``Tpad`` = ``Tq`` rounded up to 64;
``dq_acc [B, H, Tpad * D]`` fp32, zero on entry, holding each 64-row block in the dQ MMA's register
order (:class:`DqFromAccumulator` turns it into ``dq``); ``bands [tables, H, 4]`` int32
``(lo0, hi0, lo1, hi1)`` per head (the interval table of :mod:`.common`: one, or one per document).

Packed documents (``varlen``): ``B = 1``, ``cu_seqlens [Z + 1]`` int32 row offsets, one grid slice
per document. A document's rows begin a 64-row block of their own in ``lse2``, ``delta`` and
``dq_acc`` (:func:`padded_start`), so its last step reads the next document's Q and dO rows by TMA
but masks them (:func:`pair_allowed`; such steps are edge steps) and adds nothing to another
document's dQ. Its last key tile likewise loads the next document's first keys: they are zeroed
with the unattended ones, and dK, dV of that tile leave row by row (:func:`store_rows`), as do the
rows of its last dQ block.
"""

import functools
import math
from typing import NamedTuple

import cuda.bindings.driver as cuda
import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as hopper
from cutlass import Boolean, Float32, Int32
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.tensor_utils import LayoutEnum
from quack import copy_utils, layout_utils, sm90_utils

from .cute_launch import HEAD_DIM, ROW_BLOCK, padded_start

TILE_M = ROW_BLOCK  # queries per step
TILE_N = 128  # keys per CTA
STAGES = 2  # depth of the Q and dO rings

# named barriers (0 is the CTA-wide barrier)
BAR_EPILOGUE = 1
BAR_DS = 2
BAR_DQ_FULL = 3  # + warpgroup index (3, 4)
BAR_DQ_EMPTY = 5  # + warpgroup index (5, 6)
BAR_KV_READY = 7
THREADS_WG_AND_WRITER = 128 + 32


@cute.jit
def _query_range(j0: Int32, j1: Int32, tq: Int32, q_off: Int32, lo: Int32, hi: Int32,
                 tile_m: cutlass.Constexpr[int]):
    """Query blocks ``[c, c + n)`` holding the rows at distance ``[lo, hi)`` from keys ``j0..j1``."""
    rlo = cutlass.max(j0 + lo - q_off, Int32(0))
    rhi = cutlass.min(j1 + hi - 1 - q_off, tq - 1)
    c = rlo // tile_m
    n = Int32(0)
    if (hi > lo) & (rhi >= rlo):
        n = rhi // tile_m + 1 - c
    return c, n


@cute.jit
def query_steps(bands, n_block: Int32, tq: Int32, tk: Int32, q_off: Int32,
                tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int]):
    """``(c0, n0, c1, n1)``: the query blocks ``[c0, c0 + n0)`` then ``[c1, c1 + n1)`` (disjoint) that
    see key tile ``n_block`` of a head with the distance intervals ``bands = (lo0, hi0, lo1, hi1)``;
    interval 1's range is clipped so no block comes twice."""
    j0 = n_block * tile_n
    j1 = cutlass.min(j0 + tile_n - 1, tk - 1)
    c0, n0 = _query_range(j0, j1, tq, q_off, bands[0], bands[1], tile_m)
    c1, n1 = _query_range(j0, j1, tq, q_off, bands[2], bands[3], tile_m)
    start = c1
    if n0 > 0:
        start = cutlass.max(c1, c0 + n0)
    n1 = cutlass.max(c1 + n1 - start, Int32(0))
    return c0, n0, start, n1


@cute.jit
def _full_range(c: Int32, n: Int32, n_block: Int32, q_off: Int32, tq: Int32, tk: Int32, lo: Int32, hi: Int32,
                tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int]):
    """``[fa, fb)`` inside ``[c, c + n)``: the steps whose whole 64 x 128 tile lies at distances
    ``[lo, hi)`` with every query inside ``Tq`` and every key inside ``Tk`` (``fa = fb = c + n`` when
    there is none). A packed document's last rows are followed by the next document's, so a step
    that reaches past ``Tq`` is an edge step (masked)."""
    j0 = n_block * tile_n
    hi = cutlass.min(hi, q_off + tq)  # no distance reaches q_off + tq: keeps the sums in range
    # first row r0 of the step: r0 - (j0 + tile_n - 1) + q_off >= lo
    fa = (cutlass.max(lo + j0 + tile_n - 1 - q_off, Int32(0)) + tile_m - 1) // tile_m
    # last row r0 + tile_m - 1: r0 + tile_m - 1 - j0 + q_off < hi
    fb = (cutlass.max(hi + j0 - q_off - tile_m, Int32(-1)) + tile_m) // tile_m
    fa = cutlass.max(fa, c)
    fb = cutlass.min(cutlass.min(fb, c + n), tq // tile_m)
    if (fb <= fa) | (j0 + tile_n > tk):
        fa = c + n
        fb = c + n
    return fa, fb


@cute.jit
def step_walk(bands, n_block: Int32, tq: Int32, tk: Int32, q_off: Int32,
              tile_m: cutlass.Constexpr[int], tile_n: cutlass.Constexpr[int]):
    """The steps of key tile ``n_block`` as ``(edge, full)``: ``edge`` four ``(start, count)`` ranges
    of query blocks whose tile crosses a band edge or ``Tk`` (masked), ``full`` two ranges whose
    tile lies inside one interval (no mask). Together they are :func:`query_steps`' blocks."""
    c0, n0, c1, n1 = query_steps(bands, n_block, tq, tk, q_off, tile_m, tile_n)
    f0a, f0b = _full_range(c0, n0, n_block, q_off, tq, tk, bands[0], bands[1], tile_m, tile_n)
    f1a, f1b = _full_range(c1, n1, n_block, q_off, tq, tk, bands[2], bands[3], tile_m, tile_n)
    edge = (c0, f0a - c0, f0b, c0 + n0 - f0b, c1, f1a - c1, f1b, c1 + n1 - f1b)
    full = (f0a, f0b - f0a, f1a, f1b - f1a)
    return edge, full


@cute.jit
def nth_block(it: Int32, ranges) -> Int32:
    """Query block of step ``it`` of the ranges ``(start0, count0, start1, count1, ...)`` walked in order."""
    m = ranges[0] + it
    before = ranges[1]
    for r in cutlass.range_constexpr(1, len(ranges) // 2):
        if it >= before:
            m = ranges[2 * r] + it - before
        before = before + ranges[2 * r + 1]
    return m


@cute.jit
def walk_block(it: Int32, edge, full) -> Int32:
    """Query block of step ``it``: the edge steps first, then the full ones."""
    n_edge = edge[1] + edge[3] + edge[5] + edge[7]
    m = nth_block(it, edge)
    if it >= n_edge:
        m = nth_block(it - n_edge, full)
    return m


def walk_length(edge, full):
    """``(edge steps, full steps)``."""
    return edge[1] + edge[3] + edge[5] + edge[7], full[1] + full[3]


@cute.jit
def key_attended(j: Int32, tq: Int32, q_off: Int32, lo0: Int32, hi0: Int32, lo1: Int32, hi1: Int32) -> Boolean:
    """Whether some query ``0 <= i < Tq`` (position ``q_off + i``) sees key ``j``."""
    first0 = cutlass.max(j + lo0 - q_off, Int32(0))
    last0 = cutlass.min(j + hi0 - 1 - q_off, tq - 1)
    first1 = cutlass.max(j + lo1 - q_off, Int32(0))
    last1 = cutlass.min(j + hi1 - 1 - q_off, tq - 1)
    return ((hi0 > lo0) & (last0 >= first0)) | ((hi1 > lo1) & (last1 >= first1))


@cute.jit
def pair_allowed(r: Int32, j: Int32, tq: Int32, tk: Int32, q_off: Int32, lo0: Int32, hi0: Int32, lo1: Int32,
                 hi1: Int32) -> Boolean:
    """Whether query row ``r`` (position ``q_off + r``) may see key ``j``, both inside the sequence."""
    dist = q_off + r - j
    ok = ((dist >= lo0) & (dist < hi0)) | ((dist >= lo1) & (dist < hi1))
    return ok & (j < tk) & (r < tq)


@cute.jit
def sequence_geometry(z: Int32, cu_seqlens: cute.Tensor, tq: Int32, tk: Int32, q_off: Int32, per_doc: Int32,
                      varlen: cutlass.Constexpr[bool]):
    """``(b, start, tq, tk, q_off, stat_block, table)`` of grid index ``z``: a batch row, or with
    ``varlen`` a packed document (``B = 1``; rows ``cu_seqlens[z] ..``, ``q_off = 0``, its own interval
    table when ``per_doc``). ``stat_block`` is the first 64-row block of its row statistics and dQ
    accumulator: :func:`padded_start` // 64 for a document, 0 for a batch row."""
    b, start, stat_block, table = z, Int32(0), Int32(0), Int32(0)
    if cutlass.const_expr(varlen):
        b = Int32(0)
        start = cu_seqlens[z]
        tq = cu_seqlens[z + 1] - start
        tk = tq
        q_off = Int32(0)
        stat_block = padded_start(start, z) // TILE_M
        table = z * per_doc
    return b, start, tq, tk, q_off, stat_block, table


def sequence_rows(tensor: cute.Tensor, h: Int32, b: Int32, start: Int32, varlen: bool) -> cute.Tensor:
    """``(T, D)`` rows of ``tensor (T, D, H, B)`` for head ``h`` of batch row ``b``, or with ``varlen``
    the rows from a packed document's first row ``start`` on."""
    rows = tensor[None, None, h, b]
    if varlen:
        rows = cute.domain_offset((start, 0), rows)
    return rows


@cute.jit
def store_rows(src: cute.Tensor | None, dst: cute.Tensor, n_rows: Int32, tidx: Int32, n_threads: cutlass.Constexpr[int]):
    """Rows ``0 .. n_rows - 1`` of the shared-memory tile ``src (R, C)`` (zeros when ``src`` is ``None``)
    into the global ``dst (R, C)``, eight columns per thread and pass: a packed document's last tile,
    whose other rows belong to the next document (a TMA store would write them)."""
    rows, cols = cute.size(dst, mode=[0]), cute.size(dst, mode=[1])
    per_row = cols // 8
    part = cute.make_rmem_tensor((8,), dst.element_type)
    if cutlass.const_expr(src is None):
        part.fill(0.0)
    for i in cutlass.range(tidx, rows * per_row, n_threads, unroll=1):
        r = i // per_row
        chunk = i % per_row
        if r < n_rows:
            if cutlass.const_expr(src is not None):
                cute.autovec_copy(cute.local_tile(src[r, None], (8,), (chunk,)), part)
            cute.autovec_copy(part, cute.local_tile(dst[r, None], (8,), (chunk,)))


class Geometry(NamedTuple):
    """What one CTA works on: key tile ``n_block`` of head ``h`` in batch row ``b`` (or the packed
    document starting at row ``start``), its sequence lengths and query offset, the first 64-row
    block of its row statistics and dQ accumulator, and the head's intervals ``(lo0, hi0, lo1, hi1)``."""

    n_block: Int32
    h: Int32
    b: Int32
    start: Int32
    tq: Int32
    tk: Int32
    q_off: Int32
    stat_block: Int32
    bands: tuple


class BandBackwardSm90:
    """The kernel: ``dk, dv`` and the fp32 ``dq_acc`` of one call (see the module docstring)."""

    def __init__(self, dtype: type[cutlass.Numeric], varlen: bool = False):
        self.dtype = dtype
        self.varlen = varlen  # packed documents (``cu_seqlens``) instead of batch rows
        self.num_wg = 2
        self.num_mma_threads = 256
        self.num_threads = 384

    def _smem_layouts(self):
        d, tm, tn, row = HEAD_DIM, TILE_M, TILE_N, LayoutEnum.ROW_MAJOR
        # Q and dO are read as Q (S MMA, K-major) and as Q^T (dK MMA, MN-major): one swizzle fits both
        self.sQ_layout = sm90_utils.make_smem_layout(self.dtype, row, (tm, d), STAGES, major_mode_size=d)
        self.sdO_layout = sm90_utils.make_smem_layout(self.dtype, row, (tm, d), STAGES, major_mode_size=d)
        # K is read as K (S MMA) and as K^T in two 64-column halves (dQ MMA, one per warpgroup)
        self.sK_layout = sm90_utils.make_smem_layout(self.dtype, row, (tn, d), None, major_mode_size=d // 2)
        self.sV_layout = sm90_utils.make_smem_layout(self.dtype, row, (tn, d), None)
        # dS is written as dS^T (64 keys per warpgroup) and read as dS by the dQ MMA
        self.sdS_layout = sm90_utils.make_smem_layout(self.dtype, row, (tm, tn), STAGES, major_mode_size=tn // 2)
        # one contiguous fp32 chunk per warpgroup: its dQ share in register order
        self.sdQ_layout = cute.make_layout((tm * d // self.num_wg, self.num_wg))

    def _tiled_mmas(self):
        d, tm = HEAD_DIM, TILE_M
        k_major, mn_major = cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN
        # S^T, dP^T [128 keys, 64 queries]: the warpgroups split the keys
        mma_sdp = hopper.make_trivial_tiled_mma(self.dtype, self.dtype, k_major, k_major, Float32,
                                                atom_layout_mnk=(2, 1, 1), tiler_mn=(64, tm))
        # dK, dV [128 keys, D] += (dS^T | P^T) [keys, 64] (Q | dO) [64, D], A from registers
        mma_dkv = hopper.make_trivial_tiled_mma(self.dtype, self.dtype, k_major, mn_major, Float32,
                                                atom_layout_mnk=(2, 1, 1), tiler_mn=(64, d),
                                                a_source=warpgroup.OperandSource.RMEM)
        # dQ [64, D] = dS [64, 128 keys] K [keys, D]: the warpgroups split the head dim
        mma_dq = dq_tiled_mma(self.dtype)
        return mma_sdp, mma_dkv, mma_dq

    def _shared_storage(self):
        def buffer(layout, dtype):
            return cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(layout)], 1024]

        @cute.struct
        class SharedStorage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, STAGES * 2]
            mbar_do: cute.struct.MemRange[cutlass.Int64, STAGES * 2]
            mbar_kv: cute.struct.MemRange[cutlass.Int64, 2]
            s_lse: cute.struct.Align[cute.struct.MemRange[Float32, TILE_M * STAGES], 128]
            s_delta: cute.struct.Align[cute.struct.MemRange[Float32, TILE_M * STAGES], 128]
            sQ: buffer(self.sQ_layout, self.dtype)
            sdO: buffer(self.sdO_layout, self.dtype)
            sK: buffer(self.sK_layout, self.dtype)
            sV: buffer(self.sV_layout, self.dtype)
            sdS: buffer(self.sdS_layout, self.dtype)
            sdQ: buffer(self.sdQ_layout, Float32)

        return SharedStorage

    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mdO: cute.Tensor,
                 mLSE: cute.Tensor, mDelta: cute.Tensor, mdQacc: cute.Tensor, mdK: cute.Tensor,
                 mdV: cute.Tensor, mBands: cute.Tensor, mCuSeq: cute.Tensor, scale: Float32, q_off: Int32,
                 per_doc: Int32, max_seqlen: Int32, stream: cuda.CUstream):
        # [B, T, H, D] -> (T, D, H, B); [B, H, X] -> (X, H, B)
        mQ, mK, mV, mdO, mdK, mdV = [layout_utils.select(t, [1, 3, 2, 0]) for t in (mQ, mK, mV, mdO, mdK, mdV)]
        mLSE, mDelta, mdQacc = [layout_utils.select(t, [2, 1, 0]) for t in (mLSE, mDelta, mdQacc)]
        self._smem_layouts()
        mma_sdp, mma_dkv, mma_dq = self._tiled_mmas()
        storage = self._shared_storage()
        d, tm, tn = HEAD_DIM, TILE_M, TILE_N

        def tma_atom(op, gmem, smem_layout, tile):
            return cpasync.make_tiled_tma_atom(op, gmem, cute.select(smem_layout, mode=[0, 1]), tile)

        load, store = cpasync.CopyBulkTensorTileG2SOp(), cpasync.CopyBulkTensorTileS2GOp()
        atom_q, tma_q = tma_atom(load, mQ, self.sQ_layout, (tm, d))
        atom_do, tma_do = tma_atom(load, mdO, self.sdO_layout, (tm, d))
        atom_k, tma_k = tma_atom(load, mK, self.sK_layout, (tn, d))
        atom_v, tma_v = tma_atom(load, mV, self.sV_layout, (tn, d))
        atom_dk, tma_dk = tma_atom(store, mdK, self.sK_layout, (tn, d))
        atom_dv, tma_dv = tma_atom(store, mdV, self.sV_layout, (tn, d))
        if cutlass.const_expr(self.varlen):  # key tiles of the longest document, heads, documents
            grid = ((max_seqlen + tn - 1) // tn, cute.size(mQ.shape[2]), cute.size(mCuSeq.shape[0]) - 1)
        else:
            grid = (cute.ceil_div(cute.size(mK.shape[0]), tn), cute.size(mQ.shape[2]), cute.size(mQ.shape[3]))
        self.kernel(
            tma_q, tma_do, tma_k, tma_v, tma_dk, tma_dv, mdK, mdV, atom_q, atom_do, atom_k, atom_v, atom_dk,
            atom_dv, mLSE, mDelta, mdQacc, mBands, mCuSeq, mma_sdp, mma_dkv, mma_dq, dq_register_copy(),
            self.sQ_layout, self.sdO_layout, self.sK_layout, self.sV_layout, self.sdS_layout, self.sdQ_layout,
            scale * math.log2(math.e), scale, q_off, per_doc, cute.size(mQ.shape[0]), cute.size(mK.shape[0]),
            storage,
        ).launch(grid=grid, block=[self.num_threads, 1, 1], smem=storage.size_in_bytes(), stream=stream,
                 min_blocks_per_mp=1)

    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mdO: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
               mdK: cute.Tensor, mdV: cute.Tensor, gmem_dK: cute.Tensor, gmem_dV: cute.Tensor,
               atom_q: cute.CopyAtom, atom_do: cute.CopyAtom,
               atom_k: cute.CopyAtom, atom_v: cute.CopyAtom, atom_dk: cute.CopyAtom, atom_dv: cute.CopyAtom,
               mLSE: cute.Tensor, mDelta: cute.Tensor, mdQacc: cute.Tensor, mBands: cute.Tensor,
               mCuSeq: cute.Tensor,
               mma_sdp: cute.TiledMma, mma_dkv: cute.TiledMma, mma_dq: cute.TiledMma, r2s_dq: cute.TiledCopy,
               sQ_layout: cute.ComposedLayout, sdO_layout: cute.ComposedLayout,
               sK_layout: cute.ComposedLayout, sV_layout: cute.ComposedLayout,
               sdS_layout: cute.ComposedLayout, sdQ_layout: cute.Layout,
               scale_log2: Float32, scale: Float32, q_off: Int32, per_doc: Int32, tq: Int32, tk: Int32,
               storage: cutlass.Constexpr):
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        n_block, h, z = cute.arch.block_idx()
        b, start, tq, tk, q_off, stat_block, table = sequence_geometry(z, mCuSeq, tq, tk, q_off, per_doc,
                                                                       self.varlen)
        bands = (mBands[table, h, 0], mBands[table, h, 1], mBands[table, h, 2], mBands[table, h, 3])
        geometry = Geometry(n_block, h, b, start, tq, tk, q_off, stat_block, bands)
        edge, full = step_walk(bands, n_block, tq, tk, q_off, TILE_M, TILE_N)
        n_edge, n_full = walk_length(edge, full)
        if n_edge + n_full == 0:
            # no query sees these keys (or the tile lies past a shorter document's end): zero dK and dV
            # rows straight from registers, without the pipelines and the shared-memory epilogue
            rows_left = cutlass.min(tk - n_block * TILE_N, Int32(TILE_N))
            for dst in (gmem_dK, gmem_dV):
                store_rows(None, cute.local_tile(self._rows(dst, geometry), (TILE_N, HEAD_DIM), (n_block, 0)),
                           rows_left, cute.arch.thread_idx()[0], self.num_threads)
        else:
            if warp == 0:
                for atom in (atom_q, atom_do, atom_k, atom_v, atom_dk, atom_dv):
                    cpasync.prefetch_descriptor(atom)

            s = cutlass.memory.SmemAllocator().allocate(storage)
            producer = cutlass.pipeline.CooperativeGroup(cutlass.pipeline.Agent.Thread)
            consumers = cutlass.pipeline.CooperativeGroup(cutlass.pipeline.Agent.Thread, self.num_mma_threads // 32)
            rows_bytes = TILE_M * HEAD_DIM * self.dtype.width // 8 + TILE_M * 4  # a Q (or dO) tile + its statistics
            pipe_q = cutlass.pipeline.PipelineTmaAsync.create(
                barrier_storage=s.mbar_q.data_ptr(), num_stages=STAGES, producer_group=producer,
                consumer_group=consumers, tx_count=rows_bytes, defer_sync=True)
            pipe_do = cutlass.pipeline.PipelineTmaAsync.create(
                barrier_storage=s.mbar_do.data_ptr(), num_stages=STAGES, producer_group=producer,
                consumer_group=consumers, tx_count=rows_bytes, defer_sync=True)
            pipe_kv = cutlass.pipeline.PipelineTmaAsync.create(  # its init also fences and syncs the others'
                barrier_storage=s.mbar_kv.data_ptr(), num_stages=1, producer_group=producer,
                consumer_group=consumers, tx_count=2 * TILE_N * HEAD_DIM * self.dtype.width // 8)

            sQ = s.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)  # (64, D, STAGES)
            sdO = s.sdO.get_tensor(sdO_layout.outer, swizzle=sdO_layout.inner)  # (64, D, STAGES)
            sK = s.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)  # (128, D)
            sV = s.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)  # (128, D)
            sdS = s.sdS.get_tensor(sdS_layout.outer, swizzle=sdS_layout.inner)  # (64, 128, STAGES)
            sdQ = s.sdQ.get_tensor(sdQ_layout)  # (64 * D / 2, 2) fp32
            sLSE = s.s_lse.get_tensor(cute.make_layout((TILE_M, STAGES)))
            sDelta = s.s_delta.get_tensor(cute.make_layout((TILE_M, STAGES)))

            if warp < 4:
                cute.arch.setmaxregister_decrease(24)
                if warp == 0:
                    self.load(mQ, mdO, mK, mV, mLSE, mDelta, sQ, sdO, sK, sV, sLSE, sDelta, atom_q, atom_do,
                              atom_k, atom_v, pipe_q, pipe_do, pipe_kv, geometry, edge, full)
                if warp == 1:
                    self.write_dq(mdQacc, sdQ, geometry, edge, full)
            else:
                cute.arch.setmaxregister_increase(240)
                tidx = cute.arch.thread_idx()[0] - 128
                self.compute(mma_sdp, mma_dkv, mma_dq, r2s_dq, mdK, mdV, gmem_dK, gmem_dV, atom_dk, atom_dv, sQ, sdO,
                             sK, sV, sdS, sdQ, sLSE, sDelta, pipe_q, pipe_do, pipe_kv, tidx, scale_log2, scale,
                             geometry, edge, full)

    def _rows(self, tensor: cute.Tensor, geometry) -> cute.Tensor:
        """``(T, D)`` rows of ``tensor (T, D, H, B)`` for this CTA's head and batch row, or document."""
        return sequence_rows(tensor, geometry.h, geometry.b, geometry.start, self.varlen)

    @cute.jit
    def load(self, mQ, mdO, mK, mV, mLSE, mDelta, sQ, sdO, sK, sV, sLSE, sDelta, atom_q, atom_do, atom_k,
             atom_v, pipe_q, pipe_do, pipe_kv, geometry, edge, full):
        """Warp 0: K and V once, then Q + lse2 and dO + delta of every step."""
        d, tm, tn = HEAD_DIM, TILE_M, TILE_N
        one = cute.make_layout(1)
        h, b, n_block = geometry.h, geometry.b, geometry.n_block
        gK = cute.local_tile(self._rows(mK, geometry), (tn, d), (n_block, 0))
        gV = cute.local_tile(self._rows(mV, geometry), (tn, d), (n_block, 0))
        gQ = cute.local_tile(self._rows(mQ, geometry), (tm, d), (None, 0))  # (64, D, blocks)
        gdO = cute.local_tile(self._rows(mdO, geometry), (tm, d), (None, 0))
        gLSE = cute.local_tile(mLSE[None, h, b], (tm,), (None,))  # (64, padded blocks)
        gDelta = cute.local_tile(mDelta[None, h, b], (tm,), (None,))
        load_k, _, _ = copy_utils.tma_get_copy_fn(atom_k, 0, one, gK, sK, single_stage=True)
        load_v, _, _ = copy_utils.tma_get_copy_fn(atom_v, 0, one, gV, sV, single_stage=True)
        load_q, _, _ = copy_utils.tma_get_copy_fn(atom_q, 0, one, gQ, sQ)
        load_do, _, _ = copy_utils.tma_get_copy_fn(atom_do, 0, one, gdO, sdO)
        load_q = copy_utils.tma_producer_copy_fn(load_q, pipe_q)
        load_do = copy_utils.tma_producer_copy_fn(load_do, pipe_do)
        load_lse = copy_utils.tma_producer_copy_fn(copy_utils.cpasync_bulk_get_copy_fn(gLSE, sLSE), pipe_q)
        load_delta = copy_utils.tma_producer_copy_fn(copy_utils.cpasync_bulk_get_copy_fn(gDelta, sDelta), pipe_do)
        state_q = cutlass.pipeline.make_pipeline_state(cutlass.pipeline.PipelineUserType.Producer, STAGES)
        state_do = cutlass.pipeline.make_pipeline_state(cutlass.pipeline.PipelineUserType.Producer, STAGES)
        state_kv = cutlass.pipeline.make_pipeline_state(cutlass.pipeline.PipelineUserType.Producer, 1)
        n_edge, n_full = walk_length(edge, full)
        pipe_kv.producer_acquire(state_kv)
        load_k(tma_bar_ptr=pipe_kv.producer_get_barrier(state_kv))
        load_v(tma_bar_ptr=pipe_kv.producer_get_barrier(state_kv))
        for it in cutlass.range(n_edge + n_full, unroll=1):
            m = walk_block(it, edge, full)
            pipe_q.producer_acquire(state_q)
            load_q(m, producer_state=state_q)
            load_lse(geometry.stat_block + m, producer_state=state_q)
            pipe_do.producer_acquire(state_do)
            load_do(m, producer_state=state_do)
            load_delta(geometry.stat_block + m, producer_state=state_do)
            state_q.advance()
            state_do.advance()

    @cute.jit
    def write_dq(self, mdQacc, sdQ, geometry, edge, full):
        """Warp 1: per step and warpgroup, free its dQ staging chunk, then reduce-add it into dq_acc."""
        chunk = TILE_M * HEAD_DIM // self.num_wg
        acc = mdQacc[None, geometry.h, geometry.b]  # (Tpad * D,)
        n_edge, n_full = walk_length(edge, full)
        for it in cutlass.range(n_edge + n_full, unroll=1):
            m = geometry.stat_block + walk_block(it, edge, full)
            for wg in cutlass.range_constexpr(self.num_wg):
                cute.arch.cp_async_bulk_wait_group(self.num_wg - 1 - wg, read=True)  # chunk wg read out
                cute.arch.barrier_arrive(barrier_id=BAR_DQ_EMPTY + wg, number_of_threads=THREADS_WG_AND_WRITER)
            for wg in cutlass.range_constexpr(self.num_wg):
                cute.arch.barrier(barrier_id=BAR_DQ_FULL + wg, number_of_threads=THREADS_WG_AND_WRITER)
                with cute.arch.elect_one():
                    copy_utils.cpasync_reduce_bulk_add_f32(
                        sdQ[None, wg].iterator, acc.iterator + (m * TILE_M * HEAD_DIM + wg * chunk), chunk * 4)
                cute.arch.cp_async_bulk_commit_group()
        cute.arch.cp_async_bulk_wait_group(0, read=True)

    @cute.jit
    def compute(self, mma_sdp, mma_dkv, mma_dq, r2s_dq, mdK, mdV, gmem_dK, gmem_dV, atom_dk, atom_dv, sQ, sdO,
                sK, sV, sdS, sdQ, sLSE, sDelta, pipe_q, pipe_do, pipe_kv, tidx, scale_log2, scale, geometry,
                edge, full):
        """Warpgroups 1-2: the five MMAs of every step, then dK and dV out."""
        d, tm, tn = HEAD_DIM, TILE_M, TILE_N
        wg = cute.arch.make_warp_uniform(tidx // 128)
        wg_first_thread = cute.make_layout(self.num_wg, stride=128)
        thr_sdp = mma_sdp.get_slice(tidx)
        wg_sdp = mma_sdp.get_slice(wg_first_thread(wg))
        wg_dkv = mma_dkv.get_slice(wg_first_thread(wg))
        wg_dq = mma_dq.get_slice(wg_first_thread(wg))
        # S^T = K Q^T, dP^T = V dO^T (shared-memory operands); swap_AB: A = K | V, B = Q | dO
        _, tSrQ, tSrK = sm90_utils.partition_fragment_ABC(wg_sdp, (tm, tn, d), sQ, sK, swap_AB=True)
        _, tdPrdO, tdPrV = sm90_utils.partition_fragment_ABC(wg_sdp, (tm, tn, d), sdO, sV, swap_AB=True)
        # dV += P^T dO, dK += dS^T Q: A from registers, B = dO^T | Q^T (MN-major views)
        acc_dV, _, tdVrdO = sm90_utils.partition_fragment_ABC(wg_dkv, (tn, d, tm), None,
                                                              layout_utils.transpose_view(sdO))
        acc_dK, _, tdKrQ = sm90_utils.partition_fragment_ABC(wg_dkv, (tn, d, tm), None,
                                                             layout_utils.transpose_view(sQ))
        # dQ = dS K: B = K^T view
        _, tdQrdS, tdQrK = sm90_utils.partition_fragment_ABC(wg_dq, (tm, d, tn), sdS,
                                                             layout_utils.transpose_view(sK))
        store_dS, _, _ = copy_utils.get_smem_store_C(mma_sdp, layout_utils.transpose_view(sdS), tidx,
                                                     transpose=True, position_independent=True,
                                                     major_mode_size=tn // 2)
        t_lse = layout_utils.mma_partition_C_vec(sLSE, thr_sdp, expand_shape=tn, is_colvec=False)
        t_delta = layout_utils.mma_partition_C_vec(sDelta, thr_sdp, expand_shape=tn, is_colvec=False)
        t_sdQ = r2s_dq.get_slice(tidx).partition_D(sdQ)
        bar_ds = cutlass.pipeline.NamedBarrier(barrier_id=BAR_DS, num_threads=self.num_mma_threads)
        one_step = functools.partial(
            self.step, mma_sdp=mma_sdp, mma_dkv=mma_dkv, mma_dq=mma_dq, thr_sdp=thr_sdp, tSrQ=tSrQ, tSrK=tSrK,
            tdPrdO=tdPrdO, tdPrV=tdPrV, tdVrdO=tdVrdO, tdKrQ=tdKrQ, tdQrdS=tdQrdS, tdQrK=tdQrK, acc_dV=acc_dV,
            acc_dK=acc_dK, store_dS=store_dS, t_lse=t_lse, t_delta=t_delta, t_sdQ=t_sdQ, bar_ds=bar_ds,
            pipe_q=pipe_q, pipe_do=pipe_do, wg=wg, scale_log2=scale_log2, geometry=geometry)

        state_q = cutlass.pipeline.make_pipeline_state(cutlass.pipeline.PipelineUserType.Consumer, STAGES)
        state_do = cutlass.pipeline.make_pipeline_state(cutlass.pipeline.PipelineUserType.Consumer, STAGES)
        state_kv = cutlass.pipeline.make_pipeline_state(cutlass.pipeline.PipelineUserType.Consumer, 1)
        n_edge, n_full = walk_length(edge, full)  # at least one step (the kernel zeroes dK, dV of empty walks)
        pipe_kv.consumer_wait(state_kv)
        self.zero_unattended_keys(sK, sV, tidx, geometry)
        # edge steps (element mask), then full steps: two straight-line copies of the step
        for it in cutlass.range(n_edge, unroll=1):
            state_q, state_do = one_step(nth_block(it, edge), it == 0, state_q, state_do, masked=True)
        for it in cutlass.range(n_full, unroll=1):
            state_q, state_do = one_step(nth_block(it, full), (it == 0) & (n_edge == 0), state_q, state_do,
                                         masked=False)
        acc_dK.store(acc_dK.load() * scale)
        self.store_dkdv(acc_dK, acc_dV, mma_dkv, mdK, mdV, gmem_dK, gmem_dV, sK, sV, atom_dk, atom_dv, tidx, geometry)

    @cute.jit
    def zero_unattended_keys(self, sK, sV, tidx, geometry):
        """Zero the K and V rows of keys that no query attends (each thread half a row), as the Triton
        kernels do: NaN or Inf there would otherwise reach dQ (``0 * NaN`` in the dQ MMA, and in ``dS``
        through ``dP``); their dK and dV come out 0. Rows past ``Tk`` too: in a packed document's last
        tile they hold the next document's keys."""
        row = tidx // 2
        first_col = (tidx % 2) * (HEAD_DIM // 2)
        j = geometry.n_block * TILE_N + row
        lo0, hi0, lo1, hi1 = geometry.bands
        if (j >= geometry.tk) | (key_attended(j, geometry.tq, geometry.q_off, lo0, hi0, lo1, hi1) == Boolean(False)):
            for c in cutlass.range_constexpr(HEAD_DIM // 2):
                sK[row, first_col + c] = self.dtype(0.0)
                sV[row, first_col + c] = self.dtype(0.0)
        cute.arch.fence_view_async_shared()  # visible to the MMAs (the async proxy)
        cutlass.pipeline.NamedBarrier(barrier_id=BAR_KV_READY, num_threads=self.num_mma_threads).arrive_and_wait()

    @cute.jit
    def step(self, m: Int32, first: Boolean, state_q, state_do, masked: cutlass.Constexpr[bool], mma_sdp, mma_dkv,
             mma_dq, thr_sdp, tSrQ, tSrK, tdPrdO, tdPrV, tdVrdO, tdKrQ, tdQrdS, tdQrK, acc_dV, acc_dK, store_dS,
             t_lse, t_delta, t_sdQ, bar_ds, pipe_q, pipe_do, wg, scale_log2, geometry):
        """One 64-query step of warpgroups 1-2 (``first``: the tile's first step starts dK and dV;
        ``masked``: apply the element mask)."""
        d, tm, tn = HEAD_DIM, TILE_M, TILE_N
        slot = state_q.index
        pipe_q.consumer_wait(state_q)
        acc_S = sm90_utils.gemm_zero_init(mma_sdp, (tm, tn), tSrQ, tSrK, A_idx=slot, wg_wait=-1, swap_AB=True)
        r_lse = copy_utils.load_s2r(t_lse[None, slot])
        pipe_do.consumer_wait(state_do)
        acc_dP = sm90_utils.gemm_zero_init(mma_sdp, (tm, tn), tdPrdO, tdPrV, A_idx=slot, wg_wait=1, swap_AB=True)
        if cutlass.const_expr(masked):  # S^T is complete: -inf outside the band and past Tq or Tk
            lo0, hi0, lo1, hi1 = geometry.bands
            coords = thr_sdp.partition_C(
                cute.domain_offset((geometry.n_block * tn, m * tm), cute.make_identity_tensor((tn, tm))))
            for e in cutlass.range_constexpr(cute.size(acc_S)):
                j, r = coords[e]
                if not pair_allowed(r, j, geometry.tq, geometry.tk, geometry.q_off, lo0, hi0, lo1, hi1):
                    acc_S[e] = -Float32.inf
        s_rows = layout_utils.reshape_acc_to_mn(acc_S, transpose=True)  # (queries, keys) view
        for r in cutlass.range_constexpr(cute.size(s_rows, mode=[0])):
            for c in cutlass.range(cute.size(s_rows, mode=[1]), unroll_full=True):
                s_rows[r, c] = cute.math.exp2(s_rows[r, c] * scale_log2 - r_lse[r], fastmath=True)
        r_delta = copy_utils.load_s2r(t_delta[None, slot])
        p_frag = layout_utils.reshape_acc_to_frgA(acc_S)
        rP = cute.make_rmem_tensor_like(p_frag, self.dtype)
        rP.store(p_frag.load().to(self.dtype))
        warpgroup.wait_group(0)  # dP^T complete
        dp_rows = layout_utils.reshape_acc_to_mn(acc_dP, transpose=True)
        for r in cutlass.range_constexpr(cute.size(dp_rows, mode=[0])):
            for c in cutlass.range(cute.size(dp_rows, mode=[1]), unroll_full=True):
                dp_rows[r, c] = s_rows[r, c] * (dp_rows[r, c] - r_delta[r])
        ds_frag = layout_utils.reshape_acc_to_frgA(acc_dP)
        rdS = cute.make_rmem_tensor_like(ds_frag, self.dtype)
        rdS.store(ds_frag.load().to(self.dtype))
        store_dS(rdS, dst_idx=slot)
        sm90_utils.gemm_w_idx(mma_dkv, acc_dV, rP, tdVrdO, zero_init=first, B_idx=slot, wg_wait=-1)
        cute.arch.fence_view_async_shared()
        bar_ds.arrive_and_wait()  # both halves of dS are in shared memory
        acc_dQ = sm90_utils.gemm_zero_init(mma_dq, (tm, d), tdQrdS, tdQrK, A_idx=slot, wg_wait=1)
        pipe_do.consumer_release(state_do)  # dV's MMA (the last reader of dO) is complete
        sm90_utils.gemm_w_idx(mma_dkv, acc_dK, rdS, tdKrQ, zero_init=first, B_idx=slot, wg_wait=1)
        # dQ's MMA is complete: hand its share to warp 1 once the staging chunk is free
        cute.arch.barrier(barrier_id=BAR_DQ_EMPTY + wg, number_of_threads=THREADS_WG_AND_WRITER)
        cute.autovec_copy(cute.make_tensor(acc_dQ.iterator, cute.make_layout(t_sdQ.shape)), t_sdQ)
        cute.arch.fence_view_async_shared()
        cute.arch.barrier_arrive(barrier_id=BAR_DQ_FULL + wg, number_of_threads=THREADS_WG_AND_WRITER)
        warpgroup.wait_group(0)
        pipe_q.consumer_release(state_q)
        state_q.advance()
        state_do.advance()
        return state_q, state_do

    @cute.jit
    def store_dkdv(self, acc_dK, acc_dV, mma_dkv, mdK, mdV, gmem_dK, gmem_dV, sK, sV, atom_dk, atom_dv, tidx,
                   geometry):
        """dK and dV through the (now free) K and V buffers, out by TMA (rows past Tk are clipped); a packed
        document's last, partial tile row by row (:func:`store_rows`)."""
        d, tn = HEAD_DIM, TILE_N
        n_block = geometry.n_block
        bar = cutlass.pipeline.NamedBarrier(barrier_id=BAR_EPILOGUE, num_threads=self.num_mma_threads)
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        one = cute.make_layout(1)
        gdK = cute.local_tile(self._rows(mdK, geometry), (tn, d), (n_block, 0))
        gdV = cute.local_tile(self._rows(mdV, geometry), (tn, d), (n_block, 0))
        store_dk, _, _ = copy_utils.tma_get_copy_fn(atom_dk, 0, one, sK, gdK, single_stage=True)
        store_dv, _, _ = copy_utils.tma_get_copy_fn(atom_dv, 0, one, sV, gdV, single_stage=True)
        r2s_dv, _, _ = copy_utils.get_smem_store_C(mma_dkv, sV, tidx, position_independent=True)
        r2s_dk, _, _ = copy_utils.get_smem_store_C(mma_dkv, sK, tidx, position_independent=True)
        bar.arrive_and_wait()  # every MMA reading K or V (both warpgroups) is complete
        r2s_dv(acc_dV, dst_idx=None)
        r2s_dk(acc_dK, dst_idx=None)
        cute.arch.fence_view_async_shared()
        bar.arrive_and_wait()
        whole_tile = Boolean(True)
        if cutlass.const_expr(self.varlen):
            rows_left = geometry.tk - n_block * tn
            whole_tile = rows_left >= tn
            if rows_left < tn:
                for src, dst in ((sK, gmem_dK), (sV, gmem_dV)):
                    store_rows(src, cute.local_tile(self._rows(dst, geometry), (tn, d), (n_block, 0)), rows_left,
                               tidx, self.num_mma_threads)
        if (warp == 4) & whole_tile:
            store_dv()
            store_dk()
            cute.arch.cp_async_bulk_commit_group()
            cute.arch.cp_async_bulk_wait_group(0, read=True)


def dq_tiled_mma(dtype: type[cutlass.Numeric]) -> cute.TiledMma:
    """The dQ MMA (``[64, D] = dS K``, one half of D per warpgroup): its register order is dq_acc's."""
    return hopper.make_trivial_tiled_mma(dtype, dtype, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.MN,
                                         Float32, atom_layout_mnk=(1, 2, 1), tiler_mn=(64, HEAD_DIM // 2))


def dq_register_copy() -> cute.TiledCopy:
    """16-byte copies of a thread's dQ registers to (and from) its warpgroup's contiguous chunk."""
    return cute.make_tiled_copy_tv(
        cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Float32, num_bits_per_copy=128),
        cute.make_layout((128, 2)), cute.make_layout(4))


class DqFromAccumulator:
    """``dq [B, Tq, H, D] = scale * dq_acc``: one 256-thread CTA per 64-row block reads the block in
    the dQ MMA's register order (as the backward wrote it), stages it in shared memory in row order
    and stores it by TMA (rows past ``Tq`` are clipped); with ``varlen``, one CTA per block of a packed
    document, whose last, partial block is stored row by row (:func:`store_rows`)."""

    def __init__(self, dtype: type[cutlass.Numeric], varlen: bool = False):
        self.dtype = dtype
        self.varlen = varlen

    @cute.jit
    def __call__(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, mCuSeq: cute.Tensor, scale: Float32,
                 max_seqlen: Int32, stream: cuda.CUstream):
        mdQacc = layout_utils.select(mdQacc, [2, 1, 0])  # (Tpad * D, H, B)
        mdQ = layout_utils.select(mdQ, [1, 3, 2, 0])  # (Tq, D, H, B)
        s_layout = sm90_utils.make_smem_layout(self.dtype, LayoutEnum.ROW_MAJOR, (TILE_M, HEAD_DIM), None)
        atom, tma_dq = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileS2GOp(), mdQ, s_layout,
                                                   (TILE_M, HEAD_DIM))

        @cute.struct
        class SharedStorage:
            sdQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(s_layout)], 1024]

        if cutlass.const_expr(self.varlen):  # row blocks of the longest document, heads, documents
            grid = ((max_seqlen + TILE_M - 1) // TILE_M, cute.size(mdQ.shape[2]), cute.size(mCuSeq.shape[0]) - 1)
        else:
            grid = (cute.ceil_div(cute.size(mdQ.shape[0]), TILE_M), cute.size(mdQ.shape[2]), cute.size(mdQ.shape[3]))
        self.kernel(mdQacc, tma_dq, mdQ, mCuSeq, atom, dq_tiled_mma(self.dtype), dq_register_copy(), s_layout, scale,
                    SharedStorage).launch(grid=grid, block=[256, 1, 1], smem=SharedStorage.size_in_bytes(),
                                          stream=stream)

    @cute.kernel
    def kernel(self, mdQacc: cute.Tensor, mdQ: cute.Tensor, gmem_dQ: cute.Tensor, mCuSeq: cute.Tensor,
               atom: cute.CopyAtom, mma_dq: cute.TiledMma, r2s_dq: cute.TiledCopy, s_layout: cute.ComposedLayout,
               scale: Float32, storage: cutlass.Constexpr):
        tm, d = TILE_M, HEAD_DIM
        tidx = cute.arch.thread_idx()[0]
        m, h, z = cute.arch.block_idx()
        tq = cute.size(gmem_dQ.shape[0])
        b, start, tq, _, _, stat_block, _ = sequence_geometry(z, mCuSeq, tq, tq, Int32(0), Int32(0), self.varlen)
        if m * tm < tq:  # a shorter document has fewer blocks than the grid
            s = cutlass.memory.SmemAllocator().allocate(storage)
            sdQ = s.sdQ.get_tensor(s_layout.outer, swizzle=s_layout.inner)  # (64, D)
            block = cute.make_tensor(mdQacc[None, h, b].iterator + (stat_block + m) * tm * d,
                                     cute.make_layout((tm * d // 2, 2)))
            src = r2s_dq.get_slice(tidx).partition_S(block)
            acc = cute.make_rmem_tensor(mma_dq.get_slice(tidx).partition_shape_C((tm, d)), Float32)
            cute.autovec_copy(src, cute.make_tensor(acc.iterator, cute.make_layout(src.shape)))
            acc.store(acc.load() * scale)
            to_smem, _, _ = copy_utils.get_smem_store_C(mma_dq, sdQ, tidx, position_independent=True)
            to_smem(acc, dst_idx=None)
            cute.arch.fence_view_async_shared()
            cute.arch.barrier()
            whole_block = Boolean(True)
            if cutlass.const_expr(self.varlen):
                whole_block = m * tm + tm <= tq
                if m * tm + tm > tq:
                    raw_rows = sequence_rows(gmem_dQ, h, b, start, self.varlen)
                    store_rows(sdQ, cute.local_tile(raw_rows, (tm, d), (m, 0)), tq - m * tm, tidx, 256)
            if (cute.arch.make_warp_uniform(cute.arch.warp_idx()) == 0) & whole_block:
                gdQ = cute.local_tile(sequence_rows(mdQ, h, b, start, self.varlen), (tm, d), (m, 0))
                store, _, _ = copy_utils.tma_get_copy_fn(atom, 0, cute.make_layout(1), sdQ, gdQ, single_stage=True)
                store()
                cute.arch.cp_async_bulk_commit_group()
                cute.arch.cp_async_bulk_wait_group(0, read=True)
