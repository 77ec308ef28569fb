#!/usr/bin/env bash
# Runs the GPU tests (pytest -m gpu) and records the run next to the benchmarks:
#   <RESULTS_DIR>/<gpu-slug>/gpu_tests.md       date, command, commit, versions, pytest summary
#   <RESULTS_DIR>/<gpu-slug>/gpu_tests_log.txt  the full pytest output
# RESULTS_DIR defaults to benchmarks/results; <gpu-slug> is the CUDA device name in lower case
# with runs of other characters turned into "-" (e.g. nvidia-h100-80gb-hbm3).
# Extra arguments go to pytest, e.g.  bash benchmarks/run_gpu_tests.sh -x -k kernel
# Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
slug=$("$PYTHON" -c 'import re, torch
assert torch.cuda.is_available(), "no CUDA device: the GPU tests need one"
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))') || exit 2
out="${RESULTS_DIR:-benchmarks/results}/$slug"
mkdir -p "$out"
started=$(date -u +"%Y-%m-%d %H:%M UTC")
cmd=("$PYTHON" -m pytest -m gpu -q -rfEs "$@")
echo "+ ${cmd[*]}"
"${cmd[@]}" 2>&1 | tee "$out/gpu_tests_log.txt"
rc=${PIPESTATUS[0]}
"$PYTHON" - "$out" "$started" "$rc" "${cmd[*]}" <<'PY'
import importlib.metadata as md
import platform
import subprocess
import sys
from pathlib import Path

import torch

out, started, rc, command = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = (out / "gpu_tests_log.txt").read_text().splitlines()


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


def run(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "-"


props = torch.cuda.get_device_properties(0)
driver = run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()
summary_start = next((i for i, line in enumerate(log) if "short test summary info" in line), None)
summary = log[summary_start:] if summary_start is not None else log[-1:]
lines = [
    f"### GPU tests: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {started}",
    "",
    f"Command: `{command}` (via `bash benchmarks/run_gpu_tests.sh`), exit status {rc}.  ",
    f"Commit: `{run('git', 'rev-parse', 'HEAD') or '-'}`{' (uncommitted changes)' if run('git', 'status', '--porcelain', '--untracked-files=no') else ''}.  ",
    f"Versions: Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
    f"triton {version('triton')}, ai2-olmo-core {version('ai2-olmo-core')}, transformers {version('transformers')}, "
    f"NVIDIA driver {driver[0] if driver else '-'}, compute capability {props.major}.{props.minor}, "
    f"{props.total_memory / 2**30:.0f} GiB.",
    "",
    "pytest summary (failures, errors and skips with their reasons; full output in `gpu_tests_log.txt`):",
    "",
    "```",
    *summary,
    "```",
    "",
]
(out / "gpu_tests.md").write_text("\n".join(lines))
print(f"wrote {out / 'gpu_tests.md'}")
PY
exit "$rc"
