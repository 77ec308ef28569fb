"""The lm-eval model ``olmoe-spattn``: lm-eval's ``HFLM`` with our HF classes registered.

``HFLM`` loads models through transformers' Auto classes; importing
:mod:`olmoe_spattn.hf` first registers the ``olmoe_spattn`` model type and the band
attention function, so ``--model olmoe-spattn --model_args pretrained=DIR`` loads a
band checkpoint with band attention (Triton on CUDA, masked SDPA on CPU). Plain
``--model hf`` works too with ``trust_remote_code=True`` (the converted directory's
shim modules import this package).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import olmoe_spattn.hf  # noqa: F401  (registers the Auto classes and the attention function)

MODEL_NAME = "olmoe-spattn"


@register_model(MODEL_NAME)
class OlmoeSpattnLM(HFLM):
    """``HFLM`` for olmoe-spattn directories (dense or band)."""

    def __init__(self, pretrained: Any, **kwargs: Any) -> None:
        olmoe_spattn.hf.register()
        super().__init__(pretrained=pretrained, **kwargs)
