#!/usr/bin/env bash
# Everything fastedge measures on a GPU, in one command (about 7 minutes on an H200; never more
# than $GPU_SH_BUDGET_S seconds, 540 by default):
#
#   1. the `gpu` test marker (every op test on the torch, triton and cuda backends on the device);
#   2. bench/step.py: pruning steps of GPT-2 small (batch 32, seq 64, fp32) against the authors'
#      design and the floor, 5 timed steps;
#   3. bench/step.py: pruning steps of a CodeLlama-13B-shaped model with random weights built on the
#      device (bf16, batch 32 in micro-batches of 8, seq 72): step time, tokens/s, peak memory,
#      5 timed steps (a p50 of its own; bench/step.py refuses fewer when recording);
#   4. bench/ops.py: the kernel microbenchmark, masked and fused sampled ops, at GPT-2 small and
#      CodeLlama-13B layer shapes (at least 5 samples per cell);
#   5. bench/tune.py --variants: the kernels' variants at CodeLlama-13B and GPT-2 shapes (full and
#      fast precision, live columns under 90%/99%-dead masks, the stack backward's two grids);
#   6. bench/memory.py --check-device: fake-tensor peak memory against the device's, on a small model;
#   7. bench/attribution_speed.py: one EAP and one EAP-IG-inputs pass (5 steps) over 100 examples next
#      to one pruning step at GPT-2 small shape (seq 32), and the time to a circuit at faithfulness
#      0.99 for plain, warm-started and preselected pruning of the shipped induction model;
#   8. bench/tune.py: candidate Triton block sizes at the same layer shapes (printed to the log).
#
# Results go to $OUT when it is set (the device tool's folder), else bench/results/; the log of
# everything is gpu-run.log there.
#
# Usage: bench/gpu.sh [stage ...]   stages: tests step-gpt2 step-codellama ops variants memory-check
#                                   attribution tune
#                                   (default: all; they run in this order)
#
# Failures: every stage runs even when one before it failed. Each stage has a time limit, cut to
# what is left of the budget; a stage with less than $GPU_SH_MIN_STAGE_S seconds (20) left is
# not started. The summary at the end gives each stage's rc (124: timed out), and the exit
# status is 1 when any stage failed or did not run, 0 when all passed (2: an unknown stage).
#
# Revision: every result records the revision of bench/revision.py. On the device tool's
# machine the work tree is copied, but not .git: the .git found there is an old one (every H200
# run so far reported commit 5c70b84, older than the code it ran, and "-dirty" for the
# difference), so git there cannot say what ran: the caller says it. In the checkout the device tool sends (the session's own checkout, not a
# helper's worktree), commit, then run
#
#     python bench/revision.py --env
#
# which prints `FASTEDGE_GIT_REV=<commit>[+diff.<hash>] FASTEDGE_SOURCE_HASH=<hash>`, and launch
# with both assignments in front, pasted literally (a $(...) would run on the device):
#
#     run(command="FASTEDGE_GIT_REV=dca4879 FASTEDGE_SOURCE_HASH=5c243605 bench/gpu.sh",
#         timeout_s=600)
#
# gpu.sh checks FASTEDGE_SOURCE_HASH against the files it got: on a mismatch, or without
# FASTEDGE_GIT_REV, every result records `untied+src.<hash of the files here>` (not tied to a
# commit). FASTEDGE_GIT_REV=git trusts this tree's own git (a real clone on a GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
ALL_STAGES="tests step-gpt2 step-codellama ops variants memory-check attribution tune"
STAGES=${*:-$ALL_STAGES}
for name in $STAGES; do
  case " $ALL_STAGES " in
    *" $name "*) ;;
    *) echo "gpu.sh: unknown stage '$name'; stages: $ALL_STAGES" >&2; exit 2 ;;
  esac
done
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-run.log"
touch "$LOG"
LOG_START=$(wc -l <"$LOG")
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${GPU_SH_BUDGET_S:-540}
MIN_STAGE_S=${GPU_SH_MIN_STAGE_S:-20}
START=$SECONDS

say() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
declare -A RESULT
FAILED=()

say "stages: $STAGES; results under $OUT_DIR; budget ${BUDGET} s"

# The revision every result records (see above): resolved once, here, and passed on.
if [ -z "${FASTEDGE_GIT_REV:-}" ]; then
  say "WARNING: FASTEDGE_GIT_REV is not set (see bench/gpu.sh's header): the results will not be tied to a commit"
  export FASTEDGE_GIT_REV=untied
