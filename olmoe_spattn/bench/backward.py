"""``bench backward``: the Triton backend's backward schedules side by side, per shape and pattern.

For each case (B,H,T,D and pattern) the forward runs once, then every schedule of ``--schedules``
(the values of ``OLMOE_SPATTN_BWD``: ``cute``, the one-pass CuTe kernel on SM90; ``two_pass``, the
deterministic pair; ``one_pass``, the Triton one-pass kernel) times the backward alone (the row
statistics, the kernels and dQ's conversion: ``launch.run_backward``, no autograd) in one process,
interleaved in rounds. A schedule that cannot take the call says why (``cute`` off SM90, without
the ``cute`` extra, with GQA, ...). Also per schedule: the memory one call allocates beyond what is
live before it (CUDA only) and its largest difference from the first schedule's gradients.
``--docs N`` packs N documents of uneven lengths into each of the B rows and runs the B x T tokens
as one packed call (``cu_seqlens``, as training with document masking does).

Results: a Markdown table on the console (and in ``--out``), every number in ``--json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from ..bands import PATTERNS
from .features import overridden
from .kernel import parse_shapes
from .table2 import name_list

DEFAULT_SHAPES = "1,16,65536,128;2,16,16384,128;8,16,4096,128"
DEFAULT_PATTERNS = "exclusive_bands,spattention,sliding_window,dense"
SCHEDULES = ("cute", "two_pass", "one_pass")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                        help=f"';'-separated B,H,T,D shapes (default {DEFAULT_SHAPES})")
    parser.add_argument("--patterns", type=lambda s: name_list(s, PATTERNS, "pattern"),
                        default=DEFAULT_PATTERNS.split(","),
                        help=f"comma-separated patterns (default {DEFAULT_PATTERNS}; allowed {', '.join(PATTERNS)})")
    parser.add_argument("--schedules", type=lambda s: name_list(s, SCHEDULES, "schedule"), default=["two_pass", "cute"],
                        help="comma-separated OLMOE_SPATTN_BWD schedules, the first is the reference for the "
                             f"differences (default two_pass,cute; allowed {', '.join(SCHEDULES)})")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="input dtype (default bf16)")
    parser.add_argument("--docs", type=int, default=0,
                        help="pack this many documents of uneven lengths into each row (default 0: plain rows)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--iters", type=int, default=5, help="calls per schedule and round, at least (default 5)")
    parser.add_argument("--min-round-ms", type=float, default=50.0,
                        help="on CUDA, time per schedule and round, at least (default 50)")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    parser.add_argument("--json", default=None, help="write every measurement to this JSON file")


def document_lengths(t: int, n: int) -> list[int]:
    """``n`` lengths (each at least 1) that sum to ``t``, in proportion 1 : 2 : ... : n: documents from
    about ``2 / (n + 1)`` of the mean length to about twice it."""
    if not 1 <= n <= t:
        raise ValueError(f"--docs {n}: each row of {t} tokens holds 1 to {t} documents")
    weights = [i + 1 for i in range(n)]
    lengths = [max(1, t * w // sum(weights)) for w in weights]
    lengths[-1] += t - sum(lengths)
    return lengths


def packed_rows(b: int, t: int, n: int, device) -> tuple:
    """``(cu_seqlens, max_seqlen)`` of ``b`` rows of ``t`` tokens, each holding the ``n`` documents of
    :func:`document_lengths`, packed into one row of ``b * t`` tokens (int32 ``[b * n + 1]``)."""
    import torch

    lengths = document_lengths(t, n) * b
    return torch.tensor([0, *itertools.accumulate(lengths)], device=device, dtype=torch.int32), max(lengths)


def _with_schedule(schedule: str, fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with ``OLMOE_SPATTN_BWD=schedule`` (restored afterwards)."""

    def call():
        with overridden({"OLMOE_SPATTN_BWD": schedule}):
            return fn()

    return call


def _not_taken(schedule: str, p, tensors) -> str | None:
    """Why ``schedule`` would not run this call (``None``: it would)."""
    from ..kernels import cute_launch

    if schedule == "cute":
        return cute_launch.cute_unavailable_reason(p, *tensors)
    return None


