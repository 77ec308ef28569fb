#!/usr/bin/env bash
# Kernel benchmark on a GPU device machine, FlashAttention-4 included.
#
# FA4 travels in two halves (see /work/shared/tools/device-fa4.sh, run in the project root
# first): a first device call carrying .fa4a copies its half to /tmp/fa4parts; this script,
# run by the call that immediately follows it (carrying .fa4b, on the still-warm machine),
# joins the halves, installs FA4 to /tmp/fa4site and runs
#   olmoe-spattn bench kernel --out-dir $OUT <your arguments>
# Without the first half, or with FA4 broken, the FA4 rows say "not available" and the
# rest still runs.
set -u
if [ -d .fa4b ] && [ -f /tmp/fa4parts/BIG_WHEEL_NAME ] && [ ! -d /tmp/fa4site ]; then
  big=/tmp/fa4parts/$(cat /tmp/fa4parts/BIG_WHEEL_NAME)
  cat /tmp/fa4parts/cu13.part.aa .fa4b/cu13.part.ab > "$big" && rm -f /tmp/fa4parts/cu13.part.aa
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fa4site /tmp/fa4parts/*.whl \
    || echo "FA4 install failed; its rows will be marked not available"
fi
if [ -d /tmp/fa4site ]; then
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/device-run}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv || true
python3 -m olmoe_spattn.cli bench kernel --out-dir "$out" "$@" 2>&1 | tee "$out/bench_log.txt"
exit "${PIPESTATUS[0]}"
