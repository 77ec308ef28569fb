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


def test_bench_train_with_packed_documents(tmp_path):
    """``--docs``: the model gets OLMo-core's doc_lens, dense runs the dense pattern within documents,
    and the ideal bound counts pairs within documents."""
    from olmoe_spattn.bands import BandSpec
    from olmoe_spattn.bench.backward import document_lengths

    argv = ["bench", "train", "--model", "tiny", "--seq-len", "48", "--batch", "2", "--patterns",
            "sliding_window", "--backend", "torch", "--steps", "1", "--rounds", "1", "--warmup", "1",
            "--device", "cpu", "--docs", "3", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "train_bench.json").read_text())
    (setting,) = data["settings"]
    assert setting["docs"] == 3 and not setting["errors"]
    assert setting["tokens_per_s"]["dense"] > 0 and setting["tokens_per_s"]["sliding_window"] > 0
    assert "--docs 3" in data["command"]
    # sliding_window's share of the pairs within 8-, 16- and 24-token documents (partition 48)
    lengths = document_lengths(48, 3)
    spec = BandSpec("sliding_window", setting["n_heads"], 48)
    allowed = sum(int(spec.mask(n).sum()) for n in lengths)  # the oracle mask, document by document
    frac = allowed / (setting["n_heads"] * sum(n * (n + 1) // 2 for n in lengths))
    s = setting["attention_share"]
    assert abs(setting["ideal_bound"]["sliding_window"] - 1 / (1 - s + s * frac)) < 1e-9
    assert "| tiny | 2 | 48 (3 docs) | 2 |" in (tmp_path / "train_bench.md").read_text()


def test_bench_train_rejects_negative_docs():
    assert main(["bench", "train", "--docs", "-1", "--device", "cpu"]) == 2
