#!/usr/bin/env bash
# Train on one machine with several processes (one per GPU; CPU processes use gloo).
#
# Usage: launch/torchrun_single_node.sh [--dry-run] CONFIG [train options...]
#
#   CONFIG             recipe YAML file (or a bundled name such as 'tiny')
#   train options      passed to `olmoe-spattn train` unchanged, e.g. --set train.max_steps=100
#   --dry-run          print the command and exit (same as DRY_RUN=1); launcher options go
#                      BEFORE CONFIG, so `... CONFIG --dry-run` is train's own --dry-run
#
# Environment:
#   NPROC_PER_NODE   processes to start (default: number of visible GPUs, or 1)
#   MASTER_PORT      rendezvous port on localhost (default: a free port, torchrun --standalone)
#   PYTHON           Python interpreter (default: python)
#   DRY_RUN=1        print the command without running it
#
# Runs: $PYTHON -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N \
#         -m olmoe_spattn.cli train CONFIG [train options...]
# NCCL settings (e.g. NCCL_NVLS_ENABLE) are left exactly as they are in your environment.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

parse_launcher_args "${BASH_SOURCE[0]}" "$@"
set -- "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"

nproc="${NPROC_PER_NODE:-$(default_nproc)}"
require_uint NPROC_PER_NODE "$nproc" 1

rdzv=(--standalone)
if [[ -n "${MASTER_PORT:-}" ]]; then
  require_port MASTER_PORT "$MASTER_PORT"
  rdzv=(--rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$MASTER_PORT" --rdzv-id "${RDZV_ID:-olmoe-spattn-single}")
fi

run_cmd "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nnodes 1 --nproc-per-node "$nproc" \
  -m olmoe_spattn.cli train "$CONFIG" "$@"
