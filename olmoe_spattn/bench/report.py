"""``bench kernel`` results: the row schema, and their Markdown table, JSON and PNG plot.

The JSON is ``{"gpu", "device", "date", "command", "torch", "triton", "fa4", "settings",
"backends", "patterns", "availability", "env", "results": [Row, ...], "elapsed_s"}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

#: ratio columns are computed against these rows of the same shape (and pattern)
FLEX_REF, DENSE_REF = "flex", "cudnn_dense"
#: forward+backward does 3.5x the forward's matmul work (2 forward GEMMs, 5 backward)
BWD_FLOP_FACTOR = 3.5
RESULT_STEM = "kernel_bench"

#: how a results file measured peak memory (``"peak_memory"``; files without it: all live tensors)
PEAK_ALL_LIVE = "all_live"
PEAK_STEP = "step"
PEAK_TEXT = {
    PEAK_ALL_LIVE: "max allocated during fwd+bwd, everything live included (inputs, and tables other "
    "backends keep cached)",
    PEAK_STEP: "q, k, v, dout plus the most the fwd+bwd call allocates beyond what was live before it",
}


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


def command_line(argv: list[str], subcommand: str, paths: tuple[str, ...] = ("--out", "--out-dir", "--json")) -> str:
    """``olmoe-spattn bench <subcommand> [options]`` as recorded in results, however it was
    started (console script or ``python -m olmoe_spattn``), without output-path options (a
    path on the machine that ran it)."""
    words = argv[argv.index(subcommand) + 1:] if subcommand in argv else []
    kept: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        if w in paths:
            skip = True
            continue
        if any(w.startswith(p + "=") for p in paths):
            continue
        kept.append(w)
    return " ".join(["olmoe-spattn bench", subcommand, *kept])


def gpu_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (folder name for results;
    also the file stem of the GPU's ``auto`` dispatch table)."""
    from ..dispatch import gpu_slug as slug

    return slug(name)


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def ratio(base: float | None, mine: float | None) -> float | None:
    return base / mine if base and mine else None


def row_line(row: Row) -> str:
    """One log line for a measured row."""
    return (
        f"{row.backend:<12} fwd {fmt(row.fwd_ms)} ms  fwd+bwd {fmt(row.fwdbwd_ms)} ms  "
        f"x cuDNN {fmt(row.speedup_vs_cudnn_fwdbwd, '.2f')}  x flex {fmt(row.speedup_vs_flex_fwdbwd, '.2f')}  "
        f"{fmt(row.tflops_fwdbwd, '.0f')} TFLOP/s  {row.status} {row.note}"
    ).rstrip()


def missing_label(row: dict | None) -> str:
    """Why a row has no time: ``OOM`` for out of memory, else its status (``n/a`` when absent)."""
    if row is None:
        return "n/a"
    if "OutOfMemoryError" in row["note"] or "out of memory" in row["note"]:
        return "OOM"
    return row["status"]


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
            return missing_label(r)
        return f"{fmt(r['fwdbwd_ms'])} ({fmt(r['fwd_ms'])})"

    def vs(a: dict | None, b: dict | None) -> str:
        if not a or not b:
            return "-"
        x, y = ratio(b["fwdbwd_ms"], a["fwdbwd_ms"]), ratio(b["fwd_ms"], a["fwd_ms"])
        return f"{fmt(x, '.2f')} ({fmt(y, '.2f')})" if (x or y) else "-"

    for shape, pattern in keys:
        mine = cells.get((shape, pattern, "ours"))
        row = [ms(cells.get((shape, pattern, b))) for b in band]
        lines.append(
            f"| {','.join(map(str, shape))} | {pattern} | " + " | ".join(row)
            + f" | {ms(cudnn.get(shape))} | {vs(mine, cells.get((shape, pattern, 'flex')))}"
            f" | {vs(mine, cells.get((shape, pattern, 'fa4')))} | {vs(mine, cudnn.get(shape))} |"
        )
    longest = max(keys, key=lambda k: k[0][2])[0]
    mem = [r for r in res if tuple(r["shape"]) == longest and r["backend"] == "ours" and r["peak_over_io"]]
    if mem:
        lines += ["", f"Peak memory of ours at B,H,T,D = {','.join(map(str, longest))} (fwd+bwd, inputs, "
                  "outputs and gradients included) vs q,k,v,out,dout,dq,dk,dv:"]
        lines += [f"- {r['pattern']}: {r['peak_mib']:.0f} MiB = {r['peak_over_io']:.3f} x {r['io_mib']:.0f} MiB"
                  for r in mem]
    return lines + [""]


