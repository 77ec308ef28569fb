"""Analyse trained models.

  olmoe-spattn analyze heads CHECKPOINT [CHECKPOINT ...] --text FILE
      per layer and head: attention entropy (and its uniform bound), mean attended
      distance, and the diversity of head outputs (standard deviation across heads);
      a heat-map PNG and a JSON per checkpoint, and a comparison table. CHECKPOINT is a
      folder written by `olmoe-spattn bench quality` (model.safetensors + model_config.json).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``heads`` analysis."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="analysis", metavar="<analysis>")
    sub.required = True
    p = sub.add_parser("heads", help="per-head attention entropy, distance and head-output diversity",
                       description=(__doc__ or "").strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folder(s)")
    p.add_argument("--text", required=True, help="plain-text file to run through the model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the one recorded in the checkpoint)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens analysed (default: the checkpoint's partition length)")
    p.add_argument("--out", default="runs/head_analysis", help="output folder (default runs/head_analysis)")
    p.add_argument("--device", default="cpu", help="device (default cpu; float64 statistics are computed on CPU)")


def run(args: argparse.Namespace) -> int:
    """Analyses each checkpoint and writes ``<name>.json`` and ``<name>.png`` under ``--out``."""
    import json
    from pathlib import Path

    import torch

    from ..analysis.heads import analyze_model, plot_heads, summarize
    from ..bench.paper_model import load_small_model

    text_path = Path(args.text)
    if not text_path.is_file():
        raise ValueError(f"--text file {args.text!r} does not exist")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    text = text_path.read_text(encoding="utf-8", errors="replace")
    summaries = {}
    for ckpt in args.checkpoints:
        model, meta = load_small_model(ckpt, device, backend="torch" if device.type == "cpu" else "auto")
        tok_dir = args.tokenizer or meta.get("tokenizer")
        if not tok_dir or not Path(tok_dir).is_dir():
            raise ValueError(f"tokenizer folder {tok_dir!r} not found; pass --tokenizer DIR")
        from tokenizers import Tokenizer

        tok_file = Path(tok_dir) / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{tok_dir} has no tokenizer.json; pass --tokenizer DIR")
        n = args.max_tokens or int(meta["partition_len"])
        ids = Tokenizer.from_file(str(tok_file)).encode(text, add_special_tokens=False).ids[:n]
        if len(ids) < 2:
            raise ValueError(f"--text {args.text!r} gives {len(ids)} tokens; need at least 2")
        layers = analyze_model(model, torch.tensor([ids], device=device))
        name = Path(ckpt).resolve().name
        summary = summarize(layers)
        summaries[name] = {"attention": meta["attention"], "tokens": len(ids), **summary}
        (out / f"{name}.json").write_text(json.dumps(
            {"checkpoint": str(ckpt), "attention": meta["attention"], "partition_len": meta["partition_len"],
             "text": str(text_path), "tokens": len(ids), "summary": summary, "layers": layers}, indent=2))
        plot_heads(layers, out / f"{name}.png", f"{name} ({meta['attention']}, {len(ids)} tokens)")
        print(f"analyze heads: {name}: wrote {out / (name + '.json')} and {out / (name + '.png')}", flush=True)
    lines = ["| checkpoint | attention | tokens | entropy | uniform bound | mean distance | head diversity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['attention']} | {s['tokens']} | {s['entropy']:.4f} | {s['entropy_max']:.4f} | "
                     f"{s['mean_distance']:.1f} | {s['diversity']:.4f} |")
    table = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    print(table)
    return 0
