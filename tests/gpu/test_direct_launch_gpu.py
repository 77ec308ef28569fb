"""GPU: repeat launches that go straight to the compiled kernels (``kernels/direct_launch.py``).

Each case runs one call with the direct relaunch off (every launch through Triton's path), then the
same call twice with it on (the first compiles or finds the kernel and keeps it, the second goes
straight to it): outputs and gradients must be equal bit for bit (deterministic backward), and the
second call must have gone direct. The one-pass CuTe backward (atomic dQ adds) is checked against
the float64 oracle on its repeat calls instead.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import check_heads

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import direct_launch, triton_band_attention

# every call takes the launch path under test here, not a replay of an earlier call's launches
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_replays")]


def _inputs(b, t, h, hkv, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda n: torch.randn(b, t, n, d, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(h), make(hkv), make(hkv)


class CountingDriver:
    """Triton's driver, counting the direct launches (the only ones that ask it for the stream)."""

    def __init__(self, driver):
        self.driver = driver
        self.direct = 0

    def get_current_device(self):
        return self.driver.get_current_device()

    def get_current_stream(self, device):
        self.direct += 1
        return self.driver.get_current_stream(device)


def _call(q, k, v, spec, g, **kw):
    out, lse = triton_band_attention(q, k, v, spec, return_lse=True, deterministic=True, **kw)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), g))


CASES = {  # B, T, H, Hkv, D, dtype, pattern, partition
    "triton fwd tma+flat, triton dq/dkdv": (2, 1000, 8, 8, 64, torch.bfloat16, "exclusive_bands", 1000),
    "gluon fwd, triton dq with tma": (2, 1000, 8, 8, 128, torch.float16, "spattention", 1000),
    "gluon fwd, gluon dq/dkdv": (2, 1500, 4, 4, 64, torch.bfloat16, "dense", 1500),
    "gqa, dynamic partition": (2, 1500, 8, 2, 128, torch.bfloat16, "spattention", "dynamic"),
    "warp-specialized forward": (1, 4500, 4, 4, 128, torch.bfloat16, "dense", 4500),
}


@pytest.mark.parametrize("name", list(CASES))
def test_direct_relaunch_equals_tritons_launch_bit_for_bit(name, monkeypatch):
    b, t, h, hkv, d, dtype, pattern, partition = CASES[name]
    spec = BandSpec(pattern, h, partition)
    q, k, v = _inputs(b, t, h, hkv, d, dtype)
    g = torch.randn(b, t, h, d, device="cuda", dtype=dtype)
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    want = _call(q, k, v, spec, g)
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    counter = CountingDriver(direct_launch._driver())
    monkeypatch.setattr(direct_launch, "_driver", lambda: counter)
    first = _call(q, k, v, spec, g)
    after_first = counter.direct
    second = _call(q, k, v, spec, g)
    assert counter.direct - after_first >= 3, "the repeat call did not go straight to its kernels"
    for label, got in (("first", first), ("repeat", second)):
        for i, (x, y) in enumerate(zip(got, want)):
            assert torch.equal(x, y), f"{name}: {label} call, output {i} differs from Triton's launch"


def test_packed_documents_relaunch(monkeypatch):
    """Packed documents make a new launch geometry every call; the same lengths still go direct."""
    spec = BandSpec("spattention", 8, 512)
    cu = torch.tensor([0, 700, 701, 701, 2300, 2500, 3001], device="cuda", dtype=torch.int32)
    q, k, v = _inputs(1, 3001, 8, 4, 128, torch.bfloat16)
    g = torch.randn_like(q)
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    want = _call(q, k, v, spec, g, cu_seqlens=cu)
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    _call(q, k, v, spec, g, cu_seqlens=cu)
    got = _call(q, k, v, spec, g, cu_seqlens=cu)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("pattern", ["spattention", "exclusive_bands"])
def test_one_pass_backward_repeat_calls_against_the_oracle(pattern):
    """Head dim 128 takes the CuTe backward where installed (its row statistics kernel is a Triton
    launch): repeat calls, which go direct, stay within the float64 rule."""
    spec = BandSpec(pattern, 8, 1200)
    q, k, v = _inputs(2, 1200, 8, 8, 128, torch.bfloat16)
    for _ in range(3):
        check_heads(triton_band_attention, spec, q, k, v, lse=True)


def test_decode_steps_and_new_document_lengths_go_direct(monkeypatch):
    """A decode step's position and a batch of packed documents of new lengths change integer
    arguments within the class Triton specializes them by: those launches go direct too, and equal
    Triton's own launch bit for bit."""
    counter = CountingDriver(direct_launch._driver())
    monkeypatch.setattr(direct_launch, "_driver", lambda: counter)
    spec = BandSpec("spattention", 16, 4096)
    q, k, v = (x.detach() for x in _inputs(2, 4097, 16, 4, 128, torch.bfloat16))
    steps = [(q[:, t - 1: t], k[:, :t], v[:, :t]) for t in (3001, 3002, 3003, 3005)]
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    want = [triton_band_attention(*x, spec) for x in steps]
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    got = [triton_band_attention(*x, spec) for x in steps]
    assert counter.direct >= len(steps) - 1, "later decode steps did not go direct"
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    packed = BandSpec("spattention", 8, 512)
    qd, kd, vd = _inputs(1, 3001, 8, 4, 128, torch.bfloat16)
    g = torch.randn_like(qd)
    batches = [[0, 700, 701, 2300, 3001], [0, 1203, 1900, 2500, 3001], [0, 64, 3001]]
    results = {}
    for on in (False, True):
        monkeypatch.setattr(direct_launch, "ENABLED", on)
        before = counter.direct
        results[on] = [_call(qd, kd, vd, packed, g, cu_seqlens=torch.tensor(cu, device="cuda", dtype=torch.int32))
                       for cu in batches]
        if on:
            assert counter.direct - before >= 3, "packed batches of new lengths did not go direct"
    for got_batch, want_batch in zip(results[True], results[False]):
        assert all(torch.equal(a, b) for a, b in zip(got_batch, want_batch))
