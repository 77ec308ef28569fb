"""``launch/``: the torchrun / SLURM launchers, run for real on the CPU (gloo, loopback only).

* single node: ``torchrun --nproc-per-node 2`` trains the tiny recipe data-parallel; both ranks
  log the same loss every step, and step 1 (before any update) equals a one-process run on the
  same global batch.
* multi node: two torchrun agents (NODE_RANK 0 and 1, one process each) meet through c10d
  rendezvous on 127.0.0.1 and train; the result equals the single-node two-rank run.
* bad settings give one clear error line and exit status 2; DRY_RUN prints the exact command.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from olmoe_spattn.olmo.train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SINGLE = LAUNCH / "torchrun_single_node.sh"
MULTI = LAUNCH / "torchrun_multi_node.sh"
SLURM = LAUNCH / "slurm.sbatch"
STEPS = 3
#: environment variables the launchers read; cleared so the caller's shell cannot leak in
LAUNCH_VARS = (
    "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID", "RDZV_TIMEOUT",
    "DRY_RUN", "SLURM_JOB_NODELIST", "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE", "OLMOE_SPATTN_ROOT",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", LOG_FILTER_TYPE="all_ranks")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(data: Path, save: Path) -> list[str]:
    return [
        "--set", f"train.max_steps={STEPS}",
        "--set", "train.log_interval=1",
        "--set", "train.save_interval=1000",
        "--set", f"train.save_folder={save}",
        "--set", f"data.paths=[{data}]",
    ]


def _metrics(save: Path) -> dict[int, float]:
    return {step: m["train/CE loss"] for step, m in read_metrics(save).items() if "train/CE loss" in m}


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\t\S+:(\d+)\t(\S+)\t", re.M)


def _logged_losses(text: str) -> dict[int, dict[int, str]]:
    """{local rank: {step: CE loss as printed}} from OLMo-core's console logger records."""
    out: dict[int, dict[int, str]] = {}
    starts = list(_RECORD.finditer(text))
    for i, m in enumerate(starts):
        body = text[m.start() : starts[i + 1].start() if i + 1 < len(starts) else len(text)]
        if "console_logger" not in m.group(2):
            continue
        step = re.search(r"\[step=(\d+)/", body)
        loss = re.search(r"train/CE loss=([0-9.]+)", body)
        if step and loss:
            out.setdefault(int(m.group(1)), {})[int(step.group(1))] = loss.group(1)
    return out


def _global_ranks(text: str) -> list[int]:
    return [int(r) for r in re.findall(r"Global rank (\d+) = local rank", text)]


# ------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def single_node_run(workdir: Path) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    data, save = workdir / "data" / "tiny.npy", workdir / "ddp"
    proc = subprocess.run(
        ["bash", str(SINGLE), "tiny", *_train_args(data, save)],
        env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=240, cwd=workdir,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, data, save


def test_single_node_two_ranks_agree(single_node_run) -> None:
    proc, data, save = single_node_run
    out = proc.stdout + proc.stderr
    assert out.splitlines()[0].startswith("+ ") and "--nproc-per-node 2" in out.splitlines()[0]
    assert "Data parallel world size = 2" in out
    assert sorted(_global_ranks(out)) == [0, 1]
    losses = _logged_losses(out)
    assert set(losses) == {0, 1}
    assert sorted(losses[0]) == list(range(1, STEPS + 1))
    assert losses[0] == losses[1]  # both ranks log the same loss at every step
    assert sorted(_metrics(save)) == list(range(1, STEPS + 1))
    assert "tokens/s" in out


def test_single_node_matches_one_process(single_node_run, workdir: Path) -> None:
    """Two ranks x 8 sequences == one process x 2 microbatches of 8: same global batch."""
    _, data, save = single_node_run
    one = workdir / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "olmoe_spattn.cli", "train", "tiny", *_train_args(data, one)],
        env=_env(), capture_output=True, text=True, timeout=180, cwd=workdir,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp, single = _metrics(save), _metrics(one)
    assert ddp[1] == pytest.approx(single[1], rel=1e-6)  # before any update: identical batch and loss
    for step in range(2, STEPS + 1):  # after updates: same trajectory up to reduction order
        assert ddp[step] == pytest.approx(single[step], rel=1e-3)


