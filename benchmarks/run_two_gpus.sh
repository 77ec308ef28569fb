#!/usr/bin/env bash
# The launchers on a 2-GPU machine (NCCL): real, short runs of the 0.25B-1.75B
# recipe on synthetic data. Each step has its own time limit and log under $OUT (default
# benchmarks/results/two-gpus).
#   STEPS=100 bash benchmarks/run_two_gpus.sh
set -u
out=${OUT:-benchmarks/results/two-gpus}
mkdir -p "$out" /tmp/two
steps=${STEPS:-100}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
common=(--set data.synthetic=true --set "data.paths=[/tmp/two/tokens.npy]" --set data.synthetic_tokens=4000000
        --set train.global_batch_size=32 --set train.rank_microbatch_size=16 --set train.warmup_steps=10
        --set train.log_interval=10 --set train.save_interval=50 --set train.ephemeral_save_interval=null)
run() {  # name seconds launcher [args...]
  local name=$1 secs=$2; shift 2
  echo "== $name"; timeout -s INT "$secs" "$@" > "$out/$name.log" 2>&1; echo "rc=$?"
  grep -a "finished:\|Error\|error:" "$out/$name.log" | tail -3
}
cfg=configs/olmoe-0.25b-1.75b.yaml
NPROC_PER_NODE=2 run fsdp_band 120 bash launch/torchrun_single_node.sh $cfg "${common[@]}" \
  --set train.max_steps="$steps" --set train.save_folder=/tmp/two/band
NPROC_PER_NODE=2 run fsdp_dense 100 bash launch/torchrun_single_node.sh configs/olmoe-0.25b-1.75b-dense.yaml \
  "${common[@]}" --set train.max_steps="$steps" --set train.save_folder=/tmp/two/dense
NPROC_PER_NODE=2 run ep_band 80 bash launch/torchrun_single_node.sh $cfg "${common[@]}" \
  --set train.max_steps=40 --set train.expert_parallel_degree=2 --set train.data_parallel=hsdp \
  --set train.save_folder=/tmp/two/ep
port=$((29500 + RANDOM % 1000))
for r in 0 1; do
  CUDA_VISIBLE_DEVICES=$r NNODES=2 NODE_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port NPROC_PER_NODE=1 \
    run "two_nodes_rank$r" 60 bash launch/torchrun_multi_node.sh tiny --set train.device=cuda \
    --set train.max_steps=20 --set train.save_folder=/tmp/two/nodes --set "data.paths=[/tmp/two/tiny.npy]" &
done
wait
