# ruff: noqa: B023, B007
"""Throwaway timing of the Triton band kernel vs cuDNN dense causal SDPA (and Flex).

    PYTHONPATH=. python benchmarks/scratch_bench.py [--flex] [--sweep] [--shapes 8,16,4096,128;...]

Prints median ms (triton.testing.do_bench) of forward and forward+backward, side by
side in one process, the ratios, TFLOP/s on the allowed pairs, and with ``--sweep`` the
per-kernel time of every launch configuration (forward, dQ, dK/dV) on each shape.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from olmoe_spattn import BandSpec  # noqa: E402
from olmoe_spattn.kernels import triton_band_attention  # noqa: E402


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=50, rep=rep, return_mode="median")


def loop_ms(fn, n=50):
    """Steady-state ms per call of ``n`` back-to-back calls (no cache flush; host can run ahead)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def fwd_bwd(f, q, k, v, g):
    def step():
        q.grad = k.grad = v.grad = None
        f(q, k, v).backward(g)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8,16,4096,128;32,16,1024,64;2,16,16384,128")
    ap.add_argument("--patterns", default="exclusive_bands,spattention,sliding_window,dense")
    ap.add_argument("--flex", action="store_true")
    ap.add_argument("--flex-patterns", default="exclusive_bands,spattention")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--loop", action="store_true", help="also time 50 back-to-back fwd+bwd steps")
    ap.add_argument("--decode", action="store_true", help="only time decode steps (Tq=1) vs SDPA")
    ap.add_argument("--overhead", action="store_true", help="only time host-side costs on (32,16,1024,64)")
    ap.add_argument("--no-bwd", action="store_true")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"# {dev}, torch {torch.__version__}, triton {triton.__version__}, "
          f"autotune={os.environ.get('OLMOE_SPATTN_AUTOTUNE', '1')}")
    if args.decode:
        decode_bench()
        return
    if args.overhead:
        overhead_bench()
        return
    rows = []
    for shape in args.shapes.split(";"):
        b, h, t, d = (int(x) for x in shape.split(","))
        q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        gt = g.transpose(1, 2).contiguous()

        def cudnn(q_, k_, v_):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True)

        dense_f = bench(lambda: cudnn(qt, kt, vt))
        dense_fb = None if args.no_bwd else bench(fwd_bwd(cudnn, qt, kt, vt, gt))
        print(f"\n## B={b} H={h} T={t} D={d}   cudnn dense causal: fwd {dense_f:.3f} ms  fwd+bwd {dense_fb or 0:.3f} ms")
        for pat in args.patterns.split(","):
            spec = BandSpec(pat, h, t)
            pairs = sum(spec.covered_pairs(t)) * b
            ours = lambda q_, k_, v_, spec=spec: triton_band_attention(q_, k_, v_, spec)  # noqa: E731
            with torch.no_grad():
                f_ms = bench(lambda: ours(q, k, v))
            fb_ms = None if args.no_bwd else bench(fwd_bwd(ours, q, k, v, g))
            line = (f"{pat:16s} ours fwd {f_ms:.3f} ms ({4 * d * pairs / f_ms / 1e9:.0f} TF/s, {dense_f / f_ms:.2f}x cudnn)")
            if fb_ms:
                line += (f" | fwd+bwd {fb_ms:.3f} ms ({3.5 * 4 * d * pairs / fb_ms / 1e9:.0f} TF/s, "
                         f"{dense_fb / fb_ms:.2f}x cudnn)")
            if args.loop and fb_ms:
                line += (f" | loop fwd+bwd ours {loop_ms(fwd_bwd(ours, q, k, v, g)):.3f} "
                         f"cudnn {loop_ms(fwd_bwd(cudnn, qt, kt, vt, gt)):.3f}")
            flex_f = flex_fb = None
            if args.flex and pat in args.flex_patterns.split(","):
                from olmoe_spattn.flex import flex_band_attention

                fl = lambda q_, k_, v_, spec=spec: flex_band_attention(q_, k_, v_, spec)  # noqa: E731
                with torch.no_grad():
                    flex_f = bench(lambda: fl(q, k, v))
                flex_fb = None if args.no_bwd else bench(fwd_bwd(fl, q, k, v, g))
                line += f" | flex fwd {flex_f:.3f} ({flex_f / f_ms:.2f}x)"
                if flex_fb:
                    line += f" fwd+bwd {flex_fb:.3f} ({flex_fb / fb_ms:.2f}x)"
            print(line, flush=True)
            rows.append((shape, pat, f_ms, fb_ms, dense_f, dense_fb, flex_f, flex_fb))
            if args.sweep:
                sweep(q, k, v, g, spec)
            if args.profile:
                profile(q, k, v, g, spec)
    from olmoe_spattn.kernels import autotune

    for (kind, key), cfg in autotune.TUNED.items():
        print(f"# tuned {kind} {key[:6]}: {cfg}")
    print("\n| shape | pattern | ours fwd | ours fwd+bwd | cudnn fwd+bwd | x cudnn | flex fwd+bwd | x flex |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, pat, f_ms, fb_ms, df, dfb, ff, ffb in rows:
        fb = fb_ms or float("nan")
        print(f"| {shape} | {pat} | {f_ms:.3f} | {fb:.3f} | {dfb or float('nan'):.3f} | "
              f"{(dfb or float('nan')) / fb:.2f} | {ffb or float('nan'):.3f} | {(ffb or float('nan')) / fb:.2f} |")


def sweep(q, k, v, g, spec):
    """Per-kernel time of every configuration in the tuned space (autotuning off)."""
    from olmoe_spattn.kernels import autotune, launch
    from olmoe_spattn.kernels.op import _problem

    old = os.environ.get("OLMOE_SPATTN_AUTOTUNE")
    os.environ["OLMOE_SPATTN_AUTOTUNE"] = "0"
    b, t, h, d = q.shape
    p = _problem(q, k, None, spec.pattern, spec.n_heads, int(spec.partition_len), 0, 0, -1, d**-0.5)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = launch.run_forward(qd, kd, vd, p)
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(qd), torch.empty_like(kd), torch.empty_like(vd)
    launch.run_dq(g, qd, kd, vd, out, lse, None, delta, dq, p)
    real = autotune.fixed_config
    calls = {
        "fwd": lambda: launch.run_forward(qd, kd, vd, p),
        "dq": lambda: launch.run_dq(g, qd, kd, vd, out, lse, None, delta, dq, p),
        "dkdv": lambda: launch.run_dkdv(g, qd, kd, vd, lse, delta, dk, dv, p),
    }
    raw = bench(lambda: launch.run_backward(g, qd, kd, vd, *launch.run_forward(qd, kd, vd, p), p), rep=50)
    print(f"   raw launches fwd+bwd (fixed configs, no autograd) {raw:.3f} ms")
    for kind, space in autotune._SPACE.items():
        res = []
        for cfg_t in space:
            cfg = autotune.LaunchConfig(*cfg_t)
            if autotune._smem_bytes(kind, cfg, p.block_d) > 200 * 1024:
                continue
            launch.fixed_config = lambda k_, dd, e, kind=kind, cfg=cfg: cfg if k_ == kind else real(k_, dd, e)
            try:
                res.append((bench(calls[kind], rep=50), cfg_t))
            except Exception as exc:  # noqa: BLE001
                res.append((float("inf"), f"{cfg_t} {type(exc).__name__}"))
        launch.fixed_config = real
        print(f"   {kind:5s} " + "  ".join(f"{c}:{ms:.3f}" for ms, c in sorted(res, key=lambda r: r[0])))
    if old is None:
        os.environ.pop("OLMOE_SPATTN_AUTOTUNE")
    else:
        os.environ["OLMOE_SPATTN_AUTOTUNE"] = old


def overhead_bench():
    """Where a small shape's forward+backward time goes: autograd floor, launches, our path."""
    import time

    from olmoe_spattn.kernels import launch
    from olmoe_spattn.kernels.op import _problem

    class Ident(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g

    b, h, t, d = 32, 16, 1024, 64
    spec = BandSpec("exclusive_bands", h, t)
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    p = _problem(q, k, None, spec.pattern, h, t, 0, 0, -1, d**-0.5)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    x = torch.randn(16, device="cuda", requires_grad=True)

    def host_us(fn, n=200):
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / n * 1e6

    cases = {
        "autograd.Function identity fwd+bwd": lambda: Ident.apply(x).sum().backward(),
        "raw fwd launch (1 kernel)": lambda: launch.run_forward(qd, kd, vd, p),
        "raw fwd+bwd launches (3 kernels)": lambda: launch.run_backward(g, qd, kd, vd, *launch.run_forward(qd, kd, vd, p), p),
        "ours no_grad fwd": lambda: triton_band_attention(qd, kd, vd, spec),
        "ours fwd+bwd (autograd)": fwd_bwd(lambda a, b_, c: triton_band_attention(a, b_, c, spec), q, k, v, g),
    }
    print("\n| case | host us/call (enqueue only, GPU may lag) | do_bench ms |")
    print("|---|---|---|")
    for name, fn in cases.items():
        print(f"| {name} | {host_us(fn):.0f} | {bench(fn, rep=100):.3f} |", flush=True)


def decode_bench():
    """One decode step (Tq = 1 against a KV cache of Tk keys) vs SDPA's dense decode."""
    from olmoe_spattn.kernels import launch
    from olmoe_spattn.kernels.op import _problem

    print("\n| B | H/Hkv | Tk | pattern | ours ms | ours loop ms | raw launch ms | sdpa dense ms | x sdpa |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, h, hkv, tk in ((64, 16, 16, 2048), (8, 16, 16, 4096), (8, 16, 4, 16384), (1, 16, 16, 16384)):
        q = torch.randn(b, 1, h, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, tk, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        sd = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=h != hkv))
        for pat in ("dense", "spattention", "exclusive_bands"):
            spec = BandSpec(pat, h, 16384)
            ms = bench(lambda: triton_band_attention(q, k, v, spec))
            lp = loop_ms(lambda: triton_band_attention(q, k, v, spec))
            p = _problem(q, k, None, pat, h, 16384, 0, tk - 1, -1, 128**-0.5)
            raw = bench(lambda: launch.run_forward(q, k, v, p))
            print(f"| {b} | {h}/{hkv} | {tk} | {pat} | {ms:.4f} | {lp:.4f} | {raw:.4f} | {sd:.4f} | {sd / ms:.2f} |",
                  flush=True)


def profile(q, k, v, g, spec):
    """Kernel and host time of a few forward+backward steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    step = fwd_bwd(lambda a, b_, c: triton_band_attention(a, b_, c, spec), q, k, v, g)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
