"""Draw each head's allowed (query, key) cells, like the paper's Figure 1, and print a
summary: band width, start, allowed distances, covered pairs and empty rows per head,
and how much of the causal triangle the heads cover together.

Example: olmoe-spattn show-pattern --pattern spattention --heads 8 --seq-len 64 --out p.png
"""

from __future__ import annotations

import argparse

from ..bands import DYNAMIC, PATTERNS, BandSpec


def _partition_len(text: str) -> int | str:
    if text == DYNAMIC:
        return DYNAMIC
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"partition length must be an integer or 'dynamic', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", default="spattention", choices=PATTERNS, help="attention pattern")
    parser.add_argument("--heads", type=int, default=8, help="number of attention heads (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length to draw (default 64)")
    parser.add_argument(
        "--partition-len",
        type=_partition_len,
        default=None,
        help="partition length N: an integer >= heads, or 'dynamic' (default: the sequence length)",
    )
    parser.add_argument("--out", default=None, help="PNG file to write (omit for the text summary only)")


def run(args: argparse.Namespace) -> int:
    if args.seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
    if args.seq_len > 4096 and args.out:
        raise ValueError(f"--seq-len {args.seq_len} is too large to draw; use at most 4096")
    spec = BandSpec(args.pattern, args.heads, args.partition_len or args.seq_len)
    from ..pattern_report import coverage_summary, draw_pattern

    print(coverage_summary(spec, args.seq_len))
    if args.out:
        path = draw_pattern(spec, args.seq_len, args.out)
        print(f"wrote {path}")
    return 0
