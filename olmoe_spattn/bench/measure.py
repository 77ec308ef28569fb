"""``bench kernel`` measurement: one shape's variants timed side by side, errors checked
against the reference, and the results gathered into :class:`~.report.Row` s."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..bands import BandSpec
from .kernel import BAND_BACKENDS, DENSE_BACKENDS, Shape
from .report import BWD_FLOP_FACTOR, DENSE_REF, FLEX_REF, Row, ratio, row_line
from .timing import Timing, describe_error, graph_replay, measure_interleaved, peak_memory_bytes
from .variants import AttnFn, build_band_fn, build_dense_fn, ours_backward, supports_backward


def allowed_pairs(spec: BandSpec | None, seq_len: int, n_heads: int) -> int:
    """Allowed (query, key) pairs over all heads; ``None`` spec = dense causal."""
    if spec is None:
        return n_heads * seq_len * (seq_len + 1) // 2
    return sum(spec.covered_pairs(seq_len)[:n_heads])


def attention_flops(pairs: int, batch: int, head_dim: int) -> float:
    """Forward matmul FLOPs over ``pairs`` allowed pairs: Q K^T and P V, 2 FLOPs per MAC."""
    return 4.0 * batch * head_dim * pairs


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
    cuda_graphs: bool = False
    autograd_threads: bool = True
    gc: bool = True  # Python's automatic garbage collection on while timing


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


def bench_group(
    fns: dict[str, AttnFn],
    tensors: tuple[torch.Tensor, ...],
    settings: Settings,
    device: torch.device,
    ref_name: str | None = None,
) -> tuple[dict[str, Timing], dict[str, Timing], dict[str, int | None], dict[str, str], dict[str, float]]:
    """Times ``fns`` side by side (forward, then forward+backward) and measures peak memory.

    With ``settings.check``, also returns each band variant's largest gradient error
    (max over dq, dk, dv of max |grad - ref grad|) against ``ref_name``'s gradients. With
    ``settings.cuda_graphs`` the timed calls are CUDA graph replays of the same steps; peak
    memory and errors come from eager calls either way.
    """
    q, k, v, dout = tensors
    kw = dict(
        device=device, warmup=settings.warmup, iters=settings.iters, rounds=settings.rounds,
        min_round_ms=settings.min_round_ms,
    )

    def timed(step: Callable[[], object]) -> Callable[[], object]:
        return graph_replay(step, device) if settings.cuda_graphs else step

    fwd = measure_interleaved({n: timed(_fwd(f, q, k, v)) for n, f in fns.items()}, **kw)
    bwd: dict[str, Timing] = {}
    peaks: dict[str, int | None] = {}
    notes: dict[str, str] = {}
    bwd_fns: dict[str, Callable[[], object]] = {}
    if settings.backward:
        for name, fn in fns.items():
            ok, why = supports_backward(name, device)
            if ok:
                bwd_fns[name] = _fwd_bwd(fn, q, k, v, dout)
            else:
                notes[name] = why
        bwd = measure_interleaved({n: timed(step) for n, step in bwd_fns.items()}, **kw)
        for name, step in bwd_fns.items():
            if bwd[name].error is None:
                try:
                    peaks[name] = peak_memory_bytes(step, device, inputs=(q, k, v, dout))
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
            if name == "ours" and settings.backward:
                row.extra["backward"] = ours_backward(spec, q, k, v, dout)
        for name, row in pattern_rows.items():
            if name in fns:
                # ratios against this pattern's flex and this group's cuDNN samples
                base = pattern_rows.get(FLEX_REF)
                if base is not None and name != FLEX_REF:
                    row.speedup_vs_flex_fwd = ratio(base.fwd_ms, row.fwd_ms)
                    row.speedup_vs_flex_fwdbwd = ratio(base.fwdbwd_ms, row.fwdbwd_ms)
                if f"dense:{DENSE_REF}" in fwd:
                    row.speedup_vs_cudnn_fwd = ratio(fwd[f"dense:{DENSE_REF}"].median_ms, row.fwd_ms)
                    if f"dense:{DENSE_REF}" in bwd:
                        row.speedup_vs_cudnn_fwdbwd = ratio(bwd[f"dense:{DENSE_REF}"].median_ms, row.fwdbwd_ms)
            rows.append(row)
            log(f"    {row_line(row)}")
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
                row.speedup_vs_cudnn_fwd = ratio(cudnn[0].median_ms, row.fwd_ms)
                row.speedup_vs_cudnn_fwdbwd = ratio(cudnn[1].median_ms, row.fwdbwd_ms)
            log(f"    {row_line(row)}")
        rows.append(row)
    del q, k, v, dout, tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
