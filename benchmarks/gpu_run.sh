#!/usr/bin/env bash
# The whole GPU check as one command for a lent H100/H200 (see benchmarks/gpu_suite.py):
#   bash benchmarks/gpu_run.sh            # results.csv and logs under $OUT (or /tmp/lfvila_gpu)
# 1. builds lfvila_kernels._C (CPU + CUDA kernels, sm_90) in place, in the background, while
# 2. the Triton parts (HTWA, losses) run on the GPU; then
# 3. the CUDA-kernel part and the model step run in a fresh process that loads the new extension;
# 4. issue 18's limits (benchmarks/gpu_limits.py: memory floors, the big-N loss, the stage-1 step, the long-form
#    row), last, so that they load the finished extension.
# Every stage has its own time limit and appends its rows to $OUT/results.csv part by part, so a stage that runs
# long or breaks never costs the others' results. GPU time is scarce: the whole call stays under 8 minutes
# (TOTAL_LIMIT, 470 s: no stage starts with a limit past it). The HTWA part times the default Triton kernels and
# the previous ones ("triton-legacy") beside the reference and SDPA with the bias, bf16, B=16, the 12 official cases.
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
#    best settings (LFVILA_HTWA_TUNE), recorded in their rows' notes
if [ "${TUNE_BUDGET:-0}" != 0 ]; then
  rm -f /tmp/lfvila_htwa_best.json
  timeout "$(limit $(( TUNE_BUDGET + 60 )))" $PY benchmarks/gpu_htwa_tune.py --out "$OUT" --budget "$TUNE_BUDGET" \
    --best-out /tmp/lfvila_htwa_best.json > "$OUT/tune.log" 2>&1
  tail -n 40 "$OUT/tune.log"
  [ -s /tmp/lfvila_htwa_best.json ] && export LFVILA_HTWA_TUNE=/tmp/lfvila_htwa_best.json
  echo "tune done after $(( $(date +%s) - t0 )) s"
fi

timeout "$(limit "${TRITON_LIMIT:-200}")" $PY benchmarks/gpu_suite.py --only "${TRITON_PARTS:-htwa,losses}" \
  --out "$OUT" --htwa-budget "${HTWA_BUDGET:-130}" 2>&1 | tee "$OUT/triton.log"
echo "triton parts done after $(( $(date +%s) - t0 )) s"

wait $build
tail -n 4 "$OUT/build.log"
timeout "$(limit "${CUDA_LIMIT:-120}")" $PY benchmarks/gpu_suite.py --only "${CUDA_PARTS:-cuda,model}" \
  --out "$OUT" 2>&1 | tee "$OUT/cuda_model.log"
# 4. the limits, into the same $OUT/results.csv, with what is left of TOTAL (LIMITS_BUDGET caps it; 0 skips them)
left=$(( TOTAL - ($(date +%s) - t0) - 20 ))
budget=${LIMITS_BUDGET:-240}; [ "$left" -lt "$budget" ] && budget=$left
[ "$budget" -gt 10 ] && timeout "$(limit $(( budget + 20 )))" $PY benchmarks/gpu_limits.py \
  --out "$OUT" --budget "$budget" 2>&1 | tee "$OUT/limits.log"
echo "all done after $(( $(date +%s) - t0 )) s; bring back $OUT/results.csv and append it with"
echo "  python benchmarks/results.py add results.csv [--commit HASH, where the copy here had no git]"
