"""GPU checks of the long-context bench options (``pytest -m gpu tests/gpu/test_bench_long_gpu.py``):
``bench train --compile`` really compiles (OLMo-core's apply_compile) and measures band and dense,
with activation checkpointing, and a depth-extrapolated row."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("olmo_core")
if not torch.cuda.is_available():  # pragma: no cover - conftest skips gpu tests anyway
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from olmoe_spattn.cli import main  # noqa: E402


def test_bench_train_compiled_long_sequence_with_extrapolation(tmp_path):
    argv = ["bench", "train", "--model", "olmoe-0.25b-1.75b", "--layers", "1", "--extrapolate-to", "4",
            "--seq-len", "8192", "--batch", "1", "--patterns", "exclusive_bands", "--steps", "2", "--rounds", "1",
            "--warmup", "2", "--compile", "--activation-checkpointing", "attention", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "train_bench.json").read_text())["settings"]
    assert [r["layers"] for r in rows] == [1, 2, 4] and rows[2]["extrapolated_from"] == [1, 2]
    for row in rows:
        assert row["compile"] and row["activation_checkpointing"] == "attention", row
        assert not row["errors"], row["errors"]
        assert row["tokens_per_s"]["dense"] > 0 and row["tokens_per_s"]["exclusive_bands"] > 0
        assert 0 < row["attention_share"] < 1 and row["amdahl_bound"]["exclusive_bands"] > 1
