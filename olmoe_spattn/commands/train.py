"""Train an OLMoE model from a YAML recipe with OLMo-core's trainer.

Examples:
  olmoe-spattn train configs/tiny.yaml                      # CPU demo on the built-in text, ~1 min
  olmoe-spattn train tiny-dense                             # bundled recipe name: the dense twin
  olmoe-spattn train configs/olmoe-1b-7b.yaml --dry-run     # resolved config, params, patterns
  torchrun --nproc-per-node 8 -m olmoe_spattn.cli train configs/olmoe-1b-7b.yaml

Checkpoints go to train.save_folder; running the same command again resumes from the latest
checkpoint there (model, optimizer, data position, step). A folder of another run (other
attention or model shape) or with unreadable checkpoints is refused, never overwritten: use a
new train.save_folder, or --overwrite to delete its checkpoints and start over. Progress, loss, tokens/s, MFU and
expert load balance are logged to the console (and W&B with --set train.wandb=true), and every
step's metrics are appended to <save_folder>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import statistics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", help="recipe YAML file, or a bundled recipe name (tiny, olmoe-1b-7b, ...)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set train.max_steps=100 --set train.lr=1e-3 (repeatable; "
        "values are parsed as YAML)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved recipe, parameter counts (total/active) and per-layer attention "
        "pattern, then exit without training",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in train.save_folder: delete its step folders, metrics.jsonl and run "
        "record first (default: resume, and refuse a folder of another run or with unreadable checkpoints)",
    )
    parser.add_argument(
        "--allow-attention-change",
        action="store_true",
        help="resume the save folder's checkpoint although it was trained with another attention "
        "pattern / partition_len (on purpose: the weights are the same tensors; the model shape must match)",
    )


def run(args: argparse.Namespace) -> int:
    from ..olmo.recipe import load_recipe

    recipe = load_recipe(args.config, args.overrides)
    from ..olmo.train import describe, train

    if args.dry_run:
        print(describe(recipe))
        return 0
    metrics = train(recipe, overwrite=args.overwrite, allow_attention_change=args.allow_attention_change)
    if metrics:
        loss = metrics.get("train/CE loss")
        tps = _median_tokens_per_second(recipe.train.save_folder)
        parts = [f"step {metrics.get('step')}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tps is not None:
            parts.append(f"{tps:,.0f} tokens/s/device (median of logged steps)")
        print("finished: " + ", ".join(parts) + f"; checkpoints in {recipe.train.save_folder}")
    return 0


def _median_tokens_per_second(save_folder: str) -> float | None:
    """Median per-step tokens/s/device: robust to the slow first step and to steps that
    also saved a checkpoint (the last step always does)."""
    from ..olmo.train import read_metrics

    values = [m["throughput/device/TPS"] for m in read_metrics(save_folder).values() if "throughput/device/TPS" in m]
    return statistics.median(values) if values else None
