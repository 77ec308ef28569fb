"""`olmoe-spattn bench`: the dispatcher, argument checks and a tiny CPU run of `bench kernel`
(masked-SDPA and Flex forward rows), so CI exercises the harness without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from olmoe_spattn.bench import kernel, measure, report
from olmoe_spattn.cli import main


def test_bench_kernel_help_lists_options():
    proc = subprocess.run(
        [sys.executable, "-m", "olmoe_spattn.cli", "bench", "kernel", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--shapes", "--patterns", "--backends", "--quick", "--no-fa4", "--out-dir", "--cuda-graphs",
                   "--no-autograd-threads", "--no-gc"):
        assert option in proc.stdout


def test_parse_shapes_and_errors():
    assert kernel.parse_shapes("8,16,4096,128; 1x8x4096x128") == [(8, 16, 4096, 128), (1, 8, 4096, 128)]
    for bad in ("8,16,4096", "8,16,0,128", "a,b,c,d", ""):
        with pytest.raises(Exception, match="shape|at least one"):
            kernel.parse_shapes(bad)


def test_unknown_pattern_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernel", "--patterns", "exclusive_bands,nope"])
    assert exc.value.code == 2
    assert "nope" in capsys.readouterr().err


def test_flops_and_pairs_follow_band_coverage():
    from olmoe_spattn import BandSpec

    spec = BandSpec("exclusive_bands", 4, 64)
    # the heads partition the causal triangle (d < N = T) exactly once
    assert measure.allowed_pairs(spec, 64, 4) == measure.allowed_pairs(None, 64, 1)
    assert measure.attention_flops(10, 2, 8) == 4 * 2 * 8 * 10
    assert report.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cpu_quick_run_writes_results(tmp_path, capsys):
    status = main([
        "bench", "kernel", "--device", "cpu", "--quick", "--shapes", "1,4,64,16",
        "--patterns", "exclusive_bands,spattention", "--out-dir", str(tmp_path),
        "--warmup", "1", "--iters", "2", "--rounds", "2",
    ])
    assert status == 0
    data = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert data["device"] == "cpu" and data["settings"]["dtype"] == "float32"
    rows = {(r["pattern"], r["backend"]): r for r in data["results"]}
    for pattern in ("exclusive_bands", "spattention"):
        torch_row, flex_row = rows[(pattern, "torch")], rows[(pattern, "flex")]
        assert torch_row["status"] == "ok" and torch_row["fwd_ms"] > 0 and torch_row["fwdbwd_ms"] > 0
        assert flex_row["fwd_ms"] > 0 and flex_row["fwdbwd_ms"] is None  # no CPU backward in Flex
        assert flex_row["max_err"] is not None and flex_row["max_err"] < 1e-4  # same mask as masked SDPA
        assert torch_row["tflops_fwd"] > 0
    dense = rows[("dense_causal", "sdpa_dense")]
    assert dense["fwd_ms"] > 0 and dense["fwdbwd_ms"] > 0

    table = (tmp_path / "kernel_bench.md").read_text()
    assert "| 1,4,64,16 | spattention | flex |" in table
    assert (tmp_path / "kernel_bench.png").stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out


def test_our_rows_record_the_backward_they_timed(tmp_path):
    # on a CPU (the Triton interpreter) our kernel's backward is the Triton pair
    assert main(["bench", "kernel", "--device", "cpu", "--quick", "--backends", "ours", "--shapes", "1,2,40,16",
                 "--patterns", "spattention", "--out-dir", str(tmp_path), "--warmup", "1", "--iters", "1",
                 "--rounds", "1"]) == 0
    rows = json.loads((tmp_path / "kernel_bench.json").read_text())["results"]
    ours = [r for r in rows if r["backend"] == "ours"]
    assert len(ours) == 1 and ours[0]["status"] == "ok" and ours[0]["extra"]["backward"] == "two_pass"


def test_missing_bench_module_is_a_clear_error(capsys, monkeypatch):
    from olmoe_spattn.commands import bench

    kinds = {**bench.KINDS, "nothing": ("olmoe_spattn.bench.does_not_exist", "a benchmark not installed")}
    monkeypatch.setattr(bench, "KINDS", kinds)
    assert main(["bench", "nothing"]) == 2
    assert "olmoe_spattn.bench.does_not_exist is missing" in capsys.readouterr().err
    # the other subcommands keep working
    assert main(["show-pattern", "--heads", "2", "--seq-len", "8"]) == 0


@pytest.mark.gpu
def test_cuda_quick_run_agrees_with_masked_sdpa(tmp_path):
    status = main([
        "bench", "kernel", "--device", "cuda", "--shapes", "2,4,512,64",
        "--patterns", "exclusive_bands,spattention", "--backends", "flex,torch,cudnn_dense",
        "--out-dir", str(tmp_path), "--no-plot", "--warmup", "1", "--rounds", "1", "--min-round-ms", "1",
    ])
    assert status == 0
    rows = {(r["pattern"], r["backend"]): r for r in json.loads((tmp_path / "kernel_bench.json").read_text())["results"]}
    for pattern in ("exclusive_bands", "spattention"):
        row = rows[(pattern, "torch")]
        assert row["status"] == "ok" and row["fwdbwd_ms"] > 0 and row["peak_over_io"] >= 1.0
        assert row["max_err"] < 2e-2 and row["max_grad_err"] < 5e-2  # bf16 masked SDPA vs compiled Flex
        assert row["speedup_vs_flex_fwdbwd"] > 0 and row["speedup_vs_cudnn_fwdbwd"] > 0
    assert rows[("dense_causal", "cudnn_dense")]["fwdbwd_ms"] > 0


def test_plot_labels_missing_and_out_of_memory_bars(tmp_path, monkeypatch):
    """A variant without a time is drawn as a labelled stub (OOM, n/a), not an invisible zero bar."""
    import matplotlib.pyplot as plt

    def row(pattern, backend, ms, status="ok", note=""):
        return asdict(report.Row([1, 4, 64, 16], pattern, backend, 64, status, note, fwd_ms=ms, fwdbwd_ms=ms))

    data = {"gpu": "test", "date": "today", "settings": {"dtype": "float32"}, "results": [
        row("spattention", "ours", 1.0),
        row("spattention", "flex", None, "error", "fwd OutOfMemoryError: CUDA out of memory"),
        row("exclusive_bands", "ours", 2.0),
    ]}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert report.plot(data, tmp_path / "p.png").stat().st_size > 1000
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    assert "OOM" in texts and "n/a" in texts  # flex OOM on spattention, never measured on exclusive_bands
    assert {"1", "2"} <= set(texts)


def test_cuda_only_modes_refuse_cpu_clearly(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "decode"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [
    ["sweep", "--shapes", "1,4,256,64", "--patterns", "exclusive_bands", "--rep-ms", "2"],
    ["decode", "--patterns", "spattention", "--rep-ms", "2"],
    ["overhead", "--rep-ms", "2"],
])
def test_cuda_kernel_modes_write_tables(tmp_path, mode):
    out = tmp_path / "table.md"
    assert main(["bench", *mode, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len([x for x in lines if x.startswith("| ")]) >= 3  # header + at least two measured rows


def test_sweep_drives_every_kernel_kind_in_the_interpreter(monkeypatch):
    """`bench sweep` calls the kernels' launch functions directly: run it through the Triton
    interpreter (one call per configuration instead of do_bench) so a launch-signature change
    in the kernels breaks this test, not the GPU run."""
    import os

    from olmoe_spattn.bench import modes
    from olmoe_spattn.kernels import autotune

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets it on CPU machines)")
    calls = []
    monkeypatch.setattr(modes, "_bench", lambda fn, rep_ms: calls.append(fn()) or 1.0)
    monkeypatch.setattr(autotune, "_SPACE", {kind: space[:1] for kind, space in autotune._SPACE.items()})
    lines = modes.sweep([(1, 2, 32, 16)], ["exclusive_bands"], 1.0, device="cpu")
    kinds = {line.split(" | ")[2] for line in lines[2:]}
    gluon = {"fwd_sm90", "fwd_sm90_ws", "dq_sm90", "dkdv_sm90"}  # timed only where they run: SM90 GPUs
    assert gluon <= set(autotune._SPACE)
    assert kinds == set(autotune._SPACE) - {"decode"} - gluon, lines
    assert all("inf" not in line and "Error" not in line for line in lines[2:]), lines


@pytest.mark.parametrize("argv0", ["/usr/bin/olmoe-spattn", "/src/olmoe_spattn/__main__.py"])
def test_recorded_command_line_keeps_options_and_drops_output_paths(argv0):
    """Results record the command however it was started, without the machine's paths."""
    from olmoe_spattn.bench.report import command_line

    argv = [argv0, "bench", "table2", "--seq-lens", "4096,16384", "--out", "/tmp/t", "--out-dir=/x", "--fresh", "--json", "/j"]
    assert command_line(argv, "table2") == "olmoe-spattn bench table2 --seq-lens 4096,16384 --fresh"


