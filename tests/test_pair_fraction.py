"""Causal pair fractions (the attention work of each Table 2 method) against the masks."""

from __future__ import annotations

import pytest
import torch

from olmoe_spattn.bands import PATTERNS, BandSpec
from olmoe_spattn.flex import (
    BASELINES,
    baseline_covered_pairs,
    baseline_mask_mod,
    causal_pair_fraction,
    dense_mask_from_mod,
)


def _mask(method: str, n_heads: int, n: int) -> torch.Tensor:
    """The mask a backend uses for ``method``: bool ``[H, N, N]``."""
    if method in BASELINES:
        return dense_mask_from_mod(baseline_mask_mod(method, n), n_heads, n, n)
    return BandSpec(method, n_heads, n).mask(n)


def _brute_force_fraction(method: str, n_heads: int, n: int) -> float:
    mask = _mask(method, n_heads, n)
    assert not (mask & ~torch.ones(n, n, dtype=torch.bool).tril()).any()  # all allowed pairs are causal
    return mask.sum().item() / (n_heads * n * (n + 1) / 2)


@pytest.mark.parametrize("n", [8, 1024, 16384])
def test_dense_allows_every_causal_pair(n):
    assert causal_pair_fraction("dense", 8, n) == 1.0


def test_exclusive_bands_split_the_causal_pairs_among_the_heads():
    # N divisible by H: every distance belongs to exactly one head, so the heads share the pairs
    assert causal_pair_fraction("exclusive_bands", 8, 64) == _brute_force_fraction("exclusive_bands", 8, 64) == 1 / 8


@pytest.mark.parametrize("method", PATTERNS + BASELINES)
@pytest.mark.parametrize("n_heads,n", [(8, 128), (8, 200), (3, 1100)])
def test_fraction_matches_the_mask_by_brute_force(method, n_heads, n):
    # 200 and 1100 are not multiples of the 64-token blocks; at 1100 the window and global-key
    # caps of Longformer (256, 16) and BigBird (128, 8) are in force
    assert causal_pair_fraction(method, n_heads, n) == pytest.approx(_brute_force_fraction(method, n_heads, n), abs=1e-12)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_counts_per_head_match_the_mask(name):
    mask = _mask(name, 8, 128)
    assert baseline_covered_pairs(name, 8, 128) == mask.sum(dim=(1, 2)).tolist()


def test_longformer_window_4_at_16_tokens_by_hand():
    # N = 16: window min(256, 16 // 4) = 4, global keys min(16, 16 // 32) = 0.
    # Query i sees min(i + 1, 4) keys: 1 + 2 + 3 + 13 * 4 = 58 of the 16 * 17 / 2 = 136 causal pairs.
    assert baseline_covered_pairs("longformer", 2, 16) == [58, 58]
    assert causal_pair_fraction("longformer", 2, 16) == pytest.approx(58 / 136)


def test_longformer_at_16384_by_hand():
    # window 256, 16 global keys. Queries 0..255 see i + 1 keys (256 * 257 / 2 in all); every
    # later query sees 256 window keys, plus the global keys left of its window: 1, 2, ..., 15
    # for queries 256..270, then all 16.
    n = 16384
    pairs = 256 * 257 // 2 + (n - 256) * 256 + sum(range(1, 16)) + 16 * (n - 271)
    assert causal_pair_fraction("longformer", 8, n) == pytest.approx(pairs / (n * (n + 1) / 2), rel=1e-12)


def test_bigbird_links_add_pairs_beyond_window_and_globals():
    # the random-like links differ per head, so the heads' counts differ; without them the
    # count would be the window-and-globals count (that of a mask without the link term)
    counts = baseline_covered_pairs("bigbird", 8, 2048)
    mask = _mask("bigbird", 1, 2048)[0]
    i = torch.arange(2048)[:, None]
    j = torch.arange(2048)[None, :]
    window_and_globals = ((i - j >= 0) & ((i - j < 128) | (j < 8))).sum().item()
    assert counts[0] == mask.sum().item() > window_and_globals
    assert len(set(counts)) > 1


def test_unknown_method_and_bad_sizes():
    with pytest.raises(ValueError, match="'linformer'"):
        causal_pair_fraction("linformer", 8, 1024)
    with pytest.raises(ValueError, match="n_heads"):
        baseline_covered_pairs("reformer", 0, 1024)
    with pytest.raises(ValueError, match="seq_len"):
        baseline_covered_pairs("reformer", 8, 0)
