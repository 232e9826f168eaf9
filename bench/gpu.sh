#!/usr/bin/env bash
# Everything fastedge measures on a GPU, in one command (about 6 to 8 minutes on an H100/H200):
#
#   1. the `gpu` test marker (every op test on the torch, triton and cuda backends on the device);
#   2. bench/ops.py: the kernel microbenchmark at GPT-2 small and CodeLlama-13B layer shapes;
#   3. bench/step.py: one full pruning step of GPT-2 small (batch 32, seq 64, fp32) against the
#      authors' design and the floor;
#   4. bench/step.py: pruning steps of a CodeLlama-13B-shaped model with random weights built on the
#      device (bf16, batch 32 in micro-batches of 8, seq 72): step time, tokens/s, peak memory;
#   5. bench/memory.py --check-device: fake-tensor peak memory against the device's, on a small model;
#   6. bench/tune.py: candidate Triton block sizes at the same layer shapes (printed to the log).
#
# Results go to $OUT when it is set (the device tool's folder), else bench/results/.
# Usage: bench/gpu.sh [stage ...]   stages: tests step-gpt2 step-codellama ops memory-check tune
#                                   (default: all, in this order)
# Each stage has a time limit, so the whole run ends within 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-run.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${*:-tests step-gpt2 step-codellama ops memory-check tune}

say() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
declare -A RESULT

say "stages: $STAGES; results under $OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
if ! $PY -c "import fastedge" 2>/dev/null; then
  say "installing fastedge (editable, no dependencies, no network)"
  FASTEDGE_BUILD_CUDA=0 $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
    || { say "install failed"; exit 1; }
fi
$PY -c "import torch, triton, transformers, fastedge; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| fastedge', fastedge.__version__)" 2>&1 | tee -a "$LOG"
# the CUDA extension: build it once, just in time, for this card's architecture
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export FASTEDGE_CUDA_ARCHS=${FASTEDGE_CUDA_ARCHS:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-16}
timeout 240 $PY -c "import time; t = time.time(); from fastedge.backends import cuda_backend as c; print('cuda extension:', c.load_extension(), f'({time.time() - t:.0f} s)')" >>"$LOG" 2>&1 \
  || say "the CUDA extension did not build: the cuda backend will be skipped (see $LOG)"
tail -1 "$LOG"

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return ;; esac
  say "stage $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  RESULT[$name]="rc=$rc in $((SECONDS - t0)) s"
  say "stage $name: ${RESULT[$name]}"
}

# xdist: the op tests are independent; the extension is already built and cached
stage tests 120 $PY -m pytest -m gpu -q -n 8 -p no:cacheprovider -rfE --tb=short
stage step-gpt2 120 $PY bench/step.py --model gpt2-small --batch 32 --seq 64 \
  --kinds floor,fastedge,fastedge-norecompute,naive --out "$OUT_DIR"
stage step-codellama 150 $PY bench/step.py --model codellama-13b --batch 32 --micro-batch 8 --seq 72 \
  --kinds floor,fastedge --steps 2 --warmup 1 --out "$OUT_DIR"
stage ops 180 $PY bench/ops.py --rep-ms ${OPS_REP_MS:-100} --out "$OUT_DIR"
stage memory-check 60 $PY bench/memory.py --quick --check-device --device cuda --out "$OUT_DIR"
stage tune 100 $PY bench/tune.py

say "summary:"
for name in $STAGES; do say "  $name: ${RESULT[$name]:-not run}"; done
grep -h -E "passed|failed" "$LOG" | tail -2
