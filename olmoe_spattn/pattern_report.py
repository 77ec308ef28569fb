"""Human-readable views of a BandSpec: a per-head picture (like the paper's Figure 1)
and a text table of widths, starts and coverage."""

from __future__ import annotations

from pathlib import Path

import torch

from .bands import BandSpec
from .plots import pyplot, save


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


#: the most pixels per side a panel is drawn with; larger masks are max-pooled (thin bands stay visible)
MAX_PANEL_PIXELS = 256
#: ablation figure: one panel per pattern, in this order
ABLATION_PATTERNS: tuple[str, ...] = ("dense", "spattention", "exclusive_bands", "gapped_bands", "sliding_window")


def _panel_image(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[T, T]`` -> uint8 image of at most :data:`MAX_PANEL_PIXELS` per side (max-pooled)."""
    t = mask.shape[-1]
    factor = -(-t // MAX_PANEL_PIXELS)  # ceil
    img = mask.float()[None, None]  # [1, 1, T, T]
    if factor > 1:
        img = torch.nn.functional.max_pool2d(img, factor, ceil_mode=True)
    return img[0, 0].to(torch.uint8)


def _panel(ax, mask: torch.Tensor, title: str, seq_len: int, *, ylabel: bool, xlabel: bool) -> None:
    ax.imshow(_panel_image(mask).numpy(), cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest",
              extent=(0, seq_len, seq_len, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    if ylabel:
        ax.set_ylabel("query i", fontsize=7)
    if xlabel:
        ax.set_xlabel("key j", fontsize=7)


def _save(fig, out: str | Path, dpi: int = 110) -> tuple[Path, int]:
    """Saves and closes ``fig``; returns the path and the number of drawn panels."""
    panels = sum(1 for ax in fig.axes if ax.axison)
    return save(fig, out, dpi), panels


def draw_heads(spec: BandSpec, seq_len: int, out: str | Path, max_cols: int = 4,
               title: str | None = None) -> tuple[Path, int]:
    """Writes a PNG grid, one panel per head (allowed cells in colour); returns (path, panels)."""
    plt = pyplot()
    mask = spec.mask(seq_len)  # [H, T, T]
    heads = spec.n_heads
    cols = min(heads, max_cols)
    rows = (heads + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False)
    widths, starts = spec.widths(seq_len), spec.starts(seq_len)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        _panel(ax, mask[h], f"head {h}: W={widths[h]} S={starts[h]}", seq_len,
               ylabel=h % cols == 0, xlabel=h // cols == rows - 1)
    fig.suptitle(title or f"{spec.pattern}: H={heads}, partition_len={spec.partition_len}, T={seq_len}",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def draw_patterns(patterns: list[str], n_heads: int, seq_len: int, head: int, out: str | Path,
                  title: str | None = None) -> tuple[Path, int]:
    """Writes one panel per pattern, each showing head ``head`` (like the paper's Figure 2);
    returns (path, panels)."""
    if not 0 <= head < n_heads:
        raise ValueError(f"head must be in [0, {n_heads - 1}], got {head}")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(patterns), figsize=(2.5 * len(patterns), 2.9), squeeze=False)
    for i, pattern in enumerate(patterns):
        spec = BandSpec(pattern, n_heads, seq_len)
        mask = spec.mask(seq_len, head_offset=head, n_local_heads=1)[0]  # [T, T]
        _panel(axes[0][i], mask, f"({chr(97 + i)}) {pattern}", seq_len, ylabel=i == 0, xlabel=True)
    fig.suptitle(title or f"head {head} of H={n_heads}, N=T={seq_len}", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def paper_figures(out_dir: str | Path, n_heads: int = 8, seq_len: int = 1024) -> dict[str, tuple[Path, int]]:
    """The paper's Figure 1 (``exclusive_bands``, Eq. 4: one panel per head), the same for
    ``spattention`` (the authors' released default), and the ablation panels (one per pattern,
    head ``n_heads // 2``), as PNGs under ``out_dir``; returns ``{name: (path, panels)}``."""
    out = Path(out_dir)
    figs = {}
    for pattern in ("exclusive_bands", "spattention"):
        name = f"figure1-{pattern.replace('_', '-')}-{n_heads}-heads-{seq_len}"
        figs[name] = draw_heads(
            BandSpec(pattern, n_heads, seq_len), seq_len, out / f"{name}.png",
            title=f"{pattern}: each head's allowed (query, key) cells, H={n_heads}, N={seq_len}",
        )
    head = n_heads // 2
    name = f"ablation-patterns-head{head}-{seq_len}"
    figs[name] = draw_patterns(list(ABLATION_PATTERNS), n_heads, seq_len, head, out / f"{name}.png",
                               title=f"one head (h={head} of {n_heads}) per pattern, N={seq_len}")
    return figs
