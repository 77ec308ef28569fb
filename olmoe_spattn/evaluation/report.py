"""Evaluation results: one JSON per run, and a side-by-side Markdown table of runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .suite import BUNDLE_GROUPS, PAPER_COLUMNS

#: Metric shown per task (HellaSwag is reported length-normalised, as OLMo does).
PREFERRED_METRIC = {"hellaswag": "acc_norm"}


def scores_from_lm_eval(results: dict[str, Any], suffix: str = "") -> dict[str, dict[str, float]]:
    """``{task{suffix}: {metric: value}}`` from lm-eval's ``results`` (tasks and groups)."""
    scores: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            if task in BUNDLE_GROUPS:
                continue
            entry = scores.setdefault(task + suffix, {})
            for key, value in metrics.items():
                if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric, _filter = key.split(",", 1)
                entry[metric] = float(value)
    return {k: v for k, v in scores.items() if v}


def load_run(path: str | Path) -> dict[str, Any]:
    """A run JSON written by ``olmoe-spattn eval`` (``{"name", "scores", ...}``)."""
    path = Path(path)
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read evaluation results {path}: {err}") from err
    if not isinstance(run, dict) or not isinstance(run.get("scores"), dict):
        raise ValueError(f"{path} is not an olmoe-spattn eval result (no 'scores' object)")
    run.setdefault("name", path.stem)
    return run


def _settings(run: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' scores comparable: the task set, few-shot counts and the limit."""
    passes = run.get("passes") or []
    shots = sorted({str(p.get("num_fewshot")) for p in passes if isinstance(p, dict)})
    return {"tasks": run.get("tasks"), "num_fewshot": shots, "limit": run.get("limit")}


def check_comparable(runs: list[dict[str, Any]], paths: list[Any], *, force: bool = False) -> None:
    """Refuses to compare runs evaluated on different tasks, few-shot counts or limits
    (``force``: print a warning instead)."""
    first = _settings(runs[0])
    for run, path in zip(runs[1:], paths[1:]):
        other = _settings(run)
        diff = [f"{k}: {first[k]!r} in {paths[0]} vs {other[k]!r} in {path}" for k in first if first[k] != other[k]]
        if diff:
            message = "runs were evaluated differently (" + "; ".join(diff) + ")"
            if not force:
                raise ValueError(message + "; their scores are not comparable (pass --allow-mismatch to show them anyway)")
            print(f"warning: {message}")


def _pick(metrics: dict[str, float], task: str) -> float | None:
    base = task.split("@", 1)[0]
    for metric in (PREFERRED_METRIC.get(base), "acc", "acc_norm", "exact_match"):
        if metric and metric in metrics:
            return metrics[metric]
    return None


def _columns(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    present = set().union(*(r["scores"].keys() for r in runs))
    cols = [(k, label) for k, label in PAPER_COLUMNS if k in present]
    known = {k for k, _ in cols}
    cols += [(k, k) for k in sorted(present - known)]
    return cols


def compare_markdown(runs: list[dict[str, Any]], *, digits: int = 4) -> str:
    """Markdown table, one row per run, one column per task (paper order), plus Average.

    The best value of each column is bold, as in the paper's tables. The average is
    over the columns every run has.
    """
    if not runs:
        raise ValueError("no runs to compare")
    cols = _columns(runs)
    rows = []
    for run in runs:
        row = [_pick(run["scores"].get(key, {}), key) for key, _ in cols]
        rows.append(row)
    shared = [j for j in range(len(cols)) if all(r[j] is not None for r in rows)]
    for r in rows:
        r.append(sum(r[j] for j in shared) / len(shared) if shared else None)
    header = ["Method"] + [label for _, label in cols] + ["Average"]
    best = []
    for j in range(len(header) - 1):
        vals = [r[j] for r in rows if r[j] is not None and not math.isnan(r[j])]
        best.append(max(vals) if vals and len(rows) > 1 else None)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run, r in zip(runs, rows):
        cells = []
        for j, v in enumerate(r):
            if v is None:
                cells.append("-")
            else:
                text = f"{v:.{digits}f}"
                cells.append(f"**{text}**" if best[j] is not None and v == best[j] else text)
        lines.append("| " + " | ".join([str(run["name"])] + cells) + " |")
    return "\n".join(lines) + "\n"
