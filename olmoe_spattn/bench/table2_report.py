"""Table 2 results as a table: ratios to dense, the paper's numbers beside ours, a bar chart.

Pure data handling (no torch): :mod:`olmoe_spattn.bench.table2` measures, this module turns
the measured rows into Markdown, JSON-ready dicts and a PNG.

A row is a dict with at least ``seq_len``, ``variant`` (``"<method>@<impl>"``, e.g.
``"spattention@triton"``), ``status`` (``"ok"``, ``"failed"`` or ``"unavailable"``) and,
when ``ok``, ``tokens_per_s`` and ``spread`` ((max - min) / median of the timed steps).
``causal_pair_fraction`` (the share of causal (query, key) pairs the method's mask allows,
averaged over heads; filled in by :mod:`~olmoe_spattn.bench.table2`) is shown where present.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .report import fmt

#: the paper's Table 2 (8 heads, 8 layers, d_model 1024, seq 1024, 4x A100, FlexAttention):
#: method -> tokens/s
PAPER_TABLE2_TOKENS_PER_S: dict[str, int] = {
    "longformer": 6340,
    "reformer": 6014,
    "bigbird": 5736,
    "dense": 3214,
    "spattention": 6167,
}
PAPER_SEQ_LEN = 1024
#: method -> the name the paper's table uses
PAPER_NAMES: dict[str, str] = {
    "dense": "Standard",
    "longformer": "Longformer",
    "reformer": "Reformer-like",
    "bigbird": "BigBird",
    "spattention": "SPAttention",
    "exclusive_bands": "Exclusive bands (EBALL)",
    "sliding_window": "Sliding window",
    "gapped_bands": "Gapped bands (GBHALF)",
}
#: table order: the paper's rows first, then the ablation patterns
METHODS: tuple[str, ...] = tuple(PAPER_NAMES)
BASELINES: tuple[str, ...] = ("longformer", "bigbird", "reformer")
BAND_PATTERNS: tuple[str, ...] = ("spattention", "exclusive_bands", "gapped_bands", "sliding_window")
#: implementations each method may run with
IMPLS: dict[str, tuple[str, ...]] = {
    "dense": ("cudnn", "flash", "sdpa", "flex"),
    **{b: ("flex",) for b in BASELINES},
    **{p: ("triton", "fa4", "flex", "torch") for p in BAND_PATTERNS},
}
IMPL_NAMES: dict[str, str] = {
    "cudnn": "SDPA cuDNN",
    "flash": "SDPA FlashAttention-2",
    "sdpa": "SDPA (default dispatch)",
    "flex": "FlexAttention",
    "triton": "ours (Triton)",
    "fa4": "FlashAttention-4 block-sparse",
    "torch": "masked SDPA",
}


def parse_variant(name: str) -> tuple[str, str]:
    """``"spattention@triton"`` -> ``("spattention", "triton")``; ValueError on unknown names."""
    method, sep, impl = name.strip().partition("@")
    if not sep or method not in IMPLS or impl not in IMPLS[method]:
        allowed = ", ".join(f"{m}@{i}" for m in METHODS for i in IMPLS[m])
        raise ValueError(f"unknown variant {name!r}; allowed: {allowed}")
    return method, impl


def all_variants() -> list[str]:
    """Every valid ``method@impl`` name, in table order."""
    return [f"{m}@{i}" for m in METHODS for i in IMPLS[m]]


def add_ratios(rows: list[dict]) -> list[dict]:
    """Adds, per sequence length, ``vs_best_dense`` (tokens/s over the fastest dense row),
    ``vs_dense_flex`` (over dense FlexAttention, the paper's baseline), and the paper's
    ``paper_tokens_per_s`` / ``paper_vs_dense`` where the paper has the method (seq 1024 only).

    Returns the same rows (modified in place) for chaining.
    """
    by_len: dict[int, list[dict]] = {}
    for row in rows:
        by_len.setdefault(int(row["seq_len"]), []).append(row)
    for seq_len, group in by_len.items():
        dense = {r["variant"]: r["tokens_per_s"] for r in group
                 if r["status"] == "ok" and parse_variant(r["variant"])[0] == "dense"}
        best = max(dense.values()) if dense else None
        best_name = max(dense, key=dense.get) if dense else None
        flex = dense.get("dense@flex")
        for row in group:
            method, _ = parse_variant(row["variant"])
            tps = row.get("tokens_per_s") if row["status"] == "ok" else None
            row["best_dense"] = best_name
            row["vs_best_dense"] = tps / best if tps and best else None
            row["vs_dense_flex"] = tps / flex if tps and flex else None
            paper = PAPER_TABLE2_TOKENS_PER_S.get(method) if seq_len == PAPER_SEQ_LEN else None
            row["paper_tokens_per_s"] = paper
            row["paper_vs_dense"] = paper / PAPER_TABLE2_TOKENS_PER_S["dense"] if paper else None
    return rows


def sort_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows ordered by sequence length, then the paper's method order, then implementation."""
    def key(row: dict) -> tuple[int, int, int]:
        method, impl = parse_variant(row["variant"])
        return int(row["seq_len"]), METHODS.index(method), IMPLS[method].index(impl)

    return sorted(rows, key=key)


def verdict(rows: list[dict], seq_len: int) -> str:
    """One line: the fastest row at ``seq_len`` and how the best SPAttention row compares with
    the fastest dense and the fastest Longformer rows."""
    ok = [r for r in rows if int(r["seq_len"]) == seq_len and r["status"] == "ok"]
    if not ok:
        return f"seq {seq_len}: nothing measured."
    fastest = max(ok, key=lambda r: r["tokens_per_s"])

    def best(method: str) -> dict | None:
        cands = [r for r in ok if parse_variant(r["variant"])[0] == method]
        return max(cands, key=lambda r: r["tokens_per_s"]) if cands else None

    parts = [f"seq {seq_len}: fastest row `{fastest['variant']}` ({fastest['tokens_per_s']:,.0f} tokens/s)."]
    sp = best("spattention")
    if sp is not None:
        for other in ("dense", "longformer"):
            o = best(other)
            if o is not None:
                parts.append(f"`{sp['variant']}` / `{o['variant']}` = {sp['tokens_per_s'] / o['tokens_per_s']:.2f}x.")
    work = pair_sentence(fastest, sp, best("longformer"))
    return " ".join(parts + ([work] if work else []))


def fmt_fraction(x: float | None) -> str:
    """A pair fraction as a percentage (``0.125`` -> ``"12.5%"``; ``"-"`` when unknown)."""
    return "-" if x is None else format(x, ".2%" if x < 0.01 else ".1%")


def pair_sentence(fastest: dict, spattention: dict | None, longformer: dict | None) -> str:
    """The attention work behind a verdict: the causal pair fractions of SPAttention, the
    fastest row and Longformer (``""`` when the rows carry no fractions)."""
    fastest_method = parse_variant(fastest["variant"])[0]
    items = []
    for label, row in (("SPAttention", spattention), (None, fastest), ("Longformer", longformer)):
        if row is None or row.get("causal_pair_fraction") is None:
            continue
        frac = fmt_fraction(row["causal_pair_fraction"])
        if label is None:  # the fastest row, unless it is one of the two named methods
            if fastest_method not in ("spattention", "longformer"):
                items.append(f"the fastest row `{row['variant']}` {frac}")
        else:
            mark = " (the fastest row)" if parse_variant(row["variant"])[0] == fastest_method else ""
            items.append(f"{label} {frac}{mark}")
    return "Causal (query, key) pairs allowed: " + ", ".join(items) + "." if items else ""


def to_markdown(data: dict) -> str:
    """The results as Markdown: setup, one table per sequence length, and per-length verdicts."""
    rows = sort_rows(add_ratios(list(data["rows"])))
    shape = data["shape"]
    lines = [
        f"# Table 2 re-measured: training throughput ({data.get('device', '?')})",
        "",
        f"Model: {shape['n_layers']} layers, {shape['n_heads']} heads, d_model {shape['d_model']}, "
        f"vocab {shape['vocab_size']} (OLMo-core llama-like blocks, dense SwiGLU FFN). "
        f"One training step = forward, backward and AdamW step; {data.get('dtype', '')}. "
        f"All variants share one model and one batch per length and are timed in "
        f"{data.get('rounds', '?')} interleaved rounds of {data.get('steps', '?')} steps "
        f"(median; spread = (max - min) / median).",
        "",
        f"Command: `{data.get('command', '')}`",
        *(["", f"Rendered again from the saved JSON (no new measurements): `{data['rendered']}`"]
          if data.get("rendered") else []),
        "",
        f"Paper columns: the paper's Table 2 ({PAPER_SEQ_LEN} tokens, 4x A100, all methods in "
        f"FlexAttention); its ratio is to its Standard row ({PAPER_TABLE2_TOKENS_PER_S['dense']:,} tokens/s). "
        "Ours: ratio to the fastest dense row of the same length, and to dense FlexAttention. "
        "Causal pairs: the share of the N (N + 1) / 2 causal (query, key) pairs the method's mask "
        "allows, averaged over heads (computed from the masks the backends use, not measured).",
    ]
    for seq_len in sorted({int(r["seq_len"]) for r in rows}):
        group = [r for r in rows if int(r["seq_len"]) == seq_len]
        batch = next((r.get("batch") for r in group if r.get("batch")), "?")
        lines += [
            "",
            f"## seq {seq_len} (batch {batch})",
            "",
            "| Method | implementation | causal pairs | tokens/s | spread | x fastest dense | x dense Flex "
            "| paper tokens/s | paper x Standard |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        notes = []
        for r in group:
            method, impl = parse_variant(r["variant"])
            if r["status"] == "ok":
                tps, spread = f"{r['tokens_per_s']:,.0f}", fmt(r.get("spread"), ".1%")
            else:
                tps, spread = r["status"], ""
                notes.append(f"- `{r['variant']}` {r['status']}: {r.get('note', '')}")
            lines.append(
                f"| {PAPER_NAMES[method]} | {IMPL_NAMES[impl]} | {fmt_fraction(r.get('causal_pair_fraction'))} "
                f"| {tps} | {spread} | "
                f"{fmt(r.get('vs_best_dense'), '.2f')} | {fmt(r.get('vs_dense_flex'), '.2f')} | "
                f"{fmt(r.get('paper_tokens_per_s'), ',')} | {fmt(r.get('paper_vs_dense'), '.2f')} |"
            )
        lines += ["", verdict(group, seq_len)]
        if notes:
            lines += ["", *notes]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str | Path) -> Path:
    """Horizontal bars of each row's tokens/s relative to the fastest dense row, one panel per
    sequence length; the paper's ratio (to its Standard row) as a black tick where it has one."""
    from ..plots import pyplot, save

    plt = pyplot()

    rows = sort_rows(add_ratios(list(data["rows"])))
    lengths = sorted({int(r["seq_len"]) for r in rows})
    colours = {"dense": "#777777", "longformer": "#d98c3a", "bigbird": "#c9a227", "reformer": "#b0643c",
               "spattention": "#2b6cb0", "exclusive_bands": "#4a9bd9", "sliding_window": "#7fb8e6",
               "gapped_bands": "#a9cdee"}
    n_max = max(sum(1 for r in rows if int(r["seq_len"]) == n) for n in lengths)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.4 * len(lengths), 0.32 * n_max + 1.4),
                             squeeze=False, sharey=False)
    for ax, seq_len in zip(axes[0], lengths):
        group = [r for r in rows if int(r["seq_len"]) == seq_len][::-1]
        ys = list(range(len(group)))
        vals = [r.get("vs_best_dense") or 0.0 for r in group]
        ax.barh(ys, vals, color=[colours[parse_variant(r["variant"])[0]] for r in group])
        for y, r in zip(ys, group):
            if r.get("paper_vs_dense"):
                ax.plot([r["paper_vs_dense"]] * 2, [y - 0.4, y + 0.4], color="black", lw=2)
            if r["status"] != "ok":
                ax.text(0.02, y, r["status"], va="center", fontsize=7, color="#aa0000")
        ax.axvline(1.0, color="black", lw=0.6, ls=":")
        ax.set_yticks(ys)
        ax.set_yticklabels([r["variant"] + (f" ({fmt_fraction(r['causal_pair_fraction'])} pairs)"
                                            if r.get("causal_pair_fraction") is not None else "")
                            for r in group], fontsize=7)
        ax.set_xlabel("tokens/s / fastest dense (black tick: paper / its Standard)", fontsize=7)
        ax.set_title(f"seq {seq_len}", fontsize=9)
    fig.suptitle(f"Table 2 shape, training throughput ({data.get('device', '?')})", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` rows whose ``(seq_len, variant)`` is not in ``new``, then ``new`` (a re-run of
    one length replaces that length's rows and keeps the others)."""
    keys = {(int(r["seq_len"]), r["variant"]) for r in new}
    return [r for r in old if (int(r["seq_len"]), r["variant"]) not in keys] + list(new)
