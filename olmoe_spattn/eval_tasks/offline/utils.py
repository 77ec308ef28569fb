"""Loaders for the offline test tasks: JSON-lines files next to this module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(HERE / name))})


def load_tiny_mc(**_: Any) -> Any:
    """``spattn_tiny_mc``: question, choices, label."""
    return _load("spattn_tiny_mc.jsonl")


def load_tiny_cloze(**_: Any) -> Any:
    """``spattn_tiny_cloze``: context, endings, label."""
    return _load("spattn_tiny_cloze.jsonl")
