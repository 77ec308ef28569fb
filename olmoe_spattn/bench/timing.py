"""Timing and memory helpers for the benchmarks: interleaved medians and peak memory.

Run-to-run noise on the attention shapes is ~15%, so every variant of one shape is
timed in the same process, in interleaved rounds (variant A, B, C, then again in a
rotated order), and the median of all timed calls is reported. On CUDA a kernel's round is
``triton.testing.do_bench`` (CUDA events around each call, L2 cache cleared before each);
on CPU, where do_bench cannot run, calls are timed with ``time.perf_counter``.
With ``--cuda-graphs`` each timed call is the replay of a CUDA graph captured from the
variant's call (:func:`graph_replay`): GPU time without Python and launch costs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
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


def describe_error(err: BaseException) -> str:
    """One short line for a failed variant (exception type and first line of its message)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {(text[0] if text else '')[:200]}"


def time_calls(fn: Callable[[], object], device: torch.device, *, iters: int, min_ms: float = 0.0) -> list[float]:
    """Milliseconds of at least ``iters`` calls of ``fn`` (on CUDA, with ``min_ms``: for at least that long).

    Kernels (``min_ms > 0`` on CUDA) go through ``triton.testing.do_bench``; long calls such as
    whole training steps are timed one by one with CUDA events, as do_bench's extra estimate
    and warm-up calls would multiply their cost.
    """
    if device.type == "cuda" and min_ms > 0:
        from triton.testing import do_bench

        samples: list[float] = []
        while len(samples) < iters:
            samples += do_bench(fn, warmup=0, rep=min_ms, return_mode="all")
        return samples
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def graph_replay(fn: Callable[[], object], device: torch.device, warmup: int = 2) -> Callable[[], object]:
    """``fn`` as a CUDA graph replay: the first call runs ``fn`` ``warmup`` times on a side stream
    (the capture needs its caches, compiled kernels and autotuning done), captures one call into a
    :class:`torch.cuda.CUDAGraph`, then replays it; later calls only replay. Each call returns the
    captured call's outputs, which every replay overwrites in place.

    A ``fn`` that cannot be captured (it synchronizes with the host, for one) raises a
    ``RuntimeError`` naming the capture as the step that failed.
    """
    state: dict[str, object] = {}

    def call() -> object:
        graph = state.get("graph")
        if graph is None:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    state["out"] = fn()
            except Exception as err:  # noqa: BLE001 - re-raised with the step named
                raise RuntimeError(f"CUDA graph capture failed: {describe_error(err)}") from err
            state["graph"] = graph
        graph.replay()  # type: ignore[union-attr]
        return state["out"]

    return call


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


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device,
    warmup: int = 3,
    iters: int = 5,
    rounds: int = 3,
    min_round_ms: float = 0.0,
) -> dict[str, Timing]:
    """Medians of every function in ``fns``, measured side by side.

    Each function is first called ``warmup`` times (compilation, autotuning, caches);
    a function that raises there is recorded with its error and left out. Then, for
    ``rounds`` rounds, each remaining function is timed for at least ``iters`` calls
    (and, on CUDA, at least ``min_round_ms``), the order rotating by one every round so
    no variant always runs first or last.
    """
    results = {name: Timing() for name in fns}
    live = []
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            live.append(name)
        except Exception as err:  # noqa: BLE001 - one failing variant must not stop the others
            results[name].error = describe_error(err)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for r in range(rounds):
        for name in live[r % len(live):] + live[: r % len(live)] if live else []:
            if results[name].error is not None:
                continue
            try:
                results[name].samples_ms += time_calls(fns[name], device, iters=iters, min_ms=min_round_ms)
            except Exception as err:  # noqa: BLE001
                results[name].error = describe_error(err)
    return results


def peak_memory_bytes(
    fn: Callable[[], object], device: torch.device, inputs: Sequence[torch.Tensor] = ()
) -> int | None:
    """The memory footprint of one call of ``fn``: the bytes of its ``inputs`` plus the most it
    allocates on ``device`` beyond what was live before it (outputs, gradients, workspaces).

    Tensors that other code keeps alive meanwhile (another backend's cached block masks, the
    timing loop's buffers) are not counted. ``None`` on CPU, where torch keeps no allocator
    statistics.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    step = int(torch.cuda.max_memory_allocated(device)) - before
    return step + sum(x.numel() * x.element_size() for x in inputs)
