#!/usr/bin/env bash
# One device-machine run: `bash benchmarks/gpu_session.sh PHASE...` with PHASE in
#   env      versions, GPU, copy bandwidth
#   tests    GPU tests + compile tests with Inductor
#   plain    plain decoding: HF generate vs the HF-path graph vs the lean backend (bench_plain.py)
#   tune     Triton launch-config search at the headline sizes
#   head     LM-head sweep (quick grid; `head-full` for the issue's whole grid)
#   draft    draft-step benchmark at real shapes
#   e2e      end-to-end tokens/s benchmark
# Logs and JSON go to $OUT (the device tool brings them back) and benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
PY=python3
for phase in "$@"; do
  echo "=== $phase $(date -u +%H:%M:%S)"
  case "$phase" in
    env) nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
         $PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" ;;
    tests) MICROSPEC_COMPILE_BACKEND=inductor $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_eagle.py \
             tests/models/test_lean.py tests/test_compile.py tests/policies/test_contract.py \
             -k "gpu or compile or cuda or kernels or captured or sync or exact or agree" 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
    plain) $PY benchmarks/bench_plain.py --out "$OUT" 2>&1 | tee "$OUT/plain.log" | tail -40 ;;
    tune) $PY benchmarks/bench_lm_head.py --tune --out "$OUT" 2>&1 | tee "$OUT/tune.log" | tail -40 ;;
    head) $PY benchmarks/bench_lm_head.py --quick --out "$OUT" 2>&1 | tee "$OUT/head.log" | tail -40 ;;
    head-full) $PY benchmarks/bench_lm_head.py --out "$OUT" 2>&1 | tee "$OUT/head_full.log" | tail -80 ;;
    draft) $PY benchmarks/bench_draft_step.py --out "$OUT" 2>&1 | tee "$OUT/draft.log" | tail -40 ;;
    e2e) $PY benchmarks/bench_e2e.py --out "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -40 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
