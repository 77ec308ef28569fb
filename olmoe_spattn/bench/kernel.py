"""``olmoe-spattn bench kernel``: band attention kernels side by side, per shape and pattern.

For every shape ``(B, H, T, D)`` and band pattern it times, in one process and in
interleaved rounds, the forward and forward+backward of:

- ``ours``: the Triton band kernel (``band_attention(..., backend="triton")``),
- ``flex``: FlexAttention with the same mask (``backend="flex"``, compiled on CUDA),
- ``fa4``: FlashAttention-4 (``flash_attn.cute``) with the band as ``mask_mod`` plus
  block sparsity from Flex's ``BlockMask`` (only where FA4 is installed),
- ``torch``: masked SDPA (``backend="torch"``; the CPU default, dense ``[H, T, T]`` mask),

next to pattern-independent dense causal baselines: ``cudnn_dense`` and
``flash_dense`` (``scaled_dot_product_attention(is_causal=True)`` pinned to cuDNN or
FlashAttention-2) on CUDA, ``sdpa_dense`` (torch's default SDPA) anywhere. It reports
medians, ratios (vs flex, vs cuDNN dense), effective TFLOP/s counting only the
allowed (query, key) pairs, peak memory, and each variant's forward error against
the reference (Flex on CUDA, masked SDPA on CPU); then writes JSON, a Markdown table
and a PNG plot to ``benchmarks/results/<gpu-name-slug>/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..bands import DYNAMIC, PATTERNS, BandSpec
from .timing import Timing, describe_error, measure_interleaved, peak_memory_bytes, warm_up_device

Shape = tuple[int, int, int, int]  # (B, H, T, D)
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

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

BAND_BACKENDS: tuple[str, ...] = ("ours", "flex", "fa4", "torch")
DENSE_BACKENDS: tuple[str, ...] = ("cudnn_dense", "flash_dense", "sdpa_dense")
ALL_BACKENDS: tuple[str, ...] = BAND_BACKENDS + DENSE_BACKENDS
CUDA_DEFAULT_BACKENDS: tuple[str, ...] = ("ours", "flex", "fa4", "cudnn_dense", "flash_dense")
CPU_DEFAULT_BACKENDS: tuple[str, ...] = ("torch", "flex", "sdpa_dense")
#: ratio columns are computed against these rows of the same shape (and pattern)
FLEX_REF, DENSE_REF = "flex", "cudnn_dense"
#: forward+backward does 3.5x the forward's matmul work (2 forward GEMMs, 5 backward)
BWD_FLOP_FACTOR = 3.5
RESULT_STEM = "kernel_bench"


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


def _parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x for x in text.replace(" ", "").split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; allowed: {', '.join(allowed)}")
    return items


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
        help="';'-separated B,H,T,D shapes (default: the six issue shapes; --quick: two; "
        "--device cpu --quick: 1,4,128,32)",
    )
    parser.add_argument(
        "--patterns", type=lambda s: _parse_list(s, PATTERNS, "pattern"), default=list(DEFAULT_PATTERNS),
        help=f"comma-separated band patterns (default {','.join(DEFAULT_PATTERNS)}; allowed {','.join(PATTERNS)})",
    )
    parser.add_argument(
        "--backends", type=lambda s: _parse_list(s, ALL_BACKENDS, "backend"), default=None,
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
        "--time-budget", type=float, default=None,
        help="seconds; shapes/patterns not started by then are recorded as skipped (default: none)",
    )
    parser.add_argument(
        "--out-dir", default=None,
        help="where to write kernel_bench.{json,md,png} (default benchmarks/results/<gpu-name-slug>/)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG plot")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")


# ---------------------------------------------------------------- results
@dataclass
class Row:
    """One measured (shape, pattern, backend) cell; times in ms, memory in MiB."""

    shape: list[int]
    pattern: str
    backend: str
    partition_len: int | str | None
    status: str = "ok"
    note: str = ""
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_spread: float | None = None
    fwdbwd_spread: float | None = None
    tflops_fwd: float | None = None
    tflops_fwdbwd: float | None = None
    speedup_vs_flex_fwd: float | None = None
    speedup_vs_flex_fwdbwd: float | None = None
    speedup_vs_cudnn_fwd: float | None = None
    speedup_vs_cudnn_fwdbwd: float | None = None
    peak_mib: float | None = None
    io_mib: float | None = None
    peak_over_io: float | None = None
    max_err: float | None = None
    max_grad_err: float | None = None
    extra: dict = field(default_factory=dict)


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (folder name for results)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def device_name(device: torch.device) -> str:
    """Human-readable name of the device the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def allowed_pairs(spec: BandSpec | None, seq_len: int, n_heads: int) -> int:
    """Allowed (query, key) pairs over all heads; ``None`` spec = dense causal."""
    if spec is None:
        return n_heads * seq_len * (seq_len + 1) // 2
    return sum(spec.covered_pairs(seq_len)[:n_heads])