def test_sweep_times_each_feature_value_and_restores_the_environment(monkeypatch):
    """`bench sweep --features 'none;tma_dq'`: every kernel config under each value, rows
    labelled with it, and the caller's OLMOE_SPATTN_TRITON_FEATURES back afterwards."""
    import os

    from olmoe_spattn.bench import modes
    from olmoe_spattn.kernels import autotune

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets it on CPU machines)")
    seen = []
    monkeypatch.setattr(
        modes, "_bench", lambda fn, rep_ms: (seen.append(os.environ.get(modes.FEATURES_ENV)), fn(), 1.0)[2]
    )
    monkeypatch.setattr(autotune, "_SPACE", {kind: space[:1] for kind, space in autotune._SPACE.items()})
    from olmoe_spattn.kernels import launch

    real_config = launch.fixed_config
    monkeypatch.setenv(modes.FEATURES_ENV, "flat")
    lines = modes.sweep([(1, 2, 32, 16)], ["exclusive_bands"], 1.0, device="cpu", features=["none", "tma_dq"])
    assert launch.fixed_config is real_config
    labels = [line.split(" | ")[3] for line in lines[2:]]
    assert labels == ["none", "tma_dq"] * 4, lines
    assert set(seen) == {"none", "tma_dq"}
    assert os.environ[modes.FEATURES_ENV] == "flat"


