#!/usr/bin/env bash
# Tuning a GPU that has no config file of its own, as a new user does, with the results kept:
#
#   OUT=DIR bash scripts/tune_new_gpu.sh STAGE [STAGE...]
#
#   tune64_cold   sbbench tune at D=64 (H=24), no other GPU's file present (tune_d64_cold.*)
#   tune64_warm   the same, warm-started from the same-architecture files shipped (tune_d64_warm.*)
#   tune128       sbbench tune at D=128 (H=12), warm-started (tune_d128.*)
#   tune_gqa      sbbench tune at D=128, H=32, H_kv=8 (GQA group 4), warm-started (tune_gqa.*)
#   bench_tuned   forward and forward+backward with the configs exported by the tune stages,
#                 beside FA2 and cuDNN in the same run (bench_tuned.json)
#   bench_own     forward and forward+backward at D=64 (H=24) with only the configs exported by
#                 tune stage $OWN (e.g. tune_d64_cold): the shipped config files must be hidden by
#                 the caller (bench_${OWN}_d64.json)
#   tune_decode   sbbench tune --pass decode, D=128, H=32, H_kv=8, batches 1/16/64, caches 32k and
#                 128k (tune_decode.*), with its own MINUTES_DECODE budget (default 3)
#   tpe_grid      TPE (no warm start, TPE_MINUTES, default 1) against the grid on a restricted
#                 backward space of 192 configs (tpe_grid_*.json)
#
# With two GPUs, run two of these at once, one per GPU (CUDA_VISIBLE_DEVICES), after installing once.
# MINUTES (default 4) is each tune stage's budget. Each tune stage has its own storage and export
# folder under $OUT; bench_tuned reads $OUT/configs_* in the order given by CONFIGS.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/out}
MINUTES=${MINUTES:-4}
mkdir -p "$OUT"
# SBBENCH_INSTALLED=1: a caller running several of these at once (one per GPU) installed already.
if [ -d .whl ]; then
  [ -n "${SBBENCH_INSTALLED:-}" ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
[ -n "${SBBENCH_INSTALLED:-}" ] || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || { echo "install failed"; exit 1; }

tune() {  # name, then sbbench tune flags
  local name=$1; shift
  local store="sqlite:///$OUT/$name.db"
  sbbench tune --backend triton --batch 4 --dtype bf16 --seqlens 4096,16384 --minutes "$MINUTES" \
    --storage "$store" --json "$OUT/$name.json" --no-progress "$@" 2>&1 | tee "$OUT/$name.log" | tail -8
  sbbench export --storage "$store" --out "$OUT/configs_$name" --min-speedup 1.02 2>&1 | tail -6
}

for stage in "$@"; do
  case "$stage" in
    tune64_cold) tune tune_d64_cold --heads 24 --head-dim 64 --no-warm-start ;;
    tune64_warm) tune tune_d64_warm --heads 24 --head-dim 64 ;;
    tune128) tune tune_d128 --heads 12 --head-dim 128 ;;
    tune_gqa) tune tune_gqa --heads 32 --kv-heads 8 --head-dim 128 ;;
    bench_tuned)
      for dir in ${CONFIGS:-}; do export SBBENCH_CONFIG_DIR="${SBBENCH_CONFIG_DIR:+$SBBENCH_CONFIG_DIR:}$OUT/$dir"; done
      echo "SBBENCH_CONFIG_DIR=${SBBENCH_CONFIG_DIR:-}"
      sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads 24 --head-dim 64 \
        --seqlens ${SEQLENS:-4096,16384} --dtype bf16 --regime dense --json "$OUT/bench_tuned_d64.json" 2>&1 | tail -12
      sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
        --seqlens ${SEQLENS:-4096,16384} --dtype bf16 --regime dense --json "$OUT/bench_tuned_d128.json" 2>&1 | tail -12
      ;;
    bench_own)
      SBBENCH_CONFIG_DIR="$OUT/configs_$OWN" sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 \
        --heads 24 --head-dim 64 --seqlens 4096,16384 --dtype bf16 --regime dense --json "$OUT/bench_${OWN}_d64.json" \
        2>&1 | tail -10
      ;;
    tune_decode)
      sbbench tune --backend triton --pass decode --batch 1,16,64 --heads 32 --kv-heads 8 --head-dim 128 \
        --seqlens 32768,131072 --dtype bf16 --minutes "${MINUTES_DECODE:-3}" --storage "sqlite:///$OUT/tune_decode.db" \
        --json "$OUT/tune_decode.json" --no-progress 2>&1 | tee "$OUT/tune_decode.log" | tail -10
      sbbench export --storage "sqlite:///$OUT/tune_decode.db" --out "$OUT/configs_tune_decode" --min-speedup 1.02 \
        2>&1 | tail -8
      ;;
    tpe_grid)
      space=(--space bwd_BLOCK_M=64,128 --space bwd_BLOCK_N=32,64 --space bwd_num_stages=2,3 --space bwd_maxnreg=0,168
             --space bwd_dkdv_BLOCK_M=32,64 --space bwd_dkdv_BLOCK_N=64 --space bwd_dkdv_num_stages=1,2,3
             --space bwd_dkdv_num_warps=4 --space bwd_num_warps=4 --space bwd_dkdv_maxnreg=0,168)
      for sampler in grid tpe; do
        budget=()
        [ $sampler = tpe ] && budget=(--minutes "${TPE_MINUTES:-1}")
        sbbench tune --backend triton --pass bwd --batch 4 --heads 24 --head-dim 64 --seqlens 16384 --dtype bf16 \
          --sampler $sampler --no-warm-start "${space[@]}" "${budget[@]}" --storage "sqlite:///$OUT/tpe_grid.db" \
          --json "$OUT/tpe_grid_$sampler.json" --no-progress 2>&1 | tee "$OUT/tpe_grid_$sampler.log" | tail -6
      done
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
