"""GPU: repeat calls that replay the launches of an earlier call (``kernels/replay.py``).

Each case runs calls on two sets of inputs with replays off, then the same calls again, alternating,
with fresh copies of the inputs every time (so every replay fills its slots with tensors it has not
seen): outputs and gradients must equal the ordinary path's bit for bit (deterministic backward), and
the later calls must have been replays. The one-pass schedules (atomic dQ adds) are checked against
the float64 oracle instead, and the CuTe one must be chosen once per layout.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import check_heads

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import cute_launch, launch, replay, triton_band_attention

pytestmark = pytest.mark.gpu


def _inputs(b, t, h, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda n: torch.randn(b, t, n, d, device="cuda", generator=g).to(dtype)  # noqa: E731
    return make(h), make(hkv), make(hkv), make(h)


def _call(inputs, spec, dlse_weight=None, **kw):
    """Forward and backward on fresh copies of ``inputs`` (new data pointers every call)."""
    q, k, v, g = (x.clone() for x in inputs)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = triton_band_attention(q, k, v, spec, return_lse=True, deterministic=True, **kw)
    loss_lse = 0 if dlse_weight is None else (lse.nan_to_num(0, 0, 0) * dlse_weight).sum()
    grads = torch.autograd.grad((out * g).sum() + loss_lse, (q, k, v))
    return (out, lse, *grads)


@pytest.fixture
def replay_counter(monkeypatch):
    """Counts :meth:`Replay.run` calls."""
    counted = {"runs": 0}
    run = replay.Replay.run

    def counting(self, slots):
        counted["runs"] += 1
        return run(self, slots)

    monkeypatch.setattr(replay.Replay, "run", counting)
    return counted


CASES = {  # B, T, H, Hkv, D, dtype, pattern, partition, gradient of the log-sum-exp too
    "triton fwd tma+flat, triton dq/dkdv": (32, 1000, 8, 8, 64, torch.bfloat16, "exclusive_bands", 1000, False),
    "gluon fwd, triton dq with tma, dlse": (2, 1000, 8, 8, 128, torch.float16, "spattention", 1000, True),
    "gluon fwd, gluon dq/dkdv": (2, 1500, 4, 4, 64, torch.bfloat16, "dense", 1500, False),
    "gqa, dynamic partition": (2, 1500, 8, 2, 128, torch.bfloat16, "spattention", "dynamic", False),
    "warp-specialized forward": (1, 4500, 4, 4, 128, torch.bfloat16, "dense", 4500, False),
    "fp32, odd head dim": (2, 333, 6, 3, 40, torch.float32, "sliding_window", 200, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_calls_equal_the_ordinary_path_bit_for_bit(name, monkeypatch, replay_counter):
    b, t, h, hkv, d, dtype, pattern, partition, with_dlse = CASES[name]
    spec = BandSpec(pattern, h, partition)
    sets = [_inputs(b, t, h, hkv, d, dtype, seed) for seed in (0, 1)]
    weight = torch.randn(b, h, t, device="cuda") if with_dlse else None
    on = {"value": False}
    enabled = replay.enabled
    monkeypatch.setattr(replay, "enabled", lambda: on["value"] and enabled())
    want = [_call(x, spec, weight) for x in sets]
    assert replay_counter["runs"] == 0
    on["value"] = True
    for i in range(6):
        got = _call(sets[i % 2], spec, weight)
        for j, (x, y) in enumerate(zip(got, want[i % 2])):
            assert torch.equal(x, y), f"{name}: call {i}, output {j} differs from the ordinary path"
    assert replay_counter["runs"] >= 6, f"{name}: later calls did not replay ({replay_counter['runs']} replays)"


def test_settings_change_between_replayed_calls(monkeypatch, replay_counter):
    """A schedule set between calls takes effect: the two-pass backward's replay is not reused for
    the one-pass one, which stays within the float64 rule."""
    spec = BandSpec("spattention", 8, 1024)
    q, k, v, _ = (x.requires_grad_() for x in _inputs(4, 1024, 8, 8, 64, torch.bfloat16, 0))
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "two_pass")
    for _ in range(3):
        check_heads(triton_band_attention, spec, q, k, v, lse=True)
    assert replay_counter["runs"] >= 2
    used = []
    one_pass = launch.run_delta
    monkeypatch.setattr(launch, "run_delta", lambda *a, **kw: used.append(1) or one_pass(*a, **kw))
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "one_pass")
    for _ in range(3):
        check_heads(triton_band_attention, spec, q, k, v, lse=True)
    assert used, "the one-pass schedule was not taken after the setting changed"


def test_a_misaligned_input_is_not_replayed_from_an_aligned_one(replay_counter):
    spec = BandSpec("exclusive_bands", 8, 700)
    inputs = _inputs(2, 700, 8, 8, 64, torch.float16, 0)
    want = _call(inputs, spec)
    for _ in range(3):
        _call(inputs, spec)
    q, k, v, g = inputs
    shifted = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view(q.shape)  # 2 bytes off
    shifted.copy_(q)
    got = _call((shifted, k, v, g), spec)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.skipif(not cute_launch.cute_installed(), reason="the CuTe backward needs the cute extra")
def test_the_cute_schedule_is_chosen_once_per_layout(monkeypatch):
    asked = []
    choose = launch.use_cute_backward
    monkeypatch.setattr(launch, "use_cute_backward", lambda *a: asked.append(1) or choose(*a))
    spec = BandSpec("exclusive_bands", 8, 1200)
    q, k, v, _ = (x.requires_grad_() for x in _inputs(2, 1200, 8, 8, 128, torch.bfloat16, 0))
    for _ in range(3):
        check_heads(triton_band_attention, spec, q, k, v, lse=True)
    assert len(asked) == 1
