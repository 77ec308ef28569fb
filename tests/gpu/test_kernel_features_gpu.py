"""Opt-in kernel features on CUDA (``OLMOE_SPATTN_TRITON_FEATURES``), vs float64.

The default kernel (the baseline) and each variant (TMA descriptor loads in the forward and
the backward, branch-free masking, a different forward launch configuration; the one-pass
backward with atomic or TMA reduce-add dQ) runs the odd shapes in bf16 and fp16 through the
same oracle checks as the default kernel (forward, log-sum-exp with ``-inf`` exactly on empty
rows, and the backward). Run with ``OLMOE_SPATTN_AUTOTUNE=0``.
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import check_heads

from olmoe_spattn import BandSpec

# each variant forces its features and configurations: no call replays another variant's launches
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_replays")]

# (features, forward config override as (block_m, block_n, warps, stages) or None)
VARIANTS = [("", None), ("tma_dq", None), ("tma,tma_bwd", None), ("tma,flat", None), ("tma,flat,tma_dq", (64, 64, 4, 3)),
            ("gluon_fwd", None), ("gluon_fwd", (128, 64, 8, 3)), ("gluon_fwd,gluon_bwd", None),
            ("gluon_ws", None), ("gluon_ws", (64, 64, 4, 4)), ("gluon_ws,gluon_bwd", None),
            ("gluon_bwd", (64, 64, 4, 2)), ("gluon_bwd", (64, 128, 8, 2))]


def _inputs(b, t, h, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda n: torch.randn(b, t, n, d, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(h), make(hkv), make(hkv)


def _case(name: str, dtype):
    """``(spec, q, k, v, kwargs)`` of one case on CUDA (``cu_seqlens`` as an int32 tensor)."""
    spec, (b, t, h, hkv, d), kw = CASES[name]
    q, k, v = _inputs(b, t, h, hkv, d, dtype)
    if "cu_seqlens" in kw:
        kw = {"cu_seqlens": torch.tensor(kw["cu_seqlens"], device="cuda", dtype=torch.int32)}
    return spec, q, k, v, kw


CASES = {
    # two batch rows of odd T (a tile past row 0's end reads row 1), T % H != 0, dynamic
    # partition, head dim 64, empty rows at the start of every band
    "exclusive_dynamic_T_mod_H": (BandSpec("exclusive_bands", 6, "dynamic"), (2, 1001, 6, 6, 64), {}),
    # packed documents (two empty, lengths not multiples of the tile), GQA, partition_len != T
    "varlen_gqa_empty_docs": (BandSpec("spattention", 8, 512), (1, 3001, 8, 4, 128),
                              {"cu_seqlens": (0, 700, 701, 701, 2300, 2500, 3001)}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("features", "config"), VARIANTS, ids=lambda x: str(x).replace(" ", ""))
def test_variant_against_oracle(case, dtype, features, config, monkeypatch):
    from olmoe_spattn.kernels import autotune, launch, triton_band_attention

    monkeypatch.setenv("OLMOE_SPATTN_AUTOTUNE", "0")
    monkeypatch.setenv("OLMOE_SPATTN_TRITON_FEATURES", features)
    made, gluon_calls, gluon_ws_calls, gluon_bwd_calls = [], [], [], []
    real_desc = launch.tma_descriptor
    monkeypatch.setattr(launch, "tma_descriptor", lambda *a: made.append(a[1:]) or real_desc(*a))
    real_sm90 = launch.run_forward_sm90
    monkeypatch.setattr(launch, "run_forward_sm90", lambda *a: gluon_calls.append(1) or real_sm90(*a))
    real_ws = launch.run_forward_sm90_ws
    monkeypatch.setattr(launch, "run_forward_sm90_ws", lambda *a: gluon_ws_calls.append(1) or real_ws(*a))
    real_bwd = launch.run_dkdv_sm90
    monkeypatch.setattr(launch, "run_dkdv_sm90", lambda *a: gluon_bwd_calls.append(1) or real_bwd(*a))
    if config is not None:
        real = launch.fixed_config
        cfg = autotune.LaunchConfig(*config)
        monkeypatch.setattr(
            launch, "fixed_config",
            lambda kind, d, e: cfg if kind in ("fwd", "fwd_sm90", "fwd_sm90_ws", "dq_sm90", "dkdv_sm90") else real(kind, d, e),
        )
    spec, q, k, v, kw = _case(case, dtype)
    check_heads(triton_band_attention, spec, q, k, v, lse=True, **kw)
    assert bool(made) == ("tma" in features), "the TMA path was (not) taken"
    assert bool(gluon_calls) == ("gluon_fwd" in features), "the Gluon Hopper forward was (not) taken"
    assert bool(gluon_ws_calls) == ("gluon_ws" in features), "the warp-specialized Gluon forward was (not) taken"
    assert bool(gluon_bwd_calls) == ("gluon_bwd" in features), "the Gluon Hopper dK/dV pass was (not) taken"
    # and the same numbers as the default kernel, up to accumulation order
    go = torch.randn_like(q)
    got = _out_and_grads(triton_band_attention, spec, q, k, v, go, kw)
    monkeypatch.setenv("OLMOE_SPATTN_TRITON_FEATURES", "none")
    want = _out_and_grads(triton_band_attention, spec, q, k, v, go, kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        err = (a.float() - b.float()).abs().max().item()
        assert err <= (2e-2 if dtype == torch.bfloat16 else 4e-3) * max(1.0, b.float().abs().max().item()), (name, err)


def _out_and_grads(fn, spec, q, k, v, go, kw):
    """``(out, dq, dk, dv)`` of one call with output gradient ``go``."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, spec, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), go))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("features", ["", "tma_reduce", "tma_reduce,tma_bwd"], ids=lambda x: x or "pointer_atomics")
