"""``python -m olmoe_spattn.evaluation ARGS``: the ``lm_eval`` command line, unchanged, with
the ``olmoe-spattn`` lm-eval model and our transformers classes registered first.

Example::

    python -m olmoe_spattn.evaluation run --model olmoe-spattn \\
        --model_args pretrained=DIR --include_path eval/tasks --tasks paper
"""

from __future__ import annotations

from . import lm_eval_model  # noqa: F401  (registers the model before lm_eval parses --model)


def main() -> None:
    """Runs lm-eval's own CLI."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