def to_markdown(data: dict) -> str:
    """The results as Markdown: a header, a summary table, then every measured row."""
    s = data["settings"]
    lines = [
        f"### Kernel benchmark: {data['gpu']}, {data['date']}",
        "",
        f"`{data['command']}`  ",
        f"torch {data['torch']}, triton {data.get('triton') or '-'}, flash-attn-4 {data.get('fa4') or '-'}, "
        f"dtype {s['dtype']}, medians of {s['rounds']} interleaved rounds x >= {s['iters']} calls "
        f"(>= {s.get('min_round_ms', 0):g} ms per round; on CUDA triton.testing.do_bench, L2 cleared "
        f"before each call{'; each call a CUDA graph replay' if s.get('cuda_graphs') else ''}"
        f"{'; every backward on the calling thread' if not s.get('autograd_threads', True) else ''}"
        f"{'; automatic garbage collection off' if not s.get('gc', True) else ''}); "
        f"partition length N = {s['partition_len']}.",
        "Speedups are fwd+bwd (forward only in brackets); TFLOP/s count only allowed pairs "
        f"(fwd+bwd = {BWD_FLOP_FACTOR}x forward FLOPs); peak = {PEAK_TEXT[data.get('peak_memory', PEAK_ALL_LIVE)]}; "
        "io = q,k,v,out,dout,dq,dk,dv; max err = largest |output - reference| and "
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
            f"{fmt(r['speedup_vs_flex_fwdbwd'], '.2f')} ({fmt(r['speedup_vs_flex_fwd'], '.2f')})"
            if r["backend"] != FLEX_REF and r["pattern"] != "dense_causal" else ""
        )
        vs_cudnn = (
            f"{fmt(r['speedup_vs_cudnn_fwdbwd'], '.2f')} ({fmt(r['speedup_vs_cudnn_fwd'], '.2f')})"
            if r["backend"] != DENSE_REF else "1.00"
        )
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} ({r['peak_over_io']:.2f})"
        lines.append(
            f"| {','.join(map(str, r['shape']))} | {r['pattern']} | {r['backend']} | {fmt(r['fwd_ms'])} "
            f"| {fmt(r['fwdbwd_ms'])} | {vs_flex} | {vs_cudnn} "
            f"| {fmt(r['tflops_fwd'], '.3g')} / {fmt(r['tflops_fwdbwd'], '.3g')} | {peak} "
            f"| {fmt(r['max_err'], '.1e')} / {fmt(r.get('max_grad_err'), '.1e')} | {_short_note(r).replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path | None:
    """Bar chart: fwd+bwd (or forward) speedup over cuDNN dense causal, per shape and pattern.

    A variant without a value (not available, skipped, out of memory) gets a short hatched
    stub labelled with the reason, never an invisible zero bar.
    """
    from ..plots import pyplot, save

    plt = pyplot()

    rows = [r for r in data["results"] if r["pattern"] not in ("dense_causal", "-")]
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
        sub = {(r["pattern"], r["backend"]): r for r in rows if tuple(r["shape"]) == shape}
        pats = list(dict.fromkeys(p for p, _ in sub))
        top = max((r[key] or 0.0 for r in sub.values()), default=1.0) or 1.0
        for i, be in enumerate(backends):
            color = f"C{i}"
            for j, p in enumerate(pats):
                x = j + (i - (len(backends) - 1) / 2) * width
                r = sub.get((p, be))
                val = r[key] if r else None
                if val:
                    ax.bar(x, val, width, color=color)
                    ax.annotate(f"{val:.2g}", (x, val), ha="center", va="bottom", fontsize=6)
                else:  # e.g. an "ok" row without a backward on this device is still n/a here
                    stub = 0.04 * top
                    ax.bar(x, stub, width, color="none", edgecolor=color, hatch="///")
                    label = missing_label(r) if r is None or r["status"] != "ok" else "n/a"
                    ax.annotate(label, (x, stub), ha="center", va="bottom", fontsize=6, rotation=90, color=color)
        if key.startswith("speedup"):
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(pats)))
        ax.set_xticklabels(pats, fontsize=7, rotation=15)
        ax.set_title("B,H,T,D = " + ",".join(map(str, shape)), fontsize=9)
        ax.set_ylabel({"speedup_vs_cudnn_fwdbwd": "fwd+bwd speedup vs cuDNN dense",
                       "speedup_vs_cudnn_fwd": "fwd speedup vs cuDNN dense"}.get(key, key), fontsize=8)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    from matplotlib.patches import Patch

    axes.flat[0].legend(handles=[Patch(color=f"C{i}", label=be) for i, be in enumerate(backends)], fontsize=7)
    fig.suptitle(f"SPAttention kernels, {data['gpu']}, {data['date']} ({data['settings']['dtype']})", fontsize=10)
    fig.tight_layout()
    return save(fig, path, dpi=110)


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
