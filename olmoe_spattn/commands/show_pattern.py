"""Draw each head's allowed (query, key) cells, like the paper's Figure 1, and print a
summary: band width, start, allowed distances, covered pairs and empty rows per head,
and how much of the causal triangle the heads cover together.

Examples:
  olmoe-spattn show-pattern --pattern spattention --heads 8 --seq-len 64 --out p.png
  olmoe-spattn show-pattern --panels patterns --head 4 --seq-len 1024 --out ablation.png
  olmoe-spattn show-pattern --paper-figures docs/   # the paper's Figure 1 and ablation panels
"""

from __future__ import annotations

import argparse

from ..bands import PATTERNS, BandSpec, partition_len_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", default="spattention", choices=PATTERNS, help="attention pattern")
    parser.add_argument("--heads", type=int, default=8, help="number of attention heads (default 8)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length to draw (default 64)")
    parser.add_argument(
        "--partition-len",
        type=partition_len_arg,
        default=None,
        help="partition length N: an integer >= heads, or 'dynamic' (default: the sequence length)",
    )
    parser.add_argument("--out", default=None, help="PNG file to write (omit for the text summary only)")
    parser.add_argument("--panels", choices=("heads", "patterns"), default="heads",
                        help="one panel per head of --pattern (default), or one per pattern for --head")
    parser.add_argument("--head", type=int, default=None, help="head drawn by --panels patterns (default heads // 2)")
    parser.add_argument("--paper-figures", metavar="DIR", default=None,
                        help="write the paper's Figure 1 (8 heads, N = 1024; exclusive_bands and spattention) "
                        "and the ablation panels (one per pattern) to DIR, then exit")


def run(args: argparse.Namespace) -> int:
    if args.paper_figures:
        from ..pattern_report import paper_figures

        for path, panels in paper_figures(args.paper_figures).values():
            print(f"wrote {path} ({panels} panels)")
        return 0
    if args.seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
    if args.seq_len > 4096 and args.out:
        raise ValueError(f"--seq-len {args.seq_len} is too large to draw; use at most 4096")
    spec = BandSpec(args.pattern, args.heads, args.partition_len or args.seq_len)
    from ..pattern_report import ABLATION_PATTERNS, coverage_summary, draw_heads, draw_patterns

    print(coverage_summary(spec, args.seq_len))
    if args.out and args.panels == "patterns":
        head = args.heads // 2 if args.head is None else args.head
        path, panels = draw_patterns(list(ABLATION_PATTERNS), args.heads, args.seq_len, head, args.out)
        print(f"wrote {path} ({panels} panels)")
    elif args.out:
        path, panels = draw_heads(spec, args.seq_len, args.out)
        print(f"wrote {path} ({panels} panels)")
    return 0
