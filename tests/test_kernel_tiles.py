"""Tile classification of the Triton band kernel, checked against ``BandSpec.mask``.

Every kernel walks, per query tile (forward, dQ) or key tile (dK/dV), the blocks of the
other side that its head's intervals reach, and runs *edge* tiles with the element mask
and *full* tiles without it. A full tile that holds a forbidden pair would silently attend it,
and a needed block that is never visited would silently drop it; both are checked here on
small geometries through the Triton interpreter, for the block lists themselves rather
than only through attention outputs.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels.common import (
    key_block_ranges,
    keys_used,
    load_intervals,
    query_block_ranges,
    tile_is_full,
    tile_keys_all_used,
)

EDGE, FULL = 1, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _key_tiles_kernel(Table, Out, tq, tk, q_off, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    lo0, hi0, lo1, hi1 = load_intervals(Table + h * 4)
    i0 = m * BLOCK_M + q_off
    i1 = tl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
    a0, n0, a1, n1 = key_block_ranges(i0, i1, tk, lo0, hi0, lo1, hi1, BLOCK_N)
    row = Out + (h * tl.num_programs(0) + m) * n_kb
    for t in range(0, n0 + n1):
        kb = tl.where(t < n0, a0 + t, a1 + (t - n0))
        full = tile_is_full(i0, i1, kb * BLOCK_N, tk, lo0, hi0, lo1, hi1, BLOCK_N)
        tl.store(row + kb, tl.load(row + kb) + tl.where(full, 2, 1))


@triton.jit
def _query_tiles_kernel(Table, Out, tq, tk, q_off, n_qb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    lo0, hi0, lo1, hi1 = load_intervals(Table + h * 4)
    j0 = n * BLOCK_N
    j1 = tl.minimum(j0 + BLOCK_N - 1, tk - 1)
    c0, n0, c1, n1 = query_block_ranges(j0, j1, tq, q_off, lo0, hi0, lo1, hi1, BLOCK_M)
    row = Out + (h * tl.num_programs(0) + n) * n_qb
    for t in range(0, n0 + n1):
        mb = tl.where(t < n0, c0 + t, c1 + (t - n0))
        i0 = mb * BLOCK_M + q_off
        i1 = tl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
        full = tile_is_full(i0, i1, j0, tk, lo0, hi0, lo1, hi1, BLOCK_N)
        tl.store(row + mb, tl.load(row + mb) + tl.where(full, 2, 1))


@triton.jit
def _keys_used_kernel(Table, Used, AllUsed, tq, tk, q_off, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    h = tl.program_id(1)
    lo0, hi0, lo1, hi1 = load_intervals(Table + h * 4)
    i0 = m * BLOCK_M + q_off
    i1 = tl.minimum(i0 + BLOCK_M - 1, q_off + tq - 1)
    row = h * tl.num_programs(0) + m
    for kb in range(0, n_kb):
        cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(Used + row * n_kb * BLOCK_N + cols, keys_used(cols, i0, i1, tk, lo0, hi0, lo1, hi1).to(tl.int32))
        all_used = tile_keys_all_used(i0, i1, kb * BLOCK_N, tk, lo0, hi0, lo1, hi1, BLOCK_N)
        tl.store(AllUsed + row * n_kb + kb, all_used.to(tl.int32))


GEOMETRIES = [
    # pattern, heads, partition_len, tq, tk, block_m, block_n
    ("exclusive_bands", 4, 96, 96, 96, 16, 16),
    ("exclusive_bands", 2, 128, 128, 128, 16, 16),
    ("spattention", 4, 96, 96, 96, 16, 16),
    ("spattention", 3, 100, 77, 77, 16, 8),
    ("gapped_bands", 5, 120, 120, 120, 8, 16),
    ("sliding_window", 4, 64, 70, 70, 16, 16),
    ("sliding_window", 2, 100, 90, 90, 8, 8),
    ("gapped_bands", 2, 150, 150, 150, 16, 8),
    ("dense", 2, 50, 53, 53, 16, 16),
    ("exclusive_bands", 4, 200, 40, 120, 16, 16),  # queries at the end of a longer key sequence
    ("spattention", 6, 48, 100, 100, 32, 16),  # partition_len < T: pairs at d >= N dropped
]


def _tiles(mask_hw: torch.Tensor, tq: int, tk: int, bm: int, bn: int, whole_cols: bool = True):
    """``(needed, all_allowed)`` per (head, row tile, column block) from the boolean mask.

    A tile counts as all-allowed when every pair inside the sequence is; with ``whole_cols``
    its column block must also lie inside the sequence (key blocks past ``Tk`` are masked).
    """
    h = mask_hw.shape[0]
    n_qt, n_kb = triton.cdiv(tq, bm), triton.cdiv(tk, bn)
    needed = torch.zeros(h, n_qt, n_kb, dtype=torch.bool)
    full = torch.zeros_like(needed)
    for m in range(n_qt):
        for kb in range(n_kb):
            tile = mask_hw[:, m * bm:(m + 1) * bm, kb * bn:(kb + 1) * bn]  # [H, <=bm, <=bn]
            needed[:, m, kb] = tile.flatten(1).any(1)
            full[:, m, kb] = tile.flatten(1).all(1) & ((kb + 1) * bn <= tk or not whole_cols)
    return needed, full


def test_geometries_have_full_tiles():
    """Most geometries below must contain unmasked tiles, or the checks would not see them."""
    with_full = 0
    for pattern, h, n, tq, tk, bm, bn in GEOMETRIES:
        spec = BandSpec(pattern, h, n)
        _, full = _tiles(spec.mask(tk)[:, tk - tq:, :], tq, tk, bm, bn)
        with_full += bool(full.any())
    assert with_full >= len(GEOMETRIES) // 2


def _interval_table(spec: BandSpec, tk: int) -> torch.Tensor:
    return spec.interval_tensor(tk if spec.is_dynamic else None).reshape(spec.n_heads, 4).contiguous().to(DEVICE)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"{g[0]}-H{g[1]}-N{g[2]}-{g[3]}x{g[4]}-{g[5]}x{g[6]}")
def test_key_tiles_of_query_tiles(geom):
    pattern, h, n, tq, tk, bm, bn = geom
    spec = BandSpec(pattern, h, n)
    q_off = tk - tq
    mask = spec.mask(tk)[:, q_off:, :]  # [H, Tq, Tk]
    needed, full = _tiles(mask, tq, tk, bm, bn)
    out = torch.zeros(h, triton.cdiv(tq, bm), triton.cdiv(tk, bn), dtype=torch.int32, device=DEVICE)
    _key_tiles_kernel[(triton.cdiv(tq, bm), h)](
        _interval_table(spec, tk), out, tq, tk, q_off, out.shape[-1], BLOCK_M=bm, BLOCK_N=bn
    )
    out = out.cpu()
    assert out.max() <= FULL, "a key block was visited twice"
    assert not (needed & (out == 0)).any(), "a key block holding allowed pairs was skipped"
    assert not ((out == FULL) & ~full).any(), "a tile with a forbidden pair ran without the mask"
    # every tile whose pairs are all allowed runs unmasked (intervals that touch are merged)
    assert torch.equal(out == FULL, full)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"{g[0]}-H{g[1]}-N{g[2]}-{g[3]}x{g[4]}-{g[5]}x{g[6]}")
def test_query_tiles_of_key_tiles(geom):
    pattern, h, n, tq, tk, bm, bn = geom
    spec = BandSpec(pattern, h, n)
    q_off = tk - tq
    mask_t = spec.mask(tk)[:, q_off:, :].transpose(1, 2)  # [H, Tk, Tq]
    needed, full = _tiles(mask_t, tk, tq, bn, bm, whole_cols=False)
    # a query block is full only if the key tile is inside Tk too
    for kb in range(needed.shape[1]):
        if (kb + 1) * bn > tk:
            full[:, kb, :] = False
    out = torch.zeros(h, triton.cdiv(tk, bn), triton.cdiv(tq, bm), dtype=torch.int32, device=DEVICE)
    _query_tiles_kernel[(triton.cdiv(tk, bn), h)](
        _interval_table(spec, tk), out, tq, tk, q_off, out.shape[-1], BLOCK_M=bm, BLOCK_N=bn
    )
    out = out.cpu()
    assert out.max() <= FULL, "a query block was visited twice"
    assert not (needed & (out == 0)).any(), "a query block holding allowed pairs was skipped"
    assert not ((out == FULL) & ~full).any(), "a tile with a forbidden pair ran without the mask"
    assert torch.equal(out == FULL, full)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"{g[0]}-H{g[1]}-N{g[2]}-{g[3]}x{g[4]}-{g[5]}x{g[6]}")
def test_keys_used_by_query_tiles(geom):
    """The closed forms the Gluon forward uses to find value rows no query row of a tile
    attends (``keys_used``, and ``tile_keys_all_used`` per key block) equal the mask's."""
    pattern, h, n, tq, tk, bm, bn = geom
    spec = BandSpec(pattern, h, n)
    q_off = tk - tq
    mask = spec.mask(tk)[:, q_off:, :]  # [H, Tq, Tk]
    n_qt, n_kb = triton.cdiv(tq, bm), triton.cdiv(tk, bn)
    used = torch.zeros(h, n_qt, n_kb * bn, dtype=torch.int32, device=DEVICE)
    all_used = torch.zeros(h, n_qt, n_kb, dtype=torch.int32, device=DEVICE)
    _keys_used_kernel[(n_qt, h)](
        _interval_table(spec, tk), used, all_used, tq, tk, q_off, n_kb, BLOCK_M=bm, BLOCK_N=bn
    )
    want = torch.zeros(h, n_qt, n_kb * bn, dtype=torch.bool)
    for m in range(n_qt):
        want[:, m, :tk] = mask[:, m * bm:(m + 1) * bm, :].any(dim=1)
    assert torch.equal(used.cpu().bool(), want)
    want_all = want.view(h, n_qt, n_kb, bn).all(dim=-1)
    assert torch.equal(all_used.cpu().bool(), want_all)
    assert want_all.any() and not want_all.all(), "the geometry must have tiles of both kinds"