def attention_flops(pairs: int, batch: int, head_dim: int) -> float:
    """Forward matmul FLOPs over ``pairs`` allowed pairs: Q K^T and P V, 2 FLOPs per MAC."""
    return 4.0 * batch * head_dim * pairs


# ---------------------------------------------------------------- variants
def _dense_sdpa_fn(kind: str) -> AttnFn:
    """Dense causal SDPA on ``[B, T, H, D]`` tensors, pinned to one SDPA backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pinned = {"cudnn_dense": SDPBackend.CUDNN_ATTENTION, "flash_dense": SDPBackend.FLASH_ATTENTION}.get(kind)

    def fn(q, k, v):
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, T, D] views
        if pinned is None:
            out = F.scaled_dot_product_attention(*args, is_causal=True)
        else:
            with sdpa_kernel(pinned):
                out = F.scaled_dot_product_attention(*args, is_causal=True)
        return out.transpose(1, 2)  # [B, T, H, D]

    return fn


def triton_status() -> tuple[bool, str]:
    """Whether our Triton kernel is importable (``olmoe_spattn.kernels.triton_band_attention``)."""
    try:
        from ..kernels import triton_band_attention  # noqa: F401
    except Exception as err:  # noqa: BLE001 - missing module or a broken partial kernel
        return False, f"not available ({describe_error(err)})"
    return True, "ok"


def build_band_fn(
    backend: str, spec: BandSpec, shape: Shape, device: torch.device, fa4_ok: tuple[bool, str]
) -> tuple[AttnFn | None, str]:
    """(function, "ok") for a band backend, or (None, reason it cannot run here)."""
    from ..api import band_attention

    b, h, t, d = shape
    if backend == "ours":
        ok, why = triton_status()
        if not ok:
            return None, why
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return None, "not available (Triton needs CUDA or TRITON_INTERPRET=1)"
        return (lambda q, k, v: band_attention(q, k, v, spec, backend="triton")), "ok"
    if backend == "flex":
        return (lambda q, k, v: band_attention(q, k, v, spec, backend="flex")), "ok"
    if backend == "torch":
        mask_bytes = 10 * h * t * t  # bool mask + the float bias SDPA may expand it to
        if device.type == "cuda" and mask_bytes > 0.4 * torch.cuda.mem_get_info(device)[0]:
            return None, f"skipped: dense [H,T,T] mask needs ~{mask_bytes / 2**30:.0f} GiB"
        return (lambda q, k, v: band_attention(q, k, v, spec, backend="torch")), "ok"
    if backend == "fa4":
        if not fa4_ok[0]:
            return None, f"not available ({fa4_ok[1]})"
        from .fa4 import make_fa4_band_fn

        try:
            return make_fa4_band_fn(spec, t, h, device), "ok"
        except Exception as err:  # noqa: BLE001
            return None, f"error: {describe_error(err)}"
    raise ValueError(f"unknown band backend {backend!r}; allowed: {', '.join(BAND_BACKENDS)}")


def build_dense_fn(backend: str, device: torch.device) -> tuple[AttnFn | None, str]:
    """(function, "ok") for a dense causal baseline, or (None, reason)."""
    if backend in ("cudnn_dense", "flash_dense") and device.type != "cuda":
        return None, "not available (needs CUDA)"
    return _dense_sdpa_fn(backend), "ok"


# ---------------------------------------------------------------- one shape
@dataclass
class Settings:
    """Resolved run settings (also recorded in the JSON)."""

    device: str
    dtype: str
    warmup: int
    iters: int
    rounds: int
    backward: bool
    check: bool
    partition_len: int | str
    time_budget_s: float | None
    seed: int = 0
    min_round_ms: float = 0.0


def _fwd_bwd(fn: AttnFn, q, k, v, dout) -> Callable[[], object]:
    def step():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    return step


def _fwd(fn: AttnFn, q, k, v) -> Callable[[], object]:
    q, k, v = (x.detach() for x in (q, k, v))  # no autograd bookkeeping in forward timings

    def step():
        with torch.no_grad():
            return fn(q, k, v)

    return step


def _supports_backward(backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "flex" and device.type == "cpu":
        return False, "no CPU backward in torch's FlexAttention"
    return True, ""


def bench_group(
    fns: dict[str, AttnFn],
    tensors: tuple[torch.Tensor, ...],
    settings: Settings,
    device: torch.device,
    ref_name: str | None = None,
) -> tuple[dict[str, Timing], dict[str, Timing], dict[str, int | None], dict[str, str], dict[str, float]]:
    """Times ``fns`` side by side (forward, then forward+backward) and measures peak memory.

    With ``settings.check``, also returns each band variant's largest gradient error
    (max over dq, dk, dv of max |grad - ref grad|) against ``ref_name``'s gradients.
    """
    q, k, v, dout = tensors
    kw = dict(
        device=device, warmup=settings.warmup, iters=settings.iters, rounds=settings.rounds,
        min_round_ms=settings.min_round_ms,
    )
    fwd = measure_interleaved({n: _fwd(f, q, k, v) for n, f in fns.items()}, **kw)
    bwd: dict[str, Timing] = {}
    peaks: dict[str, int | None] = {}
    notes: dict[str, str] = {}
    bwd_fns: dict[str, Callable[[], object]] = {}
    if settings.backward:
        for name, fn in fns.items():
            ok, why = _supports_backward(name, device)
            if ok:
                bwd_fns[name] = _fwd_bwd(fn, q, k, v, dout)
            else:
                notes[name] = why
        bwd = measure_interleaved(bwd_fns, **kw)
        for name, step in bwd_fns.items():
            if bwd[name].error is None:
                try:
                    peaks[name] = peak_memory_bytes(step, device)
                except Exception as err:  # noqa: BLE001
                    notes[name] = f"peak memory: {describe_error(err)}"
    grad_errs = _grad_errs(bwd_fns, bwd, ref_name) if settings.backward and settings.check else {}
    return fwd, bwd, peaks, notes, grad_errs


def _grad_errs(steps: dict[str, Callable[[], object]], timings: dict[str, Timing], ref_name: str | None):
    """Largest |dq, dk, dv - reference| of each band variant (dense baselines left out)."""
    if ref_name is None or ref_name not in steps or timings[ref_name].error is not None:
        return {}
    try:
        ref = steps[ref_name]()
    except Exception:  # noqa: BLE001 - e.g. out of memory; the timings stand without it
        return {}
    errs = {ref_name: 0.0}
    for name, step in steps.items():
        if name == ref_name or name.startswith("dense:") or timings[name].error is not None:
            continue
        try:
            got = step()
            errs[name] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
        except Exception:  # noqa: BLE001 - the timing pass already reports failures
            continue
        del got
    return errs


def _max_err(fns: dict[str, AttnFn], ref_name: str | None, q, k, v) -> dict[str, float]:
    """Largest |out - ref| of each variant's forward against the reference variant's."""
    if ref_name is None or ref_name not in fns:
        return {}
    errs = {}
    q, k, v = (x.detach() for x in (q, k, v))
    with torch.no_grad():
        try:
            ref = fns[ref_name](q, k, v).float()
        except Exception:  # noqa: BLE001 - the timing pass reports the error
            return {}
        for name, fn in fns.items():
            try:
                errs[name] = float((fn(q, k, v).float() - ref).abs().max())
            except Exception:  # noqa: BLE001
                continue
    return errs


def _fill_timing(row: Row, fwd: Timing | None, bwd: Timing | None, flops_fwd: float) -> None:
    errors = []
    if fwd is not None:
        row.fwd_ms, row.fwd_spread = fwd.median_ms, fwd.spread
        if fwd.error:
            errors.append(f"fwd {fwd.error}")
    if bwd is not None:
        row.fwdbwd_ms, row.fwdbwd_spread = bwd.median_ms, bwd.spread
        if bwd.error:
            errors.append(f"fwd+bwd {bwd.error}")
    if row.fwd_ms:
        row.tflops_fwd = flops_fwd / (row.fwd_ms * 1e-3) / 1e12
    if row.fwdbwd_ms:
        row.tflops_fwdbwd = BWD_FLOP_FACTOR * flops_fwd / (row.fwdbwd_ms * 1e-3) / 1e12
    if errors:
        row.status = "error" if row.fwd_ms is None and row.fwdbwd_ms is None else "partial"
        row.note = "; ".join(errors)


def _ratio(base: float | None, mine: float | None) -> float | None:
    return base / mine if base and mine else None


def run_shape(
    shape: Shape,
    patterns: list[str],
    backends: list[str],
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    fa4_ok: tuple[bool, str],
    deadline: float | None,
    log: Callable[[str], None],
) -> list[Row]:
    """All rows of one shape: dense baselines once, band backends per pattern."""
    b, h, t, d = shape
    gen = torch.Generator(device="cpu").manual_seed(settings.seed)
    q, k, v, dout = (
        torch.randn(b, t, h, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        for _ in range(4)
    )  # [B, T, H, D]
    q, k, v = (x.requires_grad_(settings.backward) for x in (q, k, v))
    tensors = (q, k, v, dout)
    io_bytes = 8 * q.numel() * q.element_size()  # q k v out dout dq dk dv
    dense_names = [x for x in backends if x in DENSE_BACKENDS]
    band_names = [x for x in backends if x in BAND_BACKENDS]
    dense_fns: dict[str, AttnFn] = {}
    rows: list[Row] = []
    dense_rows: dict[str, Row] = {}
    for name in dense_names:
        fn, why = build_dense_fn(name, device)
        dense_rows[name] = Row(list(shape), "dense_causal", name, None)
        if fn is None:
            dense_rows[name].status, dense_rows[name].note = "n/a", why
        else:
            dense_fns[name] = fn
    dense_samples: dict[str, tuple[Timing, Timing]] = {n: (Timing(), Timing()) for n in dense_fns}
    dense_peaks: dict[str, int | None] = {}
    for pattern in patterns:
        if deadline is not None and time.monotonic() > deadline:
            for name in band_names:
                rows.append(Row(list(shape), pattern, name, None, "skipped", "time budget spent"))
            continue
        n_part = t if settings.partition_len == "seq" else settings.partition_len
        spec = BandSpec(pattern, h, n_part)
        fns: dict[str, AttnFn] = {}
        pattern_rows: dict[str, Row] = {}
        for name in band_names:
            row = Row(list(shape), pattern, name, n_part)
            pattern_rows[name] = row
            try:
                fn, why = build_band_fn(name, spec, shape, device, fa4_ok)
            except Exception as err:  # noqa: BLE001
                fn, why = None, f"error: {describe_error(err)}"
            if fn is None:
                row.status, row.note = ("n/a" if why.startswith("not available") else "skipped"), why
            else:
                fns[name] = fn
        ref = FLEX_REF if device.type == "cuda" else "torch"
        errs = {} if not settings.check else _max_err(fns, ref if ref in fns else None, q, k, v)
        group = {**fns, **{f"dense:{n}": f for n, f in dense_fns.items()}}
        t0 = time.monotonic()
        ref_name = ref if ref in fns else None
        fwd, bwd, peaks, notes, grad_errs = bench_group(group, tensors, settings, device, ref_name)
        log(f"  {pattern:<16} measured {len(group)} variants in {time.monotonic() - t0:.1f}s")
        for n in dense_fns:
            key = f"dense:{n}"
            dense_samples[n][0].samples_ms.extend(fwd[key].samples_ms)
            dense_samples[n][0].error = dense_samples[n][0].error or fwd[key].error
            if key in bwd:
                dense_samples[n][1].samples_ms.extend(bwd[key].samples_ms)
                dense_samples[n][1].error = dense_samples[n][1].error or bwd[key].error
            if peaks.get(key) is not None:
                dense_peaks[n] = peaks[key]
        flops = attention_flops(allowed_pairs(spec, t, h), b, d)
        for name, row in pattern_rows.items():
            if name not in fns:
                continue
            _fill_timing(row, fwd.get(name), bwd.get(name), flops)
            if name in notes:
                row.note = "; ".join(x for x in (row.note, notes[name]) if x)
            if peaks.get(name) is not None:
                row.peak_mib = peaks[name] / 2**20
                row.io_mib = io_bytes / 2**20
                row.peak_over_io = peaks[name] / io_bytes
            row.max_err = errs.get(name)
            row.max_grad_err = grad_errs.get(name)
        for name, row in pattern_rows.items():
            if name in fns:
                # ratios against this pattern's flex and this group's cuDNN samples
                base = pattern_rows.get(FLEX_REF)
                if base is not None and name != FLEX_REF:
                    row.speedup_vs_flex_fwd = _ratio(base.fwd_ms, row.fwd_ms)
                    row.speedup_vs_flex_fwdbwd = _ratio(base.fwdbwd_ms, row.fwdbwd_ms)
                if f"dense:{DENSE_REF}" in fwd:
                    row.speedup_vs_cudnn_fwd = _ratio(fwd[f"dense:{DENSE_REF}"].median_ms, row.fwd_ms)
                    if f"dense:{DENSE_REF}" in bwd:
                        row.speedup_vs_cudnn_fwdbwd = _ratio(bwd[f"dense:{DENSE_REF}"].median_ms, row.fwdbwd_ms)
            rows.append(row)
            log(f"    {_row_line(row)}")
    dense_flops = attention_flops(allowed_pairs(None, t, h), b, d)
    cudnn = dense_samples.get(DENSE_REF)
    for name, row in dense_rows.items():
        if name in dense_samples:
            f_t, b_t = dense_samples[name]
            _fill_timing(row, f_t, b_t if settings.backward else None, dense_flops)
            if not f_t.samples_ms and not f_t.error:
                row.status, row.note = "skipped", "time budget spent"
            if dense_peaks.get(name) is not None:
                row.peak_mib = dense_peaks[name] / 2**20
                row.io_mib = io_bytes / 2**20
                row.peak_over_io = dense_peaks[name] / io_bytes
            if cudnn is not None and name != DENSE_REF:
                row.speedup_vs_cudnn_fwd = _ratio(cudnn[0].median_ms, row.fwd_ms)
                row.speedup_vs_cudnn_fwdbwd = _ratio(cudnn[1].median_ms, row.fwdbwd_ms)
            log(f"    {_row_line(row)}")
        rows.append(row)
    del q, k, v, dout, tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _row_line(row: Row) -> str:
    return (
        f"{row.backend:<12} fwd {_fmt(row.fwd_ms)} ms  fwd+bwd {_fmt(row.fwdbwd_ms)} ms  "
        f"x cuDNN {_fmt(row.speedup_vs_cudnn_fwdbwd, '.2f')}  x flex {_fmt(row.speedup_vs_flex_fwdbwd, '.2f')}  "
        f"{_fmt(row.tflops_fwdbwd, '.0f')} TFLOP/s  {row.status} {row.note}"
    ).rstrip()


# ---------------------------------------------------------------- outputs
def _short_note(row: dict) -> str:
    """The row's note for tables: out-of-memory errors shortened to the size that did not fit."""
    note = row["note"]
    if "OutOfMemoryError" in note:
        m = re.search(r"Tried to allocate ([0-9.]+ [KMGT]iB)", note)
        note = f"out of memory (tried to allocate {m.group(1)})" if m else "out of memory"
    return note if row["status"] == "ok" else f"{row['status']}: {note}"