def test_multi_node_two_agents_on_loopback(single_node_run, workdir: Path) -> None:
    _, data, ddp_save = single_node_run
    save = workdir / "multi"
    env = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), NPROC_PER_NODE="1",
               RDZV_ID="pytest-multi-node", RDZV_TIMEOUT="120")
    agents = [
        subprocess.Popen(
            ["bash", str(MULTI), "tiny", *_train_args(data, save)],
            env=_env(**env, NODE_RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=workdir,
        )
        for rank in (0, 1)
    ]
    outs = []
    try:
        for p in agents:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(agents, outs)):
        assert p.returncode == 0, f"agent NODE_RANK={rank}:\n{out[-4000:]}"
        first = out.splitlines()[0]
        assert first.startswith("+ ") and f"--node-rank {rank}" in first
        assert "--rdzv-backend c10d" in first and "--rdzv-endpoint 127.0.0.1:" in first
        assert "Data parallel world size = 2" in out
    # c10d numbers the nodes in the order they join: together they hold global ranks 0 and 1
    assert sorted(_global_ranks(outs[0]) + _global_ranks(outs[1])) == [0, 1]
    per_agent = [_logged_losses(out)[0] for out in outs]
    assert per_agent[0] == per_agent[1] and sorted(per_agent[0]) == list(range(1, STEPS + 1))
    multi = _metrics(save)
    assert multi == pytest.approx(_metrics(ddp_save), rel=1e-6)  # same as 2 ranks on one node


# ------------------------------------------------------------------- commands and errors
def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], env=_env(**env), capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


def test_single_node_dry_run_prints_exact_command(tmp_path: Path) -> None:
    cfg = tmp_path / "my recipe.yaml"
    cfg.write_text("name: x\n")
    proc = _run(SINGLE, "--dry-run", str(cfg), "--set", "train.max_steps=5", "--dry-run", NPROC_PER_NODE="4")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"+ {sys.executable} -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 4")
    # quoted for the shell; the train options (including train's own --dry-run) pass through
    assert line.endswith(r"-m olmoe_spattn.cli train " + str(cfg).replace(" ", r"\ ") + " --set train.max_steps=5 --dry-run")
    proc = _run(SINGLE, "tiny", DRY_RUN="1", MASTER_PORT="29511")
    assert "--rdzv-endpoint 127.0.0.1:29511" in proc.stdout and str(ROOT / "configs" / "tiny.yaml") in proc.stdout
    assert "NCCL" not in proc.stdout  # NCCL settings are never touched


def test_multi_node_dry_run(tmp_path: Path) -> None:
    proc = _run(MULTI, "tiny", "--set", "a=1", DRY_RUN="1", NNODES="4", NODE_RANK="3", MASTER_ADDR="node-0.cluster",
                MASTER_PORT="29600", NPROC_PER_NODE="8", RDZV_ID="job42")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"+ {sys.executable} -m torch.distributed.run --nnodes 4 --node-rank 3 --nproc-per-node 8 "
        "--rdzv-backend c10d --rdzv-endpoint node-0.cluster:29600 --rdzv-id job42 "
        f"--rdzv-conf join_timeout=900 -m olmoe_spattn.cli train {ROOT / 'configs' / 'tiny.yaml'} --set a=1"
    )
    one = _run(MULTI, "tiny", DRY_RUN="1", NNODES="1", NODE_RANK="0")  # one node needs no MASTER_ADDR
    assert one.returncode == 0 and "--rdzv-endpoint 127.0.0.1:29500" in one.stdout


