"""Multi-GPU checks on one host with two GPUs, every stage in one call, each under its own limit.

Stages (each writes ``logs/<run>.log`` under ``--out`` and one line in ``summary.md``; a stage
that fails or runs out of time is recorded and the next one still runs):

* ``ep``      expert parallelism (degree 2) with HSDP, band attention: losses finite and falling.
* ``tp``      tensor parallelism of degree 2 vs degree 1, band attention: the first steps' losses
              agree within bf16 noise.
* ``resume``  one rank is SIGKILLed mid-run, the same command is launched again: it resumes from
              the last checkpoint and the losses after it equal an uninterrupted run's.
* ``curves``  band and its dense twin with FSDP on the same data: loss curves side by side (PNG).
* ``long``    full-depth OLMoE-1B-7B, FSDP over the two GPUs, long sequences, compiled: band vs
              dense tokens/s per GPU and MFU.
* ``scaling`` the same harness on one GPU and on two at the same per-GPU batch:
              efficiency = 2-GPU tokens/s per GPU / 1-GPU tokens/s.
* ``nodes``   ``launch/torchrun_multi_node.sh`` as 2 nodes x 1 GPU on this host (c10d on
              127.0.0.1): the two agents meet and train; losses finite and falling.

The other stages go through ``launch/torchrun_single_node.sh``. ``--cpu-smoke`` runs the same stages on the CPU
with gloo, the tiny recipe and a few steps, where expert and tensor parallelism (which need
OLMo-core's GPU MoE kernels) are replaced by degree 1 and the summary says so.

    python benchmarks/two_gpus.py --out benchmarks/results/two-gpus
    python benchmarks/two_gpus.py --out /tmp/smoke --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "launch" / "torchrun_single_node.sh"
MULTI = ROOT / "launch" / "torchrun_multi_node.sh"
STAGES = ("ep", "tp", "resume", "long", "curves", "scaling", "nodes")
LOSS = "train/CE loss"
TPS = "throughput/device/TPS"
MFU = "throughput/device/MFU"
METRICS_FILE = "metrics.jsonl"
#: NVLink multicast stays off (NCCL NVLS, symmetric memory, NVSHMEM)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------------------- settings
@dataclass
class Plan:
    """Recipes, step counts and time limits of one mode (GPU or CPU smoke)."""

    cpu: bool
    band: str
    dense: str
    common: list[str]  # --set overrides every run gets
    ep_steps: int
    tp_steps: int
    tp_compare: int  # first steps compared between TP=1 and TP=2
    tp_rel: float
    resume_steps: int
    resume_save: int
    resume_extra: list[str]
    resume_rel: float
    curve_steps: int
    long_sets: list[str]
    long_steps: int
    scale_steps: int
    limits: dict[str, int]  # seconds per run, by stage


def gpu_plan() -> Plan:
    """Two H200s: the 0.25B-1.75B recipe at seq 1024, 8 sequences per GPU, short runs."""
    return Plan(
        cpu=False,
        band="olmoe-0.25b-1.75b",
        dense="olmoe-0.25b-1.75b-dense",
        common=["train.rank_microbatch_size=8", "train.warmup_steps=20", "train.ephemeral_save_interval=null",
                "data.synthetic_tokens=6000000", "train.device=cuda"],
        ep_steps=30, tp_steps=8, tp_compare=5, tp_rel=1e-2,
        resume_steps=24, resume_save=8,
        # smaller model (4 layers, 16 experts) so that checkpoints write in seconds
        resume_extra=["model.n_layers=4", "model.num_experts=16"], resume_rel=1e-2,
        curve_steps=300,
        # selected_ops: the memory estimate of OLMoE-1B-7B at 32768 on 2 GPUs is ~78 GiB per GPU
        # (~166 GiB without activation checkpointing); whole-sequence attention (no document
        # masking) so that band vs dense measures 32k-token attention
        long_sets=["train.rank_microbatch_size=1", "train.compile=true",
                   "train.activation_checkpointing=selected_ops", "data.document_masking=false"],
        long_steps=6, scale_steps=40,
        limits={"ep": 100, "tp": 75, "resume": 70, "curves": 110, "long": 170, "scaling": 75, "nodes": 60},
    )


def cpu_plan() -> Plan:
    """CPU smoke: tiny recipe, 2 gloo ranks, a few steps per stage."""
    return Plan(
        cpu=True,
        band="tiny",
        dense="tiny-dense",
        common=["train.rank_microbatch_size=4", "train.warmup_steps=2", "train.device=cpu",
                "data.synthetic_tokens=200000"],
        ep_steps=6, tp_steps=3, tp_compare=3, tp_rel=1e-3,
        resume_steps=16, resume_save=4, resume_extra=[], resume_rel=1e-4,
        curve_steps=8,
        long_sets=["train.rank_microbatch_size=1", "train.sequence_length=256"],
        long_steps=3, scale_steps=4,
        limits={"ep": 90, "tp": 90, "resume": 90, "curves": 90, "long": 90, "scaling": 90, "nodes": 90},
    )


# ---------------------------------------------------------------------------------- running
@dataclass
class Run:
    """One launcher invocation and what it left behind."""

    name: str
    cmd: list[str]
    rc: int
    seconds: float
    save: Path
    log: Path
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def losses(self) -> dict[int, float]:
        return {s: m[LOSS] for s, m in sorted(self.metrics.items()) if LOSS in m}

    @property
    def timed_out(self) -> bool:
        return self.rc in (124, 137)

    def status(self) -> str:
        last = max(self.losses) if self.losses else 0
        what = "time limit" if self.timed_out else f"rc={self.rc}"
        return f"{what}, {last} steps logged, {self.seconds:.0f} s"


def read_metrics(save: Path) -> dict[int, dict[str, float]]:
    """Per-step metrics from ``metrics.jsonl`` (a step logged again after a resume wins)."""
    out: dict[int, dict[str, float]] = {}
    path = save / METRICS_FILE
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            out.setdefault(int(rec["step"]), {}).update(rec)
    return out


class Driver:
    """Runs the stages, keeps the budget, writes logs and the summary."""

    def __init__(self, plan: Plan, out: Path, work: Path, budget_s: float, python: str):
        self.plan, self.out, self.work, self.python = plan, out, work, python
        self.deadline = time.monotonic() + budget_s
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.results: dict[str, dict] = {}
        self.runs: dict[str, Run] = {}

    # -- launching
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, nproc: int, gpus: str | None) -> dict[str, str]:
        env = {**os.environ, **SAFE_ENV, "PYTHON": self.python, "PYTHONUNBUFFERED": "1",
               "NPROC_PER_NODE": str(nproc), "LOG_FILTER_TYPE": "all_ranks"}
        for key in ("MASTER_PORT", "DRY_RUN"):
            env.pop(key, None)
        if self.plan.cpu:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        elif gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        return env

    def command(self, recipe: str, sets: list[str], save: Path, steps: int, limit: int,
                launcher: Path = SINGLE) -> list[str]:
        data = self.work / ("tokens-tiny.npy" if self.plan.cpu else "tokens.npy")
        args = [f"data.paths=[{data}]", "data.synthetic=true", "data.builtin_text=false", f"train.save_folder={save}",
                f"train.max_steps={steps}", "train.log_interval=1", "train.save_checkpoints=false",
                *self.plan.common, *sets]
        cmd = ["timeout", "-s", "INT", "-k", "15", str(limit), "bash", str(launcher), recipe]
        for a in args:
            cmd += ["--set", a]
        return cmd

    def launch(self, name: str, recipe: str, sets: list[str], steps: int, stage: str, *, nproc: int = 2,
               gpus: str | None = None, fresh: bool = True, kill_rank_after: int | None = None,
               save_name: str | None = None) -> Run:
        """Runs one training job under the stage's limit (cut to the budget left); ``name`` names
        its log, ``save_name`` (default ``name``) its run folder under the work folder."""
        save = self.work / (save_name or name)
        if fresh and save.exists():
            subprocess.run(["rm", "-rf", str(save)], check=False)
        limit = int(max(1, min(self.plan.limits[stage], self.remaining() - 5)))
        cmd = self.command(recipe, sets, save, steps, limit)
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    env=self.env(nproc, gpus), cwd=ROOT, start_new_session=True)
            killed = None
            if kill_rank_after is not None:
                killed = _kill_rank_when(proc, save, kill_rank_after, rank=1)
                f.write(f"\n# two_gpus.py: {killed}\n")
                f.flush()
            try:
                rc = proc.wait(timeout=limit + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        run = Run(name, cmd, rc, time.monotonic() - start, save, log, read_metrics(save))
        self.runs[name] = run
        print(f"  {name}: {run.status()}", flush=True)
        return run

    def launch_nodes(self, name: str, recipe: str, sets: list[str], steps: int, stage: str) -> list[Run]:
        """``launch/torchrun_multi_node.sh`` twice, NODE_RANK 0 and 1, one process (GPU) each."""
        import socket

        save = self.work / name
        subprocess.run(["rm", "-rf", str(save)], check=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        limit = int(max(1, min(self.plan.limits[stage], self.remaining() - 5)))
        cmd = self.command(recipe, sets, save, steps, limit, launcher=MULTI)
        procs = []
        start = time.monotonic()
        for node in (0, 1):
            env = self.env(1, None if self.plan.cpu else str(node))
            env.update(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       RDZV_ID=f"two-gpus-{port}", RDZV_TIMEOUT="60")
            log = self.logs / f"{name}_rank{node}.log"
            f = open(log, "w")  # noqa: SIM115 - closed after the wait below
            f.write(f"$ NODE_RANK={node} MASTER_PORT={port} {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
            procs.append((proc, f, log))
        runs = []
        for node, (proc, f, log) in enumerate(procs):
            try:
                rc = proc.wait(timeout=limit + 30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            f.close()
            runs.append(Run(f"{name}_rank{node}", cmd, rc, time.monotonic() - start, save, log, read_metrics(save)))
        for run in runs:
            self.runs[run.name] = run
            print(f"  {run.name}: {run.status()}", flush=True)
        return runs

    # -- summary
    def record(self, stage: str, ok: bool | None, text: str, runs: list[Run], data: dict | None = None) -> None:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        cmds = "<br>".join(f"`{_short_cmd(r.cmd, self.plan.common)}` ({r.status()}; log `logs/{r.log.name}`)"
                           for r in runs)
        self.lines.append(f"| {stage} | **{verdict}** | {text} | {cmds or '-'} |")
        self.results[stage] = {"ok": ok, "text": text, **(data or {}),
                               "runs": {r.name: {"cmd": r.cmd, "rc": r.rc, "seconds": round(r.seconds, 1)} for r in runs}}
        self.write_summary()
        print(f"[{verdict}] {stage}: {text}", flush=True)

    def write_summary(self) -> None:
        mode = "CPU smoke (gloo, tiny recipe)" if self.plan.cpu else "GPUs (NCCL)"
        head = [
            f"# Two-GPU checks: {mode}",
            "",
            f"Driver: `{shlex.join(['python', 'benchmarks/two_gpus.py', *sys.argv[1:]])}`; "
            f"NCCL env: {', '.join(f'{k}={v}' for k, v in SAFE_ENV.items())}; "
            f"OLMOE_SPATTN_AUTOTUNE={os.environ.get('OLMOE_SPATTN_AUTOTUNE', 'unset (on)')}.",
            f"Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}. {_versions()}",
            "",
            "| stage | result | numbers | commands |",
            "|---|---|---|---|",
        ]
        shared = ("Every run: `" + " ".join(f"--set {a}" for a in self.plan.common) + "`, plus its own data "
                  "file, save folder (`--work`), `train.log_interval=1` and `train.save_checkpoints=false` "
                  "(except where the command says true). Launcher: `launch/torchrun_single_node.sh` with "
                  "NPROC_PER_NODE=2 (1 for the one-GPU runs).")
        (self.out / "summary.md").write_text("\n".join(head + self.lines + ["", shared, ""] + self.notes()) + "\n")
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def notes(self) -> list[str]:
        p = self.plan
        if p.cpu:
            return ["CPU smoke: expert and tensor parallelism need OLMo-core's GPU MoE kernels, so `ep` "
                    "runs HSDP with expert_parallel_degree=1 and `tp` compares degree 1 on 2 ranks with "
                    "1 rank; compile is off; numbers are not performance."]
        return [
            "Shortened relative to a full study (time limit of one call): "
            f"`ep` {p.ep_steps} steps, `tp` {p.tp_steps} steps ({p.tp_compare} compared), `resume` "
            f"{p.resume_steps} steps of a 4-layer, 16-expert variant, `curves` {p.curve_steps} steps at 4 "
            f"sequences of 1024 per GPU, `long` {p.long_steps} steps, `scaling` {p.scale_steps} steps on "
            "one GPU (the two-GPU point is the `curves` band run, or its own run when that failed), `nodes` "
            f"{2 * p.tp_steps} steps of the 4-layer variant. Stages run in the order of the table; one "
            "that finds too little of the budget left is marked SKIP.",
        ]


#: overrides every run gets besides Plan.common (left out of the summary table)
ROUTINE = ("data.paths=", "data.synthetic=", "data.builtin_text=", "train.save_folder=", "train.log_interval=", "train.save_checkpoints=false")


def _short_cmd(cmd: list[str], common: list[str]) -> str:
    """The launcher command without the overrides every run shares (listed once under the table)."""
    i = cmd.index("bash") if "bash" in cmd else 0
    words = [c.replace(str(ROOT) + "/", "") for c in cmd[i + 1:i + 3]]
    rest = cmd[i + 3:]
    for flag, value in zip(rest[::2], rest[1::2]):
        if value in common or value.startswith(ROUTINE):
            continue
        words += [flag, value]
    return shlex.join(["timeout", cmd[i - 1], *words])


def _versions() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        return f"torch {torch.__version__}, {gpu} x {torch.cuda.device_count()}."
    except Exception as err:  # noqa: BLE001 - the summary must still be written
        return f"(versions unavailable: {err})"


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _kill_rank_when(proc: subprocess.Popen, save: Path, after: int, rank: int) -> str:
    """SIGKILLs the worker of global ``rank`` once ``metrics.jsonl`` reaches step ``after``."""
    while proc.poll() is None:
        steps = read_metrics(save)
        if steps and max(steps) >= after:
            workers = [p for p in _children(proc.pid) if _rank_of(p) == rank]
            # the trainer process, not torchrun's agent (which has no RANK) or a data worker
            workers = [p for p in workers if rank_is_leader(p, workers)]
            if not workers:
                return f"no rank-{rank} worker found at step {max(steps)}"
            os.kill(workers[0], signal.SIGKILL)
            return f"SIGKILLed rank {rank} (pid {workers[0]}) after step {max(steps)}"
        time.sleep(0.02)
    return "the run ended before the kill"


def rank_is_leader(pid: int, group: list[int]) -> bool:
    """True when ``pid``'s parent is not itself in ``group`` (the top process of that rank)."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return ppid not in group


