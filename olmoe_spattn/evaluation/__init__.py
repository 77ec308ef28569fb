"""lm-eval integration: the ``olmoe-spattn`` lm-eval model, the paper suite, result tables."""

from .report import compare_markdown, load_run, scores_from_lm_eval
from .suite import PAPER_PASSES, expand_tasks

__all__ = ["PAPER_PASSES", "compare_markdown", "expand_tasks", "load_run", "scores_from_lm_eval"]