fi
REV=$($PY bench/revision.py 2>>"$LOG") || REV=""
export FASTEDGE_GIT_REV=${REV:-untied}
unset FASTEDGE_SOURCE_HASH  # checked just now; the stages take the result as it is
case "$FASTEDGE_GIT_REV" in
  untied*) say "revision: $FASTEDGE_GIT_REV (NOT tied to a commit: see $LOG)" ;;
  *) say "revision: $FASTEDGE_GIT_REV" ;;
esac

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
if ! $PY -c "import fastedge" 2>/dev/null; then
  say "installing fastedge (editable, no dependencies, no network)"
  if ! FASTEDGE_BUILD_CUDA=0 $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
    say "install failed: the stages will fail too (see $LOG)"
    RESULT[install]="failed"
    FAILED+=(install)
  fi
fi
$PY -c "import torch, triton, transformers, fastedge; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| fastedge', fastedge.__version__)" 2>&1 | tee -a "$LOG"
# the CUDA extension: build it once, just in time, for this card's architecture (24 s on an H200)
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>>"$LOG")
export FASTEDGE_CUDA_ARCHS=${FASTEDGE_CUDA_ARCHS:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-16}
timeout -k 10 120 $PY -c "import time; t = time.time(); from fastedge.backends import cuda_backend as c; print('cuda extension:', c.load_extension(), f'({time.time() - t:.0f} s)')" >>"$LOG" 2>&1 \
  || say "the CUDA extension did not build: the cuda backend will be skipped (see $LOG)"
tail -1 "$LOG"

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < MIN_STAGE_S)); then
    RESULT[$name]="not run: ${left} s left of the ${BUDGET} s budget"
    FAILED+=("$name")
    say "stage $name: ${RESULT[$name]}"
    return 0
  fi
  ((limit > left)) && limit=$left
  say "stage $name (limit ${limit} s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  RESULT[$name]="rc=$rc in $((SECONDS - t0)) s"
  if ((rc == 124 || rc == 137)); then RESULT[$name]+=" (timed out at ${limit} s)"; fi
  if ((rc != 0)); then FAILED+=("$name"); fi
  say "stage $name: ${RESULT[$name]}"
}

# Limits from the H200 runs in bench/results/gpu-run-*.log: setup 42 s; tests 48 s, step-gpt2
# 23 s, step-codellama 52 s at 2 timed steps (7.3 s a fastedge step: about 75 s at 5), ops 61 s
# for the masked op alone (about 150 s with the sampled op and 5 samples a cell), tune about 60 s.
# xdist: the op tests are independent; the extension is already built and cached
stage tests 120 $PY -m pytest -m gpu -q -n 8 -p no:cacheprovider -rfE --tb=short
stage step-gpt2 60 $PY bench/step.py --model gpt2-small --batch 32 --seq 64 \
  --kinds floor,fastedge,fastedge-norecompute,naive --steps 5 --out "$OUT_DIR"
stage step-codellama 150 $PY bench/step.py --model codellama-13b --batch 32 --micro-batch 8 --seq 72 \
  --kinds floor,fastedge --steps 5 --warmup 1 --out "$OUT_DIR"
stage ops 200 $PY bench/ops.py --ops masked,sampled --rep-ms "${OPS_REP_MS:-100}" --out "$OUT_DIR"
stage variants 60 $PY bench/tune.py --variants --shapes cl13b-b8-L39,cl13b-b8-L20,gpt2-L11
stage memory-check 60 $PY bench/memory.py --quick --check-device --device cuda --out "$OUT_DIR"
# attribution: not yet run on a GPU (an estimate: a GPT-2-small pass in about a second, the three
# 1,000-step pruning runs of the shipped model a minute or two). After the stages above it may find
# the budget spent: `bench/gpu.sh attribution` runs it alone.
stage attribution 150 $PY bench/attribution_speed.py --device cuda --to-faithfulness --out "$OUT_DIR"
stage tune 90 $PY bench/tune.py

tail -n +$((LOG_START + 1)) "$LOG" | grep -h -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" | tail -2
say "summary (revision $FASTEDGE_GIT_REV, $((SECONDS - START)) s):"
for name in ${RESULT[install]:+install} $STAGES; do say "  $name: ${RESULT[$name]:-not run}"; done
if ((${#FAILED[@]})); then
  say "FAILED: ${FAILED[*]}"
  exit 1
fi
say "all stages passed"
exit 0
