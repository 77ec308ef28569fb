#!/usr/bin/env bash
# Every multi-GPU check on one host with two GPUs (NCCL), in one call of under ten minutes:
# expert parallelism with HSDP, tensor parallelism 2 vs 1, kill-one-rank-and-resume, 300-step
# band vs dense loss curves, full-depth OLMoE-1B-7B at seq 32768 (compiled) band vs dense,
# 1- vs 2-GPU scaling, and the multi-node launcher as 2 nodes x 1 GPU on this host. Each run
# has its own time limit and log; summary.md, results.json and loss_curves.png go to OUT. NVLink multicast stays off (the three variables below).
#
#   bash benchmarks/run_two_gpus.sh [OUT] [driver options...]      # default OUT: benchmarks/results/two-gpus
#   bash benchmarks/run_two_gpus.sh /tmp/smoke --cpu-smoke          # the same stages on the CPU (gloo)
#
# Environment: PYTHON (default python3), WORK (scratch folder for data and checkpoints, a few
# tens of GB on GPUs; default $TMPDIR/olmoe-two-gpus, deleted at the end unless KEEP_WORK=1). Driver options:
# `python benchmarks/two_gpus.py --help`.
set -u
case "${1:-}" in -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;; esac
out=${1:-benchmarks/results/two-gpus}
[[ $# -gt 0 ]] && shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
work=${WORK:-${TMPDIR:-/tmp}/olmoe-two-gpus}
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PYTHON" "$(dirname "$0")/two_gpus.py" --out "$out" --work "$work" "$@"
rc=$?
[[ "${KEEP_WORK:-0}" == 1 ]] || rm -rf "$work"
exit $rc
