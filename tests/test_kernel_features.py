"""Opt-in kernel features (``OLMOE_SPATTN_TRITON_FEATURES``: tma, tma_dq, tma_bwd, tma_reduce, flat;
gluon_fwd and gluon_ws in ``test_hopper_kernels.py``).

On a CPU machine these run through Triton's interpreter, which executes TMA descriptor
loads (host-side ``TensorDescriptor``); ``tma_dq`` and ``tma_bwd`` do the same for the backward
kernels; the compiled code is covered by ``tests/gpu/test_kernel_features_gpu.py``. Every
variant must give the default kernel's output and log-sum-exp (bit for bit here: the same
arithmetic, only the loads and the masking of full tiles differ) and stay within the
2x-of-low-precision rule of the float64 oracle.
"""

from __future__ import annotations

import json

import pytest
import torch
from attention_checks import CASES, Case, assert_within_rule, check_heads, lowp_sdpa, reference_outputs

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import launch, triton_band_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = ["tma", "flat", "tma,flat"]
ENV = "OLMOE_SPATTN_TRITON_FEATURES"


def _count_descriptors(monkeypatch) -> list:
    made = []
    real = launch.tma_descriptor

    def counting(x, rows, block_d):
        made.append((tuple(x.shape), rows, block_d, x.data_ptr()))
        return real(x, rows, block_d)

    monkeypatch.setattr(launch, "tma_descriptor", counting)
    return made


CASE_DTYPES = [(c, d) for c in CASES for d in (torch.float32, torch.float16) if c.head_dim >= 16 or d == torch.float32]


# pointer loads with flat masking change no load: fp32 suffices for them
FWD_PARAMS = [(c, d, f) for f in VARIANTS for c, d in CASE_DTYPES if f != "flat" or d == torch.float32]


