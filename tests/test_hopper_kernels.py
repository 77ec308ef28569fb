"""The Gluon Hopper kernels (``gluon_fwd``, ``gluon_bwd``) on a CPU machine.

Gluon has no interpreter, so what runs here is: every kernel compiles for SM90 with the
installed Triton (down to a cubin, no GPU needed) at the launch configurations the dispatch
uses, and a call that cannot take the Gluon path (here: the interpreter, CPU tensors) falls back
to the Triton kernel with the same result.
The geometry the Gluon kernels share with the Triton ones (key ranges, full tiles, keys no row
of a tile attends) is checked in ``test_kernel_tiles.py``; their numbers are checked against the
float64 oracle on the GPU (``tests/gpu/test_kernel_features_gpu.py``, ``test_nonfinite_gpu.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from olmoe_spattn import BandSpec
from olmoe_spattn.kernels import autotune, launch, triton_band_attention

ENV = "OLMOE_SPATTN_TRITON_FEATURES"


# Runs in a fresh interpreter: with TRITON_INTERPRET=1 set at import (as in this test session)
# the shared ``@triton.jit`` helpers become interpreter objects, which Gluon cannot compile.
_COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from olmoe_spattn.kernels import hopper_backward, hopper_forward, hopper_forward_ws

def descriptor_type(rows, head_dim, dtype):
    elt = gl.bfloat16 if dtype == "bf16" else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], elt)
    return f"tensordesc<{dtype}[{rows}, {head_dim}],{layout!r}>"

def signature(kind, bm, bn, head_dim, dtype):
    desc = lambda rows: descriptor_type(rows, head_dim, dtype)  # noqa: E731
    ptr = "*" + dtype
    if kind in ("fwd_sm90", "fwd_sm90_ws"):
        sig = {"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn), "Out": ptr, "Lse": "*fp32"}
        strides = ["stride_ob", "stride_ot", "stride_oh"]
    elif kind == "dq_sm90":
        sig = {"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn), "do_desc": desc(bm), "Out": ptr,
               "DQ": ptr, "Lse": "*fp32", "DLse": "*fp32", "Delta": "*fp32"}
        strides = ["stride_ob", "stride_ot", "stride_oh", "stride_dqb", "stride_dqt", "stride_dqh"]
    else:
        sig = {"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn), "do_desc": desc(bm), "DK": ptr,
               "DV": ptr, "Lse": "*fp32", "Delta": "*fp32"}
        strides = ["stride_dkb", "stride_dkt", "stride_dkh", "stride_dvb", "stride_dvt", "stride_dvh"]
    sig.update({"Table": "*i32", "CuSeq": "*i32"})
    for name in strides + ["stride_lb", "stride_lh", "table_doc_stride", "tq_arg", "tk_arg", "q_off_arg", "group"]:
        sig[name] = "i32"
    sig["sm_scale"] = "fp32"
    return sig

KERNELS = {"fwd_sm90": hopper_forward.fwd_kernel_sm90, "dq_sm90": hopper_backward.dq_kernel_sm90,
           "dkdv_sm90": hopper_backward.dkdv_kernel_sm90, "fwd_sm90_ws": hopper_forward_ws.fwd_kernel_sm90_ws}
results = []
for kind, (bm, bn, warps, stages), head_dim, dtype, varlen, row_major in json.loads(sys.argv[1]):
    sig = signature(kind, bm, bn, head_dim, dtype)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, IS_VARLEN=varlen)
    if kind == "dq_sm90":
        constexprs["HAS_DLSE"] = varlen
    constexprs["num_warps"] = warps
    constexprs["ROW_MAJOR_STORE"] = row_major
    names = list(sig) + list(constexprs)
    sig.update(dict.fromkeys(constexprs, "constexpr"))
    src = GluonASTSource(KERNELS[kind], sig, {(names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": warps}
    if kind == "fwd_sm90_ws":
        options["maxnreg"] = hopper_forward_ws.MAX_REGISTERS
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = compiled.asm["ptx"]
    results.append({"cubin": len(compiled.asm["cubin"]), "wgmma": "wgmma.mma_async" in ptx,
                    "shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps,
                    "setmaxnreg": sorted(set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+);", ptx))),
                    # N of the MMAs whose A operand comes from registers ("{acc}, {a regs}, b desc")
                    "register_a_n": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k\d+\S*\s+\{[^}]*\},\s*\{", ptx)))})
print(json.dumps(results))
"""


