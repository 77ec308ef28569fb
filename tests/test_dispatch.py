"""``backend="auto"``: the dispatch rule, its tables, and writing them from bench results (CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from olmoe_spattn import BandSpec, band_attention, dispatch
from olmoe_spattn.cli import main
from olmoe_spattn.dispatch import Context, Entry, auto_backend, band_width, choose, load_table, width_bucket
from olmoe_spattn.dispatch.write import table_from_results

REPO = Path(__file__).resolve().parents[1]
H100_RESULTS = REPO / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3" / "kernel_bench.json"
H100_TABLE = REPO / "olmoe_spattn" / "dispatch" / "nvidia-h100-80gb-hbm3.json"

ENTRIES = (
    Entry("spattention", 128, 64, "triton", "triton"),
    Entry("spattention", 128, 256, "fa4", "triton"),
    Entry("spattention", 128, 1024, "triton", "fa4"),
    Entry("dense", 128, 1024, "fa4", "fa4"),
)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    monkeypatch.delenv(dispatch.ENV_TABLE, raising=False)
    dispatch.reset()
    yield
    dispatch.reset()


@pytest.fixture
def gpu_with_table(monkeypatch):
    """Pretends the inputs' device has ``ENTRIES`` as its table and that FA4 runs there."""
    ctx = Context("", "triton", "Fake GPU", "fake.json", ENTRIES)
    monkeypatch.setattr(dispatch, "device_context", lambda device_type, index: ctx)
    from olmoe_spattn.fa4 import support

    monkeypatch.setattr(support, "fa4_problem", lambda q: ("", ""))
    return ctx


def _qk(t, *, tk=None, d=128, grad=False, h=16):
    q = torch.zeros(1, t, h, d, requires_grad=grad)
    return q, torch.zeros(1, tk or t, h, d)


# ---------------------------------------------------------------- keys
def test_band_width_is_the_band_span_capped_at_the_keys():
    assert band_width(BandSpec("spattention", 16, 4096), 4096) == 256
    assert band_width(BandSpec("exclusive_bands", 16, 4100), 9000) == 257  # ceil(N / H)
    assert band_width(BandSpec("sliding_window", 16, 4096), 100) == 100  # capped at Tk
    assert band_width(BandSpec("spattention", 8, "dynamic"), 1000) == 125  # N = this call's Tk
    assert band_width(BandSpec("dense", 16, 64), 777) == 777


def test_width_bucket_rounds_to_the_nearest_power_of_two():
    assert [width_bucket(w) for w in (1, 2, 3, 5, 6, 256, 362, 363, 1000)] == [1, 2, 4, 4, 8, 256, 256, 512, 1024]


def test_choose_takes_the_geometrically_nearest_width_of_the_same_key():
    pick = lambda w: choose(ENTRIES, "spattention", 128, w, True)  # noqa: E731
    assert pick(10).width == 64 and pick(127).width == 64 and pick(128).width == 256
    assert pick(511).width == 256 and pick(512).width == 1024 and pick(10**6).width == 1024
    assert choose(ENTRIES, "spattention", 64, 256, True) is None  # head_dim not measured
    assert choose(ENTRIES, "gapped_bands", 128, 256, True) is None  # pattern not measured


# ---------------------------------------------------------------- the rule
def test_training_and_inference_follow_their_own_column(gpu_with_table):
    spec = BandSpec("spattention", 16, 4096)  # width 256: train fa4, infer triton
    assert auto_backend(*_qk(4096, grad=True), spec) == "fa4"
    assert auto_backend(*_qk(4096), spec) == "triton"
    with torch.no_grad():
        assert auto_backend(*_qk(4096, grad=True), spec) == "triton"
    spec = BandSpec("spattention", 16, 16384)  # width 1024: train triton, infer fa4
    assert auto_backend(*_qk(16384, grad=True), spec) == "triton"
    assert auto_backend(*_qk(16384), spec) == "fa4"


def test_decoding_and_unmeasured_keys_keep_triton(gpu_with_table):
    assert auto_backend(*_qk(1, tk=1024), BandSpec("dense", 16, 1024)) == "triton"  # Tq != Tk
    assert auto_backend(*_qk(1024, d=64), BandSpec("dense", 16, 1024)) == "triton"  # head_dim 64 unmeasured
    assert auto_backend(*_qk(1024), BandSpec("dense", 16, 1024)) == "fa4"


