"""FA4 block-sparse tables and mask data (pure torch, no GPU): checked against ``BandSpec.mask``.

The tables must list every tile that holds an allowed pair (partial or full), mark full only
tiles whose every cell is allowed and inside the sequence, and the backward tables must be
the transpose of the forward ones. The mask data, evaluated exactly as the CuTe ``mask_mod``
does (``allowed_from_aux``), must equal the oracle mask cell by cell.
"""

from __future__ import annotations

import math

import pytest
import torch

from olmoe_spattn import BandSpec
from olmoe_spattn.fa4.blocks import (
    allowed_from_aux,
    band_aux_tensors,
    band_block_tables,
    block_size_for,
    dedupe_bounds,
)

# (spec, q_len, kv_len, q_offset, head_offset, n_local, cu_seqlens, block)
GEOMETRIES = [
    (BandSpec("exclusive_bands", 4, 70), 70, 70, 0, 0, 4, None, (16, 16)),
    (BandSpec("spattention", 5, 61), 61, 61, 0, 0, 5, None, (16, 8)),  # odd T, T % H != 0
    (BandSpec("gapped_bands", 3, 50), 77, 77, 0, 0, 3, None, (16, 16)),
    (BandSpec("gapped_bands", 4, 4), 33, 33, 0, 0, 4, None, (8, 8)),  # W // 2 == 0: empty heads
    (BandSpec("sliding_window", 4, 40), 45, 45, 0, 0, 4, None, (16, 16)),
    (BandSpec("dense", 2, 64), 33, 33, 0, 0, 2, None, (16, 16)),
    (BandSpec("spattention", 6, "dynamic"), 50, 50, 0, 2, 3, None, (16, 16)),  # dynamic, head offset
    (BandSpec("exclusive_bands", 4, 64), 9, 70, 61, 0, 4, None, (16, 16)),  # chunked prefill
    (BandSpec("spattention", 4, 64), 1, 70, 69, 0, 4, None, (16, 16)),  # one decode row
    (BandSpec("dense", 4, 64), 5, 70, 30, 0, 4, None, (16, 16)),  # explicit query offset
    (BandSpec("exclusive_bands", 4, 32), 90, 90, 0, 0, 4, (0, 20, 21, 57, 90), (16, 16)),
    (BandSpec("spattention", 3, "dynamic"), 64, 64, 0, 0, 3, (0, 10, 10, 40, 64), (8, 8)),  # empty doc
    (BandSpec("dense", 2, 16), 45, 45, 0, 0, 2, (0, 7, 30, 45), (16, 8)),
    (BandSpec("spattention", 8, 333), 333, 333, 0, 0, 8, None, (128, 128)),  # FA4's real SM90 tiles
    (BandSpec("exclusive_bands", 6, "dynamic"), 301, 301, 0, 0, 6, (0, 100, 301), (256, 128)),  # SM100 tiles
]
IDS = [f"{g[0].pattern}-{g[1]}x{g[2]}-{'docs' if g[6] else 'seq'}-{g[7][0]}x{g[7][1]}" for g in GEOMETRIES]


def oracle(spec, q_len, kv_len, q_offset, head_offset, n_local, cu) -> torch.Tensor:
    """Exact ``[H, Tq, Tk]`` mask from ``BandSpec.mask`` (documents: one block per document)."""
    if cu is None:
        return spec.mask(kv_len, q_len=q_len, q_offset=q_offset, head_offset=head_offset, n_local_heads=n_local)
    out = torch.zeros(n_local, q_len, kv_len, dtype=torch.bool)
    for a, b in zip(cu, cu[1:]):
        if b > a:
            out[:, a:b, a:b] = spec.mask(b - a, head_offset=head_offset, n_local_heads=n_local)
    return out


