"""``olmoe-spattn <subcommand>``: the single command-line entry point.

Each subcommand lives in ``olmoe_spattn/commands/<module>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int``; adding one is one line in
:data:`SUBCOMMANDS`. A subcommand's module is imported only once argparse has chosen it,
and command modules import nothing heavy (torch loads in ``run``), so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

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


class _LazySubParsers(argparse._SubParsersAction):
    """Sub-parsers that get their arguments only when argparse picks them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaders: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def __call__(self, parser, namespace, values, option_string=None):
        load = self.loaders.pop(values[0], None)
        if load is not None:
            load(self._name_parser_map[values[0]])
        super().__call__(parser, namespace, values, option_string)


def setup(parser: argparse.ArgumentParser, module, help_text: str) -> None:
    """Fills ``parser`` from ``module``: its docstring as description, its arguments, its ``run``."""
    parser.description = (module.__doc__ or help_text).replace("``", "`").strip()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def lazy_subcommands(
    parser: argparse.ArgumentParser,
    table: dict[str, tuple[str, str]],
    load: Callable[[argparse.ArgumentParser, str, str, str], None],
    dest: str,
) -> None:
    """Adds one sub-parser per ``table`` entry (name -> (module, help)); ``load(parser, name,
    module, help)`` fills the chosen one."""
    sub = parser.add_subparsers(dest=dest, metavar="<command>" if dest == "command" else "<kind>",
                                action=_LazySubParsers, required=True)
    for name, (module, help_text) in table.items():
        sub.add_parser(name, help=help_text)
        sub.loaders[name] = lambda p, name=name, module=module, h=help_text: load(p, name, module, h)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (subcommand modules load when chosen)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="olmoe-spattn",
                                     description="SPAttention band attention for OLMo-core MoE models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    lazy_subcommands(
        parser, SUBCOMMANDS,
        lambda p, name, module, h: setup(p, importlib.import_module(f"olmoe_spattn.commands.{module}"), h),
        dest="command",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` and runs the chosen subcommand; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ValueError as err:  # bad user input: one clear line, no traceback
        print(f"olmoe-spattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
