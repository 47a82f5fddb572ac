#!/usr/bin/env bash
# The GPU checks of docs/performance.md ("GPU: bf16 training of `small`") in one run, for
# a single H100/H200 lent for minutes. Phases (default: tests train attention):
#   tests      cuDNN attention against xla, in outputs and gradients, and `auto` (pytest)
#   train      bf16 training of `small` at 16k and 32k tokens per sample, cuDNN attention,
#              remat dots and none, layers scanned and unrolled (unrolled, the scan's
#              stacking of residuals, 13% of the 16k step in the profile, goes away)
#   attention  the attention backends at 4k-32k tokens
#   heads64    `small` with 12 heads of 64 (its shape before 6 of 128): cuDNN attention, and
#              training at 32k
#   profile    op time of the 16k train step by phase and kind (jax.profiler), into LOGDIR/prof
# Each phase has its own time limit, so a slow or failing one does not cost the others.
#
#   bash scripts/gpu/checks.sh [LOGDIR [PHASE...]]
#
# Results: docs/bench/*_gpu.json (render with `vdit bench report ... --docs docs/performance.md`),
# copied into LOGDIR (default gpu_logs) beside LOGDIR/checks.log, the output of every phase.
# On a copied tree set VDIT_CODE_VERSION to the commit, so that the results are stamped with it.
set -u
logs=${1:-gpu_logs}
shift || true
phases=${*:-tests train attention}
mkdir -p "$logs" docs/bench
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
py=${PYTHON:-python3}
phase() { echo "== $(date -u +%H:%M:%S) $1"; }
run() {  # run LIMIT_S NAME CMD...: one phase, its output appended to LOGDIR/checks.log
  local limit=$1 name=$2; shift 2
  phase "$name: $*" | tee -a "$logs/checks.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$logs/checks.log" | grep -vE "^\s*$" | tail -n 40
  echo "== $name exit ${PIPESTATUS[0]}"
  cp -f docs/bench/*_gpu.json "$logs/" 2>/dev/null  # whatever is done survives a later time-out
}
small16k=(--config small dit.attention_impl=cudnn data.frames=61 data.resolution=512 --batch 1)

phase env
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$py -c "import jax, flax, optax, numpy; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
'numpy', numpy.__version__, jax.devices())"

for p in $phases; do
  case $p in
    tests) run 150 tests $py -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_dit.py \
      -k "cudnn or hardware or auto" ;;
    train)
      for t in 16k:61 32k:125; do
        run 300 "train_${t%:*}" $py -m vdit bench train --config small dit.attention_impl=cudnn data.frames=${t#*:} \
          data.resolution=512 --batch 1 --remat dots,none --scan true,false --no_xcheck --json "docs/bench/train_small_${t%:*}_d128_gpu.json"
      done ;;
    attention) run 60 attention $py -m vdit bench attention --config small --impl cudnn,chunked,xla \
      --seq 4096,16384,32768 --json docs/bench/attention_small_d128_gpu.json ;;
    heads64)
      run 40 attention_d64 $py -m vdit bench attention --config small dit.num_heads=12 --impl cudnn \
        --seq 4096,16384,32768 --json docs/bench/attention_small_d64_cudnn_gpu.json
      run 90 train_32k_d64 $py -m vdit bench train --config small dit.num_heads=12 dit.attention_impl=cudnn \
        data.frames=125 data.resolution=512 --batch 1 --remat none --no_xcheck --json docs/bench/train_small_32k_d64_none_gpu.json ;;
    # Without command buffers (CUDA graphs) each kernel event names its own HLO op, not the graph.
    profile) (export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="
      run 150 profile $py -m vdit bench train "${small16k[@]}" --remat none --no_xcheck --profile "$logs/prof") ;;
    *) echo "unknown phase $p; expected tests, train, attention, heads64 or profile"; exit 2 ;;
  esac
done
phase done
