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
    "table2": ("olmoe_spattn.bench.table2", "the paper's Table 2 training throughput vs dense and sparse baselines"),
    "quality": ("olmoe_spattn.bench.quality", "train one small model per attention variant on local text; held-out loss"),
}


def _load(kind: str):
    """``(module, "")`` for ``kind``, or ``(None, why)`` when it cannot be imported here.

    Any import failure is caught, so one broken or missing benchmark never breaks the
    whole command line (every subcommand's parser is built at start-up).
    """
    module, _ = KINDS[kind]
    try:
        return importlib.import_module(module), ""
    except ModuleNotFoundError as err:
        if err.name is not None and module.startswith(err.name):
            return None, f"module {module} is missing"
        return None, f"{module} needs {err.name!r}, which is not installed"
    except Exception as err:  # noqa: BLE001 - report, do not crash the CLI
        return None, f"{module} failed to import ({type(err).__name__}: {err})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one sub-parser per benchmark kind (each kind's module is imported lazily)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="bench_kind", metavar="<kind>")
    sub.required = True
    for kind, (_module, help_text) in KINDS.items():
        mod, why = _load(kind)
        if mod is None:
            p = sub.add_parser(kind, help=f"{help_text} (not available: {why})",
                               description=f"{help_text}. Not available here: {why}.")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_bench_missing=why)
            continue
        p = sub.add_parser(kind, help=help_text, description=(mod.__doc__ or help_text).replace("``", "`").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_bench_missing=None)


def run(args: argparse.Namespace) -> int:
    """Dispatches to the chosen kind's ``run(args)``."""
    missing = getattr(args, "_bench_missing", None)
    if missing:
        raise ValueError(f"'bench {args.bench_kind}' is not available in this installation: {missing}")
    mod, why = _load(args.bench_kind)
    if mod is None:
        raise ValueError(f"'bench {args.bench_kind}' is not available in this installation: {why}")
    return int(mod.run(args) or 0)
