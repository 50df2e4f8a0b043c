#!/usr/bin/env bash
# The full benchmark on a GPU machine, in one command (about 4-6 minutes):
#
#   bash benchmarks/gpu_run.sh               # results under $OUT/<device-slug>/
#   GPU_RUN_SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh   # tiny, any machine
#
# Writes $OUT/<device-slug>/{results.json,results.md,chart.png,run.log}
# (after every part, so a timeout keeps what was measured): LINe scorer
# samples/s at the three head shapes, every scorer vs PyTorch, ResNet-18 and
# ResNet-50 end to end with bfloat16 backbones (Energy vs LINe, line_jax vs
# PyTorch), the ResNet-50 precompute (official batch-1 vs batched line_jax),
# memory and kernel counts. Copy the folder to benchmarks/results/.
#
# Needs jax (CUDA), torch (CUDA), flax, numpy, matplotlib; not
# tensorflow_datasets: the run makes importing it an error, so the check
# is part of every run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
MODE=--full
if [[ -n "${GPU_RUN_SMOKE:-}" ]]; then MODE=--smoke; fi
# JAX would take 75 % of the GPU up front; PyTorch shares the device here.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=1
mkdir -p "$OUT/logs"
set +e
"$PYTHON" - "$MODE" "$OUT" <<'PY' 2>&1 | tee "$OUT/logs/run.log"
import sys
sys.modules["tensorflow_datasets"] = None  # importing it now raises ImportError
from benchmarks import throughput
mode, out = sys.argv[1:]
sys.exit(throughput.main([mode, "--bf16", "--out", out]))
PY
status=${PIPESTATUS[0]}
set -e
results=$(ls "$OUT"/*/results.json 2>/dev/null | head -n 1)
if [[ -n "$results" ]]; then
  mv "$OUT/logs/run.log" "$(dirname "$results")/run.log" && rmdir "$OUT/logs"
  echo "results in $(dirname "$results")"
fi
exit "$status"
