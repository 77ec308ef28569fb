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


def test_a_candidate_out_of_shared_memory_is_dropped(fake_timer):
    """A GPU with less shared memory than the sweeps' rejects some candidates at launch: the
    tuner drops them instead of failing the call."""
    import triton.runtime.errors

    speeds, calls = fake_timer
    default = LaunchConfig(64, 64, 4, 2)
    cands = autotune.candidates("dq", 128, default)
    too_big = cands[1]
    for c in cands:
        speeds[c] = 1.0
    speeds[too_big] = 0.1  # would win, but cannot launch

    def run(cfg):
        if cfg == too_big:
            raise triton.runtime.errors.OutOfResources(300 * 1024, 228 * 1024, "shared memory")
        calls.append(cfg)

    assert autotune.pick("dq", ("c",), default, 128, run) == default
    assert too_big not in calls


def test_hopper_takes_the_deeper_backward_pipelines_for_wide_bands(monkeypatch):
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(autotune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(autotune.torch.cuda, "current_device", lambda: 0)
    cases = [  # (major, extent, dq, dkdv)
        (9, 8192, (128, 64, 8, 3), (64, 128, 8, 3)),
        (9, 2049, (64, 64, 4, 2), (32, 64, 4, 3)),
        (8, 8192, (64, 64, 4, 2), (64, 128, 8, 2)),
        (8, 2049, (64, 64, 4, 2), (64, 128, 8, 2)),
    ]
    for major, extent, dq, dkdv in cases:
        monkeypatch.setattr(autotune.torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert autotune.fixed_config("dq", 128, extent) == LaunchConfig(*dq), (major, extent)
        assert autotune.fixed_config("dkdv", 128, extent) == LaunchConfig(*dkdv), (major, extent)
        assert autotune.fixed_config("dkdvdq", 128, extent) == LaunchConfig(64, 128, 8, 2)  # one pass: as before
        assert autotune.fixed_config("dq", 64, extent) == LaunchConfig(64, 64, 4, 2)  # head dim 64: as before


def test_gluon_kernels_fixed_configs_by_band_width(monkeypatch):
    """One warpgroup per block for the Gluon kernels; the dK/dV pass steps 32 queries at head dim
    128 (K held in registers), and at head dim 64 up to 4096 distances, 64 beyond."""
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    for head_dim in (64, 128):
        for extent in (256, 4096, 4097, 65536):
            assert autotune.fixed_config("fwd_sm90", head_dim, extent) == LaunchConfig(64, 64, 4, 2)
            assert autotune.fixed_config("dq_sm90", head_dim, extent) == LaunchConfig(64, 64, 4, 2)
            want = LaunchConfig(64, 64, 4, 2) if head_dim == 64 and extent > 4096 else LaunchConfig(32, 64, 4, 2)
            assert autotune.fixed_config("dkdv_sm90", head_dim, extent) == want, (head_dim, extent)


def test_row_major_output_stores_where_measured_faster():
    """Every Gluon kernel stores its output row-major, except the dK/dV pass at head dim 64 on
    bands wider than 256 distances (measured slower there); the launch passes that choice on."""
    from types import SimpleNamespace

    from olmoe_spattn.kernels.launch import _sm90_constexprs

    for kind in ("fwd_sm90", "fwd_sm90_ws", "dq_sm90", "dkdv_sm90"):
        for extent in (64, 256, 257, 1024, 65536):
            assert autotune.row_major_store(kind, 128, extent), (kind, extent)
            want = kind != "dkdv_sm90" or extent <= 256
            assert autotune.row_major_store(kind, 64, extent) == want, (kind, extent)
            p = SimpleNamespace(head_dim=64, block_d=64, extent=extent, is_varlen=False)
            assert _sm90_constexprs(kind, p, LaunchConfig(64, 64, 4, 2))["ROW_MAJOR_STORE"] == want, (kind, extent)


def test_device_capability_is_asked_once_per_device_and_query(monkeypatch):
    import torch

    asked = []

    def query(device=None, answer=(9, 0)):
        asked.append(device)
        return answer

    monkeypatch.setattr(torch.cuda, "get_device_capability", query)
    for _ in range(3):
        assert autotune.device_capability(torch.device("cuda", 5)) == (9, 0)
    assert autotune.device_capability(torch.device("cuda", 6)) == (9, 0)
    assert asked == [5, 6]  # once per device index
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert autotune.device_capability(torch.device("cuda", 5)) == (8, 0)  # a replaced query is asked again
    monkeypatch.setattr(torch.cuda, "get_device_capability", query)
    autotune.device_capability(torch.device("cuda"))
    autotune.device_capability(torch.device("cuda"))
    assert asked[2:] == [torch.device("cuda")] * 2  # no index (the current device): asked every time
