"""``olmoe-spattn bench kernel``: band attention kernels side by side, per shape and pattern.

For every shape ``(B, H, T, D)`` and band pattern it times, in one process and in
interleaved rounds, the forward and forward+backward of:

- ``ours``: the Triton band kernel (``band_attention(..., backend="triton")``),
- ``flex``: FlexAttention with the same mask (``backend="flex"``, compiled on CUDA),
- ``fa4``: FlashAttention-4 (``band_attention(..., backend="fa4")``: the band as a
  ``mask_mod`` plus block-sparse tables; only where flash-attn-4 is installed),
- ``torch``: masked SDPA (``backend="torch"``; the CPU default, dense ``[H, T, T]`` mask),

next to pattern-independent dense causal baselines: ``cudnn_dense`` and
``flash_dense`` (``scaled_dot_product_attention(is_causal=True)`` pinned to cuDNN or
FlashAttention-2) on CUDA, ``sdpa_dense`` (torch's default SDPA) anywhere. It reports
medians, ratios (vs flex, vs cuDNN dense), effective TFLOP/s counting only the
allowed (query, key) pairs, peak memory, and each variant's forward error against
the reference (Flex on CUDA, masked SDPA on CPU); then writes JSON, a Markdown table
and a PNG plot to ``benchmarks/results/<gpu-name-slug>/`` (variants with no value are
labelled n/a, skipped or OOM in the plot). The measurement lives in :mod:`.measure`, the
variants in :mod:`.variants`, the outputs in :mod:`.report`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..bands import DYNAMIC, PATTERNS
from .table2 import name_list

if TYPE_CHECKING:  # torch loads when the benchmark runs, not for --help
    import torch

    from .measure import Settings

Shape = tuple[int, int, int, int]  # (B, H, T, D)

DEFAULT_SHAPES: tuple[Shape, ...] = (
    (8, 16, 4096, 128),
    (32, 16, 1024, 64),
    (32, 8, 1024, 128),
    (1, 8, 4096, 128),
    (2, 16, 16384, 128),
    (1, 16, 65536, 128),
)
QUICK_SHAPES: tuple[Shape, ...] = ((8, 16, 4096, 128), (2, 16, 16384, 128))
CPU_QUICK_SHAPES: tuple[Shape, ...] = ((1, 4, 128, 32),)
DEFAULT_PATTERNS: tuple[str, ...] = ("exclusive_bands", "spattention", "sliding_window", "dense")
#: the variants (see :mod:`.variants`); kept here so that --help needs no torch
BAND_BACKENDS: tuple[str, ...] = ("ours", "flex", "fa4", "torch")
DENSE_BACKENDS: tuple[str, ...] = ("cudnn_dense", "flash_dense", "sdpa_dense")
ALL_BACKENDS: tuple[str, ...] = BAND_BACKENDS + DENSE_BACKENDS
CUDA_DEFAULT_BACKENDS: tuple[str, ...] = ("ours", "flex", "fa4", "cudnn_dense", "flash_dense")
CPU_DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "flex", "sdpa_dense")


# ---------------------------------------------------------------- arguments
def parse_shapes(text: str) -> list[Shape]:
    """``"8,16,4096,128;32,16,1024,64"`` -> ``[(8, 16, 4096, 128), (32, 16, 1024, 64)]``."""
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        fields = part.lower().replace("x", ",").split(",")
        try:
            dims = tuple(int(x) for x in fields)
        except ValueError:
            dims = ()
        if len(dims) != 4 or min(dims) <= 0:
            raise argparse.ArgumentTypeError(
                f"shape {part!r} must be four positive integers B,H,T,D (e.g. 8,16,4096,128)"
            )
        shapes.append(dims)  # type: ignore[arg-type]
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes needs at least one B,H,T,D shape")
    return shapes


def _partition_len(text: str) -> int | str:
    if text in (DYNAMIC, "seq"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"partition length must be a positive integer, 'seq' or 'dynamic', got {text!r}"
        )
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``olmoe-spattn bench kernel``."""
    parser.add_argument(
        "--shapes", type=parse_shapes, default=None,
        help="';'-separated B,H,T,D shapes (default: six shapes from 1K to 64K tokens; --quick: two; "
        "--device cpu --quick: 1,4,128,32)",
    )
    parser.add_argument(
        "--patterns", type=lambda s: name_list(s, PATTERNS, "pattern"), default=list(DEFAULT_PATTERNS),
        help=f"comma-separated band patterns (default {','.join(DEFAULT_PATTERNS)}; allowed {','.join(PATTERNS)})",
    )
    parser.add_argument(
        "--backends", type=lambda s: name_list(s, ALL_BACKENDS, "backend"), default=None,
        help=f"comma-separated variants (default on CUDA {','.join(CUDA_DEFAULT_BACKENDS)}; "
        f"on CPU {','.join(CPU_DEFAULT_BACKENDS)}; allowed {','.join(ALL_BACKENDS)})",
    )
    parser.add_argument(
        "--partition-len", type=_partition_len, default="seq",
        help="partition length N: 'seq' (= T of each shape, the default), an integer, or 'dynamic'",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", default=None, choices=("bfloat16", "float16", "float32"),
        help="input dtype (default bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--fa4", dest="fa4", action="store_true", default=True,
                        help="include FlashAttention-4 rows when flash_attn.cute imports (default)")
    parser.add_argument("--no-fa4", dest="fa4", action="store_false", help="leave FlashAttention-4 out")
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--no-check", action="store_true", help="skip the forward error check vs the reference")
    parser.add_argument("--quick", action="store_true", help="short run: fewer shapes, rounds and repeats")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant (default 3; quick 2)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per round, at least (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument(
        "--min-round-ms", type=float, default=None,
        help="time each variant for at least this long per round, adding calls (default on CUDA 50, quick 20)",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help="time each call as the replay of a CUDA graph captured after warmup: GPU time without "
        "Python and launch costs (CUDA only; a variant that cannot be captured is reported as an error)",
    )
    parser.add_argument(
        "--no-autograd-threads", dest="autograd_threads", action="store_false", default=True,
        help="run every backward on the calling thread (torch.autograd.set_multithreading_enabled(False), "
        "as a process with one GPU can): without the autograd engine's device thread the host time of "
        "eager calls at short lengths roughly halves; all variants are timed this way",
    )
    parser.add_argument(
        "--no-gc", dest="gc", action="store_false", default=True,
        help="turn Python's automatic garbage collection off for the run, collecting before each shape "
        "instead (as OLMo-core's trainer does during training, and timeit while it times): in a process "
        "with many objects loaded, collections triggered mid-call add host time to eager calls at short "
        "lengths; all variants are timed this way",
    )
    parser.add_argument(
        "--time-budget", type=float, default=None,
        help="seconds; shapes/patterns not started by then are recorded as skipped (default: none)",
    )
    parser.add_argument(
        "--out-dir", default=None,
        help="where to write kernel_bench.{json,md,png} (default benchmarks/results/<gpu-name-slug>/)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    # defined here, not in olmoe_spattn.dispatch (which imports torch), so --help stays light
    parser.add_argument(
        "--write-dispatch", nargs="?", const="auto", default=None, metavar="PATH",
        help="write the backend='auto' dispatch table (triton vs fa4 per pattern, head_dim, band width) "
        "from this run's results to PATH (default: olmoe_spattn/dispatch/<gpu-slug>.json)",
    )
    parser.add_argument(
        "--dispatch-from", default=None, metavar="RESULTS_JSON",
        help="do not run: read an earlier run's kernel_bench.json and write its dispatch table "
        "(to --write-dispatch PATH, default the package's table of that GPU)",
    )


def device_name(device: torch.device) -> str:
    """Human-readable name of the device the benchmark runs on."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def _versions() -> dict[str, str | None]:
    import torch

    found: dict[str, str | None] = {"torch": torch.__version__, "triton": None, "fa4": None}
    try:
        import triton

        found["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        from importlib.metadata import version

        found["fa4"] = version("flash-attn-4")
    except Exception:  # noqa: BLE001
        pass
    return found


def resolve_settings(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, Settings, list[Shape], list[str]]:
    """Device, dtype, timing settings, shapes and backends from the parsed arguments."""
    import torch

    from .measure import Settings

    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    quick = args.quick
    cuda_graphs = args.cuda_graphs
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs captures CUDA graphs and needs --device cuda, got --device {device.type}")
    for opt in ("warmup", "iters", "rounds"):
        value = getattr(args, opt)
        if value is not None and (value < (0 if opt == "warmup" else 1)):
            raise ValueError(f"--{opt} must be {'>= 0' if opt == 'warmup' else '>= 1'}, got {value}")
    settings = Settings(
        device=device.type,
        dtype=dtype_name,
        warmup=args.warmup if args.warmup is not None else (2 if quick else 3),
        iters=args.iters if args.iters is not None else 3,
        rounds=args.rounds if args.rounds is not None else (2 if quick else 3),
        backward=not args.no_backward,
        check=not args.no_check,
        partition_len=args.partition_len,
        time_budget_s=args.time_budget,
        seed=args.seed,
        min_round_ms=args.min_round_ms if args.min_round_ms is not None else (
            (20.0 if quick else 50.0) if device.type == "cuda" else 0.0
        ),
        cuda_graphs=cuda_graphs,
        autograd_threads=args.autograd_threads,
        gc=args.gc,
    )
    if args.shapes:
        shapes = args.shapes
    elif quick:
        shapes = list(QUICK_SHAPES if device.type == "cuda" else CPU_QUICK_SHAPES)
    else:
        shapes = list(DEFAULT_SHAPES)
    for b, h, t, d in shapes:
        if isinstance(args.partition_len, int) and args.partition_len < h:
            raise ValueError(f"--partition-len {args.partition_len} is smaller than H={h} of shape {b},{h},{t},{d}")
    backends = list(args.backends or (CUDA_DEFAULT_BACKENDS if device.type == "cuda" else CPU_DEFAULT_BACKENDS))
    if not args.fa4 and "fa4" in backends:
        backends.remove("fa4")
    return device, dtype, settings, shapes, backends


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark and writes its results; returns the exit status."""
    import torch

    from ..dispatch import write as dispatch_write
    from .measure import run_shape
    from .report import PEAK_STEP, Row, command_line, gpu_slug, write_outputs
    from .timing import describe_error, warm_up_device
    from .variants import triton_status

    if getattr(args, "dispatch_from", None):
        return dispatch_write.run_from_results(args)
    device, dtype, settings, shapes, backends = resolve_settings(args)
    gpu = device_name(device)
    out_dir = Path(args.out_dir) if args.out_dir else Path("benchmarks") / "results" / gpu_slug(gpu)
    fa4_ok = (False, "left out (--no-fa4)")
    if "fa4" in backends:
        from .fa4 import fa4_available

        fa4_ok = fa4_available()
    ours_ok = triton_status()

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"bench kernel on {gpu}: {len(shapes)} shapes x {len(args.patterns)} patterns, backends "
        f"{','.join(backends)}, dtype {settings.dtype}")
    if "ours" in backends and not ours_ok[0]:
        log(f"  ours (Triton): {ours_ok[1]}")
    if "fa4" in backends and not fa4_ok[0]:
        log(f"  fa4: {fa4_ok[1]}")
    warm_up_device(device, 2.0)
    start = time.monotonic()
    deadline = start + settings.time_budget_s if settings.time_budget_s else None
    data = {
        "gpu": gpu,
        "device": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(sys.argv, "kernel"),
        **_versions(),
        "settings": asdict(settings),
        "peak_memory": PEAK_STEP,
        "backends": backends,
        "patterns": args.patterns,
        "availability": {"ours": ours_ok[1], "fa4": fa4_ok[1]},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OLMOE_SPATTN_", "TRITON_INTERPRET"))},
        "results": [],
    }
    status = 0
    gc_was_enabled = gc.isenabled()
    if not settings.gc:
        gc.disable()
    with torch.autograd.set_multithreading_enabled(settings.autograd_threads):  # restored on exit
        try:
            for shape in shapes:
                if not settings.gc:
                    gc.collect()
                if deadline is not None and time.monotonic() > deadline:
                    data["results"] += [
                        asdict(Row(list(shape), p, be, None, "skipped", "time budget spent"))
                        for p in args.patterns for be in backends if be in BAND_BACKENDS
                    ]
                    continue
                log(f"shape B,H,T,D = {','.join(map(str, shape))} ({time.monotonic() - start:.0f}s elapsed)")
                try:
                    rows = run_shape(shape, args.patterns, backends, settings, device, dtype, fa4_ok, deadline, log)
                except torch.cuda.OutOfMemoryError as err:
                    torch.cuda.empty_cache()
                    rows = [Row(list(shape), "-", "-", None, "skipped", f"out of memory: {describe_error(err)}")]
                data["results"] += [asdict(r) for r in rows]
                write_outputs(data, out_dir, draw=False)  # keep partial results if the run is cut short
        finally:
            if gc_was_enabled:
                gc.enable()
            data["elapsed_s"] = round(time.monotonic() - start, 1)
            paths = write_outputs(data, out_dir, draw=not args.no_plot)
            log("wrote " + ", ".join(str(p) for p in paths))
    dispatch_write.after_run(args, data, log)
    if not any(r["fwd_ms"] for r in data["results"]):
        log("error: no variant could be measured")
        status = 1
    return status
