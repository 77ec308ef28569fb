"""Human-readable views of a BandSpec: a per-head picture (like the paper's Figure 1)
and a text table of widths, starts and coverage."""

from __future__ import annotations

from pathlib import Path

import torch

from .bands import BandSpec


def coverage_summary(spec: BandSpec, seq_len: int) -> str:
    """Table of width, start, allowed intervals and covered pairs per head, then totals."""
    widths, starts = spec.widths(seq_len), spec.starts(seq_len)
    pairs = spec.covered_pairs(seq_len)
    causal = seq_len * (seq_len + 1) // 2
    mask = spec.mask(seq_len)  # [H, T, T]
    union = int(mask.any(0).sum())
    empty_rows = (~mask.any(-1)).sum(-1).tolist()  # [H]
    n = spec.resolve_partition_len(seq_len)
    lines = [
        f"pattern={spec.pattern} heads={spec.n_heads} partition_len={spec.partition_len} "
        f"(N={n}) seq_len={seq_len}",
        f"{'head':>4} {'width':>6} {'start':>6} {'distances':<24} {'pairs':>9} {'of causal':>9} {'empty rows':>10}",
    ]
    for h, parts in enumerate(spec.intervals(seq_len)):
        dist = " u ".join(f"[{lo},{min(hi, seq_len)})" for lo, hi in parts) or "-"
        lines.append(
            f"{h:>4} {widths[h]:>6} {starts[h]:>6} {dist:<24} {pairs[h]:>9} "
            f"{pairs[h] / causal:>8.1%} {empty_rows[h]:>10}"
        )
    total = sum(pairs)
    lines.append(
        f"total pairs over heads: {total} = {total / (spec.n_heads * causal):.1%} of dense causal work; "
        f"union of heads covers {union}/{causal} = {union / causal:.1%} of the causal triangle"
    )
    return "\n".join(lines)


def draw_pattern(spec: BandSpec, seq_len: int, out: str | Path, max_cols: int = 4) -> Path:
    """Writes a PNG grid, one panel per head: allowed (query, key) cells in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = spec.mask(seq_len).to(torch.uint8)  # [H, T, T]
    heads = spec.n_heads
    cols = min(heads, max_cols)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False)
    widths, starts = spec.widths(seq_len), spec.starts(seq_len)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(mask[h].numpy(), cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_title(f"head {h}: W={widths[h]} S={starts[h]}", fontsize=8)
        if h % cols == 0:
            ax.set_ylabel("query i", fontsize=7)
        if h // cols == rows - 1:
            ax.set_xlabel("key j", fontsize=7)
    fig.suptitle(
        f"{spec.pattern}: H={heads}, partition_len={spec.partition_len}, T={seq_len}", fontsize=10
    )
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
