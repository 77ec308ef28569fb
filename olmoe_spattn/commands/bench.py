"""Benchmark the attention kernels or end-to-end training throughput.

  olmoe-spattn bench kernel [--quick] [--shapes 8,16,4096,128;...] [--patterns ...]
      band kernels (Triton, Flex, FlashAttention-4) vs dense cuDNN/flash SDPA, fwd and
      fwd+bwd, written to benchmarks/results/<gpu>/kernel_bench.{json,md,png}
  olmoe-spattn bench sweep | decode | overhead
      the Triton kernel alone: every launch configuration, decode steps, host-side costs
  olmoe-spattn bench backward [--schedules two_pass,cute,one_pass]
      the backward alone under each schedule (CuTe one-pass, Triton two-pass, Triton one-pass)
  olmoe-spattn bench train ...
      training-step throughput of OLMoE with band vs dense attention
  olmoe-spattn bench retrieval ...
      synthetic key-value retrieval trained briefly; accuracy per distance bucket

Run `olmoe-spattn bench <kind> --help` for each kind's options.
"""

from __future__ import annotations

import argparse
import importlib

#: kind -> (module providing add_arguments/run, one-line help); adding a kind is one line here
KINDS: dict[str, tuple[str, str]] = {
    "kernel": ("olmoe_spattn.bench.kernel", "time band attention kernels side by side, per shape and pattern"),
    "sweep": ("olmoe_spattn.bench.modes", "time every launch configuration of the Triton kernels"),
    "decode": ("olmoe_spattn.bench.modes", "time decode steps (one query vs a KV cache) against SDPA"),
    "overhead": ("olmoe_spattn.bench.modes", "split a small shape's time into host and kernel costs"),
    "backward": ("olmoe_spattn.bench.backward", "time the Triton backend's backward schedules side by side"),
    "train": ("olmoe_spattn.bench.train", "measure training-step throughput (tokens/s), band vs dense"),
    "table2": ("olmoe_spattn.bench.table2", "the paper's Table 2 training throughput vs dense and sparse baselines"),
    "quality": ("olmoe_spattn.bench.quality", "train one small model per attention variant on local text; held-out loss"),
    "retrieval": ("olmoe_spattn.bench.retrieval", "long-range key-value retrieval accuracy per distance, band vs dense"),
}


def _load(parser: argparse.ArgumentParser, kind: str, module: str, help_text: str) -> None:
    """Fills the chosen kind's parser; a kind whose module cannot be imported here becomes a
    clear error when run, and the other kinds keep working."""
    from ..cli import setup

    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - report, do not crash the command line
        if isinstance(err, ModuleNotFoundError) and err.name is not None and module.startswith(err.name):
            why = f"module {module} is missing"
        elif isinstance(err, ModuleNotFoundError):
            why = f"{module} needs {err.name!r}, which is not installed"
        else:
            why = f"{module} failed to import ({type(err).__name__}: {err})"
        parser.description = f"{help_text}. Not available here: {why}."
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(_run=_unavailable(kind, why))
        return
    setup(parser, mod, help_text)


def _unavailable(kind: str, why: str):
    def run(args: argparse.Namespace) -> int:
        raise ValueError(f"'bench {kind}' is not available in this installation: {why}")

    return run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per benchmark kind; only the chosen kind's module is imported."""
    from ..cli import lazy_subcommands

    lazy_subcommands(parser, KINDS, _load, dest="bench_kind")


def run(args: argparse.Namespace) -> int:  # pragma: no cover - each kind's parser sets its own run
    raise ValueError("choose a benchmark kind")