# ---------------------------------------------------------------------------------- checks
def finite_and_falling(losses: dict[int, float], window: int = 3) -> tuple[bool, str]:
    """All losses finite and the mean of the last ``window`` below the mean of the first."""
    if len(losses) < 2 * window:
        return False, f"only {len(losses)} losses logged"
    vals = [losses[s] for s in sorted(losses)]
    if not all(math.isfinite(v) for v in vals):
        return False, "non-finite loss"
    first, last = statistics.mean(vals[:window]), statistics.mean(vals[-window:])
    return last < first, f"loss {first:.3f} (first {window}) -> {last:.3f} (last {window}), {len(vals)} steps"


def compare(a: dict[int, float], b: dict[int, float], steps: list[int], rel: float) -> tuple[bool, float, str]:
    """Losses of ``a`` and ``b`` at ``steps`` agree within relative ``rel``; returns max rel diff."""
    missing = [s for s in steps if s not in a or s not in b]
    if missing or not steps:
        return False, math.inf, f"steps missing: {missing or 'none to compare'}"
    diffs = [abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps]
    worst = max(diffs)
    return worst <= rel, worst, f"max rel diff {worst:.2e} (tol {rel:.0e}) over steps {steps[0]}-{steps[-1]}"


def median_metric(run: Run, key: str, skip: int = 3) -> float | None:
    """Median of ``key`` over logged steps after the first ``skip`` (warm-up, compile)."""
    vals = [m[key] for s, m in sorted(run.metrics.items()) if s > skip and key in m]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------- stages
