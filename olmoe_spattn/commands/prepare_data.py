"""Tokenize local text (JSON lines with a text field, or Parquet) into OLMo-core numpy token
files: raw uint16/uint32 arrays of token ids, an EOS after every document, a Dolma-style
``.csv.gz`` of document boundaries beside each array, and ``prepare_data.json`` with the
tokenizer, dtype and counts. Point a recipe's dataset ``paths`` at ``OUT/part-*.npy`` (with
``expand_glob: true``) and set its ``dtype`` to the one printed.

Examples:
  olmoe-spattn prepare-data data/*.jsonl --tokenizer allenai/gpt-neox-olmo-dolma-v1_5 --out tokens/
  python -m olmoe_spattn.data.tiny_tokenizer tok/      # offline: a tiny local tokenizer
  olmoe-spattn prepare-data corpus.parquet --tokenizer tok/ --text-field content --out tokens/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import DTYPES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help=".jsonl/.json(.gz) files (one JSON object per line), .parquet files, or directories of them",
    )
    parser.add_argument("--out", "-o", required=True, help="output directory for part-NNNNN.npy files")
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="Hugging Face tokenizer: a local directory (works offline) or a hub id such as "
        "allenai/gpt-neox-olmo-dolma-v1_5 (needs the hub)",
    )
    parser.add_argument("--text-field", default="text", help="JSON field / Parquet column holding the text (default: text)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="token dtype; auto = the smallest that holds the vocabulary, as OLMo-core infers it (default)",
    )
    parser.add_argument(
        "--eos-token-id", type=_non_negative_int, default=None, help="EOS id appended to every document (default: the tokenizer's)"
    )
    parser.add_argument(
        "--max-tokens-per-file",
        type=_positive_int,
        default=2**30,
        help="start a new part file past this many tokens (default 2^30)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=512, help="documents per tokenizer call (default 512)")
    parser.add_argument("--max-documents", type=_positive_int, default=None, help="stop after this many documents")
    parser.add_argument("--overwrite", action="store_true", help="replace .npy files already in the output directory")
    parser.add_argument(
        "--progress-every", type=float, default=5.0,
        help="seconds between progress-bar redraws (default 5; negative: no bar)"
    )


def run(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare_data

    result = prepare_data(
        args.inputs,
        args.out,
        args.tokenizer,
        text_field=args.text_field,
        dtype=args.dtype,
        eos_token_id=args.eos_token_id,
        max_tokens_per_file=args.max_tokens_per_file,
        batch_size=args.batch_size,
        max_documents=args.max_documents,
        overwrite=args.overwrite,
        progress_every=args.progress_every,
        log=lambda line: print(line, flush=True),
    )
    pad = result.pad_token_id if result.pad_token_id is not None else result.eos_token_id
    ident = result.tokenizer if not Path(result.tokenizer).exists() else str(Path(result.tokenizer).resolve())
    glob = f"{Path(result.output_dir).resolve()}/part-*.npy"
    print(
        "recipe data section (model.vocab_size must be >= vocab_size):\n"
        "data:\n"
        f"  paths: ['{glob}']\n"
        f"  dtype: {result.dtype}\n"
        f"  tokenizer: {{vocab_size: {result.vocab_size}, eos_token_id: {result.eos_token_id}, "
        f"pad_token_id: {pad}, identifier: '{ident}'}}\n"
        f"or on the command line: --set 'data.paths=[{glob}]' --set data.dtype={result.dtype} --set data.synthetic=false --set data.builtin_text=false"
    )
    return 0
