"""The paper's evaluation suite (SPAttention, Tables 1-3) as lm-eval passes.

Table 1/3 columns: Winogrande, COPA, MMLU STEM and Social Sciences zero-shot, MMLU
STEM and Humanities five-shot; Table 2 adds HellaSwag. lm-eval applies one
``num_fewshot`` per run, so ``paper`` is two passes over the task groups defined in
``eval/tasks/paper/``: ``paper`` (zero-shot) and ``paper_mmlu`` (five-shot).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalPass:
    """One lm-eval run: task names and few-shot count; ``suffix`` tags its score keys."""

    tasks: tuple[str, ...]
    num_fewshot: int | None
    suffix: str = ""


#: ``--tasks paper``: the zero-shot group, then MMLU five-shot.
PAPER_PASSES: tuple[EvalPass, ...] = (
    EvalPass(("paper",), 0),
    EvalPass(("paper_mmlu",), 5, suffix="@5shot"),
)

#: Column order of the comparison table (paper order first) and display names.
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("winogrande", "Winogrande"),
    ("copa", "COPA"),
    ("hellaswag", "HellaSwag"),
    ("mmlu_stem", "STEM"),
    ("mmlu_social_sciences", "SocSci"),
    ("mmlu_humanities", "Humanities"),
    ("mmlu_stem@5shot", "STEM (5-shot)"),
    ("mmlu_social_sciences@5shot", "SocSci (5-shot)"),
    ("mmlu_humanities@5shot", "Humanities (5-shot)"),
)
#: Groups that only bundle other tasks: left out of the score table.
BUNDLE_GROUPS = frozenset({"paper", "paper_mmlu"})


def expand_tasks(tasks: str, num_fewshot: int | None) -> list[EvalPass]:
    """``"paper,foo"`` -> the paper passes plus one pass for the other task names."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; give 'paper' and/or lm-eval task names")
    passes: list[EvalPass] = []
    if "paper" in names:
        if num_fewshot is not None:
            raise ValueError("--num-fewshot cannot be combined with --tasks paper (the suite fixes 0 and 5 shots)")
        passes.extend(PAPER_PASSES)
    others = tuple(n for n in names if n != "paper")
    if others:
        suffix = f"@{num_fewshot}shot" if num_fewshot else ""
        passes.append(EvalPass(others, num_fewshot, suffix))
    return passes