def stage_ep(d: Driver) -> None:
    p = d.plan
    degree = 1 if p.cpu else 2
    run = d.launch("ep_band", p.band, [f"train.global_batch_size={16 if not p.cpu else 8}",
                   "train.data_parallel=hsdp", f"train.expert_parallel_degree={degree}"], p.ep_steps, "ep")
    ok, text = finite_and_falling(run.losses)
    d.record("ep", ok and run.rc == 0, f"expert_parallel_degree={degree}, HSDP: {text}", [run],
             {"losses": run.losses})


def stage_tp(d: Driver) -> None:
    p = d.plan
    gb = 16 if not p.cpu else 8
    base = [f"train.global_batch_size={gb}", "train.data_parallel=fsdp"]
    if p.cpu:  # reference: one process (TP needs GPUs), the same global batch
        ref = d.launch("tp1_one_rank", p.band, [f"train.global_batch_size={gb}"], p.tp_steps, "tp", nproc=1)
        two = d.launch("tp1_two_ranks", p.band, base, p.tp_steps, "tp")
        label = "degree 1 on 2 ranks vs 1 rank (CPU)"
    else:
        ref = d.launch("tp1", p.band, base, p.tp_steps, "tp")
        two = d.launch("tp2", p.band, [*base, "train.tensor_parallel_degree=2"], p.tp_steps, "tp")
        label = "tensor_parallel_degree=2 vs 1"
    steps = list(range(1, p.tp_compare + 1))
    ok, worst, text = compare(two.losses, ref.losses, steps, p.tp_rel)
    pairs = ", ".join(f"{s}: {two.losses.get(s, math.nan):.4f}/{ref.losses.get(s, math.nan):.4f}" for s in steps)
    d.record("tp", ok and two.rc == 0 and ref.rc == 0, f"{label}: {text}; losses (step: new/ref) {pairs}",
             [ref, two], {"max_rel_diff": worst})


