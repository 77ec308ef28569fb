"""Timing and memory helpers for the benchmarks: interleaved medians and peak memory.

Run-to-run noise on the attention shapes is ~15%, so every variant of one shape is
timed in the same process, in interleaved rounds (variant A, B, C, then again in a
rotated order), and the median of all timed calls is reported. On CUDA each call is
bracketed by CUDA events; on CPU by ``time.perf_counter``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Timed calls of one variant, in milliseconds (``error`` set when it failed)."""

    samples_ms: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        """Median of the samples, or ``None`` when nothing was measured."""
        return statistics.median(self.samples_ms) if self.samples_ms else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the samples: a rough noise indicator."""
        if len(self.samples_ms) < 2:
            return None
        med = statistics.median(self.samples_ms)
        return (max(self.samples_ms) - min(self.samples_ms)) / med if med > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_error(err: BaseException) -> str:
    """One short line for a failed variant (exception type and first line of its message)."""
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(err).__name__}: {first[:200]}"


def _time_calls(fn: Callable[[], object], iters: int, device: torch.device) -> list[float]:
    """Times ``iters`` calls of ``fn`` one by one; returns milliseconds per call."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def warm_up_device(device: torch.device, seconds: float = 1.0) -> None:
    """Keeps the GPU busy with large matmuls for ``seconds`` so clocks ramp up before timing."""
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize(device)
    del a


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int = 3,
    iters: int = 5,
    rounds: int = 3,
    min_round_ms: float = 0.0,
    max_iters: int = 100,
) -> dict[str, Timing]:
    """Medians of every function in ``fns``, measured side by side.

    Each function is first called ``warmup`` times (compilation, autotuning, caches);
    a function that raises there is recorded with its error and left out. Then, for
    ``rounds`` rounds, each remaining function is timed for ``iters`` calls (more, up
    to ``max_iters``, when fewer would take less than ``min_round_ms``), the order
    rotating by one every round so no variant always runs first or last.
    """
    results = {name: Timing() for name in fns}
    n_calls = {name: iters for name in fns}
    live = []
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            _sync(device)
            if min_round_ms > 0:
                estimate = statistics.median(_time_calls(fn, 2, device))
                n_calls[name] = int(min(max_iters, max(iters, math.ceil(min_round_ms / max(estimate, 1e-3)))))
            live.append(name)
        except Exception as err:  # noqa: BLE001 - one failing variant must not stop the others
            results[name].error = describe_error(err)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in range(rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for name in order:
            if results[name].error is not None:
                continue
            try:
                results[name].samples_ms.extend(_time_calls(fns[name], n_calls[name], device))
            except Exception as err:  # noqa: BLE001
                results[name].error = describe_error(err)
    return results


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated on ``device`` while ``fn`` runs (everything live, inputs included).

    ``None`` on CPU, where torch keeps no allocator statistics.
    """
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device))
