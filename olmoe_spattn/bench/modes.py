"""``bench sweep``, ``bench decode`` and ``bench overhead``: the Triton band kernel alone, on CUDA.

  sweep     every launch configuration of the tuned space (forward, dQ, dK/dV, dK/dV+dQ kernels,
            and on SM90 the Gluon forward, dQ and dK/dV kernels), per shape and pattern,
            autotuning off: the data behind the kernels' fixed choices;
            with --variants, instead the kernels with and without opt-in features
            (``OLMOE_SPATTN_TRITON_FEATURES``) side by side (``features.py``)
  decode    one decode step (one query against a KV cache of Tk keys) vs SDPA's dense decode
  overhead  where a small shape's forward+backward time goes: the autograd floor, the raw
            launches and the full path (also with every backward on the calling thread instead
            of the autograd engine's device thread), host (enqueue) time next to GPU time

Times are ``triton.testing.do_bench`` medians (L2 cache cleared before each call), printed
as Markdown tables (also written to --out when given).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..bands import PATTERNS
from .kernel import parse_shapes

FEATURES_ENV = "OLMOE_SPATTN_TRITON_FEATURES"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the three modes (``decode`` and ``overhead`` use fixed shapes)."""
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("8,16,4096,128;32,16,1024,64"),
                        help="sweep: ';'-separated B,H,T,D shapes (default 8,16,4096,128;32,16,1024,64)")
    parser.add_argument("--patterns", default="exclusive_bands,spattention",
                        help=f"sweep/decode: comma-separated patterns (allowed {','.join(PATTERNS)})")
    parser.add_argument("--rep-ms", type=float, default=50.0, help="do_bench repetition time per case (ms)")
    parser.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    parser.add_argument("--features", default=None,
                        help="sweep: ';'-separated OLMOE_SPATTN_TRITON_FEATURES values to time every config "
                             "under, e.g. 'none;tma_dq;tma_bwd' (default: the environment's)")
    parser.add_argument("--variants", default=None,
                        help="sweep: compare kernel feature variants instead of configs, e.g. "
                             "'default,tma,tma+flat,tma+flat@64x64x4x3' (features joined by '+', "
                             "optional forward config @BMxBNxWARPSxSTAGES)")
    parser.add_argument("--cases", default=None,
                        help="sweep --variants: ';'-separated B,H,T,D:pattern+pattern cases, timed in "
                             "this order (default: every --shapes x --patterns)")
    parser.add_argument("--rounds", type=int, default=2, help="sweep --variants: interleaved timing rounds")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="sweep --variants: skip the remaining cases once this many seconds have passed (0: no limit)")
    parser.add_argument("--json", default=None, help="sweep --variants: write the results as JSON here")


def _bench(fn, rep_ms: float) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def _fwd_bwd(fn, q, k, v, g):
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(g)

    return step


def _inputs(b: int, t: int, h: int, d: int, *, grad: bool = False, device: str = "cuda", dtype=None):
    import torch

    kw = dict(device=device, dtype=dtype or torch.bfloat16, requires_grad=grad)
    return tuple(torch.randn(b, t, h, d, **kw) for _ in range(3))  # q, k, v [B, T, H, D]