def test_sweep_rejects_an_unknown_feature_before_running(capsys):
    assert main(["bench", "sweep", "--features", "none;tma_everything"]) != 0
    err = capsys.readouterr().err
    assert "unknown ['tma_everything']; allowed: tma, tma_dq" in err, err


def test_peak_memory_counts_the_call_and_its_inputs_not_other_live_tensors(monkeypatch):
    """The kernel table's peak is one call's footprint: its inputs plus what it allocates beyond
    what was already live (another backend's cached block masks must not count)."""
    import torch

    from olmoe_spattn.bench import timing

    state = {"allocated": 1000, "peak": 0}  # 1000 bytes already live: caches, other tensors

    def call():
        state["peak"] = max(state["peak"], state["allocated"] + 300)  # the call's outputs, workspaces

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    inputs = (torch.zeros(10, dtype=torch.float16), torch.zeros(5, dtype=torch.float32))  # 20 + 20 bytes
    assert timing.peak_memory_bytes(call, torch.device("cuda"), inputs=inputs) == 300 + 40
    assert timing.peak_memory_bytes(lambda: None, torch.device("cpu")) is None


def test_report_names_how_peak_memory_was_measured():
    from olmoe_spattn.bench import report

    settings = {"dtype": "bfloat16", "rounds": 3, "iters": 3, "partition_len": "seq"}
    data = {"gpu": "g", "date": "d", "command": "c", "torch": "t", "settings": settings, "results": []}
    assert report.PEAK_TEXT[report.PEAK_ALL_LIVE] in report.to_markdown(data)  # files from before the field
    assert report.PEAK_TEXT[report.PEAK_STEP] in report.to_markdown({**data, "peak_memory": report.PEAK_STEP})


def test_written_sweep_tables_say_what_they_were_measured_on(monkeypatch):
    from olmoe_spattn.bench import modes

    monkeypatch.setattr("sys.argv", ["olmoe-spattn", "bench", "sweep", "--features", "none;tma_dq", "--out", "/x/y.md"])
    head = modes.results_header("sweep")
    assert head[0].startswith("### bench sweep: ") and "UTC" in head[0]
    assert head[2] == "`olmoe-spattn bench sweep --features none;tma_dq`  "  # no output path
    assert "torch " in head[3] and "triton " in head[3]


def _autograd_threads_on() -> bool:
    import torch

    return torch._C._is_multithreading_enabled()


def _gc_on() -> bool:
    import gc

    return gc.isenabled()


# (flag, its setting in kernel_bench.json, what the header says when it is given, the process state)
PROCESS_FLAGS = [
    ("--no-autograd-threads", "autograd_threads", "every backward on the calling thread", _autograd_threads_on),
    ("--no-gc", "gc", "automatic garbage collection off", _gc_on),
]


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize(("flag", "setting", "note", "state"), PROCESS_FLAGS, ids=[f[0] for f in PROCESS_FLAGS])
def test_process_flags_hold_while_timing_and_are_restored(tmp_path, monkeypatch, given, flag, setting, note, state):
    """``--no-autograd-threads`` runs every backward on the calling thread, ``--no-gc`` turns automatic
    garbage collection off: for every timed shape, recorded in the results, undone afterwards."""
    seen = []
    real = measure.run_shape

    def recording(*args, **kwargs):
        seen.append(state())
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "run_shape", recording)
    argv = ["bench", "kernel", "--device", "cpu", "--quick", "--backends", "torch", "--shapes", "1,2,32,16",
            "--patterns", "spattention", "--out-dir", str(tmp_path), "--warmup", "1", "--iters", "1",
            "--rounds", "1", "--no-plot"]
    assert main(argv + ([flag] if given else [])) == 0
    assert seen == [not given]
    assert state()  # the process's setting is restored afterwards
    data = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert data["settings"][setting] is (not given)
    header = "\n".join((tmp_path / "kernel_bench.md").read_text().splitlines()[:6])
    assert (note in header) is given


def test_bench_overhead_times_the_backward_on_the_calling_thread_when_asked():
    import torch

    from olmoe_spattn.bench.modes import on_calling_thread

    x = torch.ones(3, requires_grad=True)
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(torch._C._is_multithreading_enabled())
            return g

    step = on_calling_thread(lambda: Spy.apply(x).sum().backward())
    assert step() is None and seen == [False]
    assert torch._C._is_multithreading_enabled()  # restored after the call
