"""``BandSpec.mask`` against a second oracle written from the paper's formulas alone.

The oracle below shares no code with :class:`olmoe_spattn.BandSpec` (not its widths, starts or
intervals): for every head ``h``, query ``i`` and key ``j`` it evaluates, with plain Python
integers,

    d = i - j,  Wb = N // H,  R = N % H,
    W_h = Wb + (1 if h < R else 0),  S_h = h * Wb + min(h, R)

and the pattern's rule (paper Eq. 4 for ``exclusive_bands``; the authors' released default for
``spattention``). Hypothesis draws random geometries: every pattern, fixed and dynamic partition
lengths (``N`` = the key length), queries placed inside a longer key sequence, and head offsets
(a tensor-parallel shard's slice of the global heads).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from olmoe_spattn import BandSpec

PATTERNS = ("exclusive_bands", "spattention", "gapped_bands", "sliding_window", "dense")


def oracle_allows(pattern: str, h: int, n_heads: int, partition_len: int, i: int, j: int) -> bool:
    """Whether global head ``h`` lets query position ``i`` attend to key position ``j``."""
    d = i - j
    if d < 0:  # causal
        return False
    wb = partition_len // n_heads
    r = partition_len % n_heads
    w = wb + (1 if h < r else 0)
    s = h * wb + min(h, r)
    in_band = s <= d < s + w
    if pattern == "dense":
        return True
    if pattern == "exclusive_bands":
        return in_band
    if pattern == "spattention":
        return d <= w or in_band
    if pattern == "gapped_bands":
        return s <= d < s + w // 2
    if pattern == "sliding_window":
        return d <= w
    raise AssertionError(pattern)


@st.composite
def geometries(draw):
    pattern = draw(st.sampled_from(PATTERNS))
    n_heads = draw(st.integers(1, 9))
    dynamic = draw(st.booleans())
    tk = draw(st.integers(1, 40))  # dynamic with tk < n_heads: some heads get width 0
    partition_len = "dynamic" if dynamic else draw(st.integers(n_heads, 48))
    tq = draw(st.integers(1, tk))
    q_offset = draw(st.integers(0, tk - tq))
    head_offset = draw(st.integers(0, n_heads - 1))
    n_local = draw(st.integers(1, n_heads - head_offset))
    return pattern, n_heads, partition_len, tk, tq, q_offset, head_offset, n_local


@settings(max_examples=500, deadline=None)
@given(geometries())
def test_mask_matches_the_formula_oracle(geometry):
    pattern, n_heads, partition_len, tk, tq, q_offset, head_offset, n_local = geometry
    spec = BandSpec(pattern, n_heads, partition_len)
    got = spec.mask(tk, q_len=tq, q_offset=q_offset, head_offset=head_offset, n_local_heads=n_local)
    assert tuple(got.shape) == (n_local, tq, tk)
    n = tk if partition_len == "dynamic" else partition_len
    rows = got.tolist()
    for local in range(n_local):
        h = head_offset + local
        for qi in range(tq):
            i = q_offset + qi  # the query's position in the key sequence
            want = [oracle_allows(pattern, h, n_heads, n, i, j) for j in range(tk)]
            assert rows[local][qi] == want, (pattern, n_heads, partition_len, tk, h, i)


def test_oracle_on_a_hand_worked_geometry():
    """The oracle itself, on H = 3, N = 8 (Wb = 2, R = 2: widths 3, 3, 2, starts 0, 3, 6)."""
    allowed = {
        h: [d for d in range(12) if oracle_allows("exclusive_bands", h, 3, 8, d, 0)] for h in range(3)
    }
    assert allowed == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7]}
    spatt = [d for d in range(12) if oracle_allows("spattention", 2, 3, 8, d, 0)]
    assert spatt == [0, 1, 2, 6, 7]  # window d <= W_2 = 2, band [6, 8)
    gapped = [d for d in range(12) if oracle_allows("gapped_bands", 1, 3, 8, d, 0)]
    assert gapped == [3]  # [S_1, S_1 + W_1 // 2) = [3, 4)
