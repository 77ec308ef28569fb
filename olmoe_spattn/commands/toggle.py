"""Switch a recipe between dense and band attention (rewrites its top-level ``attention:``).

Only the ``attention`` line (and, when given, ``partition_len`` / ``attention_backend`` /
``name`` / ``train.save_folder``) changes; comments and layout are kept, and the result is
validated as a recipe before it is written. Model parameters do not depend on the attention
pattern, so checkpoints of the two variants are interchangeable.

The toggled recipe trains into a new save folder: ``train.save_folder`` gets the new
attention as a suffix (``runs/tiny`` -> ``runs/tiny-dense``; a previous ``-<pattern>`` suffix is
replaced), so it never resumes the other variant's checkpoints. ``--save-folder`` sets it
explicitly; ``--keep-save-folder`` keeps it (training then refuses the other attention's
checkpoints unless told ``--allow-attention-change``).

Examples:
  olmoe-spattn toggle configs/olmoe-1b-7b.yaml --attention dense -o configs/my-dense.yaml
  olmoe-spattn toggle my.yaml --attention exclusive_bands          # in place
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from ..api import BACKENDS
from ..bands import DYNAMIC, PATTERNS

_TOP_KEYS = ("attention", "partition_len", "attention_backend", "name")


def _set_top_level(text: str, key: str, value: str) -> str:
    """Replaces ``key: ...`` at column 0 (keeping a trailing comment), or appends it."""
    pattern = re.compile(rf"^{re.escape(key)}:[ \t]*([^#\n]*?)([ \t]*#[^\n]*)?$", re.MULTILINE)
    match = pattern.search(text)
    if match is None:
        sep = "" if text.endswith("\n") or not text else "\n"
        return f"{text}{sep}{key}: {value}\n"
    comment = (match.group(2) or "").strip()
    line = f"{key}: {value}"
    if comment:
        column = match.group(0).index("#")  # keep the comment where it was when there is room
        line = line.ljust(column) + comment if len(line) < column else f"{line} {comment}"
    return text[: match.start()] + line + text[match.end() :]


def _set_save_folder(text: str, value: str) -> str:
    """Rewrites ``save_folder:`` inside the top-level ``train:`` section."""
    pattern = re.compile(r"^([ \t]+save_folder:[ \t]*)([^#\n]*?)([ \t]*#[^\n]*)?$", re.MULTILINE)
    if pattern.search(text) is None:
        raise ValueError("the recipe has no train.save_folder line to rewrite")
    return pattern.sub(lambda m: f"{m.group(1)}{value}{m.group(3) or ''}", text, count=1)


def toggle_recipe_text(
    text: str,
    attention: str,
    *,
    partition_len: int | str | None = None,
    backend: str | None = None,
    name: str | None = None,
    save_folder: str | None = None,
) -> str:
    """Returns the recipe ``text`` with its attention switched; validates the result."""
    if attention not in PATTERNS:
        raise ValueError(f"unknown attention {attention!r}; allowed: {', '.join(PATTERNS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("not a recipe: the YAML file must be a mapping")
    out = _set_top_level(text, "attention", attention)
    if partition_len is not None:
        out = _set_top_level(out, "partition_len", str(partition_len))
    if backend is not None:
        out = _set_top_level(out, "attention_backend", backend)
    if name is not None:
        out = _set_top_level(out, "name", name)
    if save_folder is not None:
        out = _set_save_folder(out, save_folder)
    from ..olmo.recipe import recipe_from_dict

    recipe = recipe_from_dict(yaml.safe_load(out))  # raises ValueError on a bad result
    if recipe.attention != attention:
        raise ValueError("could not rewrite the top-level 'attention:' key of this recipe")
    return out


def _partition_len(text: str) -> int | str:
    if text == DYNAMIC:
        return DYNAMIC
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'dynamic', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", help="recipe YAML file to rewrite")
    parser.add_argument("--attention", required=True, choices=PATTERNS, help="attention to switch to")
    parser.add_argument("--partition-len", type=_partition_len, default=None,
                        help="also set partition_len (int >= n_heads or 'dynamic'; default: keep)")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="also set attention_backend")
    parser.add_argument("--name", default=None, help="also set the recipe name")
    parser.add_argument("--save-folder", default=None,
                        help="set train.save_folder (default: the current one with a -<attention> suffix)")
    parser.add_argument("--keep-save-folder", action="store_true",
                        help="keep train.save_folder unchanged (the toggled run shares the old run's folder)")
    parser.add_argument("-o", "--out", default=None, help="write here instead of rewriting CONFIG in place ('-' = stdout)")


def suffixed_save_folder(text: str, attention: str) -> str:
    """The recipe's ``train.save_folder`` with ``-<attention>`` replacing any ``-<pattern>`` suffix."""
    data = yaml.safe_load(text)
    train = data.get("train") if isinstance(data, dict) else None
    folder = str((train or {}).get("save_folder") or "runs/olmoe").rstrip("/")
    for pattern in PATTERNS:
        folder = folder.removesuffix(f"-{pattern}").removesuffix(f"-{pattern.replace('_', '-')}")
    return f"{folder}-{attention.replace('_', '-')}"


def run(args: argparse.Namespace) -> int:
    src = Path(args.config)
    if not src.exists():
        raise ValueError(f"recipe {str(src)!r} not found")
    text = src.read_text(encoding="utf-8")
    if args.save_folder is not None and args.keep_save_folder:
        raise ValueError("give --save-folder or --keep-save-folder, not both")
    save_folder = args.save_folder
    if save_folder is None and not args.keep_save_folder:
        save_folder = suffixed_save_folder(text, args.attention)
    new = toggle_recipe_text(
        text,
        args.attention,
        partition_len=args.partition_len,
        backend=args.backend,
        name=args.name,
        save_folder=save_folder,
    )
    if args.out == "-":
        sys.stdout.write(new)
        return 0
    dst = Path(args.out) if args.out else src
    dst.write_text(new, encoding="utf-8")
    folder = f"; train.save_folder: {save_folder}" if save_folder else ""
    print(f"wrote {dst} (attention: {args.attention}{folder})")
    return 0
