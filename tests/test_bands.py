"""Properties of the band semantics (BandSpec) over many head counts and partition lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from olmoe_spattn import PATTERNS, BandSpec
from olmoe_spattn.bands import UNBOUNDED


@st.composite
def heads_and_partition(draw, max_n: int = 8192):
    h = draw(st.integers(1, 64))
    n = draw(st.integers(h, max_n))
    return h, n


def covered(intervals: list[tuple[int, int]], d: int) -> bool:
    return any(lo <= d < hi for lo, hi in intervals)


def distance_counts(spec: BandSpec, n: int) -> torch.Tensor:
    """How many heads allow each distance 0..n-1 (difference array over the intervals)."""
    counts = torch.zeros(n + 1, dtype=torch.int64)
    for parts in spec.intervals():
        for lo, hi in parts:
            counts[min(lo, n)] += 1
            counts[min(hi, n)] -= 1
    return counts.cumsum(0)[:n]


@settings(max_examples=200, deadline=None)
@given(heads_and_partition())
def test_widths_differ_by_at_most_one_and_sum_to_partition(hn):
    h, n = hn
    spec = BandSpec("exclusive_bands", h, n)
    w = spec.widths()
    assert sum(w) == n
    assert max(w) - min(w) <= 1
    assert w == sorted(w, reverse=True)  # the wider heads come first (h < N % H)
    s = spec.starts()
    assert s[0] == 0
    assert all(s[i + 1] == s[i] + w[i] for i in range(h - 1))


@settings(max_examples=200, deadline=None)
@given(heads_and_partition())
def test_exclusive_bands_cover_each_distance_below_n_exactly_once(hn):
    h, n = hn
    spec = BandSpec("exclusive_bands", h, n)
    assert torch.all(distance_counts(spec, n) == 1)
    # and nothing at or beyond N
    assert all(hi <= n for parts in spec.intervals() for _, hi in parts)


@settings(max_examples=60, deadline=None)
@given(heads_and_partition(max_n=96), st.integers(1, 128))
def test_exclusive_bands_mask_covers_causal_pairs_below_n_exactly_once(hn, t):
    h, n = hn
    m = BandSpec("exclusive_bands", h, n).mask(t).sum(0)  # [T, T] heads per pair
    d = torch.arange(t)[:, None] - torch.arange(t)[None, :]
    assert torch.equal(m, ((d >= 0) & (d < n)).long())


@settings(max_examples=60, deadline=None)
@given(heads_and_partition(max_n=96), st.integers(1, 128))
def test_pattern_relations_on_masks(hn, t):
    h, n = hn
    mask = {p: BandSpec(p, h, n).mask(t) for p in PATTERNS}
    assert torch.equal(mask["spattention"], mask["sliding_window"] | mask["exclusive_bands"])
    assert not torch.any(mask["gapped_bands"] & ~mask["exclusive_bands"])
    causal = torch.ones(t, t, dtype=torch.bool).tril().expand(h, t, t)
    assert torch.equal(mask["dense"], causal)
    for p in PATTERNS:
        assert not torch.any(mask[p] & ~causal), p


@settings(max_examples=200, deadline=None)
@given(heads_and_partition())
def test_pattern_relations_on_intervals(hn):
    h, n = hn
    iv = {p: BandSpec(p, h, n).intervals() for p in PATTERNS}
    for head in range(h):
        w = BandSpec("sliding_window", h, n).widths()[head]
        probe = sorted({0, w, w + 1, n - 1, n, *[x for lo, hi in iv["exclusive_bands"][head] for x in (lo, hi - 1, hi)]})
        for d in probe:
            assert covered(iv["spattention"][head], d) == (
                covered(iv["sliding_window"][head], d) or covered(iv["exclusive_bands"][head], d)
            )
            if covered(iv["gapped_bands"][head], d):
                assert covered(iv["exclusive_bands"][head], d)
        assert len(iv["spattention"][head]) <= 2
        assert iv["dense"][head] == [(0, UNBOUNDED)]


def test_known_geometry_from_the_design_formula():
    spec = BandSpec("spattention", 4, 10)  # Wb = 2, R = 2
    assert spec.widths() == [3, 3, 2, 2]
    assert spec.starts() == [0, 3, 6, 8]
    assert spec.intervals() == [[(0, 4)], [(0, 6)], [(0, 3), (6, 8)], [(0, 3), (8, 10)]]
    assert BandSpec("gapped_bands", 4, 10).intervals() == [[(0, 1)], [(3, 4)], [(6, 7)], [(8, 9)]]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_covered_pairs_matches_mask(pattern):
    spec = BandSpec(pattern, 5, 23)
    assert spec.covered_pairs(41) == spec.mask(41).sum(dim=(1, 2)).tolist()


def test_dynamic_partition_follows_the_key_length():
    spec = BandSpec("exclusive_bands", 4, "dynamic")
    assert spec.widths(10) == BandSpec("exclusive_bands", 4, 10).widths()
    assert torch.equal(spec.mask(10), BandSpec("exclusive_bands", 4, 10).mask(10))
    with pytest.raises(ValueError, match="seq_len"):
        spec.widths()


def test_mask_query_offset_and_head_slice_are_rows_of_the_full_mask():
    spec = BandSpec("spattention", 6, 32)
    full = spec.mask(50)
    part = spec.mask(50, q_len=7, q_offset=20, head_offset=2, n_local_heads=3)
    assert torch.equal(part, full[2:5, 20:27])
    assert torch.equal(spec.mask(50, q_len=1), full[:, -1:])


def test_empty_rows_exist_for_exclusive_bands():
    mask = BandSpec("exclusive_bands", 4, 16).mask(16)
    assert not mask[3, :12].any()  # head 3 starts at distance 12
    assert mask[3, 12:].any(-1).all()


def test_interval_tensor_layout():
    spec = BandSpec("spattention", 4, 10)
    t = spec.interval_tensor(head_offset=2, n_local_heads=2)
    assert t.dtype == torch.int32 and t.shape == (2, 2, 2)
    assert t.tolist() == [[[0, 3], [6, 8]], [[0, 3], [8, 10]]]
    assert BandSpec("sliding_window", 2, 4).interval_tensor().tolist() == [[[0, 3], [0, 0]], [[0, 3], [0, 0]]]


def test_dict_round_trip():
    for pl in (4096, "dynamic"):
        spec = BandSpec("spattention", 16, pl)
        assert BandSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("nope", 4, 16), "'nope'"),
        (("spattention", 0, 16), "n_heads"),
        (("spattention", 4, 3), "partition_len=3"),
        (("spattention", 4, -8), "partition_len"),
        (("spattention", 4, "auto"), "'auto'"),
        (("spattention", 4.0, 16), "n_heads"),
        (("spattention", 4, True), "partition_len"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_value(args, needle):
    with pytest.raises(ValueError, match=needle):
        BandSpec(*args)


def test_bad_mask_arguments():
    spec = BandSpec("dense", 4, 16)
    with pytest.raises(ValueError, match="seq_len"):
        spec.mask(0)
    with pytest.raises(ValueError, match="out of range"):
        spec.mask(8, head_offset=3, n_local_heads=2)
    with pytest.raises(ValueError, match="BandSpec needs"):
        BandSpec.from_dict({"pattern": "dense", "n_heads": 4})