def test_one_pass_backward_against_oracle(case, dtype, features, monkeypatch):
    """The one-pass backward, with per-element atomic dQ adds or TMA bulk reduce-adds."""
    from olmoe_spattn.kernels import launch, triton_band_attention

    monkeypatch.setenv("OLMOE_SPATTN_AUTOTUNE", "0")
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "one_pass")
    monkeypatch.setenv("OLMOE_SPATTN_TRITON_FEATURES", features)
    reduced = []
    real_desc = launch.tma_descriptor
    monkeypatch.setattr(
        launch, "tma_descriptor", lambda x, *a: reduced.append(x.dtype == torch.float32) or real_desc(x, *a)
    )
    spec, q, k, v, kw = _case(case, dtype)
    check_heads(triton_band_attention, spec, q, k, v, lse=True, **kw)
    assert any(reduced) == ("tma_reduce" in features), "the dQ reduce-add descriptor was (not) made"


@pytest.mark.parametrize("case", list(CASES))
def test_gluon_backward_is_bit_identical_run_to_run(case, monkeypatch):
    """The Gluon backward keeps the two-pass schedule without atomics: two runs give the same bits."""
    from olmoe_spattn.kernels import launch, triton_band_attention

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels run on SM90 only")
    monkeypatch.setenv("OLMOE_SPATTN_AUTOTUNE", "0")
    monkeypatch.setenv("OLMOE_SPATTN_TRITON_FEATURES", "gluon_fwd,gluon_bwd")
    calls = []
    real = launch.run_dkdv_sm90
    monkeypatch.setattr(launch, "run_dkdv_sm90", lambda *a: calls.append(1) or real(*a))
    spec, q, k, v, kw = _case(case, torch.bfloat16)
    go = torch.randn_like(q)
    first = _out_and_grads(triton_band_attention, spec, q, k, v, go, kw)
    second = _out_and_grads(triton_band_attention, spec, q, k, v, go, kw)
    assert calls, "the Gluon dK/dV pass was not taken"
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name
