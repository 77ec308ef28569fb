"""NaN / Inf in keys or values that a head never attends never reach an output.

Property test over every pattern, fixed and dynamic partition lengths, query offsets, GQA and
packed documents: keys and values are poisoned (NaN, +Inf, -Inf) at every position that no query
of a kv head's group attends (per the ``BandSpec.mask`` oracle); the outputs must be finite and
equal to the clean run's. The Triton kernel runs in the interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.bands import PATTERNS

BACKENDS = ["torch", "flex", "triton"]


def _unattended(spec: BandSpec, tq: int, tk: int, q_offset: int, h_kv: int, cu: list[int] | None) -> torch.Tensor:
    """``[Tk, Hkv]`` bool: no query of any head of the kv group attends this key (oracle)."""
    h = spec.n_heads
    if cu is None:
        used = spec.mask(tk, q_len=tq, q_offset=q_offset).any(dim=1)  # [H, Tk]
    else:
        used = torch.zeros(h, tk, dtype=torch.bool)
        for a, b in zip(cu, cu[1:]):
            if b > a:
                used[:, a:b] = spec.mask(b - a).any(dim=1)
    return ~used.view(h_kv, h // h_kv, tk).any(dim=1).t()  # [Tk, Hkv]


@st.composite
def cases(draw):
    pattern = draw(st.sampled_from(PATTERNS))
    n_heads = draw(st.sampled_from([2, 4]))
    h_kv = draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0]))
    partition_len = draw(st.one_of(st.just("dynamic"), st.integers(n_heads, 24)))
    tk = draw(st.integers(1, 40))
    packed = draw(st.booleans()) and tk > 1
    if packed:
        cuts = sorted(draw(st.lists(st.integers(1, tk - 1), max_size=3, unique=True)))
        cu, tq, q_offset, batch = [0, *cuts, tk], tk, None, 1
    else:
        tq = draw(st.integers(1, tk))
        cu, q_offset, batch = None, draw(st.integers(0, tk - tq)), draw(st.integers(1, 2))
    poison = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    which = draw(st.sampled_from(["k", "v", "kv"]))
    return pattern, n_heads, h_kv, partition_len, batch, tq, tk, q_offset, cu, poison, which


def _check(backend: str, case) -> None:
    pattern, n_heads, h_kv, partition_len, batch, tq, tk, q_offset, cu, poison, which = case
    spec = BandSpec(pattern, n_heads, partition_len)
    gen = torch.Generator().manual_seed(tk * 31 + tq)
    q = torch.randn(batch, tq, n_heads, 16, generator=gen)
    k = torch.randn(batch, tk, h_kv, 16, generator=gen)
    v = torch.randn(batch, tk, h_kv, 16, generator=gen)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    off = q_offset if cu is None else None
    clean = band_attention(q, k, v, spec, backend, q_offset=off, cu_seqlens=cu_t)
    bad = _unattended(spec, tq, tk, tk - tq if off is None else off, h_kv, cu)  # [Tk, Hkv]
    k2, v2 = k.clone(), v.clone()
    if "k" in which:
        k2[:, bad] = poison
    if "v" in which:
        v2[:, bad] = poison
    with torch.no_grad():
        out = band_attention(q, k2, v2, spec, backend, q_offset=off, cu_seqlens=cu_t)
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite outputs"
    torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_torch_backend_ignores_poison_in_unattended_keys(case):
    _check("torch", case)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_flex_backend_ignores_poison_in_unattended_keys(case):
    with torch.no_grad():
        _check("flex", case)


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])  # the interpreter is slow: no shrinking
@given(case=cases())
def test_triton_backend_ignores_poison_in_unattended_keys(case):
    pytest.importorskip("triton")
    _check("triton", case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusive_band_tail_keys_poisoned(backend):
    """A fixed example (runs without hypothesis' search): head 3 of exclusive_bands with N=16 never
    attends the last 12 keys; Inf in its values there must not reach any output."""
    if backend == "triton":
        pytest.importorskip("triton")
    _check(backend, ("exclusive_bands", 4, 4, 16, 1, 32, 32, 0, None, math.inf, "kv"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), pick=st.integers(0, 10**6))
def test_torch_backend_keeps_poison_to_the_rows_that_attend_it(case, pick):
    """Per row, not per head: one poisoned key reaches exactly the queries whose mask allows it."""
    pattern, n_heads, h_kv, partition_len, batch, tq, tk, q_offset, _, poison, which = case
    spec = BandSpec(pattern, n_heads, partition_len)
    gen = torch.Generator().manual_seed(pick)
    q = torch.randn(batch, tq, n_heads, 16, generator=gen)
    k = torch.randn(batch, tk, h_kv, 16, generator=gen)
    v = torch.randn(batch, tk, h_kv, 16, generator=gen)
    j, g = pick % tk, (pick // tk) % h_kv  # the poisoned key and its kv head
    clean = band_attention(q, k, v, spec, "torch", q_offset=q_offset)
    k2, v2 = k.clone(), v.clone()
    if "k" in which:
        k2[:, j, g] = poison
    if "v" in which:
        v2[:, j, g] = poison
    out = band_attention(q, k2, v2, spec, "torch", q_offset=q_offset)
    group = n_heads // h_kv
    attends = torch.zeros(tq, n_heads, dtype=torch.bool)  # [Tq, H]
    attends[:, g * group:(g + 1) * group] = spec.mask(tk, q_len=tq, q_offset=q_offset)[
        g * group:(g + 1) * group, :, j
    ].t()
    rows = attends[None, :, :, None].expand_as(out)  # [B, Tq, H, D]
    assert not torch.isfinite(out[rows]).any(), "a row that attends the poisoned key stayed finite"
    torch.testing.assert_close(out[~rows], clean[~rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize(
    ("h", "h_kv", "partition", "tq", "tk", "head_offset", "n_local"),
    [(8, 8, 256, 384, 384, 0, 8), (6, 2, 100, 77, 301, 0, 6), (8, 4, 0, 50, 130, 4, 4), (5, 5, 64, 1, 257, 1, 3)],
)
def test_unattended_kv_table_matches_the_mask(pattern, h, h_kv, partition, tq, tk, head_offset, n_local):
    """The keys zeroed before block-sparse kernels are exactly those no query of a kv head's
    group attends under ``BandSpec.mask`` (partition 0: dynamic)."""
    from olmoe_spattn.bands import DYNAMIC
    from olmoe_spattn.flex import unattended_kv_table

    spec = BandSpec(pattern, h, partition or DYNAMIC)
    n_kv = h_kv * n_local // h
    table = unattended_kv_table(spec, tq, tk, tk - tq, head_offset, n_local, n_kv, None, "cpu")
    used = spec.mask(tk, q_len=tq, head_offset=head_offset, n_local_heads=n_local).any(dim=1)  # [H, Tk]
    want = ~used.view(n_kv, -1, tk).any(dim=1).t()  # [Tk, Hkv]
    if table is None:
        assert not want.any()
    else:
        assert table.shape == (1, tk, n_kv, 1)
        assert torch.equal(table[0, :, :, 0], want)


@pytest.mark.parametrize("partition", [64, 0])
def test_unattended_kv_table_per_document(partition):
    """Per packed document, empty documents included (partition 0: dynamic, the document's length)."""
    from olmoe_spattn.bands import DYNAMIC
    from olmoe_spattn.flex import unattended_kv_table, zero_unattended_kv

    spec = BandSpec("exclusive_bands", 4, partition or DYNAMIC)
    cu = (0, 50, 50, 51, 170)
    tk = cu[-1]
    table = unattended_kv_table(spec, tk, tk, 0, 0, 4, 2, cu, "cpu")[0, :, :, 0]  # [Tk, Hkv]
    for a, b in zip(cu, cu[1:]):
        if b == a:
            continue
        used = spec.mask(b - a).any(dim=1).view(2, 2, b - a).any(dim=1)  # [Hkv, n]
        assert torch.equal(table[a:b], ~used.t())
    k = torch.randn(1, tk, 2, 8)
    v = torch.randn(1, tk, 2, 8)
    k2, v2 = zero_unattended_kv(k, v, spec, tk, n_local_heads=4, cu_seqlens=torch.tensor(cu))
    assert torch.equal(k2[0][table], torch.zeros_like(k2[0][table])) and torch.equal(v2[0][~table], v[0][~table])
    # every key attended: the inputs come back uncopied
    dense = BandSpec("dense", 4, 64)
    assert zero_unattended_kv(k, v, dense, tk, n_local_heads=4)[0] is k


def test_zeroing_by_rows_equals_the_mask_table():
    """The row fill the Flex and FA4 backends use gives exactly the table's masked_fill, for a
    batch of several rows, a non-contiguous input, and with zero gradient at the filled rows."""
    from olmoe_spattn.flex import unattended_kv_rows, unattended_kv_table, zero_kv_rows

    spec = BandSpec("exclusive_bands", 4, 40)
    table = unattended_kv_table(spec, 40, 40, 0, 0, 4, 2, None, "cpu")  # [1, Tk, Hkv, 1]
    rows = unattended_kv_rows(spec, 40, 40, 0, 0, 4, 2, None, "cpu")
    assert rows is not None and len(rows) == int(table.sum())
    x = torch.randn(3, 2, 40, 8).transpose(1, 2).requires_grad_()  # [B, Tk, Hkv, D], non-contiguous
    got = zero_kv_rows(x, rows)
    assert torch.equal(got, x.masked_fill(table, 0))
    got.sum().backward()
    assert torch.equal(x.grad, (~table).expand_as(x).float())
    assert zero_kv_rows(x, None) is x
