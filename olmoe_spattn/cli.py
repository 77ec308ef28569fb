"""``olmoe-spattn <subcommand>``: the single command-line entry point.

Each subcommand lives in ``olmoe_spattn/commands/<module>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when
their subcommand runs, so ``--help`` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

#: subcommand -> (module under olmoe_spattn.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "show-pattern": ("show_pattern", "draw each head's allowed (query, key) cells and summarise coverage"),
    "bench": ("bench", "benchmark the attention kernels or training throughput"),
    "prepare-data": ("prepare_data", "tokenize local text into OLMo-core numpy token files"),
    "train": ("train", "train an OLMoE model from a YAML recipe"),
    "toggle": ("toggle", "switch a recipe between dense and band attention"),
    "convert": ("convert", "convert checkpoints between OLMo-core and Hugging Face formats"),
    "eval": ("eval", "evaluate a Hugging Face model directory with lm-eval"),
    "analyze": ("analyze", "analyse trained models (per-head attention statistics)"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if importlib.util.find_spec(f"olmoe_spattn.commands.{module}") is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per available subcommand."""
    parser = argparse.ArgumentParser(
        prog="olmoe-spattn",
        description="SPAttention band attention for OLMo-core MoE models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, (module, help_text) in _available().items():
        mod = importlib.import_module(f"olmoe_spattn.commands.{module}")
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(f"olmoe_spattn.commands.{args._module}")
    try:
        return int(mod.run(args) or 0)
    except ValueError as err:  # bad user input: one clear line, no traceback
        print(f"olmoe-spattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
