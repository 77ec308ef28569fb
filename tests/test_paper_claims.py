"""The paper-claims tools on tiny inputs: Table 2 table builder, head metrics, the quality
loop, the head analysis of its checkpoints, and the paper figures."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from olmoe_spattn.analysis.heads import (
    attention_entropy,
    attention_probs,
    head_diversity,
    max_entropy,
    mean_distance,
)
from olmoe_spattn.bands import BandSpec
from olmoe_spattn.bench import table2_report as t2
from olmoe_spattn.cli import main


# ---------------------------------------------------------------- Table 2 table builder
def _rows():
    return [
        {"seq_len": 1024, "batch": 16, "variant": "dense@cudnn", "status": "ok", "tokens_per_s": 2000.0, "spread": 0.02},
        {"seq_len": 1024, "batch": 16, "variant": "dense@flex", "status": "ok", "tokens_per_s": 1000.0, "spread": 0.05},
        {"seq_len": 1024, "batch": 16, "variant": "longformer@flex", "status": "ok", "tokens_per_s": 2500.0, "spread": 0.01},
        {"seq_len": 1024, "batch": 16, "variant": "spattention@triton", "status": "ok", "tokens_per_s": 3000.0, "spread": 0.03},
        {"seq_len": 1024, "batch": 16, "variant": "spattention@fa4", "status": "unavailable", "note": "no fa4 here"},
        {"seq_len": 4096, "batch": 4, "variant": "dense@flash", "status": "ok", "tokens_per_s": 800.0, "spread": 0.1},
        {"seq_len": 4096, "batch": 4, "variant": "exclusive_bands@triton", "status": "ok", "tokens_per_s": 1200.0, "spread": 0.1},
    ]


def test_ratios_to_fastest_dense_to_dense_flex_and_the_papers():
    rows = {(r["seq_len"], r["variant"]): r for r in t2.add_ratios(_rows())}
    sp = rows[(1024, "spattention@triton")]
    assert sp["best_dense"] == "dense@cudnn"
    assert sp["vs_best_dense"] == pytest.approx(1.5)
    assert sp["vs_dense_flex"] == pytest.approx(3.0)
    assert sp["paper_tokens_per_s"] == 6167
    assert sp["paper_vs_dense"] == pytest.approx(6167 / 3214)
    assert rows[(1024, "longformer@flex")]["paper_vs_dense"] == pytest.approx(6340 / 3214)
    assert rows[(1024, "spattention@fa4")]["vs_best_dense"] is None
    # ratios are per length: at 4096 the only dense row is flash, and the paper has no numbers
    ex = rows[(4096, "exclusive_bands@triton")]
    assert ex["vs_best_dense"] == pytest.approx(1.5) and ex["vs_dense_flex"] is None
    assert ex["paper_tokens_per_s"] is None


def test_markdown_has_the_papers_rows_and_notes(tmp_path):
    data = {"device": "test", "shape": {"d_model": 1024, "n_layers": 8, "n_heads": 8, "vocab_size": 50304},
            "rows": _rows(), "rounds": 3, "steps": 5, "command": "x"}
    md = t2.to_markdown(data)
    assert "| SPAttention | ours (Triton) | - | 3,000 | 3.0% | 1.50 | 3.00 | 6,167 | 1.92 |" in md
    assert "| Standard | FlexAttention | - | 1,000 | 5.0% | 0.50 | 1.00 | 3,214 | 1.00 |" in md
    assert "pairs allowed" not in md  # rows without fractions: no work sentence
    assert "- `spattention@fa4` unavailable: no fa4 here" in md
    assert "## seq 4096 (batch 4)" in md
    assert "fastest row `spattention@triton`" in md
    assert "`spattention@triton` / `longformer@flex` = 1.20x" in md
    # paper row order: Standard rows before Longformer before SPAttention
    assert md.index("| Standard | SDPA cuDNN") < md.index("| Longformer") < md.index("| SPAttention | ours")
    path = t2.plot(data, tmp_path / "t2.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_shows_the_causal_pair_fractions_and_names_them_in_the_verdict():
    fractions = {"dense": 1.0, "longformer": 0.461, "spattention": 0.331, "exclusive_bands": 0.125,
                 "gapped_bands": 0.0664}
    rows = _rows() + [{"seq_len": 4096, "batch": 4, "variant": v, "status": "ok", "tokens_per_s": tps, "spread": 0.1}
                      for v, tps in (("spattention@fa4", 1000.0), ("longformer@flex", 1100.0),
                                     ("gapped_bands@triton", 1300.0))]
    for r in rows:
        r["causal_pair_fraction"] = fractions[t2.parse_variant(r["variant"])[0]]
    data = {"device": "test", "shape": {"d_model": 1024, "n_layers": 8, "n_heads": 8, "vocab_size": 50304},
            "rows": rows, "rounds": 3, "steps": 5, "command": "x"}
    md = t2.to_markdown(data)
    assert "| Method | implementation | causal pairs | tokens/s |" in md
    assert "| SPAttention | ours (Triton) | 33.1% | 3,000 | 3.0% |" in md
    assert "| SPAttention | FlashAttention-4 block-sparse | 33.1% | unavailable |" in md  # same for every impl
    assert "| Standard | SDPA cuDNN | 100.0% | 2,000 |" in md
    # at 1024 spattention is the fastest row; at 4096 gapped bands are
    assert "Causal (query, key) pairs allowed: SPAttention 33.1% (the fastest row), Longformer 46.1%." in md
    assert ("Causal (query, key) pairs allowed: SPAttention 33.1%, the fastest row `gapped_bands@triton` 6.6%, "
            "Longformer 46.1%.") in md
    assert t2.fmt_fraction(0.00397) == "0.40%" and t2.fmt_fraction(None) == "-"


def test_every_implementation_of_a_method_gets_the_methods_pair_fraction():
    from olmoe_spattn.bench.table2 import add_pair_fractions
    from olmoe_spattn.flex import causal_pair_fraction

    rows = add_pair_fractions(_rows(), 8)
    for r in rows:
        method = t2.parse_variant(r["variant"])[0]
        assert r["causal_pair_fraction"] == causal_pair_fraction(method, 8, r["seq_len"])
    sp = [r["causal_pair_fraction"] for r in rows if r["variant"].startswith("spattention@")]
    assert len(sp) == 2 and sp[0] == sp[1]


def test_bench_table2_render_rewrites_a_saved_result_without_measuring(tmp_path, capsys):
    from olmoe_spattn.flex import causal_pair_fraction

    saved = {"device": "test", "command": "olmoe-spattn bench table2 --seq-lens 1024,4096",
             "shape": {"d_model": 1024, "n_layers": 8, "n_heads": 8, "vocab_size": 50304},
             "rows": _rows(), "rounds": 3, "steps": 5}
    path = tmp_path / "table2.json"
    path.write_text(json.dumps(saved))
    assert main(["bench", "table2", "--render", str(path)]) == 0  # in place, no GPU, no model
    data = json.loads(path.read_text())
    assert data["command"] == saved["command"] and "--render table2.json" in data["rendered"]
    for old, new in zip(saved["rows"], data["rows"]):
        assert {k: new[k] for k in old} == old  # measured values unchanged
        assert new["causal_pair_fraction"] == causal_pair_fraction(t2.parse_variant(old["variant"])[0], 8,
                                                                   old["seq_len"])
    md = (tmp_path / "table2.md").read_text()
    assert "| causal pairs |" in md and "Rendered again from the saved JSON" in md
    assert (tmp_path / "table2.png").is_file()
    assert main(["bench", "table2", "--render", str(tmp_path / "missing.json")]) == 2
    assert "missing.json is not a file" in capsys.readouterr().err


def test_merge_keeps_other_lengths_and_replaces_rerun_rows():
    old = _rows()
    new = [{"seq_len": 4096, "variant": "dense@flash", "status": "ok", "tokens_per_s": 900.0}]
    merged = t2.merge_rows(old, new)
    assert len(merged) == len(old)
    assert [r["tokens_per_s"] for r in merged if r["variant"] == "dense@flash"] == [900.0]


def test_variant_names_are_validated():
    assert t2.parse_variant("reformer@flex") == ("reformer", "flex")
    for bad in ("longformer@triton", "spattention", "banded@flex"):
        with pytest.raises(ValueError, match="unknown variant"):
            t2.parse_variant(bad)


def test_bench_table2_tiny_cpu_run_writes_results(tmp_path):
    argv = ["bench", "table2", "--tiny", "--device", "cpu", "--out", str(tmp_path),
            "--variants", "dense@sdpa,dense@flex,exclusive_bands@torch", "--steps", "1", "--rounds", "1"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "table2.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["dense@sdpa"]["status"] == "ok" and rows["dense@sdpa"]["tokens_per_s"] > 0
    assert rows["exclusive_bands@torch"]["vs_best_dense"] > 0
    assert rows["dense@flex"]["status"] == "unavailable"  # no CPU backward in Flex
    assert data["shape"] == {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512}
    assert (tmp_path / "table2.png").is_file() and "## seq 64 (batch 2)" in (tmp_path / "table2.md").read_text()
    assert rows["exclusive_bands@torch"]["causal_pair_fraction"] == 1 / 4  # 4 heads share the pairs
    assert rows["dense@flex"]["causal_pair_fraction"] == 1.0  # unavailable rows get it too


def test_bench_table2_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "table2", "--variants", "dense@triton"])
    assert main(["bench", "table2", "--tiny", "--device", "cpu", "--seq-lens", "2"]) == 2
    assert "smaller than the number of heads" in capsys.readouterr().err


# ---------------------------------------------------------------- head metrics
def test_entropy_of_known_distributions():
    probs = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0],
                           [0.25, 0.25, 0.25, 0.25]]], dtype=torch.float64)  # [1, 4, 4]
    expected = (0.0 + math.log(2) + 1.5 * math.log(2) + math.log(4)) / 4
    assert float(attention_entropy(probs)[0]) == pytest.approx(expected)
    # an empty row (no allowed key) is left out of the average
    with_empty = torch.cat([torch.zeros(1, 1, 4, dtype=torch.float64), probs[:, 1:]], dim=1)
    assert float(attention_entropy(with_empty)[0]) == pytest.approx((math.log(2) + 1.5 * math.log(2) + math.log(4)) / 3)


def test_uniform_attention_reaches_the_entropy_bound_and_the_band_mean_distance():
    spec = BandSpec("exclusive_bands", 4, 32)
    mask = spec.mask(32)  # [4, 32, 32]
    q = torch.zeros(32, 8)  # zero queries: uniform attention over the allowed keys
    for h, (start, width) in enumerate(zip(spec.starts(), spec.widths())):
        probs = attention_probs(q, torch.randn(32, 8), mask[h], scale=1.0)
        assert float(attention_entropy(probs)) == pytest.approx(float(max_entropy(mask[h])))
        rows = [list(range(start, min(start + width, i + 1))) for i in range(32)]
        means = [sum(r) / len(r) for r in rows if r]
        assert float(mean_distance(probs)) == pytest.approx(sum(means) / len(means))


def test_mean_distance_of_a_one_hot_diagonal():
    t, d = 16, 5
    probs = torch.zeros(t, t, dtype=torch.float64)
    for i in range(d, t):
        probs[i, i - d] = 1.0
    assert float(mean_distance(probs)) == pytest.approx(d)


def test_diversity_zero_for_identical_heads_and_known_for_orthogonal_ones():
    base = torch.randn(10, 1, 6)
    assert head_diversity(base.expand(10, 3, 6)) == pytest.approx(0.0, abs=1e-12)
    assert head_diversity(torch.cat([base, 3 * base], dim=1)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    e = torch.eye(4)
    two = torch.stack([e[0], e[1]])[None].expand(5, 2, 4)  # [T, 2, 4]: heads output e0 and e1
    assert head_diversity(two) == pytest.approx(0.25)  # std 0.5 on 2 of 4 channels
    with pytest.raises(ValueError, match="H >= 2"):
        head_diversity(torch.randn(4, 1, 3))


# ---------------------------------------------------------------- quality loop + analysis
@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    corpus = root / "corpus"
    corpus.mkdir()
    words = "attention heads bands tokens model layer distance window sparse dense query key value".split()
    for i in range(6):
        text = "\n".join(" ".join(words[(i + j + k) % len(words)] for k in range(12)) for j in range(60))
        (corpus / f"doc{i}.txt").write_text(text)
    (corpus / "copy.txt").write_text((corpus / "doc0.txt").read_text())  # duplicate: kept once
    with gzip.open(corpus / "notes.md.gz", "wt") as f:
        f.write("compressed notes about sparse attention\n" * 40)
    out = root / "out"
    argv = ["bench", "quality", "--tiny", "--corpus", str(corpus), "--out", str(out),
            "--variants", "dense,exclusive_bands", "--heads", "4", "--vocab-size", "300"]
    assert main(argv) == 0
    return out


def test_quality_loop_writes_curves_table_and_checkpoints(quality_run):
    data = json.loads((quality_run / "quality.json").read_text())
    assert [r["variant"] for r in data["runs"]] == ["dense", "exclusive_bands"]
    corpus = data["corpus"]
    assert corpus["n_files"] == 8  # six documents, a copy of one, a gzipped one
    assert corpus["n_train_files"] + corpus["n_heldout_files"] == 7  # the copy is kept once
    assert corpus["n_heldout_files"] >= 1 and corpus["heldout_tokens"] > 0
    for r in data["runs"]:
        assert r["steps"] == 3 and len(r["curve"]) == 3
        assert all(math.isfinite(p["heldout_loss"]) and p["heldout_loss"] > 0 for p in r["curve"])
        ckpt = quality_run / "checkpoints" / f"seq32-{r['variant']}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "model_config.json").is_file()
    md = (quality_run / "quality.md").read_text()
    assert "| exclusive_bands |" in md and "nats held-out loss" in md
    assert (quality_run / "quality_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_keeps_earlier_runs_of_the_same_study(quality_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(quality_run, out)
    corpus = json.loads((out / "quality.json").read_text())["corpus"]["roots"]
    argv = ["bench", "quality", "--tiny", "--corpus", *corpus, "--out", str(out), "--variants", "sliding_window",
            "--heads", "4", "--vocab-size", "300"]
    assert main(argv) == 0
    runs = json.loads((out / "quality.json").read_text())["runs"]
    assert [r["variant"] for r in runs] == ["dense", "exclusive_bands", "sliding_window"]
    assert "| sliding_window |" in (out / "quality.md").read_text()


def test_analyze_heads_on_dense_and_band_checkpoints(quality_run, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("sparse attention heads look at bands of distance in the model layer\n" * 8)
    ckpts = [str(quality_run / "checkpoints" / f"seq32-{v}") for v in ("dense", "exclusive_bands")]
    assert main(["analyze", "heads", *ckpts, "--text", str(text), "--out", str(tmp_path / "ha")]) == 0
    band = json.loads((tmp_path / "ha" / "seq32-exclusive_bands.json").read_text())
    spec = BandSpec("exclusive_bands", 4, 32)
    assert len(band["layers"]) == 2 and band["tokens"] == 32
    for layer in band["layers"]:
        assert layer["recompute_error"] < 1e-4  # the statistics describe what the layer computed
        for h, (s, w) in enumerate(zip(spec.starts(), spec.widths())):
            assert s <= layer["mean_distance"][h] < s + w  # head h only sees its band
            assert 0 <= layer["entropy"][h] <= layer["entropy_max"][h] + 1e-9
            assert layer["entropy_max"][h] <= math.log(w) + 1e-9  # the paper's log(N/H) bound
    dense = json.loads((tmp_path / "ha" / "seq32-dense.json").read_text())
    assert dense["summary"]["entropy_max"] > band["summary"]["entropy_max"]
    assert (tmp_path / "ha" / "seq32-dense.png").is_file()
    assert "| seq32-exclusive_bands | exclusive_bands | 32 |" in capsys.readouterr().out


def test_analyze_heads_rejects_a_folder_without_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["analyze", "heads", str(tmp_path), "--text", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err


def test_ordering_report_says_where_band_attention_loses():
    from olmoe_spattn.bench.quality import ordering_report

    lines = "\n".join(ordering_report({"dense": 3.0, "spattention": 3.1, "exclusive_bands": 3.05,
                                       "sliding_window": 3.2}))
    assert "`spattention` loses to dense: +0.1000 nats" in lines
    assert "`spattention` >= `exclusive_bands`: does NOT hold" in lines
    assert "`exclusive_bands` >= `sliding_window`: holds" in lines


# ---------------------------------------------------------------- figures
def test_paper_figures_files_and_panels(tmp_path):
    from olmoe_spattn.pattern_report import paper_figures

    figs = paper_figures(tmp_path, n_heads=4, seq_len=64)
    panels = {name: n for name, (_path, n) in figs.items()}
    assert panels == {"figure1-exclusive-bands-4-heads-64": 4, "figure1-spattention-4-heads-64": 4,
                      "ablation-patterns-head2-64": 5}
    for path, _ in figs.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_pattern_patterns_panels(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["show-pattern", "--panels", "patterns", "--heads", "8", "--seq-len", "64", "--head", "7",
                 "--out", str(out)]) == 0
    assert "(5 panels)" in capsys.readouterr().out and out.is_file()
    assert main(["show-pattern", "--panels", "patterns", "--heads", "8", "--seq-len", "64", "--head", "8",
                 "--out", str(out)]) == 2