def sweep(shapes, patterns: list[str], rep_ms: float, device: str = "cuda",
          features: list[str] | None = None) -> list[str]:
    """Per-kernel ms of every configuration in the tuned space, fastest first; with
    ``features``, once per ``OLMOE_SPATTN_TRITON_FEATURES`` value (rows labelled with it)."""
    import torch

    from ..bands import BandSpec
    from ..kernels import autotune, launch
    from ..kernels.op import _problem
    from .features import overridden

    lines = ["| B,H,T,D | pattern | kernel | features | config (block_m, block_n, warps, stages): ms, fastest first |",
             "|---|---|---|---|---|"]
    feature_values = features or [os.environ.get(FEATURES_ENV) or "auto"]
    with overridden({"OLMOE_SPATTN_AUTOTUNE": "0"}):
        for b, h, t, d in shapes:
            q, k, v = _inputs(b, t, h, d, device=device, dtype=None if device == "cuda" else torch.float32)
            g = torch.randn_like(q)
            for pattern in patterns:
                spec = BandSpec(pattern, h, t)
                p = _problem(q, k, None, pattern, h, t, 0, 0, -1, d**-0.5)
                out, lse = launch.run_forward(q, k, v, p)
                delta = torch.empty_like(lse)
                dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                launch.run_dq(g, q, k, v, out, lse, None, delta, dq, p)
                dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # [B, T, H, D]
                calls = {  # the closures run within this iteration
                    "fwd": lambda: launch.run_forward(q, k, v, p),  # noqa: B023
                    "dq": lambda: launch.run_dq(g, q, k, v, out, lse, None, delta, dq, p),  # noqa: B023
                    "dkdv": lambda: launch.run_dkdv(g, q, k, v, lse, delta, dk, dv, p),  # noqa: B023
                    "dkdvdq": lambda: launch.run_dkdv(g, q, k, v, lse, delta, dk, dv, p, dq_acc=dq_acc),  # noqa: B023
                }
                if launch.sm90_ok(p, q, k, v):  # the Gluon Hopper kernels, called directly
                    out2, lse2 = torch.empty_like(out), torch.empty_like(lse)
                    calls.update({
                        "fwd_sm90": lambda: launch.run_forward_sm90(q, k, v, out2, lse2, p),  # noqa: B023
                        "fwd_sm90_ws": lambda: launch.run_forward_sm90_ws(q, k, v, out2, lse2, p),  # noqa: B023
                        "dq_sm90": lambda: launch.run_dq_sm90(g, q, k, v, out, lse, None, delta, dq, p),  # noqa: B023
                        "dkdv_sm90": lambda: launch.run_dkdv_sm90(g, q, k, v, lse, delta, dk, dv, p),  # noqa: B023
                    })
                for kind, space in autotune._SPACE.items():
                    if kind not in calls:  # a kernel kind this sweep does not know how to call
                        continue
                    for feats in feature_values:
                        res = []
                        for cfg_t in space:
                            cfg = autotune.LaunchConfig(*cfg_t)
                            if autotune._smem_bytes(kind, cfg, p.block_d) > 200 * 1024:
                                continue
                            try:
                                with overridden({FEATURES_ENV: feats}, {kind: cfg}):
                                    res.append((_bench(calls[kind], rep_ms), str(cfg_t)))
                            except Exception as exc:  # noqa: BLE001 - a config that does not fit is listed
                                res.append((float("inf"), f"{cfg_t} {type(exc).__name__}"))
                        cells = "  ".join(f"{c}: {ms:.3f}" for ms, c in sorted(res, key=lambda r: r[0]))
                        lines.append(f"| {b},{h},{t},{d} | {spec.pattern} | {kind} | {feats} | {cells} |")
                        print(lines[-1], flush=True)
    return lines


def decode(patterns: list[str], rep_ms: float) -> list[str]:
    """One decode step of the band kernel vs dense SDPA, for a few batch / cache sizes."""
    import torch
    import torch.nn.functional as F

    from ..bands import BandSpec
    from ..kernels import triton_band_attention

    lines = ["| B | H/Hkv | Tk | pattern | ours ms | sdpa dense ms | x sdpa |", "|---|---|---|---|---:|---:|---:|"]
    for b, h, hkv, tk in ((64, 16, 16, 2048), (8, 16, 16, 4096), (8, 16, 4, 16384), (1, 16, 16, 16384)):
        q = torch.randn(b, 1, h, 128, device="cuda", dtype=torch.bfloat16)  # [B, 1, H, D]
        k, v = (torch.randn(b, tk, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        dense = _bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=h != hkv), rep_ms)  # noqa: B023
        for pattern in ["dense", *patterns]:
            spec = BandSpec(pattern, h, 16384)
            ms = _bench(lambda: triton_band_attention(q, k, v, spec), rep_ms)  # noqa: B023
            lines.append(f"| {b} | {h}/{hkv} | {tk} | {pattern} | {ms:.4f} | {dense:.4f} | {dense / ms:.2f} |")
            print(lines[-1], flush=True)
    return lines


def on_calling_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every backward it runs on the calling thread
    (``torch.autograd.set_multithreading_enabled(False)``) instead of the autograd engine's device
    thread; the process's setting is restored after each call."""
    import torch

    def call():
        with torch.autograd.set_multithreading_enabled(False):
            return fn()

    return call


