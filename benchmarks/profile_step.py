"""One attention forward+backward per backend, for a profiler or a clock/power reading.

Two uses:

* Under Nsight Compute: ``ncu --profile-from-start off [sections] python benchmarks/profile_step.py
  --shape 2,16,16384,128 --pattern spattention --backends fa4,triton``. After a warmup, each
  backend runs one forward+backward between ``cudaProfilerStart`` and ``cudaProfilerStop``. That
  range is process-wide, so it also holds the backward kernels, which autograd launches from its
  own thread (an NVTX range pushed in the main thread would not).
* ``--clocks SECONDS``: each backend's forward, then its forward+backward, is looped for
  SECONDS while ``nvidia-smi`` samples the SM clock, the power draw and the active clock-event
  (throttle) reasons every 50 ms. The line printed per workload gives the ``do_bench`` time next
  to the median clock and power. A GPU held at its power limit runs at the clock its power
  allows, so at a given power a kernel that does less work finishes sooner.

Runs on a CPU too (``--device cpu``, no profiler range, no clock reading), which is how the
tests exercise it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from olmoe_spattn import BandSpec, band_attention
from olmoe_spattn.bench.kernel import parse_shapes

SMI_FIELDS = "clocks.sm,power.draw,clocks_event_reasons.active"


def make_step(shape: tuple[int, int, int, int], pattern: str, backend: str, device: str,
              dtype: torch.dtype) -> tuple[Callable[[], torch.Tensor], Callable[[], tuple[torch.Tensor, ...]],
                                           tuple[torch.Tensor, ...]]:
    """The forward and the forward+backward (returning dQ, dK, dV) of one backend, and their inputs
    ``(q, k, v, grad_out)``: seeded random ``[B, T, H, D]`` tensors."""
    b, h, t, d = shape
    spec = BandSpec(pattern, h, t)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(b, t, h, d, device=device, dtype=dtype, generator=gen)

    def forward() -> torch.Tensor:
        return band_attention(q, k, v, spec, backend=backend)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(forward(), (q, k, v), grad_out)

    return forward, forward_backward, (q, k, v, grad_out)


def sample_clocks(fn: Callable, seconds: float) -> dict[str, object]:
    """Loops ``fn`` for ``seconds`` while ``nvidia-smi`` samples; medians of the last 3/4 of samples."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "smi.csv"
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits",
                                "-lms", "50", "-f", str(log)])
        start = time.time()
        while time.time() - start < seconds:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        smi.terminate()
        smi.wait()
        rows = [line.split(", ") for line in log.read_text().strip().splitlines()]
    rows = rows[len(rows) // 4:]  # the clock settles during the first quarter
    if not rows:
        raise RuntimeError("nvidia-smi returned no samples")
    return {
        "sm_mhz": statistics.median(float(r[0]) for r in rows),
        "power_w": statistics.median(float(r[1]) for r in rows),
        "reasons": sorted({r[2] for r in rows}),
    }


def _one_shape(text: str) -> tuple[int, int, int, int]:
    shapes = parse_shapes(text)
    if len(shapes) != 1:
        raise argparse.ArgumentTypeError(f"--shape takes one B,H,T,D shape, got {text!r}")
    return shapes[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shape", default="2,16,16384,128", type=_one_shape, help="B,H,T,D (default: %(default)s)")
    parser.add_argument("--pattern", default="spattention", help="band pattern (default: %(default)s)")
    parser.add_argument("--backends", default="fa4,triton",
                        help="comma-separated band_attention backends (default: %(default)s)")
    parser.add_argument("--clocks", type=float, default=0.0, metavar="SECONDS",
                        help="loop each workload this long while sampling clocks and power (CUDA only)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    shape = args.shape
    label_shape = ",".join(map(str, shape))
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; use --device cpu")
    if args.clocks and not cuda:
        parser.error("--clocks reads nvidia-smi: it needs --device cuda")
    dtype = getattr(torch, args.dtype)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    steps = {name: make_step(shape, args.pattern, name, args.device, dtype) for name in backends}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _, step, _ in steps.values():  # compile and autotune outside the profiled range
        for _ in range(3):
            step()
    sync()
    if args.clocks:
        import triton.testing

        for name, (forward, step, _) in steps.items():
            for label, fn in (("fwd", forward), ("fwd+bwd", step)):
                reading = sample_clocks(fn, args.clocks)
                ms = triton.testing.do_bench(fn, warmup=50, rep=300)
                print(f"{label_shape} {args.pattern} {name} {label}: {ms:.3f} ms, SM {reading['sm_mhz']:.0f} MHz, "
                      f"{reading['power_w']:.1f} W, reasons {','.join(reading['reasons'])}", flush=True)
        return
    if cuda:
        torch.cuda.profiler.start()
    for name, (_, step, _) in steps.items():
        step()
        sync()
        print(f"{label_shape} {args.pattern} {name}: one forward+backward done", flush=True)
    if cuda:
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