@pytest.mark.parametrize(("case", "dtype", "features"), FWD_PARAMS,
                         ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_variant_equals_default_and_oracle(case: Case, dtype, features, monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("compiled variants are checked in tests/gpu/test_kernel_features_gpu.py")
    q, k, v = case.tensors(dtype, device=DEVICE)
    kw = case.kwargs(DEVICE)
    monkeypatch.delenv(ENV, raising=False)
    want, want_lse = triton_band_attention(q, k, v, case.spec, return_lse=True, **kw)
    made = _count_descriptors(monkeypatch)
    monkeypatch.setenv(ENV, features)
    out, lse = triton_band_attention(q, k, v, case.spec, return_lse=True, **kw)
    # TMA needs a power-of-two head dim; the decode path (Tq <= 16) keeps pointer loads
    expect_tma = "tma" in features and case.head_dim >= 16 and case.q_len > 16
    assert bool(made) == expect_tma, made
    assert torch.equal(out, want)
    assert torch.equal(lse, want_lse)
    ref, _ = reference_outputs(case, *(x.double() for x in (q, k, v)))
    assert_within_rule(f"out[{features}]", out, lowp_sdpa(case, q, k, v), ref, dtype)


@pytest.mark.parametrize("features", ["tma_dq", "tma_bwd"])
@pytest.mark.parametrize(("case", "dtype"), CASE_DTYPES, ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_backward_descriptors_equal_default_and_oracle(case: Case, dtype, features, monkeypatch):
    """``tma_dq``: dQ reads K, V through descriptors; ``tma_bwd``: also dK/dV (Q, dO)."""
    if DEVICE == "cuda":
        pytest.skip("compiled variants are checked in tests/gpu/test_kernel_features_gpu.py")
    q, k, v = case.tensors(dtype, device=DEVICE, requires_grad=True)
    kw = case.kwargs(DEVICE)
    g = torch.randn_like(q)
    monkeypatch.delenv(ENV, raising=False)
    want = torch.autograd.grad(triton_band_attention(q, k, v, case.spec, **kw), (q, k, v), g)
    made = _count_descriptors(monkeypatch)
    monkeypatch.setenv(ENV, features)
    got = torch.autograd.grad(triton_band_attention(q, k, v, case.spec, **kw), (q, k, v), g)
    assert bool(made) == (case.head_dim >= 16), made  # the backward has no decode path
    streamed = {ptr for *_, ptr in made}
    assert (q.data_ptr() in streamed) == (features == "tma_bwd" and case.head_dim >= 16), made
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a, w), name
    check_heads(triton_band_attention, case.spec, q, k, v, lse=True, **kw)


@pytest.mark.parametrize("features", ["tma,tma_bwd", "tma,flat,tma_dq"])
def test_rows_past_a_sequence_end_stay_isolated(features, monkeypatch):
    """Through a 2-D descriptor, the rows after a sequence's last key are the next batch row's
    (or document's) keys: NaN there must not reach this sequence, exactly as without TMA."""
    spec = BandSpec("spattention", 4, 24)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g) for _ in range(3))  # [B, T, H, D], T % 16 != 0
    k[1], v[1], q[1] = float("nan"), float("nan"), float("nan")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    go = torch.randn_like(q)
    go[1] = float("nan")
    monkeypatch.setenv(ENV, features)
    out = triton_band_attention(q, k, v, spec)
    grads = torch.autograd.grad(out, (q, k, v), go)
    monkeypatch.delenv(ENV)
    want = triton_band_attention(q, k, v, spec)
    want_grads = torch.autograd.grad(want, (q, k, v), go)
    assert torch.isfinite(out[0]).all()
    assert torch.equal(out[0], want[0])
    for a, w in zip(grads, want_grads):
        assert torch.isfinite(a[0]).all()
        assert torch.equal(a[0], w[0])
    q, k, v = (x.detach() for x in (q, k, v))

    cu = torch.tensor([0, 21, 50, 74], dtype=torch.int32)  # packed documents, one poisoned
    qp, kp, vp = (x.nan_to_num(0.5).reshape(1, 74, 4, 16).clone() for x in (q, k, v))
    kp[:, 21:50], vp[:, 21:50], qp[:, 21:50] = float("nan"), float("nan"), float("nan")
    qp, kp, vp = (x.requires_grad_() for x in (qp, kp, vp))
    go = torch.randn_like(qp)
    go[:, 21:50] = float("nan")
    monkeypatch.setenv(ENV, features)
    out = triton_band_attention(qp, kp, vp, spec, cu_seqlens=cu, max_seqlen=29)
    grads = torch.autograd.grad(out, (qp, kp, vp), go)
    monkeypatch.delenv(ENV)
    want = triton_band_attention(qp, kp, vp, spec, cu_seqlens=cu, max_seqlen=29)
    want_grads = torch.autograd.grad(want, (qp, kp, vp), go)
    for a, b in ((0, 21), (50, 74)):
        assert torch.isfinite(out[:, a:b]).all()
        assert torch.equal(out[:, a:b], want[:, a:b])
        for x, w in zip(grads, want_grads):
            assert torch.isfinite(x[:, a:b]).all()
            assert torch.equal(x[:, a:b], w[:, a:b])


def test_non_packed_heads_fall_back_to_pointer_loads(monkeypatch):
    """A view whose heads are not packed along a row cannot be one 2-D descriptor."""
    spec = BandSpec("exclusive_bands", 2, 40)
    x = torch.randn(1, 40, 2, 3, 16)  # [B, T, H, qkv, D]
    q, k, v = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]  # stride_h = 48 != D
    made = _count_descriptors(monkeypatch)
    monkeypatch.setenv(ENV, "tma")
    out = triton_band_attention(q, k, v, spec)
    assert made == []
    monkeypatch.delenv(ENV)
    assert torch.equal(out, triton_band_attention(q, k, v, spec))


@pytest.mark.parametrize(("value", "words"), [("tma,fast", "unknown ['fast']"), ("tma,ws", "unknown ['ws']")])
def test_bad_feature_names_are_clear_errors(value, words, monkeypatch):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV) as err:
        launch.triton_features()
    assert words in str(err.value)


def test_empty_setting_means_no_features(monkeypatch):
    monkeypatch.setenv(ENV, " , ")
    assert launch.triton_features() == frozenset()