def overhead(rep_ms: float) -> list[str]:
    """Host time per call (enqueue only) and do_bench ms of the layers of one small call."""
    import torch

    from ..bands import BandSpec
    from ..kernels import launch, triton_band_attention
    from ..kernels.op import _problem
    from .timing import graph_replay

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    b, h, t, d = 32, 16, 1024, 64
    spec = BandSpec("exclusive_bands", h, t)
    q, k, v = _inputs(b, t, h, d, grad=True)
    g = torch.randn_like(q)
    p = _problem(q, k, None, spec.pattern, h, t, 0, 0, -1, d**-0.5)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    x = torch.randn(16, device="cuda", requires_grad=True)

    def host_us(fn, n: int = 200) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        seconds = time.perf_counter() - t0
        torch.cuda.synchronize()
        return seconds / n * 1e6

    cases = {
        "autograd.Function identity fwd+bwd": lambda: Identity.apply(x).sum().backward(),
        "raw fwd launch (1 kernel)": lambda: launch.run_forward(qd, kd, vd, p),
        "raw fwd+bwd launches (3 kernels)": lambda: launch.run_backward(g, qd, kd, vd, *launch.run_forward(qd, kd, vd, p), p),
        "ours no_grad fwd": lambda: triton_band_attention(qd, kd, vd, spec),
        "ours fwd+bwd (autograd)": _fwd_bwd(lambda a, b_, c: triton_band_attention(a, b_, c, spec), q, k, v, g),
    }
    cases["autograd.Function identity fwd+bwd, backward on the calling thread"] = on_calling_thread(
        cases["autograd.Function identity fwd+bwd"])
    cases["ours fwd+bwd (autograd), backward on the calling thread"] = on_calling_thread(
        cases["ours fwd+bwd (autograd)"])
    cases["ours fwd+bwd, CUDA graph replay"] = graph_replay(cases["ours fwd+bwd (autograd)"], q.device)
    lines = [f"B,H,T,D = {b},{h},{t},{d}, exclusive_bands", "",
             "| case | host us/call (enqueue only) | do_bench ms |", "|---|---:|---:|"]
    for name, fn in cases.items():
        lines.append(f"| {name} | {host_us(fn):.0f} | {_bench(fn, rep_ms):.3f} |")
        print(lines[-1], flush=True)
    return lines


def run(args: argparse.Namespace) -> int:
    """Runs the mode named by ``args.bench_kind`` and prints (and optionally writes) its table."""
    import torch

    features = [x.strip() for x in args.features.split(";")] if args.features else None
    for value in features or []:  # a bad name fails before anything runs
        if value != "auto":
            from ..kernels.launch import parse_features

            parse_features(value)
    if not torch.cuda.is_available():
        raise ValueError(f"bench {args.bench_kind} times the Triton kernel and needs a CUDA GPU")
    patterns = [x for x in args.patterns.split(",") if x]
    bad = [x for x in patterns if x not in PATTERNS]
    if bad:
        raise ValueError(f"unknown pattern(s) {bad}; allowed: {', '.join(PATTERNS)}")
    print(f"bench {args.bench_kind} on {torch.cuda.get_device_name()}", flush=True)
    if args.bench_kind == "sweep" and args.variants:
        from .features import parse_cases, parse_variants, run_variants

        variants = parse_variants(args.variants)
        if args.cases:
            cases = parse_cases(args.cases)
        else:
            cases = [(shape, pat) for shape in args.shapes for pat in patterns]
        lines = run_variants(cases, variants, rep_ms=args.rep_ms, rounds=args.rounds,
                             budget_s=args.budget_s, json_path=args.json)
    elif args.bench_kind == "sweep":
        lines = sweep(args.shapes, patterns, args.rep_ms, features=features)
    elif args.bench_kind == "decode":
        lines = decode(patterns, args.rep_ms)
    else:
        lines = overhead(args.rep_ms)
    if args.out:
        Path(args.out).write_text("\n".join([*results_header(args.bench_kind), *lines]) + "\n")
        print(f"wrote {args.out}")
    return 0


def results_header(kind: str) -> list[str]:
    """What a written table was measured on: GPU, date, command, versions (Markdown lines)."""
    import datetime as _dt
    import sys

    import torch
    import triton

    from .report import command_line

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"### bench {kind}: {gpu}, {date}",
        "",
        f"`{command_line(sys.argv, kind)}`  ",
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"OLMOE_SPATTN_TRITON_FEATURES={os.environ.get(FEATURES_ENV, 'auto (unset)')}",
        "",
    ]