def test_fa4_that_cannot_run_falls_back_to_triton(gpu_with_table, monkeypatch, caplog):
    from olmoe_spattn.fa4 import support

    monkeypatch.setattr(support, "fa4_problem", lambda q: ("missing", "flash-attn-4 is not installed"))
    with caplog.at_level(logging.INFO, logger="olmoe_spattn.dispatch"):
        assert auto_backend(*_qk(1024), BandSpec("dense", 16, 1024)) == "triton"
        auto_backend(*_qk(1024), BandSpec("dense", 16, 1024))
    decisions = [r.getMessage() for r in caplog.records if "auto -> triton" in r.getMessage()]
    assert len(decisions) == 1 and "not installed" in decisions[0]  # logged once, with the reason


def test_environment_overrides_auto(monkeypatch):
    q, k = _qk(64, h=2, d=16)
    monkeypatch.setenv(dispatch.ENV_BACKEND, "flex")
    assert auto_backend(q, k, BandSpec("dense", 2, 64)) == "flex"  # CPU would give "torch"
    monkeypatch.setenv(dispatch.ENV_BACKEND, "fastest")
    dispatch.reset()
    with pytest.raises(ValueError, match="OLMOE_SPATTN_BACKEND='fastest'.*allowed"):
        auto_backend(q, k, BandSpec("dense", 2, 64))


def test_without_a_table_auto_keeps_the_old_rule():
    q, k = _qk(32, h=2, d=16)
    assert auto_backend(q, k, BandSpec("spattention", 2, 32)) == "torch"  # CPU
    ctx = dispatch._context("cpu", 0)
    assert ctx.entries == () and ctx.base == "torch"


def test_band_attention_auto_goes_through_the_dispatcher(monkeypatch):
    calls = []

    def fake(q, k, spec):
        calls.append(spec.pattern)
        return "torch"

    monkeypatch.setattr(dispatch, "auto_backend", fake)
    q = torch.randn(1, 20, 2, 8)
    out = band_attention(q, q, q, BandSpec("spattention", 2, 20))
    assert calls == ["spattention"] and out.shape == q.shape
    band_attention(q, q, q, BandSpec("spattention", 2, 20), backend="torch")
    assert calls == ["spattention"]  # an explicit backend never consults the table


def test_the_decision_traces_under_torch_compile_without_graph_breaks(gpu_with_table):
    spec = BandSpec("spattention", 16, "dynamic")

    def f(q, k):
        return q * (2.0 if auto_backend(q, k, spec) == "fa4" else 3.0)

    compiled = torch.compile(f, fullgraph=True, backend="eager", dynamic=True)
    for t in (4096, 1000, 16384):  # widths 256 (fa4 when training), 63 and 1024 (triton)
        q, k = _qk(t, grad=True)
        assert compiled(q, k)[0, 0, 0, 0].item() == f(q, k)[0, 0, 0, 0].item()


def test_config_layers_accept_fa4_as_a_backend():
    from olmoe_spattn.api import BACKENDS
    from olmoe_spattn.olmo.config import BandAttentionConfig

    assert "fa4" in BACKENDS
    config = BandAttentionConfig(n_heads=4, band_pattern="spattention", partition_len=64, band_backend="fa4")
    assert config.band_backend == "fa4"


# ---------------------------------------------------------------- tables
def _row(shape, pattern, backend, fwd, fwdbwd, status="ok", n=None):
    return {"shape": list(shape), "pattern": pattern, "backend": backend, "partition_len": n or shape[2],
            "status": status, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd}


def test_table_from_results_picks_the_faster_per_key_and_mode():
    data = {"gpu": "Fake GPU", "date": "d", "results": [
        _row((2, 16, 4096, 128), "spattention", "ours", 1.0, 4.0),
        _row((2, 16, 4096, 128), "spattention", "fa4", 1.5, 3.0),  # fa4 wins training only
        _row((1, 8, 2048, 128), "spattention", "ours", 1.0, 4.0),  # same width bucket (256)
        _row((1, 8, 2048, 128), "spattention", "fa4", 0.2, 4.5),  # sums: fwd 2.0 vs 1.7, fwdbwd 8 vs 7.5
        _row((1, 16, 65536, 128), "dense", "ours", 40.0, 160.0),
        _row((1, 16, 65536, 128), "dense", "fa4", None, None, status="OOM"),  # failed: never picked
        _row((1, 16, 65536, 128), "dense", "flex", 1.0, 1.0),  # other backends are ignored
        _row((4, 4, 512, 64), "sliding_window", "ours", 1.0, 1.0),  # no fa4 row: no entry
    ]}
    table = table_from_results(data, source="x.json")
    got = {(e["pattern"], e["head_dim"], e["width"]): (e["train"], e["infer"]) for e in table["entries"]}
    assert got == {("spattention", 128, 256): ("fa4", "fa4"), ("dense", 128, 65536): ("triton", "triton")}
    assert table["gpu"] == "Fake GPU" and table["measured"]["source"] == "x.json"