def test_keys_used_with_gaps_around_the_tile_height():
    """Hand-made interval pairs whose gap is just below, at and above the query tile's
    height (where the two key ranges of a tile touch or leave one key out), unused intervals,
    and a first interval not starting at distance 0."""
    bm, bn, tq, tk = 8, 8, 40, 40
    pairs = [(0, 5, 5 + gap, 12 + gap) for gap in (bm - 2, bm - 1, bm, bm + 1, bm + 2)]
    pairs += [(0, 7, 0, 0), (3, 9, 0, 0), (2, 4, 20, 23), (0, 40, 0, 0)]
    table = torch.tensor(pairs, dtype=torch.int32, device=DEVICE)  # [heads, (lo0, hi0, lo1, hi1)]
    h, n_qt, n_kb = len(pairs), triton.cdiv(tq, bm), triton.cdiv(tk, bn)
    used = torch.zeros(h, n_qt, n_kb * bn, dtype=torch.int32, device=DEVICE)
    all_used = torch.zeros(h, n_qt, n_kb, dtype=torch.int32, device=DEVICE)
    _keys_used_kernel[(n_qt, h)](table, used, all_used, tq, tk, 0, n_kb, BLOCK_M=bm, BLOCK_N=bn)
    dist = torch.arange(tq)[:, None] - torch.arange(n_kb * bn)[None, :]  # [Tq, keys]
    for head, (lo0, hi0, lo1, hi1) in enumerate(pairs):
        allowed = ((dist >= lo0) & (dist < hi0)) | ((dist >= lo1) & (dist < hi1))
        allowed &= torch.arange(n_kb * bn)[None, :] < tk
        want = allowed.view(n_qt, bm, n_kb * bn).any(dim=1)  # [query tiles, keys]
        assert torch.equal(used[head].cpu().bool(), want), (lo0, hi0, lo1, hi1)
        assert torch.equal(all_used[head].cpu().bool(), want.view(n_qt, n_kb, bn).all(-1)), (lo0, hi0, lo1, hi1)
