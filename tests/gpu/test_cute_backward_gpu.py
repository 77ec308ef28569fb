"""The CuTe one-pass backward (``olmoe_spattn/kernels/cute_backward.py``) on an SM90 GPU, vs float64.

Every case goes through ``triton_band_attention`` (the package's autograd path) and must take the
CuTe kernel (checked with a spy): bf16 and fp16, T not a multiple of the 64-query step or the
128-key tile, T % H != 0, partition_len != T, dynamic partitions, queries placed inside a longer
key sequence, packed documents (``cu_seqlens``, fixed and per-document partitions), empty rows
(zero gradient, no NaN), the log-sum-exp's own gradient, and the head groups that bound the fp32
dQ accumulator. ``deterministic=True`` must keep the Triton pair.
Needs the ``cute`` extra (``nvidia-cutlass-dsl``, ``quack-kernels``).
"""

from __future__ import annotations

import pytest
import torch
from attention_checks import check_heads, max_err

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import cute_launch, launch, triton_band_attention
from olmoe_spattn.reference import reference_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="the CuTe backward is an SM90 kernel"),
]

D = 128
CASES = {
    # odd T (not a multiple of 64 or 128), T % H != 0, two batch rows
    "spattention_odd_T": (BandSpec("spattention", 6, 1000), (2, 1000, 1000, 6), {}),
    # partition_len != T and empty rows at the start of every band but the first
    "exclusive_empty_rows": (BandSpec("exclusive_bands", 5, 512), (1, 777, 777, 5), {}),
    "exclusive_dynamic": (BandSpec("exclusive_bands", 4, "dynamic"), (1, 1500, 1500, 4), {}),
    # bands that start past T: heads 3..7 have no pair and are not launched (zero gradients)
    "exclusive_idle_heads": (BandSpec("exclusive_bands", 8, 1024), (2, 300, 300, 8), {}),
    # two intervals per head
    "gapped_bands": (BandSpec("gapped_bands", 4, 1030), (1, 1030, 1030, 4), {}),
    "sliding_window": (BandSpec("sliding_window", 3, 700), (2, 700, 700, 3), {}),
    "dense": (BandSpec("dense", 2, 513), (1, 513, 513, 2), {}),
    # queries at the end of a longer key sequence (a prefill chunk), head offset into the spec
    "prefill_chunk_head_offset": (BandSpec("spattention", 8, 900), (1, 300, 900, 4), {"head_offset": 4}),
    # packed documents: a one-row document, an empty one, one of whole 128-key tiles, odd lengths
    "packed_documents": (BandSpec("spattention", 8, 1000), (1, 3001, 3001, 8),
                         {"cu_seqlens": (0, 700, 701, 701, 2237, 2493, 3001)}),
    # packed documents with a partition per document length (a table per document)
    "packed_documents_dynamic": (BandSpec("exclusive_bands", 4, "dynamic"), (1, 1500, 1500, 4),
                                 {"cu_seqlens": (0, 129, 1000, 1064, 1500)}),
}


def _tensors(b, tq, tk, h, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda t: torch.randn(b, t, h, D, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(tq), make(tk), make(tk)


@pytest.fixture
def cute_calls(monkeypatch):
    """The list of CuTe backward calls made while the test runs."""
    monkeypatch.setenv("OLMOE_SPATTN_AUTOTUNE", "0")
    monkeypatch.delenv("OLMOE_SPATTN_BWD", raising=False)
    monkeypatch.delenv("OLMOE_SPATTN_TRITON_FEATURES", raising=False)
    calls = []
    real = launch.run_backward_cute

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "run_backward_cute", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cute_backward_against_oracle(case, dtype, cute_calls):
    spec, (b, tq, tk, h), kw = CASES[case]
    q, k, v = _tensors(b, tq, tk, h, dtype)
    if "cu_seqlens" in kw:
        kw = {"cu_seqlens": torch.tensor(kw["cu_seqlens"], device="cuda", dtype=torch.int32)}
    check_heads(triton_band_attention, spec, q, k, v, lse=True, **kw)
    assert cute_calls, "the call did not take the CuTe backward"


def test_head_groups_give_the_same_gradients(cute_calls, monkeypatch):
    spec = BandSpec("spattention", 6, 1000)
    q, k, v = _tensors(1, 1000, 1000, 6, torch.bfloat16)
    g = torch.randn_like(q)
    whole = torch.autograd.grad(triton_band_attention(q, k, v, spec), (q, k, v), g)
    monkeypatch.setattr(cute_launch, "ACC_ALWAYS_OK_BYTES", 0)
    monkeypatch.setattr(cute_launch, "ACC_MAX_FRACTION", 1 / 10)  # 0.5 MiB per head, 12.3 MB io: 2 per group
    assert cute_launch.head_groups(6, 1024 * 128 * 4, 4 * 2 * q.numel() * 2) == [(0, 2), (2, 4), (4, 6)]
    grouped = torch.autograd.grad(triton_band_attention(q, k, v, spec), (q, k, v), g)
    assert len(cute_calls) == 2
    for name, a, c in zip(("dq", "dk", "dv"), whole, grouped):
        assert max_err(a, c) <= 2e-2 * max(a.abs().max().item(), 1.0), name


def test_lse_gradient(cute_calls):
    spec = BandSpec("exclusive_bands", 4, 600)
    q, k, v = _tensors(1, 600, 600, 4, torch.float16)
    out, lse = triton_band_attention(q, k, v, spec, return_lse=True)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g_out).sum() + (torch.where(torch.isinf(lse), 0, lse) * g_lse).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, spec)
    loss = (ref * g_out.double()).sum() + (torch.where(torch.isinf(ref_lse), 0, ref_lse) * g_lse.double()).sum()
    want = torch.autograd.grad(loss, (q64, k64, v64))
    assert cute_calls
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert max_err(a, w) <= 0.02 * max(w.abs().max().item(), 1.0), f"{name}: {max_err(a, w):.3g}"