def summary_markdown(data: dict) -> list[str]:
    """Compact table: fwd+bwd ms of each band backend per (shape, pattern), cuDNN dense, ratios."""
    res = data["results"]
    band = [b for b in ("ours", "flex", "fa4", "torch") if any(r["backend"] == b for r in res)]
    cudnn = {tuple(r["shape"]): r for r in res if r["backend"] == DENSE_REF}
    cells = {(tuple(r["shape"]), r["pattern"], r["backend"]): r for r in res}
    keys = list(dict.fromkeys((tuple(r["shape"]), r["pattern"]) for r in res if r["pattern"] != "dense_causal"))
    if not keys:
        return []
    head = " | ".join(f"{b} ms" for b in band)
    lines = [
        "Summary, forward+backward ms (forward ms in brackets):",
        "",
        f"| B,H,T,D | pattern | {head} | cuDNN dense ms | ours vs flex | ours vs fa4 | ours vs cuDNN |",
        "|---|---|" + "---:|" * (len(band) + 4),
    ]

    def ms(r: dict | None) -> str:
        if r is None or (r["fwdbwd_ms"] is None and r["fwd_ms"] is None):
            if r is not None and "OutOfMemoryError" in r["note"]:
                return "OOM"
            return "n/a" if r is None or r["status"] == "n/a" else r["status"]
        return f"{_fmt(r['fwdbwd_ms'])} ({_fmt(r['fwd_ms'])})"

    def ratio(a: dict | None, b: dict | None) -> str:
        if not a or not b:
            return "-"
        x = _ratio(b["fwdbwd_ms"], a["fwdbwd_ms"])
        y = _ratio(b["fwd_ms"], a["fwd_ms"])
        return f"{_fmt(x, '.2f')} ({_fmt(y, '.2f')})" if (x or y) else "-"

    for shape, pattern in keys:
        mine = cells.get((shape, pattern, "ours"))
        row = [ms(cells.get((shape, pattern, b))) for b in band]
        lines.append(
            f"| {','.join(map(str, shape))} | {pattern} | " + " | ".join(row)
            + f" | {ms(cudnn.get(shape))} | {ratio(mine, cells.get((shape, pattern, 'flex')))}"
            f" | {ratio(mine, cells.get((shape, pattern, 'fa4')))} | {ratio(mine, cudnn.get(shape))} |"
        )
    longest = max(keys, key=lambda k: k[0][2])[0]
    mem = [r for r in res if tuple(r["shape"]) == longest and r["backend"] == "ours" and r["peak_over_io"]]
    if mem:
        lines += ["", f"Peak memory of ours at B,H,T,D = {','.join(map(str, longest))} (fwd+bwd, inputs, "
                  "outputs and gradients included) vs q,k,v,out,dout,dq,dk,dv (target: within 10%):"]
        lines += [f"- {r['pattern']}: {r['peak_mib']:.0f} MiB = {r['peak_over_io']:.3f} x {r['io_mib']:.0f} MiB"
                  for r in mem]
    return lines + [""]