def bench_case(shape, pattern: str, schedules: list[str], args, device) -> dict:
    """One case: ``{"shape", "pattern", "distances", "schedules": {name: {...}}}``."""
    import torch

    from ..bands import BandSpec
    from ..kernels import launch
    from ..kernels.common import Problem
    from .timing import measure_interleaved, peak_memory_bytes

    b, h, t, d = shape
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    gen = torch.Generator(device=device).manual_seed(0)
    cu, max_seqlen = None, t
    if args.docs:
        cu, max_seqlen = packed_rows(b, t, args.docs, device)
        b, t = 1, b * t
    q, k, v, do = (torch.randn(b, t, h, d, device=device, generator=gen).to(dtype) for _ in range(4))
    spec = BandSpec(pattern, h, shape[2])
    p = Problem(q, k, spec, head_offset=0, q_offset=0, cu_seqlens=cu, max_seqlen=max_seqlen, scale=d ** -0.5)
    out, lse = launch.run_forward(q, k, v, p)
    row = {"shape": list(shape), "pattern": pattern, "distances": p.extent, "docs": args.docs, "schedules": {}}
    fns = {}
    for name in schedules:
        why = _not_taken(name, p, (q, k, v, out, do))
        if why is not None:
            row["schedules"][name] = {"status": f"not taken: {why}"}
            continue
        fns[name] = _with_schedule(name, lambda: launch.run_backward(do, q, k, v, out, lse, p))
    timings = measure_interleaved(fns, device=device, warmup=2, iters=args.iters, rounds=args.rounds,
                                  min_round_ms=args.min_round_ms)
    grads = {name: fn() for name, fn in fns.items() if timings[name].error is None}
    reference = next(iter(grads.values()), None)
    for name, timing in timings.items():
        entry = {"status": "ok" if timing.error is None else f"error: {timing.error}"}
        if timing.error is None:
            entry["ms"] = timing.median_ms
            extra = peak_memory_bytes(fns[name], device)
            entry["extra_mib"] = None if extra is None else extra / 2**20
            entry["max_diff"] = max((a.float() - r.float()).abs().max().item() for a, r in zip(grads[name], reference))
        row["schedules"][name] = entry
    return row


def markdown(rows: list[dict], schedules: list[str]) -> str:
    """The results as a Markdown table: ms (extra MiB), and x the first schedule."""
    head = "| B,H,T,D | pattern | distances | " + " | ".join(schedules) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(schedules)]
    for row in rows:
        first = row["schedules"].get(schedules[0], {}).get("ms")
        cells = []
        for name in schedules:
            entry = row["schedules"].get(name, {})
            if "ms" not in entry:
                cells.append(entry.get("status", "-"))
                continue
            text = f"{entry['ms']:.3f}"
            if entry.get("extra_mib") is not None:
                text += f" (+{entry['extra_mib']:.0f} MiB)"
            if first and name != schedules[0]:
                text += f", {first / entry['ms']:.2f}x"
            cells.append(text)
        shape = ",".join(str(x) for x in row["shape"])
        lines.append(f"| {shape} | {row['pattern']} | {row['distances']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from .timing import warm_up_device

    if args.rounds < 1 or args.iters < 1:
        raise ValueError(f"--rounds {args.rounds} and --iters {args.iters} must be at least 1")
    if args.docs < 0:
        raise ValueError(f"--docs {args.docs}: the documents per row, 0 (plain rows) or more")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    packed = f", {args.docs} packed documents per row" if args.docs else ""
    print(f"bench backward on {name}: {len(args.shapes)} shapes x {len(args.patterns)} patterns, "
          f"schedules {','.join(args.schedules)}, {args.dtype}{packed}", flush=True)
    warm_up_device(device)
    rows = []
    for shape in args.shapes:
        for pattern in args.patterns:
            rows.append(bench_case(shape, pattern, args.schedules, args, device))
            print(markdown(rows[-1:], args.schedules).splitlines()[-1], flush=True)
    table = markdown(rows, args.schedules)
    print(table)
    if args.out:
        Path(args.out).write_text(f"Backward alone, ms (extra MiB), x {args.schedules[0]}; {name}, {args.dtype}"
                                  f"{packed}\n\n" + table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "dtype": args.dtype, "docs": args.docs, "rows": rows},
                                              indent=1))
    return 0