def test_deterministic_keeps_the_triton_pair(cute_calls):
    spec = BandSpec("spattention", 4, 512)
    q, k, v = _tensors(1, 512, 512, 4, torch.bfloat16)
    out = triton_band_attention(q, k, v, spec, deterministic=True)
    first = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    out = triton_band_attention(q, k, v, spec, deterministic=True)
    second = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert not cute_calls
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_calls_it_cannot_run_fall_back(cute_calls):
    # GQA (two query heads per kv head) and head dim 64: the Triton pair, same contract
    spec = BandSpec("spattention", 4, 256)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 256, 4, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 256, 2, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for _ in range(2))
    check_heads(triton_band_attention, spec, q, k, v)
    q64, k64, v64 = (torch.randn(1, 256, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
                     for _ in range(3))
    check_heads(triton_band_attention, spec, q64, k64, v64)
    assert not cute_calls


def test_cuda_graph_replay_matches_eager(cute_calls):
    from olmoe_spattn import band_attention
    from olmoe_spattn.bench.timing import graph_replay

    spec = BandSpec("sliding_window", 4, 640)
    shape = (2, 640, 4, D)

    def fresh(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(4)]

    def step(q, k, v, g):
        def run():
            out = band_attention(q, k, v, spec, backend="triton")
            return (out, *torch.autograd.grad(out, (q, k, v), g))
        return run

    static = [x.requires_grad_(i < 3) for i, x in enumerate(fresh(0))]
    replay = graph_replay(step(*static), torch.device("cuda"))
    new = fresh(1)
    with torch.no_grad():
        for dst, src in zip(static, new):
            dst.copy_(src)
    got = [x.clone() for x in replay()]
    want = step(*[x.clone().requires_grad_(i < 3) for i, x in enumerate(new)])()
    assert cute_calls
    for label, a, c in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        # dQ's fp32 adds land in any order: equal up to rounding
        assert max_err(a, c) <= 1e-2 * max(c.abs().max().item(), 1.0), label


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("pattern", ["exclusive_bands", "gapped_bands"])
def test_poison_in_unattended_keys_stays_out_of_the_gradients(pattern, poison, cute_calls):
    # keys no query of a head attends, inside key tiles that the kernel visits: NaN / Inf there must
    # reach no output or gradient (dQ would take 0 * NaN through the dQ MMA); their dK, dV are 0
    spec = BandSpec(pattern, 8, 256)
    q, k, v = _tensors(2, 384, 384, 8, torch.bfloat16)
    g = torch.randn_like(q)
    bad = ~spec.mask(384, device="cuda").any(dim=1).t()  # [Tk, H]
    assert bad.any()
    clean = triton_band_attention(q, k, v, spec)
    want = torch.autograd.grad(clean, (q, k, v), g)
    k2, v2 = (x.detach().clone() for x in (k, v))
    k2[:, bad], v2[:, bad] = poison, poison
    k2.requires_grad_()
    v2.requires_grad_()
    out = triton_band_attention(q, k2, v2, spec)
    got = torch.autograd.grad(out, (q, k2, v2), g)
    assert cute_calls
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite"
        assert max_err(a, w) <= 1e-2 * max(w.abs().max().item(), 1.0), name
    assert (got[1][:, bad] == 0).all() and (got[2][:, bad] == 0).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_poison_in_a_document_stays_out_of_its_neighbours(poison, cute_calls):
    # packed documents of 200 and 384 rows: the first document's last key tile also loads the second
    # document's first keys; NaN / Inf in the keys no query of their own document attends must reach
    # no gradient of either document, and their dK, dV come out 0
    spec = BandSpec("exclusive_bands", 8, 256)
    docs = (0, 200, 584)
    cu = torch.tensor(docs, device="cuda", dtype=torch.int32)
    q, k, v = _tensors(1, docs[-1], docs[-1], 8, torch.bfloat16)
    g = torch.randn_like(q)
    bad = torch.cat([~spec.mask(b - a, device="cuda").any(dim=1).t() for a, b in zip(docs, docs[1:])])  # [T, H]
    assert bad[: docs[1]].any() and bad[docs[1]:].any()
    want = torch.autograd.grad(triton_band_attention(q, k, v, spec, cu_seqlens=cu), (q, k, v), g)
    k2, v2 = (x.detach().clone() for x in (k, v))
    k2[:, bad], v2[:, bad] = poison, poison
    k2.requires_grad_()
    v2.requires_grad_()
    got = torch.autograd.grad(triton_band_attention(q, k2, v2, spec, cu_seqlens=cu), (q, k2, v2), g)
    assert cute_calls
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite"
        assert max_err(a, w) <= 1e-2 * max(w.abs().max().item(), 1.0), name
    assert (got[1][:, bad] == 0).all() and (got[2][:, bad] == 0).all()