def test_kernels_compile_for_sm90_at_every_tuned_config():
    """Forward, dQ and dK/dV at every configuration of their tuned spaces (the defaults are
    among them), head dim 128 in bf16 and 64 in fp16 with packed documents, with the output stores
    the launches choose (row-major or from the MMA layout: both for dK/dV at head dim 64)."""
    cases = []
    for kind in ("fwd_sm90", "fwd_sm90_ws", "dq_sm90", "dkdv_sm90"):
        for cfg in autotune._SPACE[kind]:
            for head_dim, dtype, varlen in ((128, "bf16", False), (64, "fp16", True)):
                for row_major in sorted({autotune.row_major_store(kind, head_dim, e) for e in (64, 16384)}):
                    cases.append((kind, cfg, head_dim, dtype, varlen, row_major))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for case, res in zip(cases, results):
        assert res["cubin"] > 0, f"{case}: no SM90 binary"
        assert res["wgmma"], f"{case}: the kernel must use warpgroup MMAs"
        assert res["shared"] <= 227 * 1024, f"{case}: more shared memory than an SM90 block may have"
        if case[0] == "fwd_sm90_ws":  # two consumer warpgroups and the producer's: 24 + 240 + 240 registers
            assert res["warps"] == 12 and {"24", "240"} <= set(res["setmaxnreg"]), (case, res)
        if case[0] == "dq_sm90" and case[2] == 128:  # dS always from registers; Q (S's A, N = 64 keys) too
            assert "128" in res["register_a_n"], (case, res)
            assert ("64" in res["register_a_n"]) == (case[1][1] == 64), (case, res)
        if case[0] == "dkdv_sm90":  # P^T, dS^T always from registers; K (S^T's A, N = query step) at 32 x 128
            (bm, *_), head_dim = case[1], case[2]
            assert str(head_dim) in res["register_a_n"], (case, res)
            if bm != head_dim:  # (else dV's and dK's N is the same number)
                assert (str(bm) in res["register_a_n"]) == (bm == 32 and head_dim == 128), (case, res)


def test_fixed_configs_are_in_the_tuned_spaces(monkeypatch):
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    for kind in ("fwd_sm90", "fwd_sm90_ws", "dq_sm90", "dkdv_sm90"):
        for extent in (64, 4096, 65536):
            assert tuple(vars(autotune.fixed_config(kind, 128, extent)).values()) in autotune._SPACE[kind], kind


@pytest.mark.parametrize("feature", ["gluon_fwd", "gluon_ws", "gluon_fwd,gluon_ws"])
def test_forced_gluon_forward_falls_back_where_it_cannot_run(feature, monkeypatch):
    """Forced ``gluon_fwd`` or ``gluon_ws`` in the interpreter (or on CPU tensors): the Triton
    forward runs, with the same numbers as without the feature, and no Gluon launcher is called."""
    spec = BandSpec("spattention", 4, 40)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g) for _ in range(3))  # [B, T, H, D]
    monkeypatch.delenv(ENV, raising=False)
    want = triton_band_attention(q, k, v, spec)
    calls = []
    monkeypatch.setattr(launch, "run_forward_sm90", lambda *a: calls.append(a))
    monkeypatch.setattr(launch, "run_forward_sm90_ws", lambda *a: calls.append(a))
    monkeypatch.setenv(ENV, feature)
    assert torch.equal(triton_band_attention(q, k, v, spec), want)
    assert calls == []


def test_warp_specialized_forward_is_taken_first_where_it_can_run(monkeypatch):
    """With ``gluon_ws`` and ``gluon_fwd`` both chosen and the call able to take a Gluon kernel,
    the warp-specialized launcher runs and the one-warpgroup one does not."""
    spec = BandSpec("spattention", 4, 40)
    q, k, v = (torch.randn(2, 37, 4, 16) for _ in range(3))  # [B, T, H, D]
    calls = []
    monkeypatch.setattr(launch, "sm90_ok", lambda *a: True)
    monkeypatch.setattr(launch, "run_forward_sm90", lambda *a: calls.append("one_warpgroup"))
    monkeypatch.setattr(launch, "run_forward_sm90_ws", lambda *a: calls.append("warp_specialized"))
    monkeypatch.setenv(ENV, "gluon_fwd,gluon_ws")
    p = launch.Problem(q, k, spec, head_offset=0, q_offset=0, cu_seqlens=None, max_seqlen=37, scale=0.25)
    launch.run_forward(q, k, v, p)
    assert calls == ["warp_specialized"]
    calls.clear()
    monkeypatch.setenv(ENV, "gluon_fwd")
    launch.run_forward(q, k, v, p)
    assert calls == ["one_warpgroup"]
