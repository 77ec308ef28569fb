"""Flex block masks built from intervals: tile classes agree with the exact mask, no T x T."""

from __future__ import annotations

import math

import pytest
import torch
from attention_checks import max_err

from olmoe_spattn import BandSpec
from olmoe_spattn.flex import band_block_mask, band_mask_mod, dense_mask_from_mod, run_flex
from olmoe_spattn.flex_blocks import band_block_classes
from olmoe_spattn.reference import reference_attention

# (spec, q_len, kv_len, q_offset, head_offset, n_local, cu_seqlens, (q_block, kv_block))
LAYOUTS = [
    (BandSpec("exclusive_bands", 4, 70), 70, 70, 0, 0, 4, None, (16, 16)),
    (BandSpec("spattention", 5, 61), 61, 61, 0, 0, 5, None, (8, 16)),
    (BandSpec("gapped_bands", 3, 50), 77, 77, 0, 0, 3, None, (16, 8)),
    (BandSpec("sliding_window", 4, 40), 45, 45, 0, 0, 4, None, (16, 16)),
    (BandSpec("dense", 2, 64), 33, 33, 0, 0, 2, None, (16, 16)),
    (BandSpec("spattention", 6, "dynamic"), 50, 50, 0, 2, 3, None, (16, 16)),
    (BandSpec("exclusive_bands", 4, 64), 9, 70, 61, 0, 4, None, (16, 16)),  # chunked prefill
    (BandSpec("spattention", 4, 64), 1, 70, 69, 0, 4, None, (16, 16)),  # decode row
    (BandSpec("exclusive_bands", 4, 32), 90, 90, 0, 0, 4, (0, 20, 21, 57, 90), (16, 16)),
    (BandSpec("spattention", 3, "dynamic"), 64, 64, 0, 0, 3, (0, 10, 40, 64), (8, 8)),
    (BandSpec("exclusive_bands", 4, "dynamic"), 40, 40, 0, 0, 4, (0, 10, 10, 40), (8, 8)),  # empty document
]


def _truth(spec, q_len, kv_len, q_offset, head_offset, n_local, cu, q_block, kv_block):
    """(any allowed, all allowed and unpadded) per tile, from the exact element mask."""
    mod = band_mask_mod(spec, kv_len=kv_len, q_offset=q_offset, head_offset=head_offset,
                        n_local_heads=n_local, cu_seqlens=cu)
    mask = dense_mask_from_mod(mod, n_local, q_len, kv_len)  # [H, Tq, Tk]
    nq, nk = math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)
    padded = torch.zeros(n_local, nq * q_block, nk * kv_block, dtype=torch.bool)
    padded[:, :q_len, :kv_len] = mask
    valid = torch.zeros_like(padded)
    valid[:, :q_len, :kv_len] = True
    tiles = padded.view(n_local, nq, q_block, nk, kv_block)
    valid_tiles = valid.view(n_local, nq, q_block, nk, kv_block)
    return tiles.any(4).any(2), (tiles | ~valid_tiles).all(4).all(2) & valid_tiles.all(4).all(2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0].pattern}-{x[1]}x{x[2]}-cu{x[6] is not None}")
def test_tile_classes_match_the_exact_mask(layout):
    spec, q_len, kv_len, q_offset, head_offset, n_local, cu, (qb, kb) = layout
    partial, full = band_block_classes(spec, q_len, kv_len, q_offset=q_offset, head_offset=head_offset,
                                       n_local_heads=n_local, cu_seqlens=cu, q_block=qb, kv_block=kb)
    any_allowed, all_allowed = _truth(spec, q_len, kv_len, q_offset, head_offset, n_local, cu, qb, kb)
    assert not (partial & full).any()
    assert not (full & ~all_allowed).any(), "a tile marked full holds a masked or padded cell"
    assert not (any_allowed & ~(partial | full)).any(), "a tile with an allowed pair is skipped"
    if cu is None:  # without documents the classification is exact, not just safe
        assert torch.equal(partial | full, any_allowed)
        assert torch.equal(full, all_allowed & full)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{x[0].pattern}-{x[1]}x{x[2]}-cu{x[6] is not None}")
def test_flex_with_small_tiles_matches_reference(layout):
    spec, q_len, kv_len, q_offset, head_offset, n_local, cu, block = layout
    torch.manual_seed(0)
    q = torch.randn(1, q_len, n_local, 16)
    k, v = torch.randn(1, kv_len, n_local, 16), torch.randn(1, kv_len, n_local, 16)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    bm = band_block_mask(spec, q_len, kv_len, q_offset=q_offset, head_offset=head_offset,
                         n_local_heads=n_local, cu_seqlens=cu_t, block_size=block)
    out = run_flex(q, k, v, bm, scale=0.25)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), spec, head_offset=head_offset,
                                 q_offset=q_offset, cu_seqlens=cu_t, scale=0.25)
    assert max_err(out, ref) < 1e-5


def test_long_sequence_block_mask_needs_no_dense_mask():
    """T = 65536, 16 heads: a dense [H, T, T] mask would be 64 GiB; the interval path is small."""
    spec = BandSpec("exclusive_bands", 16, 65536)
    bm = band_block_mask(spec, 65536, 65536, n_local_heads=16)
    n_tiles = 512 * 513 // 2  # causal tiles per head
    visited = (bm.kv_num_blocks + bm.full_kv_num_blocks).sum().item()  # over 16 heads
    # each head's band covers ~1/16 of the causal triangle: ~16 causal triangles' worth in all,
    # plus boundary tiles
    assert visited < 1.2 * n_tiles
    assert bm.kv_indices.shape == (1, 16, 512, 512)