# ----------------------------------------------------------------------------- bench sweep --variants
def test_bench_variants_in_the_interpreter(tmp_path):
    """`bench sweep --variants` drives every variant (one call each instead of do_bench),
    reports its difference from the default and writes the JSON; a spent budget skips cases."""
    from olmoe_spattn.bench import features as F

    variants = F.parse_variants("tma,tma+flat+tma_dq@16x16x4x1")
    assert [v.name for v in variants] == ["default", "tma", "tma+flat+tma_dq@16x16x4x1"]
    assert [v.name for v in F.parse_variants("tma,default")] == ["default", "tma"]
    assert variants[2].features == ("tma", "flat", "tma_dq") and variants[2].fwd_config == (16, 16, 4, 1)
    cases = F.parse_cases("1,2,40,16:exclusive_bands+dense;1,2,20,16")
    assert [c[1] for c in cases] == ["exclusive_bands", "dense", "exclusive_bands"]
    path = tmp_path / "variants.json"
    lines = F.run_variants(cases[:2], variants, rep_ms=1.0, rounds=1, json_path=str(path), device="cpu",
                           dtype=torch.float32, bench=lambda fn, rep_ms: fn() and 1.0, do_preflight=False)
    assert len([x for x in lines if x.startswith("| 1,2,40,16")]) == 6
    rec = json.loads(path.read_text())
    assert [r["variant"] for r in rec["rows"]] == [v.name for v in variants] * 2
    assert all(r["max_diff_vs_default"] == 0.0 and r["fwd_ms"] == 1.0 for r in rec["rows"]), rec["rows"]
    lines = F.run_variants(cases, variants, rep_ms=1.0, budget_s=1e-9, json_path=str(path), device="cpu",
                           dtype=torch.float32, bench=lambda fn, rep_ms: 1.0, do_preflight=False)
    assert len(json.loads(path.read_text())["skipped_cases"]) == 3


@pytest.mark.parametrize(("text", "words"), [("tma+fast", "unknown feature"), ("tma@64x64", "BMxBNxWARPSxSTAGES")])
def test_bench_variant_errors(text, words):
    from olmoe_spattn.bench import features as F

    with pytest.raises(ValueError, match=words):
        F.parse_variants(text)


def test_bench_case_errors():
    from olmoe_spattn.bench import features as F

    with pytest.raises(ValueError, match="unknown pattern"):
        F.parse_cases("1,2,40,16:bands")
    with pytest.raises(ValueError, match="four positive integers"):
        F.parse_cases("1,2,40:dense")


def test_bench_preflight_leaves_out_a_failing_variant():
    """A variant that fails in its preflight subprocess (here: a tile that is not a power of
    two) is reported and left out, the others pass; the default is never preflighted."""
    import os

    from olmoe_spattn.bench import features as F

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter stands in for the GPU here")
    variants = F.parse_variants("tma,tma@24x16x4x1")
    failed = F.preflight(variants, F.parse_cases("1,2,40,16:exclusive_bands"), timeout_s=120.0, device="cpu")
    assert list(failed) == ["tma@24x16x4x1"], failed
    reason = failed["tma@24x16x4x1"]
    assert "Error" in reason and 'File "' not in reason, reason  # the error, not the machine's paths


def _problem(extent: int, head_dim: int = 128, max_tk: int = 65536):
    from types import SimpleNamespace

    block_d = 1 << max(head_dim - 1, 1).bit_length()
    return SimpleNamespace(extent=extent, head_dim=head_dim, block_d=block_d, max_tk=max_tk)


