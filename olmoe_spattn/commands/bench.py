"""Benchmark the attention kernels or end-to-end training throughput.

  olmoe-spattn bench kernel [--quick] [--shapes 8,16,4096,128;...] [--patterns ...]
      band kernels (Triton, Flex, FlashAttention-4) vs dense cuDNN/flash SDPA, fwd and
      fwd+bwd, written to benchmarks/results/<gpu>/kernel_bench.{json,md,png}
  olmoe-spattn bench train ...
      training-step throughput of OLMoE with band vs dense attention

Run `olmoe-spattn bench <kind> --help` for each kind's options.
"""

from __future__ import annotations

import argparse
import importlib

#: kind -> (module providing add_arguments/run, one-line help)
KINDS: dict[str, tuple[str, str]] = {
    "kernel": ("olmoe_spattn.bench.kernel", "time band attention kernels side by side, per shape and pattern"),
    "train": ("olmoe_spattn.bench.train", "measure training-step throughput (tokens/s), band vs dense"),
}


def _load(kind: str):
    """The module of ``kind``, or ``None`` when it is not part of this installation."""
    module, _ = KINDS[kind]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            return None  # the module itself is missing (not one of its imports)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one sub-parser per benchmark kind (each kind's module is imported lazily)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="bench_kind", metavar="<kind>")
    sub.required = True
    for kind, (module, help_text) in KINDS.items():
        mod = _load(kind)
        if mod is None:
            p = sub.add_parser(kind, help=f"{help_text} (not available: {module} is missing)",
                               description=f"{help_text}. Not available here: module {module} is missing.")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_bench_missing=module)
            continue
        p = sub.add_parser(kind, help=help_text, description=(mod.__doc__ or help_text).replace("``", "`").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_bench_missing=None)


def run(args: argparse.Namespace) -> int:
    """Dispatches to the chosen kind's ``run(args)``."""
    missing = getattr(args, "_bench_missing", None)
    if missing:
        raise ValueError(
            f"'bench {args.bench_kind}' is not available in this installation: module {missing} is missing"
        )
    mod = _load(args.bench_kind)
    return int(mod.run(args) or 0)