def to_markdown(data: dict) -> str:
    """The results as Markdown: a header, a summary table, then every measured row."""
    lines = [
        f"### Kernel benchmark: {data['gpu']}, {data['date']}",
        "",
        f"`{data['command']}`  ",
        f"torch {data['torch']}, triton {data.get('triton') or '-'}, flash-attn-4 {data.get('fa4') or '-'}, "
        f"dtype {data['settings']['dtype']}, medians of {data['settings']['rounds']} interleaved rounds x "
        f">= {data['settings']['iters']} calls (>= {data['settings'].get('min_round_ms', 0):g} ms per round); "
        f"partition length N = {data['settings']['partition_len']}.",
        "Speedups are fwd+bwd (forward only in brackets); TFLOP/s count only allowed pairs "
        f"(fwd+bwd = {BWD_FLOP_FACTOR}x forward FLOPs); peak = max allocated during fwd+bwd, "
        "inputs included; io = q,k,v,out,dout,dq,dk,dv; max err = largest |output - reference| and "
        "|dq,dk,dv - reference| (reference: flex on CUDA, masked SDPA on CPU).",
        "",
        *summary_markdown(data),
        "All rows:",
        "",
        "| B,H,T,D | pattern | backend | fwd ms | fwd+bwd ms | vs flex | vs cuDNN dense | TFLOP/s fwd / fwd+bwd "
        "| peak MiB (x io) | max err out / grad | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["results"]:
        vs_flex = (
            f"{_fmt(r['speedup_vs_flex_fwdbwd'], '.2f')} ({_fmt(r['speedup_vs_flex_fwd'], '.2f')})"
            if r["backend"] != FLEX_REF and r["pattern"] != "dense_causal" else ""
        )
        vs_cudnn = (
            f"{_fmt(r['speedup_vs_cudnn_fwdbwd'], '.2f')} ({_fmt(r['speedup_vs_cudnn_fwd'], '.2f')})"
            if r["backend"] != DENSE_REF else "1.00"
        )
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} ({r['peak_over_io']:.2f})"
        note = _short_note(r)
        lines.append(
            f"| {','.join(map(str, r['shape']))} | {r['pattern']} | {r['backend']} | {_fmt(r['fwd_ms'])} "
            f"| {_fmt(r['fwdbwd_ms'])} | {vs_flex} | {vs_cudnn} "
            f"| {_fmt(r['tflops_fwd'], '.3g')} / {_fmt(r['tflops_fwdbwd'], '.3g')} | {peak} "
            f"| {_fmt(r['max_err'], '.1e')} / {_fmt(r.get('max_grad_err'), '.1e')} | {note.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path | None:
    """Bar chart: fwd+bwd (or forward) speedup over cuDNN dense causal, per shape and pattern."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["pattern"] != "dense_causal"]
    key = "speedup_vs_cudnn_fwdbwd" if any(r["speedup_vs_cudnn_fwdbwd"] for r in rows) else "speedup_vs_cudnn_fwd"
    if not any(r[key] for r in rows):  # no cuDNN (CPU): plot fwd+bwd or forward ms instead
        key = "fwdbwd_ms" if any(r["fwdbwd_ms"] for r in rows) else "fwd_ms"
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
    if not shapes:
        return None
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cols = min(3, len(shapes))
    n_rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(5.5 * cols, 3.8 * n_rows), squeeze=False)
    width = 0.8 / max(len(backends), 1)
    for ax, shape in zip(axes.flat, shapes):
        sub = [r for r in rows if tuple(r["shape"]) == shape]
        pats = list(dict.fromkeys(r["pattern"] for r in sub))
        for i, be in enumerate(backends):
            vals = [next((r[key] or 0.0 for r in sub if r["pattern"] == p and r["backend"] == be), 0.0) for p in pats]
            xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(pats))]
            bars = ax.bar(xs, vals, width, label=be)
            for bar, val in zip(bars, vals):
                if val:
                    ax.annotate(f"{val:.2g}", (bar.get_x() + bar.get_width() / 2, val), ha="center",
                                va="bottom", fontsize=6)
        if key.startswith("speedup"):
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(pats)))
        ax.set_xticklabels(pats, fontsize=7, rotation=15)
        ax.set_title("B,H,T,D = " + ",".join(map(str, shape)), fontsize=9)
        ax.set_ylabel({"speedup_vs_cudnn_fwdbwd": "fwd+bwd speedup vs cuDNN dense",
                       "speedup_vs_cudnn_fwd": "fwd speedup vs cuDNN dense"}.get(key, key), fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"SPAttention kernels, {data['gpu']}, {data['date']} ({data['settings']['dtype']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(data: dict, out_dir: Path, *, draw: bool) -> list[Path]:
    """Writes ``kernel_bench.json``, ``kernel_bench.md`` and (optionally) ``kernel_bench.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{RESULT_STEM}.json", out_dir / f"{RESULT_STEM}.md"]
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    paths[1].write_text(to_markdown(data))
    if draw:
        png = plot(data, out_dir / f"{RESULT_STEM}.png")
        if png is not None:
            paths.append(png)
    return paths


# ---------------------------------------------------------------- entry point
def _versions() -> dict[str, str | None]:
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
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    quick = args.quick
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
        "command": "olmoe-spattn bench kernel " + " ".join(sys.argv[sys.argv.index("kernel") + 1 :])
        if "kernel" in sys.argv else "olmoe-spattn bench kernel",
        **_versions(),
        "settings": asdict(settings),
        "backends": backends,
        "patterns": args.patterns,
        "availability": {"ours": ours_ok[1], "fa4": fa4_ok[1]},
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OLMOE_SPATTN_", "TRITON_INTERPRET"))},
        "results": [],
    }
    status = 0
    try:
        for shape in shapes:
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
        data["elapsed_s"] = round(time.monotonic() - start, 1)
        paths = write_outputs(data, out_dir, draw=not args.no_plot)
        log("wrote " + ", ".join(str(p) for p in paths))
    if not any(r["fwd_ms"] for r in data["results"]):
        log("error: no variant could be measured")
        status = 1
    return status