@pytest.mark.parametrize(
    ("extent", "head_dim", "major", "want"),
    [(256, 128, 9, {"gluon_fwd", "tma_dq"}), (1024, 64, 9, {"tma", "flat", "gluon_bwd"}), (512, 64, 9, {"tma", "flat"}),
     (1025, 128, 9, {"gluon_fwd", "gluon_bwd", "tma_dq"}), (65536, 128, 10, {"tma_dq"}), (256, 128, 10, {"tma", "flat", "tma_dq"}),
     (256, 128, 8, set()), (256, 256, 9, set()), (256, 96, 9, set()),
     (2048, 128, 9, {"gluon_fwd", "gluon_bwd", "tma_dq"}), (2049, 128, 9, {"gluon_fwd", "gluon_ws", "gluon_bwd", "tma_dq"}),
     (65536, 128, 9, {"gluon_fwd", "gluon_ws", "gluon_bwd", "tma_dq"}), (65536, 64, 9, {"gluon_fwd", "gluon_ws", "gluon_bwd"})],
)
def test_automatic_choice_by_band_width_and_gpu(extent, head_dim, major, want, monkeypatch):
    """Unset (or ``auto``), on SM90: the Gluon forward for wide bands and at head dim 128 (its
    warp-specialized version above 2048 distances), tma+flat for narrow bands at head dim 64, the
    Gluon backward above 512 distances; on SM100 (no warpgroup MMAs)
    tma+flat for narrow bands; tma_dq (used by the Triton dQ kernel) at head dim 128 on SM90+; only
    for the measured head dims; ``none`` and an explicit list win."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    cuda = torch.device("cuda", 0)
    p = _problem(extent, head_dim)
    monkeypatch.delenv(ENV, raising=False)
    assert launch.triton_features(p, cuda) == frozenset(want)
    monkeypatch.setenv(ENV, "auto")
    assert launch.triton_features(p, cuda) == frozenset(want)
    monkeypatch.setenv(ENV, "none")
    assert launch.triton_features(p, cuda) == frozenset()
    monkeypatch.setenv(ENV, "tma_bwd")
    assert launch.triton_features(p, cuda) == frozenset({"tma_bwd"})
    if "tma_dq" in want:  # the one-pass backward keeps pointer loads unless they are forced
        assert launch.triton_features(p, cuda, atomic_dq=True) == frozenset({"tma_bwd"})
    monkeypatch.delenv(ENV)
    assert launch.triton_features(p, cuda, atomic_dq=True) == frozenset()
    assert launch.triton_features(p, torch.device("cpu")) == frozenset()


def test_automatic_choice_for_short_causal_attention(monkeypatch):
    """Dense (a band as wide as the sequence) at T <= 1024: no flat masking in the forward."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv(ENV, raising=False)
    cuda = torch.device("cuda", 0)
    assert launch.triton_features(_problem(1024, head_dim=64, max_tk=1024), cuda) == {"gluon_bwd"}
    assert launch.triton_features(_problem(512, head_dim=64, max_tk=1024), cuda) == {"tma", "flat"}
    assert launch.triton_features(_problem(1024, max_tk=1024), cuda) == {"gluon_fwd", "gluon_bwd", "tma_dq"}
    assert launch.triton_features(_problem(2048, max_tk=2048), cuda) == {"gluon_fwd", "gluon_bwd", "tma_dq"}


def test_interpreter_runs_the_plain_kernels_by_default(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert launch.triton_features(_problem(64), torch.device("cuda", 0)) == frozenset()


def test_reduce_add_keeps_atomic_adds_in_the_interpreter(monkeypatch):
    """``tma_reduce`` (one-pass dQ by TMA reduce-add) has no interpreter counterpart: there the
    one-pass backward keeps per-element atomic adds and gives the same gradients."""
    if DEVICE == "cuda":
        pytest.skip("the compiled reduce-add is checked in tests/gpu/test_kernel_features_gpu.py")
    spec = BandSpec("spattention", 4, 24)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g).requires_grad_() for _ in range(3))  # [B, T, H, D]
    go = torch.randn_like(q)
    monkeypatch.setenv("OLMOE_SPATTN_BWD", "one_pass")
    monkeypatch.delenv(ENV, raising=False)
    want = torch.autograd.grad(triton_band_attention(q, k, v, spec), (q, k, v), go)
    made = _count_descriptors(monkeypatch)
    monkeypatch.setenv(ENV, "tma_reduce")
    got = torch.autograd.grad(triton_band_attention(q, k, v, spec), (q, k, v), go)
    assert made == []
    for a, w in zip(got, want):
        assert torch.equal(a, w)
