#!/usr/bin/env bash
# The whole GPU check as one command for a lent H100/H200 (see benchmarks/gpu_suite.py):
#   bash benchmarks/gpu_run.sh            # results and logs under $OUT (or /tmp/lfvila_gpu)
# 1. builds lfvila_kernels._C (CPU + CUDA kernels, sm_90) in place, in the background, while
# 2. the Triton parts (HTWA, losses) run on the GPU; then
# 3. the CUDA-kernel part and the model step run in a fresh process that loads the new extension.
# Every stage has its own time limit, and each report is written part by part, so a stage that runs long or
# breaks never costs the others' results. GPU time is scarce: the whole call stays under 8 minutes (TOTAL_LIMIT,
# 470 s: no stage starts with a limit past it). The HTWA part times the default Triton kernels and the previous
# ones ("triton-legacy") beside the reference and SDPA with the bias, bf16, B=16, the 12 official cases.
set -u
OUT=${OUT:-/tmp/lfvila_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

t0=$(date +%s)
TOTAL=${TOTAL_LIMIT:-470}
# a stage's limit: its own ($1 seconds), cut to what is left of TOTAL (at least 1 s: a stage past it ends at once)
limit() { local left=$(( TOTAL - ($(date +%s) - t0) )); [ "$left" -lt 1 ] && left=1; echo $(( $1 < left ? $1 : left )); }
( MAX_JOBS=${MAX_JOBS:-12} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} LFVILA_FORCE_CUDA=1 \
    timeout "${BUILD_LIMIT:-300}" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build rc=$? after $(( $(date +%s) - t0 )) s" >> "$OUT/build.log" ) &
build=$!

# 0. optional (TUNE_BUDGET=seconds): the HTWA Triton launch-settings sweep; the stages below then run with its
#    best settings (LFVILA_HTWA_TUNE), recorded in their reports
if [ "${TUNE_BUDGET:-0}" != 0 ]; then
  rm -f /tmp/lfvila_htwa_best.json
  timeout "$(limit $(( TUNE_BUDGET + 60 )))" $PY benchmarks/gpu_htwa_tune.py --out "$OUT" --budget "$TUNE_BUDGET" \
    --best-out /tmp/lfvila_htwa_best.json > "$OUT/tune.log" 2>&1
  tail -n 40 "$OUT/tune.log"
  [ -s /tmp/lfvila_htwa_best.json ] && export LFVILA_HTWA_TUNE=/tmp/lfvila_htwa_best.json
  echo "tune done after $(( $(date +%s) - t0 )) s"
fi

timeout "$(limit "${TRITON_LIMIT:-220}")" $PY benchmarks/gpu_suite.py --only "${TRITON_PARTS:-htwa,losses}" \
  --json triton.json --out "$OUT" --htwa-budget "${HTWA_BUDGET:-145}" 2>&1 | tee "$OUT/triton.log"
echo "triton parts done after $(( $(date +%s) - t0 )) s"

# the slot of the limits suite (memory floors, the long-form row, the big-N loss), when the file is there
if [ -f benchmarks/gpu_limits.py ]; then
  timeout "$(limit "${LIMITS_LIMIT:-75}")" $PY benchmarks/gpu_limits.py --out "$OUT" 2>&1 | tee "$OUT/limits.log"
  echo "limits done after $(( $(date +%s) - t0 )) s"
fi

wait $build
tail -n 4 "$OUT/build.log"
timeout "$(limit "${CUDA_LIMIT:-150}")" $PY benchmarks/gpu_suite.py --only "${CUDA_PARTS:-cuda,model}" \
  --json cuda_model.json --out "$OUT" 2>&1 | tee "$OUT/cuda_model.log"
echo "all done after $(( $(date +%s) - t0 )) s"
