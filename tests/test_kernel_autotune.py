"""The launch-configuration tuner's policy (no GPU: timings are faked)."""

from __future__ import annotations

import pytest

from olmoe_spattn.kernels import autotune
from olmoe_spattn.kernels.autotune import LaunchConfig


@pytest.fixture
def fake_timer(monkeypatch):
    speeds: dict[LaunchConfig, float] = {}
    calls: list[LaunchConfig] = []

    def do_bench(fn, **kwargs):
        fn()
        return speeds[calls[-1]]

    monkeypatch.setattr(autotune.triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(autotune, "TUNED", {})
    return speeds, calls


def test_keeps_default_unless_clearly_faster(fake_timer):
    speeds, calls = fake_timer
    default = LaunchConfig(64, 64, 4, 2)
    cands = autotune.candidates("fwd", 128, default)
    assert cands[0] == default and len(cands) == len(set(cands)) > 1
    for c in cands:
        speeds[c] = 1.0
    speeds[cands[1]] = 0.99  # 1% faster: noise, keep the default
    assert autotune.pick("fwd", ("a",), default, 128, calls.append) == default
    speeds[cands[2]] = 0.8  # 20% faster: take it
    assert autotune.pick("fwd", ("b",), default, 128, calls.append) == cands[2]
    n = len(calls)
    assert autotune.pick("fwd", ("b",), default, 128, calls.append) == cands[2]  # cached, no timing
    assert len(calls) == n


def test_large_head_dims_only_get_configs_that_fit():
    for kind in ("fwd", "dq", "dkdv"):
        for cfg in autotune.candidates(kind, 256, LaunchConfig(64, 32, 4, 2))[1:]:
            assert autotune._smem_bytes(kind, cfg, 256) <= 200 * 1024
