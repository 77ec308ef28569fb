"""``benchmarks/two_gpus.py``: the two-GPU driver.

* for real on the CPU (``--cpu-smoke``, gloo, 2 ranks): one rank is SIGKILLed mid-run, the same
  command resumes from the last checkpoint and its losses equal the uninterrupted run's; the
  summary says PASS and names the checkpoint it loaded;
* every stage's verdict logic on stand-in runs (no training): right numbers pass, wrong ones
  (diverging losses, a rising curve, a run that never resumed, a crashed run) fail, and a stage
  that raises does not stop the next one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_two_gpus.sh"
spec = importlib.util.spec_from_file_location("two_gpus", ROOT / "benchmarks" / "two_gpus.py")
tg = importlib.util.module_from_spec(spec)
sys.modules["two_gpus"] = tg
spec.loader.exec_module(tg)


# ------------------------------------------------------------------ stand-in runs
def _curve(n: int, start: float = 10.0, slope: float = -0.01) -> dict[int, dict[str, float]]:
    return {s: {tg.LOSS: start + slope * s, tg.TPS: 1000.0 + s % 3, tg.MFU: 10.0} for s in range(1, n + 1)}


class FakeDriver(tg.Driver):
    """A Driver whose launch returns prepared metrics instead of training."""

    def __init__(self, tmp: Path, cpu: bool = False, tweak=None):
        super().__init__(tg.cpu_plan() if cpu else tg.gpu_plan(), tmp / "out", tmp / "work", 100.0, sys.executable)
        self.tweak = tweak or (lambda name, metrics, log: None)

    def launch(self, name, recipe, sets, steps, stage, *, nproc=2, gpus=None, fresh=True,
               kill_rank_after=None, save_name=None):
        save = self.work / (save_name or name)
        save.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        metrics, rc, text = _curve(steps), 0, ""
        if kill_rank_after is not None:
            metrics = {s: m for s, m in metrics.items() if s <= kill_rank_after}
            rc = 1
            (save / "step0").mkdir(exist_ok=True)
            (save / f"step{self.plan.resume_save}").mkdir(exist_ok=True)
            text = f"# two_gpus.py: SIGKILLed rank 1 (pid 1) after step {kill_rank_after}\n"
        if name == "resume_relaunch":
            text = f"Loading checkpoint from '{save}/step{self.plan.resume_save}'...\n"
        lines = [text]
        self.tweak(name, metrics, lines)
        log.write_text(lines[0])
        run = tg.Run(name, ["timeout", "-s", "INT", "9", "bash", "launch/x.sh", recipe, "--set", sets[0]],
                     rc, 1.0, save, log, metrics)
        self.runs[name] = run
        return run


    def launch_nodes(self, name, recipe, sets, steps, stage):
        return [self.launch(f"{name}_rank{node}", recipe, sets, steps, stage, save_name=name) for node in (0, 1)]


def _all_stages(d: tg.Driver) -> dict:
    for stage in tg.STAGES:
        tg.RUNNERS[stage](d)
    return d.results


def test_all_stages_pass_on_consistent_runs(tmp_path):
    results = _all_stages(FakeDriver(tmp_path))
    assert {s: r["ok"] for s, r in results.items()} == {s: True for s in tg.STAGES}
    assert results["resume"]["resumed_from"] == tg.gpu_plan().resume_save
    assert results["scaling"]["efficiency"] == pytest.approx(1.0)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.count("**PASS**") == len(tg.STAGES)
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tp"]["max_rel_diff"] == 0


@pytest.mark.parametrize(
    ("stage", "broken", "tweak"),
    [
        ("tp", "tp2", lambda m: m[2].__setitem__(tg.LOSS, m[2][tg.LOSS] * 1.05)),
        ("resume", "resume_relaunch", lambda m: m[20].__setitem__(tg.LOSS, m[20][tg.LOSS] + 0.5)),
        ("ep", "ep_band", lambda m: m[30].__setitem__(tg.LOSS, math.nan)),
        ("curves", "curves_dense", lambda m: [m[s].__setitem__(tg.LOSS, 5.0 + 0.01 * s) for s in m]),
        ("curves", "curves_band", lambda m: [m.pop(s) for s in list(m) if s > 200]),
        ("long", "long_dense", lambda m: m.clear()),
        ("nodes", "nodes_rank0", lambda m: m.clear()),
    ],
)
def test_wrong_numbers_fail_their_stage(tmp_path, stage, broken, tweak):
    def change(name, metrics, text):
        if name == broken:
            tweak(metrics)

    results = _all_stages(FakeDriver(tmp_path, tweak=change))
    assert results[stage]["ok"] is False, results[stage]["text"]
    assert [s for s, r in results.items() if r["ok"] is False] == [stage]


def test_resume_without_checkpoint_load_fails(tmp_path):
    def no_load(name, metrics, text):
        if name == "resume_relaunch":
            text[0] = "No checkpoint found\n"

    assert _all_stages(FakeDriver(tmp_path, tweak=no_load))["resume"]["ok"] is False


def test_stage_error_is_recorded_and_next_stage_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tg, "Driver", lambda plan, out, work, budget, python: FakeDriver(Path(out).parent))
    monkeypatch.setitem(tg.RUNNERS, "tp", lambda d: 1 / 0)
    rc = tg.main(["--out", str(tmp_path / "out"), "--stages", "tp,ep"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rc == 1
    assert results["tp"]["ok"] is False and "ZeroDivisionError" in results["tp"]["text"]
    assert results["ep"]["ok"] is True


def test_bad_options_are_refused():
    for argv in (["--out", "x", "--stages", "ep,warp"], ["--out", "x", "--budget-s", "0"]):
        with pytest.raises(SystemExit) as err:
            tg.main(argv)
        assert err.value.code == 2


def test_compare_and_falling():
    a = {1: 10.0, 2: 9.0}
    assert tg.compare(a, {1: 10.0, 2: 9.0 * (1 + 5e-3)}, [1, 2], 1e-2)[0]
    assert not tg.compare(a, {1: 10.0, 2: 9.5}, [1, 2], 1e-2)[0]
    assert not tg.compare(a, {1: 10.0}, [1, 2], 1e-2)[0]
    assert tg.finite_and_falling({s: 10 - s for s in range(1, 8)})[0]
    assert not tg.finite_and_falling({s: 10 + s for s in range(1, 8)})[0]
    assert not tg.finite_and_falling({1: 3.0, 2: 2.0})[0]


# ------------------------------------------------------------------ real runs (CPU, gloo)
@pytest.mark.slow
def test_cpu_smoke_kill_one_rank_and_resume(tmp_path):
    """Three 2-rank runs on the CPU: uninterrupted, SIGKILL of rank 1 mid-run, relaunch."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "WORK": str(tmp_path / "work")}
    env.pop("MASTER_PORT", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--cpu-smoke", "--stages", "resume"],
                          capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + summary
    result = json.loads((out / "results.json").read_text())["resume"]
    assert result["ok"] is True and result["max_rel_diff"] <= 1e-4
    assert result["resumed_from"] == tg.cpu_plan().resume_save
    assert "SIGKILLed rank 1" in summary and "| resume | **PASS** |" in summary
    for name in ("resume_ref", "resume_killed", "resume_relaunch"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert not (tmp_path / "work").exists()  # scratch removed unless KEEP_WORK=1
