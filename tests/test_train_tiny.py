"""End-to-end CPU training of the tiny recipe through ``olmoe-spattn train`` (OLMo-core's trainer)
on the package's built-in text: loss goes down, the tokenizer is saved with every checkpoint, a run
killed with SIGKILL resumes (not restarts) to exactly the uninterrupted losses, and activation
checkpointing really recomputes the attention layers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from olmoe_spattn.olmo.train import CRASH_ENV, METRICS_FILE, read_metrics

STEPS = 12
LOSS = "train/CE loss"


def _train(tmp: Path, run: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny",
        "--set", f"train.save_folder={tmp / run}",
        "--set", f"data.paths=[{tmp / 'tokens.npy'}]",
        "--set", f"data.tokenizer.identifier={tmp / 'tokenizer'}",
        "--set", f"train.max_steps={STEPS}",
        "--set", "train.save_interval=4",
        "--set", "train.log_interval=1",
        *extra,
    ]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=full_env)


def _loss_steps(metrics: dict[int, dict[str, float]]) -> list[int]:
    return sorted(step for step, values in metrics.items() if LOSS in values)


def _loss_records(save_folder: Path) -> list[int]:
    """The step of every loss record in ``metrics.jsonl``, in the order written (a step run twice
    appears twice)."""
    lines = (save_folder / METRICS_FILE).read_text().splitlines()
    return [rec["step"] for rec in map(json.loads, filter(str.strip, lines)) if LOSS in rec]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[int, dict[str, float]]]:
    tmp = tmp_path_factory.mktemp("train")
    out = _train(tmp, "full")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finished: step 12, loss" in out.stdout
    return tmp, read_metrics(tmp / "full")


def test_tiny_trains_and_loss_goes_down(uninterrupted):
    tmp, metrics = uninterrupted
    assert _loss_steps(metrics) == list(range(1, STEPS + 1))
    losses = [metrics[s][LOSS] for s in range(1, STEPS + 1)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert all(metrics[s]["throughput/device/TPS"] > 0 for s in range(2, STEPS + 1))
    assert "train/block 00/load imbalance" in metrics[STEPS]  # expert load balance is logged
    assert (tmp / "full" / f"step{STEPS}" / "config.json").exists()


def test_tiny_trains_on_the_builtin_text_and_saves_its_tokenizer(uninterrupted):
    """The token file is the shipped text through the locally built tokenizer, and that tokenizer
    is copied into every checkpoint."""
    from transformers import AutoTokenizer

    from olmoe_spattn.data.tiny_text import documents

    tmp, _ = uninterrupted
    tok = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"))
    ids = np.fromfile(tmp / "tokens.npy", dtype=np.uint16)
    docs = tok.decode(ids.tolist()).split("<|endoftext|>")
    assert docs[:-1] == documents() and docs[-1] == ""  # every paragraph, EOS after each
    assert len(tok) == 512 and int(ids.max()) < 512
    for step in (4, 8, STEPS):
        saved = tmp / "full" / f"step{step}" / "tokenizer"
        assert (saved / "tokenizer.json").read_bytes() == (tmp / "tokenizer" / "tokenizer.json").read_bytes()


def test_resume_after_kill_reproduces_losses(uninterrupted):
    tmp, full = uninterrupted
    killed = _train(tmp, "resumed", env={CRASH_ENV: "6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = read_metrics(tmp / "resumed")
    assert max(_loss_steps(partial)) <= 6 and not (tmp / "resumed" / "step8").exists()
    assert (tmp / "resumed" / "step4").exists()

    before = _loss_records(tmp / "resumed")
    assert before == list(range(1, max(before) + 1)), before
    resumed = _train(tmp, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert f"Loading checkpoint from '{tmp / 'resumed' / 'step4'}'" in log, log[-3000:]
    assert "Will resume training from step 4" in log, log[-3000:]
    # a resume re-runs only the steps after the checkpoint; a restart would log steps 1-4 again
    assert _loss_records(tmp / "resumed") == before + list(range(5, STEPS + 1))
    metrics = read_metrics(tmp / "resumed")
    assert _loss_steps(metrics) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert metrics[step][LOSS] == pytest.approx(full[step][LOSS], rel=1e-6, abs=1e-6), step


def test_activation_checkpointing_gives_the_same_losses(uninterrupted):
    """OLMo-core's activation checkpointing wraps the band layers without changing the math."""
    tmp, full = uninterrupted
    out = _train(tmp, "ac", "--set", "train.activation_checkpointing=attention", env={CRASH_ENV: "3"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    metrics = read_metrics(tmp / "ac")
    for step in (1, 2):
        assert metrics[step][LOSS] == pytest.approx(full[step][LOSS], rel=1e-5), step


@pytest.mark.parametrize("data_parallel", ["fsdp"])
def test_torchrun_two_ranks_on_cpu_matches_one_process(uninterrupted, data_parallel):
    """``torchrun --nproc-per-node 2 -m olmoe_spattn.cli train`` (gloo) splits the same global
    batch over two ranks: the losses equal the single-process run's."""
    tmp, full = uninterrupted
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "olmoe_spattn.cli",
        "train", "tiny",
        "--set", f"train.save_folder={tmp / data_parallel}",
        "--set", f"data.paths=[{tmp / 'tokens.npy'}]",
        "--set", f"data.tokenizer.identifier={tmp / 'tokenizer'}",
        "--set", f"train.max_steps={STEPS}",
        "--set", "train.save_interval=100",
        "--set", "train.log_interval=1",
        "--set", f"train.data_parallel={data_parallel}",
    ]
    env = {**os.environ, CRASH_ENV: "4", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert "Data parallel world size = 2" in out.stdout + out.stderr, out.stderr[-3000:]
    metrics = read_metrics(tmp / data_parallel)
    for step in (1, 2, 3):
        assert metrics[step][LOSS] == pytest.approx(full[step][LOSS], rel=1e-4), step


def test_builtin_text_never_overwrites_an_unpaired_token_file(tmp_path):
    from olmoe_spattn.olmo.recipe import load_recipe
    from olmoe_spattn.olmo.tokenizer_files import ensure_builtin_text

    tokens = tmp_path / "mine.npy"
    tokens.write_bytes(b"\x05\x00" * 10)
    recipe = load_recipe("tiny", [f"data.paths=[{tokens}]", f"data.tokenizer.identifier={tmp_path / 'tok'}"])
    with pytest.raises(ValueError, match="builtin_text=false"):
        ensure_builtin_text(recipe)
    assert tokens.read_bytes() == b"\x05\x00" * 10
    with pytest.raises(ValueError, match="data.builtin_text=true needs"):
        load_recipe("tiny", ["data.synthetic=true"])


def test_builtin_text_rebuilds_a_missing_tokenizer_that_reproduces_its_token_file(tmp_path):
    """A run started from another folder finds the token file but not the (relative) tokenizer:
    the tokenizer is rebuilt from the shipped text, and kept only because it gives the same ids."""
    import shutil

    from olmoe_spattn.olmo.recipe import load_recipe
    from olmoe_spattn.olmo.tokenizer_files import ensure_builtin_text

    tokens, tok = tmp_path / "tiny.npy", tmp_path / "tok"
    recipe = load_recipe("tiny", [f"data.paths=[{tokens}]", f"data.tokenizer.identifier={tok}"])
    ensure_builtin_text(recipe)
    made = tokens.read_bytes()
    shutil.rmtree(tok)
    ensure_builtin_text(recipe)
    assert (tok / "tokenizer.json").is_file() and tokens.read_bytes() == made
    assert not list(tmp_path.glob("*.check"))


def test_save_checkpoints_false_writes_no_checkpoint(uninterrupted):
    """``train.save_checkpoints: false`` (benchmark runs): not even the final checkpoint is written."""
    tmp, full = uninterrupted
    out = _train(tmp, "nockpt", "--set", "train.save_checkpoints=false", "--set", "train.max_steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list((tmp / "nockpt").glob("step*"))
    metrics = read_metrics(tmp / "nockpt")
    assert metrics[1][LOSS] == pytest.approx(full[1][LOSS], rel=1e-6)
    assert _loss_steps(metrics) == [1, 2, 3]