def tiles_of(cnt: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Bool ``[H, rows, n_cols]`` of the tiles a (count, indices) table lists; checks its form."""
    cnt, idx = cnt[0], idx[0]  # [H, R], [H, R, C]
    assert cnt.dtype == idx.dtype == torch.int32
    assert idx.shape[-1] == max(int(cnt.max()), 1), "index table is not compacted to the longest row"
    out = torch.zeros(*cnt.shape, n_cols, dtype=torch.bool)
    for h in range(cnt.shape[0]):
        for r in range(cnt.shape[1]):
            listed = idx[h, r, : cnt[h, r]].tolist()
            assert listed == sorted(set(listed)), f"head {h} row {r}: indices {listed} not ascending/unique"
            assert all(0 <= c < n_cols for c in listed)
            out[h, r, listed] = True
    return out


def tile_truth(mask: torch.Tensor, q_block: int, kv_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any cell allowed, every cell allowed and inside the sequence) per tile."""
    h, tq, tk = mask.shape
    nq, nk = math.ceil(tq / q_block), math.ceil(tk / kv_block)
    padded = torch.zeros(h, nq * q_block, nk * kv_block, dtype=torch.bool)
    padded[:, :tq, :tk] = mask
    inside = torch.zeros_like(padded)
    inside[:, :tq, :tk] = True
    tiles = padded.view(h, nq, q_block, nk, kv_block)
    whole = inside.view(h, nq, q_block, nk, kv_block).all(4).all(2)
    return tiles.any(4).any(2), tiles.all(4).all(2) & whole


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_block_tables_match_the_oracle(geometry):
    spec, tq, tk, q_offset, head_offset, n_local, cu, block = geometry
    t = band_block_tables(spec, tq, tk, q_offset=q_offset, head_offset=head_offset, n_local_heads=n_local,
                          cu_seqlens=cu, block_size=block, device="cpu")
    nq, nk = math.ceil(tq / block[0]), math.ceil(tk / block[1])
    assert t.block_size == block
    assert t.fwd_mask_cnt.shape == t.fwd_full_cnt.shape == (1, n_local, nq)
    assert t.bwd_mask_cnt.shape == t.bwd_full_cnt.shape == (1, n_local, nk)
    partial = tiles_of(t.fwd_mask_cnt, t.fwd_mask_idx, nk)
    full = tiles_of(t.fwd_full_cnt, t.fwd_full_idx, nk)
    any_allowed, all_allowed = tile_truth(oracle(spec, tq, tk, q_offset, head_offset, n_local, cu), *block)
    assert not (partial & full).any(), "a tile is listed both partial and full"
    assert not (full & ~all_allowed).any(), "a full tile holds a masked or padded cell"
    assert not (any_allowed & ~(partial | full)).any(), "a tile with an allowed pair is skipped"
    if cu is None:  # one sequence: exact, not just safe
        assert torch.equal(partial | full, any_allowed)
    assert torch.equal(full, all_allowed) or cu is not None
    # backward tables: per key tile, the same tiles in the same classes
    assert torch.equal(tiles_of(t.bwd_mask_cnt, t.bwd_mask_idx, nq), partial.transpose(1, 2))
    assert torch.equal(tiles_of(t.bwd_full_cnt, t.bwd_full_idx, nq), full.transpose(1, 2))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_mask_data_reproduces_the_oracle(geometry):
    spec, tq, tk, q_offset, head_offset, n_local, cu, _ = geometry
    aux = band_aux_tensors(spec, tk, q_offset=q_offset, head_offset=head_offset, n_local_heads=n_local,
                           cu_seqlens=cu, device="cpu")
    assert all(a.dtype == torch.int32 and a.is_contiguous() for a in aux)
    assert len(aux) == (1 if cu is None else 2)
    if cu is not None:  # every position a tile may read (up to the padded length) is in the table
        assert aux[1].numel() % 256 == 0 and aux[1].numel() >= tk
        assert int(aux[1].max()) == aux[0].shape[0] - 1  # padding -> the empty last row
        assert not aux[0][-1].any()
    got = allowed_from_aux(aux, n_local, tq, tk)
    want = oracle(spec, tq, tk, q_offset, head_offset, n_local, cu)
    assert torch.equal(got, want), f"{int((got != want).sum())} cells differ"


def test_tables_are_cached_per_geometry():
    spec = BandSpec("spattention", 4, 64)
    kw = dict(q_offset=0, head_offset=0, n_local_heads=4, block_size=(16, 16), device="cpu")
    a = band_block_tables(spec, 64, 64, cu_seqlens=None, **kw)
    assert band_block_tables(spec, 64, 64, cu_seqlens=None, **kw) is a
    assert band_block_tables(spec, 64, 64, cu_seqlens=(0, 30, 64), **kw) is not a
    # an empty document changes nothing: it is dropped before the cache lookup
    b = band_block_tables(spec, 64, 64, cu_seqlens=(0, 30, 64), **kw)
    assert band_block_tables(spec, 64, 64, cu_seqlens=(0, 30, 30, 64), **kw) is b


def test_dedupe_bounds():
    assert dedupe_bounds(None) is None
    assert dedupe_bounds((0, 5, 5, 9, 9)) == (0, 5, 9)
    assert dedupe_bounds((0, 9)) == (0, 9)


@pytest.mark.parametrize("head_dim,expected", [(64, (128, 128)), (128, (128, 128)), (160, (128, 96)), (256, (128, 64))])
def test_hopper_key_tiles_follow_the_head_dim(head_dim, expected):
    # SM90 kernels need the sparse key tile to equal their own tile_n in both passes
    assert block_size_for(90, head_dim) == expected


def test_blackwell_query_tiles_cover_two_kernel_tiles():
    assert block_size_for(100, 128) == (256, 128)
    assert block_size_for(103, 64) == (256, 128)


def test_tables_have_row_major_strides_even_in_size_one_dimensions():
    """FA4 reads the innermost stride; one query tile (decode) must not inherit a transposed
    map's stride there (``Tensor.contiguous()`` leaves size-1 dimensions' strides alone)."""
    from olmoe_spattn.fa4.blocks import canonical

    base = torch.arange(33 * 4).reshape(4, 1, 33).transpose(1, 2)  # [4, 33, 1], strides (33, 1, 33)
    assert base.is_contiguous() and base.stride()[-1] == 33
    fixed = canonical(base)
    assert fixed.stride() == (33, 1, 1) and torch.equal(fixed, base)
    same = torch.zeros(2, 3)
    assert canonical(same) is same
