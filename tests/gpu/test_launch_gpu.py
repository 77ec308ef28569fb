"""GPU: the single-node ``torchrun`` launcher end to end with NCCL on the one GPU.

Runs ``launch/torchrun_single_node.sh`` exactly as a user would on a GPU node
(``NPROC_PER_NODE=1``), with the band kernel, then re-launches it with more steps and
checks that it resumes from the saved checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - conftest skips gpu tests anyway
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from olmoe_spattn.olmo.train import METRICS_FILE, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ROOT / "launch" / "torchrun_single_node.sh"


def _launch(tmp_path: Path, steps: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    args = [
        "tiny",
        "--set", f"train.max_steps={steps}",
        "--set", "train.log_interval=1",
        "--set", "train.save_interval=4",
        "--set", "train.device=cuda",
        "--set", "attention_backend=triton",
        "--set", f"train.save_folder={tmp_path / 'run'}",
        "--set", f"data.paths=[{tmp_path / 'tokens.npy'}]",
        "--set", f"data.tokenizer.identifier={tmp_path / 'tokenizer'}",
    ]
    return subprocess.run(["bash", str(SINGLE), *args], env=env, capture_output=True, text=True,
                          timeout=400, cwd=tmp_path)


def _losses(save: Path) -> dict[int, float]:
    return {step: m["train/CE loss"] for step, m in read_metrics(save).items() if "train/CE loss" in m}


def _loss_records(save: Path) -> list[int]:
    """The step of every loss record in metrics.jsonl in the order written (a rerun step appears twice)."""
    lines = (save / METRICS_FILE).read_text().splitlines()
    return [rec["step"] for rec in map(json.loads, filter(str.strip, lines)) if "train/CE loss" in rec]


def test_single_node_launcher_nccl_trains_and_resumes(tmp_path):
    first = _launch(tmp_path, steps=8)
    text = first.stdout + first.stderr
    assert first.returncode == 0, text[-4000:]
    assert "--nproc-per-node 1" in text.splitlines()[0]
    assert re.search(r"Using distributed backend \S*nccl", text), "the CUDA run did not use NCCL"
    assert "finished: step 8, loss" in text
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1]

    second = _launch(tmp_path, steps=12)  # same save folder: resumes from step 8
    text2 = second.stdout + second.stderr
    assert second.returncode == 0, text2[-4000:]
    assert "finished: step 12, loss" in text2
    assert f"Loading checkpoint from '{tmp_path / 'run' / 'step8'}'" in text2, text2[-4000:]
    assert "Will resume training from step 8" in text2, text2[-4000:]
    # a resume logs only steps 9-12 again; a restart would log steps 1-8 a second time
    assert _loss_records(tmp_path / "run") == list(range(1, 13))
    resumed = _losses(tmp_path / "run")
    assert all(resumed[s] == losses[s] for s in range(1, 9))