def stage_resume(d: Driver) -> None:
    p = d.plan
    sets = [f"train.global_batch_size={16 if not p.cpu else 8}", *p.resume_extra,
            "train.scheduler=constant"]
    # the reference saves checkpoints too: saving initialises the optimizer state early
    # (torch.distributed.checkpoint), so a run without checkpoints is not the same computation
    ck = [*sets, "train.save_checkpoints=true", f"train.save_interval={p.resume_save}"]
    ref = d.launch("resume_ref", p.band, ck, p.resume_steps, "resume")
    killed = d.launch("resume_killed", p.band, ck, p.resume_steps, "resume",
                      kill_rank_after=p.resume_save + max(1, p.resume_save // 2))
    saved = sorted(int(x.name[4:]) for x in killed.save.glob("step*") if x.name[4:].isdigit())
    start = saved[-1] if saved else 0
    again = d.launch("resume_relaunch", p.band, ck, p.resume_steps, "resume", fresh=False,
                     save_name="resume_killed")
    loaded = re.findall(r"Loading checkpoint from '[^']*/step(\d+)'", again.log.read_text())
    resumed = int(loaded[0]) if loaded else None
    after = list(range(start + 1, p.resume_steps + 1))
    ok, worst, text = compare(again.losses, ref.losses, after, p.resume_rel)
    ended_early = killed.rc != 0 and killed.losses and max(killed.losses) < p.resume_steps
    kill_note = re.findall(r"# two_gpus.py: (.*)", killed.log.read_text())
    good = bool(ok and ended_early and start > 0 and resumed == start and again.rc == 0)
    d.record("resume", good,
             f"{kill_note[-1] if kill_note else 'no kill'}; killed run rc={killed.rc}, checkpoints {saved}; "
             f"relaunch loaded checkpoint step {resumed}; steps after it vs the uninterrupted run: {text}", [ref, killed, again], {"max_rel_diff": worst, "resumed_from": start})


def stage_curves(d: Driver) -> None:
    p = d.plan
    # 4 sequences of the sequence length per GPU (small, so that 300 steps fit the budget)
    sets = ["train.global_batch_size=8", "train.rank_microbatch_size=4", "train.data_parallel=fsdp"]
    band = d.launch("curves_band", p.band, sets, p.curve_steps, "curves")
    dense = d.launch("curves_dense", p.dense, sets, p.curve_steps, "curves")
    png = d.out / "loss_curves.png"
    plotted = _plot({"band (spattention)": band.losses, "dense twin": dense.losses}, png)
    okb, tb = finite_and_falling(band.losses)
    okd, td = finite_and_falling(dense.losses)
    full = len(band.losses) >= p.curve_steps and len(dense.losses) >= p.curve_steps
    d.record("curves", okb and okd and full and plotted,
             f"band: {tb}; dense: {td}; plot `{png.name}`" + ("" if plotted else " (not written)"),
             [band, dense])


def _plot(curves: dict[str, dict[int, float]], path: Path) -> bool:
    if not any(curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        ax.plot(list(losses), list(losses.values()), label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train CE loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def long_recipe(cpu: bool) -> tuple[str, str, list[str]]:
    """(band, dense, overrides): the 32k recipes if this tree has them, else OLMoE-1B-7B at 32768."""
    if cpu:
        return "tiny", "tiny-dense", []
    sys.path.insert(0, str(ROOT))
    from olmoe_spattn.olmo.recipe import load_recipe

    try:
        load_recipe("olmoe-1b-7b-32k", ["train.load_path=null", "data.paths=[x.npy]"])
        return "olmoe-1b-7b-32k", "olmoe-1b-7b-32k-dense", ["train.load_path=null"]
    except ValueError:
        return "olmoe-1b-7b", "olmoe-1b-7b-dense", ["train.sequence_length=32768"]


def stage_long(d: Driver) -> None:
    p = d.plan
    band_r, dense_r, extra = long_recipe(p.cpu)
    sets = ["train.global_batch_size=2", "train.data_parallel=fsdp", *extra, *p.long_sets]
    band = d.launch("long_band", band_r, sets, p.long_steps, "long")
    if not p.cpu and "OutOfMemoryError" in band.log.read_text() and d.remaining() > 240:
        sets = [*sets, "train.sequence_length=16384"]  # the longest power of two that should fit then
        band = d.launch("long_band_16k", band_r, sets, p.long_steps, "long")
    dense = d.launch("long_dense", dense_r, sets, p.long_steps, "long")
    skip = 2 if p.long_steps > 3 else 1
    tb, td = median_metric(band, TPS, skip), median_metric(dense, TPS, skip)
    mb, md = median_metric(band, MFU, skip), median_metric(dense, MFU, skip)
    ratio = f"{tb / td:.2f}x" if tb and td else "-"
    oom = [r.name for r in d.runs.values() if r.name.startswith("long") and "OutOfMemoryError" in r.log.read_text()]
    runs = [r for n, r in d.runs.items() if n.startswith("long")]
    d.record("long", bool(tb and td and band.rc == 0 and dense.rc == 0),
             f"{band_r} vs {dense_r} ({', '.join(sets)}): tokens/s/GPU band {_fmt(tb)}, dense {_fmt(td)} "
             f"(band/dense {ratio}); MFU band {_fmt(mb, '.1f')}%, dense {_fmt(md, '.1f')}% (median of steps > "
             f"{skip})" + (f"; out of memory: {oom}" if oom else ""), runs,
             {"tps": [tb, td], "mfu": [mb, md]})


def stage_scaling(d: Driver) -> None:
    p = d.plan
    per_gpu = 4  # as in the curves stage, whose band run is the two-GPU point
    sets = ["train.data_parallel=fsdp", "train.rank_microbatch_size=4"]
    one = d.launch("scaling_1", p.band, [*sets, f"train.global_batch_size={per_gpu}"], p.scale_steps, "scaling",
                   nproc=1, gpus=None if p.cpu else "0")
    two = d.runs.get("curves_band")
    if two is None or two.rc != 0 or not two.losses or p.cpu:
        two = d.launch("scaling_2", p.band, [*sets, f"train.global_batch_size={2 * per_gpu}"], p.scale_steps,
                       "scaling")
    t1, t2 = median_metric(one, TPS), median_metric(two, TPS)
    eff = t2 / t1 if t1 and t2 else None  # TPS is per device: 2*t2 / (2*t1)
    d.record("scaling", eff is not None and one.rc == 0,
             f"{per_gpu} sequences per GPU: tokens/s/GPU 1 GPU {_fmt(t1)}, 2 GPUs {_fmt(t2)} (`{two.name}`); "
             f"efficiency = 2-GPU total / (2 x 1-GPU) = {_fmt(eff, '.1%')}", [one, two],
             {"tps_1": t1, "tps_2": t2, "efficiency": eff})


def stage_nodes(d: Driver) -> None:
    """Two torchrun agents (NNODES=2, NODE_RANK 0 and 1, one GPU each) on this host."""
    p = d.plan
    sets = [f"train.global_batch_size={16 if not p.cpu else 8}", *p.resume_extra]
    runs = d.launch_nodes("nodes", p.band, sets, 2 * p.tp_steps, "nodes")
    rcs = [r.rc for r in runs]
    ok, text = finite_and_falling(runs[0].losses)
    d.record("nodes", ok and rcs == [0, 0], f"2 agents x 1 {'process' if p.cpu else 'GPU'} (c10d on 127.0.0.1): "
             f"{text}; agent exit codes {rcs}", runs)


RUNNERS = {"ep": stage_ep, "tp": stage_tp, "resume": stage_resume, "curves": stage_curves,
           "long": stage_long, "scaling": stage_scaling, "nodes": stage_nodes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for summary.md, results.json, logs/, PNG")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch folder for data and run folders (default: OUT/work; tens of GB on GPUs)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny recipe on the CPU, 2 gloo ranks, few steps")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, default=500.0,
                    help="wall-clock budget for all stages; each run's limit is cut to what is left (default 500)")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {', '.join(STAGES)}")
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {args.budget_s}")
    os.environ.update(SAFE_ENV)
    plan = cpu_plan() if args.cpu_smoke else gpu_plan()
    out = args.out.resolve()
    driver = Driver(plan, out, (args.work or out / "work").resolve(), args.budget_s,
                    os.environ.get("PYTHON", sys.executable))
    driver.write_summary()
    for stage in stages:
        if driver.remaining() < 20:
            driver.record(stage, None, f"skipped: {driver.remaining():.0f} s of the budget left", [])
            continue
        print(f"== {stage} ({driver.remaining():.0f} s left)", flush=True)
        try:
            RUNNERS[stage](driver)
        except Exception as err:  # noqa: BLE001 - one stage's bug must not stop the others
            driver.record(stage, False, f"driver error: {type(err).__name__}: {err}", [])
    failed = [s for s, r in driver.results.items() if r["ok"] is False]
    print(f"summary: {out / 'summary.md'}; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