BAD_SETTINGS = [
    (SINGLE, ["missing.yaml"], {}, "config file 'missing.yaml' not found (bundled recipes: "),
    (SINGLE, [], {}, "missing CONFIG"),
    (SINGLE, ["tiny"], {"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE must be a whole number, got 'two'"),
    (SINGLE, ["tiny"], {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be >= 1, got '0'"),
    (SINGLE, ["tiny"], {"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port (1-65535), got '70000'"),
    (SINGLE, ["--bogus", "tiny"], {}, "unknown launcher option '--bogus'"),
    (SINGLE, ["tiny"], {"DRY_RUN": "yes"}, "DRY_RUN must be 0 or 1, got 'yes'"),
    (MULTI, ["tiny"], {}, "NNODES is not set"),
    (MULTI, ["tiny"], {"NNODES": "2"}, "NODE_RANK is not set (this node's index, 0..1)"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be < NNODES=2"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "-1", "MASTER_ADDR": "h"}, "NODE_RANK must be a whole number, got '-1'"),
    (MULTI, ["tiny"], {"NNODES": "x2", "NODE_RANK": "0"}, "NNODES must be a whole number, got 'x2'"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR is not set"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "a b"}, "MASTER_ADDR='a b' is not a hostname"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
     "MASTER_PORT must be a whole number, got 'http'"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "NPROC_PER_NODE": "1.5"},
     "NPROC_PER_NODE must be a whole number, got '1.5'"),
    (MULTI, ["tiny"], {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "RDZV_ID": "a/b"}, "RDZV_ID='a/b' may hold only"),
    (MULTI, ["nope.yaml"], {"NNODES": "1", "NODE_RANK": "0"}, "config file 'nope.yaml' not found"),
    (SLURM, ["tiny"], {}, "no SLURM allocation (SLURM_JOB_NODELIST is unset): submit with sbatch"),
]


@pytest.mark.parametrize("script,args,env,message", BAD_SETTINGS)
def test_bad_settings_are_refused_clearly(script: Path, args: list[str], env: dict[str, str], message: str) -> None:
    proc = _run(script, *args, **env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "torch.distributed.run" not in proc.stdout  # nothing was launched


@pytest.mark.parametrize("script", [SINGLE, MULTI, SLURM])
def test_help(script: Path) -> None:
    proc = _run(script, "--help")
    assert proc.returncode == 0
    assert "Usage" in proc.stdout and "CONFIG" in proc.stdout
    if script is not SINGLE:
        for var in ("NNODES", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_ID"):
            assert var in proc.stdout


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Path:
    """``scontrol`` that expands a two-node list and an ``srun`` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[[ "$1 $2 $3" == "show hostnames gpu-[07-08]" ]] || exit 1\necho gpu-07\necho gpu-08\n'
    )
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path / "srun.args"}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_slurm_derives_master_and_runs_one_agent_per_node(fake_slurm: Path, tmp_path: Path) -> None:
    env = dict(PATH=f"{fake_slurm}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-[07-08]",
               SLURM_JOB_ID="777", SLURM_GPUS_PER_NODE="h100:8", NODE_RANK="5")
    dry = _run(SLURM, "tiny", "--set", "x=1", DRY_RUN="1", **env)
    assert dry.returncode == 0, dry.stderr
    assert "MASTER_ADDR=gpu-07 MASTER_PORT=29500 NPROC_PER_NODE=8 RDZV_ID=777" in dry.stdout
    assert "+ srun --nodes 2 --ntasks 2 --ntasks-per-node 1" in dry.stdout
    assert (
        "--nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint gpu-07:29500 "
        "--rdzv-id 777" in dry.stdout
    )
    assert not (tmp_path / "srun.args").exists()  # DRY_RUN: srun was not called

    real = _run(SLURM, "tiny", "--set", "x=1", **env)
    assert real.returncode == 0, real.stderr
    srun_args = (tmp_path / "srun.args").read_text().split()
    assert srun_args[:7] == ["--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert srun_args[7:] == [str(MULTI), str(ROOT / "configs" / "tiny.yaml"), "--set", "x=1"]

    too_many = _run(SLURM, "tiny", NNODES="3", **env)
    assert too_many.returncode == 2 and "NNODES=3 but the allocation has only 2 node(s)" in too_many.stderr


def test_scripts_are_executable_and_parse() -> None:
    for script in (SINGLE, MULTI, SLURM, LAUNCH / "_common.sh"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for script in (SINGLE, MULTI, SLURM):
        assert os.access(script, os.X_OK)
