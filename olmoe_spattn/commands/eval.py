"""Evaluate a Hugging Face model directory with lm-eval, or compare result files.

  olmoe-spattn eval MODEL_DIR --tasks paper [--limit 100] [--out run.json]
  olmoe-spattn eval MODEL_DIR --tasks hellaswag,arc_easy --num-fewshot 0
  olmoe-spattn eval --compare dense.json band.json [--markdown table.md]

`--tasks paper` is the SPAttention paper's suite (eval/tasks/paper/): Winogrande, COPA,
HellaSwag and MMLU STEM / Social Sciences / Humanities zero-shot, then MMLU five-shot.
Any other lm-eval task name (or a task defined under --include-path) can be added.
MODEL_DIR is a directory written by `olmoe-spattn convert to-hf`; band attention runs
through the Triton kernel on CUDA and masked SDPA on CPU. Results are saved as JSON;
`--compare` prints a Markdown table of several runs side by side (paper Tables 1-3).

The same evaluation with the plain lm_eval command line (run in the repo root):
  lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
      --include_path eval/tasks --tasks paper --num_fewshot 0
  lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
      --include_path eval/tasks --tasks paper_mmlu --num_fewshot 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def default_include_path() -> Path:
    """The lm-eval task files bundled with the package (a checkout's ``eval/tasks`` links here)."""
    return Path(__file__).resolve().parents[1] / "eval_tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model_dir", nargs="?", default=None, help="HF directory written by `convert to-hf`")
    parser.add_argument("--tasks", default="paper", help="'paper' and/or comma-separated lm-eval task names")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot count for non-paper tasks")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (int) or fraction (<1)")
    parser.add_argument("--batch-size", default="1", help="lm-eval batch size (int or 'auto'; default 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="model dtype passed to transformers (default: auto)")
    parser.add_argument("--include-path", default=None, help="extra lm-eval task folder (default: the bundled eval/tasks)")
    parser.add_argument("--name", default=None, help="row name in comparison tables (default: from the config)")
    parser.add_argument("--out", default=None, help="result JSON to write (default: eval-<name>.json)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RUN_JSON", help="compare result files")
    parser.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="--compare runs evaluated on different task sets, few-shot counts or --limit (refused by default: "
        "their numbers are not comparable)",
    )


def _run_name(model_dir: Path) -> str:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return model_dir.name
    pattern = cfg.get("attention_pattern")
    return f"{model_dir.name} ({pattern})" if pattern else model_dir.name


def _limit(value: float | None) -> float | int | None:
    if value is None:
        return None
    if value <= 0:
        raise ValueError(f"--limit must be positive, got {value}")
    return int(value) if value >= 1 else value


def check_task_names(passes: list[Any], known: list[str], include: Path) -> None:
    """Refuses task names lm-eval does not know (tasks, groups and tags of ``include`` too)."""
    known_set = set(known)
    unknown = sorted({t for p in passes for t in p.tasks if t not in known_set})
    if unknown:
        raise ValueError(
            f"--tasks: unknown lm-eval task(s) {', '.join(unknown)} (searched lm-eval's tasks and {include}); "
            "use 'paper' or names listed by `lm_eval --tasks list`"
        )


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every lm-eval pass for ``args`` and returns the run record."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from ..evaluation import lm_eval_model
    from ..evaluation.report import scores_from_lm_eval
    from ..evaluation.suite import expand_tasks

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    if not any((model_dir / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(
            f"{model_dir} has no model.safetensors: only safetensors weights are evaluated (pickled "
            "pytorch_model.bin files are never loaded); write the directory with `olmoe-spattn convert to-hf`"
        )
    include = Path(args.include_path) if args.include_path else default_include_path()
    if not include.is_dir():
        raise ValueError("cannot find the eval/tasks folder; pass --include-path PATH/TO/eval/tasks")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    passes = expand_tasks(args.tasks, args.num_fewshot)
    _limit(args.limit)
    cfg = json.loads((model_dir / "config.json").read_text())
    batch_size = args.batch_size
    if cfg.get("partition_len") == "dynamic" and str(batch_size) != "1":
        # the partition would follow each padded batch's length: score one sequence at a time
        print(f"note: partition_len is 'dynamic', so --batch-size {batch_size} -> 1 (padding would change the bands)")
        batch_size = "1"
    manager = TaskManager(include_path=str(include))
    check_task_names(passes, manager.all_tasks, include)  # before the model is loaded
    scores: dict[str, dict[str, float]] = {}
    records = []
    # one lm-eval call per few-shot setting: lm-eval's CLI takes a single --num_fewshot per run
    for i, p in enumerate(passes, 1):
        shots = "task default" if p.num_fewshot is None else f"{p.num_fewshot}-shot"
        print(f"[{i}/{len(passes)}] lm-eval {','.join(p.tasks)} ({shots}) on {device}", flush=True)
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm_eval_model.MODEL_NAME,
            model_args=f"pretrained={model_dir},dtype={args.dtype}",
            tasks=list(p.tasks),
            num_fewshot=p.num_fewshot,
            limit=_limit(args.limit),
            batch_size=batch_size,
            device=device,
            task_manager=manager,
        )
        seconds = time.perf_counter() - start
        if out is None:  # non-zero ranks under torchrun
            continue
        scores.update(scores_from_lm_eval(out, p.suffix))
        records.append({"tasks": list(p.tasks), "num_fewshot": p.num_fewshot, "seconds": round(seconds, 2),
                        "n_samples": out.get("n-samples", {})})
        print(f"[{i}/{len(passes)}] done in {seconds:.1f}s", flush=True)
    return {
        "name": args.name or _run_name(model_dir),
        "model_dir": str(model_dir),
        "attention_pattern": cfg.get("attention_pattern"),
        "partition_len": cfg.get("partition_len"),
        "tasks": args.tasks,
        "limit": args.limit,
        "device": device,
        "passes": records,
        "scores": scores,
    }


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import check_comparable, compare_markdown, load_run

    if args.compare:
        if args.model_dir:
            raise ValueError("give either MODEL_DIR (evaluate) or --compare RUN_JSON... (compare), not both")
        runs = [load_run(p) for p in args.compare]
        check_comparable(runs, args.compare, force=args.allow_mismatch)
        table = compare_markdown(runs)
    else:
        if not args.model_dir:
            raise ValueError("MODEL_DIR is required (or use --compare RUN_JSON...)")
        record = evaluate(args)
        out = Path(args.out or f"eval-{Path(args.model_dir).name}.json")
        out.write_text(json.dumps(record, indent=2))
        print(f"wrote {out}")
        table = compare_markdown([record])
    print(table, end="")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0
