#!/usr/bin/env bash
# Train on several machines: run this once on EVERY node, with the same settings except NODE_RANK.
# The agents meet through torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT.
#
# Usage: launch/torchrun_multi_node.sh [--dry-run] CONFIG [train options...]
#
#   CONFIG             recipe YAML file (or a bundled name such as 'olmoe-1b-7b')
#   train options      passed to `olmoe-spattn train` unchanged, e.g. --set train.max_steps=100
#   --dry-run          print the command and exit (same as DRY_RUN=1); launcher options go
#                      BEFORE CONFIG, so `... CONFIG --dry-run` is train's own --dry-run
#
# Environment (required unless a default is shown):
#   NNODES           number of nodes (machines), >= 1
#   NODE_RANK        this node's index, 0 .. NNODES-1 (default: $SLURM_NODEID under SLURM)
#   MASTER_ADDR      address of node 0, reachable from every node (hostname or IP)
#   MASTER_PORT      rendezvous port on MASTER_ADDR (default 29500)
#   NPROC_PER_NODE   processes per node (default: number of visible GPUs, or 1)
#   RDZV_ID          rendezvous id, the same on all nodes of one job and different between
#                    concurrent jobs (default: $SLURM_JOB_ID, else olmoe-spattn)
#   RDZV_TIMEOUT     seconds to wait for all nodes to join (default 900)
#   PYTHON           Python interpreter (default: python)
#   DRY_RUN=1        print the command without running it
#
# Runs: $PYTHON -m torch.distributed.run --nnodes NNODES --node-rank NODE_RANK \
#         --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:MASTER_PORT \
#         --rdzv-id RDZV_ID -m olmoe_spattn.cli train CONFIG [train options...]
# NCCL settings (e.g. NCCL_NVLS_ENABLE) are left exactly as they are in your environment.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

parse_launcher_args "${BASH_SOURCE[0]}" "$@"
set -- "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"

[[ -n "${NNODES:-}" ]] || die "NNODES is not set (the number of nodes, e.g. NNODES=2)"
require_uint NNODES "$NNODES" 1
node_rank="${NODE_RANK:-${SLURM_NODEID:-}}"
[[ -n "$node_rank" ]] || die "NODE_RANK is not set (this node's index, 0..$((10#$NNODES - 1)))"
require_uint NODE_RANK "$node_rank"
(( 10#$node_rank < 10#$NNODES )) || die "NODE_RANK=$node_rank must be < NNODES=$NNODES (ranks are 0..$((10#$NNODES - 1)))"
if [[ -z "${MASTER_ADDR:-}" ]]; then
  (( 10#$NNODES == 1 )) || die "MASTER_ADDR is not set: the address of node 0, reachable from every node"
  MASTER_ADDR=127.0.0.1
fi
[[ "$MASTER_ADDR" =~ ^[A-Za-z0-9._:-]+$ ]] || die "MASTER_ADDR='$MASTER_ADDR' is not a hostname or IP address"
master_port="${MASTER_PORT:-29500}"
require_port MASTER_PORT "$master_port"
nproc="${NPROC_PER_NODE:-$(default_nproc)}"
require_uint NPROC_PER_NODE "$nproc" 1
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-olmoe-spattn}}"
[[ "$rdzv_id" =~ ^[A-Za-z0-9._-]+$ ]] || die "RDZV_ID='$rdzv_id' may hold only letters, digits, '.', '_' and '-'"
rdzv_timeout="${RDZV_TIMEOUT:-900}"
require_uint RDZV_TIMEOUT "$rdzv_timeout" 1

endpoint="$MASTER_ADDR:$master_port"
[[ "$MASTER_ADDR" == *:* ]] && endpoint="[$MASTER_ADDR]:$master_port"  # IPv6

run_cmd "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$node_rank" \
  --nproc-per-node "$nproc" --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "$rdzv_id" \
  --rdzv-conf "join_timeout=$rdzv_timeout" \
  -m olmoe_spattn.cli train "$CONFIG" "$@"