def test_table_from_results_without_fa4_rows_is_an_error():
    data = {"results": [_row((1, 4, 64, 16), "spattention", "ours", 1.0, 2.0)]}
    with pytest.raises(ValueError, match="both the Triton kernel"):
        table_from_results(data)


def test_load_table_rejects_bad_entries(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": 1, "entries": [
        {"pattern": "spattention", "head_dim": 128, "width": 256, "train": "cudnn", "infer": "triton"}]}))
    with pytest.raises(ValueError, match=r"t.json, entries\[0\]: train must be one of triton, fa4"):
        load_table(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="format=1"):
        load_table(path)


SHIPPED = sorted((REPO / "olmoe_spattn" / "dispatch").glob("*.json"))


def _results_of(table_path: Path) -> Path:
    """A shipped table's bench results: benchmarks/results/<gpu-slug>/<measured.source>."""
    source = json.loads(table_path.read_text())["measured"]["source"]
    return REPO / "benchmarks" / "results" / table_path.stem / source


@pytest.mark.parametrize("table_path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_table_is_the_one_its_bench_results_give(table_path):
    results = _results_of(table_path)
    assert results.is_file(), f"{table_path.name} ships without its bench results ({results})"
    shipped = json.loads(table_path.read_text())
    assert dispatch.gpu_slug(shipped["gpu"]) == table_path.stem
    assert shipped == table_from_results(json.loads(results.read_text()), source=results.name)
    _, entries = load_table(table_path)
    assert entries and dispatch.table_path_for(shipped["gpu"]) == table_path


def test_gpus_without_a_shipped_table_have_none():
    assert H100_TABLE in SHIPPED
    assert dispatch.table_path_for("NVIDIA GeForce RTX 3090") is None


@pytest.mark.parametrize("table_path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_table_picks_the_faster_kernel_on_every_bench_row(table_path):
    """Goal of ``auto``: every measured row at least as fast as the faster of triton and fa4
    (5%: the noise of one run)."""
    _, entries = load_table(table_path)
    rows = json.loads(_results_of(table_path).read_text())["results"]
    by_cell = {}
    for r in rows:
        if r["backend"] in ("ours", "fa4"):
            key = (tuple(r["shape"]), r["pattern"], str(r["partition_len"]))
            by_cell.setdefault(key, {})["triton" if r["backend"] == "ours" else "fa4"] = r
    checked = 0
    for (shape, pattern, n), cell in by_cell.items():
        if not any(r["status"] == "ok" for r in cell.values()):
            continue  # skipped by the run's time budget (no partition length recorded)
        b, h, t, d = shape
        spec = BandSpec(pattern, h, n if n == "dynamic" else int(n))
        for mode, field in (("train", "fwdbwd_ms"), ("infer", "fwd_ms")):
            times = {k: r[field] for k, r in cell.items() if r["status"] == "ok" and r[field]}
            if "triton" not in times:
                continue
            entry = choose(entries, pattern, d, band_width(spec, t), mode == "train")
            picked = getattr(entry, mode)
            assert picked in times, f"{shape} {pattern} {mode}: picked {picked}, which did not run"
            assert times[picked] <= 1.05 * min(times.values()), f"{shape} {pattern} {mode}: {picked} {times}"
            checked += 1
    assert checked, "no row measured both kernels"


def test_bench_kernel_writes_a_table_from_earlier_results(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(["bench", "kernel", "--dispatch-from", str(H100_RESULTS), "--write-dispatch", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads(H100_TABLE.read_text())
    assert "wrote dispatch table" in capsys.readouterr().out


def test_write_dispatch_after_a_run_without_fa4_rows_says_why(tmp_path, capsys):
    status = main([
        "bench", "kernel", "--device", "cpu", "--shapes", "1,2,32,16", "--patterns", "spattention",
        "--backends", "torch", "--warmup", "0", "--iters", "1", "--rounds", "1", "--no-plot", "--no-check",
        "--out-dir", str(tmp_path), "--write-dispatch", str(tmp_path / "table.json"),
    ])
    assert status == 2 and "both the Triton kernel ('ours') and 'fa4'" in capsys.readouterr().err
    assert (tmp_path / "kernel_bench.json").is_file() and not (tmp_path / "table.json").exists()
