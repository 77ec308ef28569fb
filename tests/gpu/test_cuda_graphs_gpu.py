"""Band attention captured in a CUDA graph: replays give the eager results, bit for bit.

Small shapes spend more time in Python and kernel launches than on the GPU; a captured
forward+backward replays with none of that. The capture must not read GPU values on the host:
these tests capture the Triton backend's forward and backward (fixed and dynamic partitions,
GQA, packed documents with ``max_seqlen``), replay on new inputs copied into the captured
tensors, and compare with eager calls on the same inputs (deterministic backward, so equal
bits). Packed documents that would need a host read fail with a message saying what to pass.
"""

from __future__ import annotations

import json

import pytest
import torch

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.bench.timing import graph_replay
from olmoe_spattn.cli import main

pytestmark = pytest.mark.gpu

CASES = {
    "fixed_gqa": dict(b=2, t=300, h=4, hkv=2, d=64, spec=BandSpec("spattention", 4, 300)),
    "dynamic_partition": dict(b=1, t=257, h=3, hkv=3, d=128, spec=BandSpec("exclusive_bands", 3, "dynamic")),
    "packed_documents": dict(b=1, t=333, h=4, hkv=4, d=64, spec=BandSpec("sliding_window", 4, 96),
                             docs=[0, 100, 101, 333]),
}


def _tensors(case: dict, seed: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape_q = (case["b"], case["t"], case["h"], case["d"])
    shape_kv = (case["b"], case["t"], case["hkv"], case["d"])
    return tuple(torch.randn(s, device="cuda", generator=g).to(dtype) for s in (shape_q, shape_kv, shape_kv, shape_q))


def _step(case: dict, q, k, v, grad_out):
    kwargs = {}
    if "docs" in case:
        cu = torch.tensor(case["docs"], device="cuda", dtype=torch.int32)
        kwargs = dict(cu_seqlens=cu, max_seqlen=max(b - a for a, b in zip(case["docs"], case["docs"][1:])))

    def step():
        out = band_attention(q, k, v, case["spec"], backend="triton", deterministic=True, **kwargs)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    return step


@pytest.mark.parametrize("name", list(CASES))
def test_replay_matches_eager_on_new_inputs(name):
    case = CASES[name]
    static = [x.requires_grad_(i < 3) for i, x in enumerate(_tensors(case, seed=0))]
    replay = graph_replay(_step(case, *static), torch.device("cuda"))
    for seed in (1, 2):
        fresh = _tensors(case, seed)
        with torch.no_grad():
            for dst, src in zip(static, fresh):
                dst.copy_(src)
        got = [x.clone() for x in replay()]
        eager_inputs = [x.clone().requires_grad_(i < 3) for i, x in enumerate(fresh)]
        want = _step(case, *eager_inputs)()
        for label, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert torch.equal(a, b), f"{name}, inputs {seed}: replayed {label} differs from eager"
        assert got[0].abs().sum() > 0


def test_decode_step_replays_on_new_inputs():
    """A decode step (one query per sequence: the split-key kernel and its combine launch)."""
    spec = BandSpec("spattention", 8, 4096)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 1, 8, 128, device="cuda", generator=g).to(torch.bfloat16)
    k, v = (torch.randn(4, 3001, 2, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))

    def step():
        with torch.no_grad():
            return band_attention(q, k, v, spec, backend="triton")

    replay = graph_replay(step, torch.device("cuda"))
    for _ in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, device="cuda", generator=g).to(x.dtype))
        assert torch.equal(replay().clone(), step())


@pytest.mark.parametrize("kwargs, message", [
    (dict(spec=BandSpec("spattention", 4, 96)), "need max_seqlen"),
    (dict(spec=BandSpec("spattention", 4, "dynamic"), max_seqlen=233), "use a fixed partition_len"),
])
def test_packed_documents_that_need_host_reads_fail_clearly(kwargs, message):
    q, k, v = (torch.randn(1, 333, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 100, 333], device="cuda", dtype=torch.int32)
    spec = kwargs.pop("spec")
    band_attention(q, k, v, spec, backend="triton", cu_seqlens=cu, **kwargs)  # eager: fine
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match=message):
        with torch.cuda.graph(graph):
            band_attention(q, k, v, spec, backend="triton", cu_seqlens=cu, **kwargs)
    out = band_attention(q, k, v, BandSpec("spattention", 4, 96), backend="triton", cu_seqlens=cu, max_seqlen=233)
    assert torch.isfinite(out).all()  # the failed capture left the stream usable


def test_bench_kernel_times_graph_replays(tmp_path):
    status = main([
        "bench", "kernel", "--device", "cuda", "--shapes", "2,4,512,64", "--patterns", "spattention",
        "--backends", "ours,flex,cudnn_dense", "--cuda-graphs", "--out-dir", str(tmp_path), "--no-plot",
        "--warmup", "1", "--rounds", "1", "--min-round-ms", "1",
    ])
    assert status == 0
    data = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert data["settings"]["cuda_graphs"] is True
    rows = {r["backend"]: r for r in data["results"]}
    assert rows["ours"]["status"] == "ok" and rows["ours"]["fwdbwd_ms"] > 0
    assert rows["ours"]["max_grad_err"] < 5e-2
    assert "CUDA graph replay" in (tmp_path / "kernel_bench.md").read_text()


def test_compiled_with_reduce_overhead_matches_eager():
    """``torch.compile(mode="reduce-overhead")`` records the custom op into CUDA graphs."""
    case = CASES["fixed_gqa"]
    spec = case["spec"]

    def loss_grads(fn, q, k, v, grad_out):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    def attend(q, k, v):
        return band_attention(q, k, v, spec, backend="triton", deterministic=True)

    compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3):  # the first calls record, later ones replay
        q, k, v, grad_out = _tensors(case, seed)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        got = [x.clone() for x in loss_grads(compiled, q, k, v, grad_out)]
        want = loss_grads(attend, q, k, v, grad_out)
        for label, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert torch.equal(a, b), f"inputs {seed}: compiled {label} differs from eager"
