"""The Triton kernel's two backward schedules, determinism switches and NaN isolation.

* one-pass (atomic fp32 dQ) and two-pass (deterministic) give the float64 oracle's
  gradients on the shared odd cases (GQA, offsets, packed documents, empty rows);
* ``deterministic=True`` and ``torch.use_deterministic_algorithms(True)`` force two-pass;
* keys and values that no query of a head attends never reach that head's output or
  gradients, even as NaN / Inf inside a tile that the kernel visits.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import ATOL, CASES, Case, max_err, reference_outputs

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import launch, triton_band_attention
from olmoe_spattn.reference import sdpa_band_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCHEDULES = ["one_pass", "two_pass"]


def _grads(case: Case, q, k, v, g, **kw):
    out = triton_band_attention(q, k, v, case.spec, **case.kwargs(DEVICE), **kw)
    return out, torch.autograd.grad(out, (q, k, v), g)


# the default schedule runs every case in test_kernel_interpret.py; here each one explicitly
SCHEDULE_CASES = [(c, "one_pass") for c in CASES] + [
    (c, "two_pass") for c in CASES if c.name in ("exclusive_empty_rows", "varlen_dynamic")
]


@pytest.mark.parametrize(("case", "schedule"), SCHEDULE_CASES, ids=lambda x: x.name if isinstance(x, Case) else x)
def test_schedule_matches_oracle(case: Case, schedule, monkeypatch):
    monkeypatch.setenv("OLMOE_SPATTN_BWD", schedule)
    q, k, v = case.tensors(torch.float32, device=DEVICE, requires_grad=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_outputs(case, q64, k64, v64)
    g = torch.randn_like(ref)
    _, got = _grads(case, q, k, v, g.float())
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    lowp = torch.autograd.grad(
        sdpa_band_attention(qf, kf, vf, case.spec, **case.kwargs(DEVICE)), (qf, kf, vf), g.float()
    )
    for name, a, w, c in zip("qkv", got, want, lowp):
        assert torch.isfinite(a).all(), f"d{name} not finite"
        tol = 2 * max_err(c, w) + ATOL[torch.float32] * max(w.abs().max().item(), 1.0)
        assert max_err(a, w) <= tol, f"{schedule} d{name}: {max_err(a, w):.3g} > {tol:.3g}"


def test_schedules_agree():
    case = CASES[0]
    q, k, v = case.tensors(torch.float32, device=DEVICE, requires_grad=True)
    g = torch.randn_like(q)
    results = {}
    for schedule in SCHEDULES:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OLMOE_SPATTN_BWD", schedule)
            results[schedule] = _grads(case, q, k, v, g)[1]
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _schedule_used(monkeypatch, **kw) -> list[bool]:
    """Runs one backward and records whether it took the one-pass schedule."""
    seen: list[bool] = []
    real = launch.use_one_pass

    def spy(deterministic):
        seen.append(real(deterministic))
        return seen[-1]

    monkeypatch.setattr(launch, "use_one_pass", spy)
    case = CASES[0]
    q, k, v = case.tensors(torch.float32, device=DEVICE, requires_grad=True)
    _grads(case, q, k, v, torch.randn_like(q), **kw)
    return seen


def test_deterministic_flag_forces_two_pass(monkeypatch):
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "one_pass")
    assert _schedule_used(monkeypatch) == [True]
    assert _schedule_used(monkeypatch, deterministic=True) == [False]


def test_torch_deterministic_mode_forces_two_pass(monkeypatch):
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "one_pass")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert _schedule_used(monkeypatch) == [False]
    finally:
        torch.use_deterministic_algorithms(before)


def test_unknown_schedule_is_refused(monkeypatch):
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "three_pass")
    case = CASES[0]
    q, k, v = case.tensors(torch.float32, device=DEVICE, requires_grad=True)
    out = triton_band_attention(q, k, v, case.spec)
    with pytest.raises(ValueError, match="OLMOE_SPATTN_BWD='three_pass'.*one_pass, two_pass"):
        out.sum().backward()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pattern", ["exclusive_bands", "gapped_bands"])
def test_unattended_nan_keys_and_values_stay_out(pattern, schedule, monkeypatch):
    """Keys a head never attends (the last W of exclusive bands) hold NaN / Inf: outputs and
    gradients of that head are those of clean inputs, and the poisoned keys get zero gradient."""
    monkeypatch.setenv("OLMOE_SPATTN_BWD", schedule)
    spec = BandSpec(pattern, 2, 40)
    b, t, h, d = 1, 50, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(b, t, h, d, generator=g).to(DEVICE) for _ in range(4))
    never = ~spec.mask(t).to(DEVICE).any(dim=1)  # [H, Tk]: keys no query of head h attends
    assert never.any()
    k_bad, v_bad = k.clone(), v.clone()
    for head in range(h):
        k_bad[0, never[head], head] = float("nan")
        v_bad[0, never[head], head] = float("inf")
    clean = [x.clone().requires_grad_() for x in (q, k, v)]
    poisoned = [x.clone().requires_grad_() for x in (q, k_bad, v_bad)]
    out_clean = triton_band_attention(*clean, spec)
    out_bad = triton_band_attention(*poisoned, spec)
    torch.testing.assert_close(out_bad, out_clean, rtol=0, atol=0)
    grads_clean = torch.autograd.grad(out_clean, clean, grad)
    grads_bad = torch.autograd.grad(out_bad, poisoned, grad)
    torch.testing.assert_close(grads_bad[0], grads_clean[0], rtol=1e-6, atol=1e-6)
    for clean_g, bad_g in zip(grads_clean[1:], grads_bad[1:]):
        keep = ~never.T[None, :, :, None].expand_as(bad_g)  # [B, Tk, H, D]
        torch.testing.assert_close(bad_g[keep], clean_g[keep], rtol=1e-6, atol=1e-6)
        assert (bad_g[~keep] == 0).all()


def test_band_attention_passes_deterministic_to_the_kernel(monkeypatch):
    from olmoe_spattn import band_attention

    monkeypatch.setenv("OLMOE_SPATTN_BWD", "one_pass")
    seen: list[bool] = []
    real = launch.use_one_pass
    monkeypatch.setattr(launch, "use_one_pass", lambda det: seen.append(real(det)) or seen[-1])
    case = CASES[0]
    q, k, v = case.tensors(torch.float32, device=DEVICE, requires_grad=True)
    for deterministic in (False, True):
        out = band_attention(q, k, v, case.spec, "triton", deterministic=deterministic, **case.kwargs(DEVICE))
        out.sum().backward()
    assert seen == [True, False]
