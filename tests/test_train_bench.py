"""``olmoe-spattn bench train`` on a CPU: runs the tiny model and writes its JSON/Markdown."""

from __future__ import annotations

import json

from olmoe_spattn.cli import main


def test_bench_train_tiny_on_cpu(tmp_path, capsys):
    argv = ["bench", "train", "--model", "tiny", "--seq-len", "32", "--batch", "2", "--patterns",
            "exclusive_bands", "--backend", "torch", "--steps", "1", "--rounds", "1", "--warmup", "1",
            "--device", "cpu", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "train_bench.json").read_text())
    (setting,) = data["settings"]
    assert (setting["layers"], setting["seq_len"], setting["batch"]) == (2, 32, 2)
    assert setting["tokens_per_s"]["dense"] > 0 and setting["tokens_per_s"]["exclusive_bands"] > 0
    assert 0 < setting["attention_share"] <= 1
    assert setting["ideal_bound"]["exclusive_bands"] >= 1.0
    assert "| tiny | 2 | 32 | 2 | no | none | exclusive_bands |" in (tmp_path / "train_bench.md").read_text()


def test_bench_train_rejects_bad_pattern():
    assert main(["bench", "train", "--patterns", "dense,banded", "--device", "cpu"]) == 2
