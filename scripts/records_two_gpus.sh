#!/usr/bin/env bash
# The records of reports/<device>/ made with the shipped configs, on two GPUs at once:
#
#   OUT=DIR bash scripts/records_two_gpus.sh
#
# GPU 0: the same-architecture fallback first (this GPU's own file hidden: bench_fallback_d64.json
#        and everything it printed, fallback.log); the gate's sweep for this device
#        (ci/gpu_gate.sh bench: bench.json, the gate's baseline; D=64 and 128, bf16 and fp16,
#        beside FA2 and cuDNN); the non-deterministic backward beside the default
#        (scripts/gpu_atomic_dq.py, atomic_dq/); sbbench check of triton in bf16 and fp16, D=64
#        and 128, GQA, every regime (check.json).
# GPU 1: the decode tune (scripts/tune_new_gpu.sh tune_decode), exported into the shipped file;
#        decode numerics and speed with it (scripts/gpu_decode.py); pytest -m gpu
#        (pytest_gpu.log); packed varlen checks and T=16384 checks (check_varlen.json, check_16k.json).
# Every step has its own time limit, so a slow one cannot take the others' results with it.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  mv "sbbench/configs/$device" /tmp/own_configs
  timeout 70 sbbench bench --backends fa2,triton --mode fwdbwd --batch 4 --heads 24 --head-dim 64 \
    --seqlens 4096,16384 --dtype bf16 --regime dense --no-progress --json "$OUT/bench_fallback_d64.json" \
    > "$OUT/fallback.log" 2>&1
  mv /tmp/own_configs "sbbench/configs/$device"
  tail -8 "$OUT/fallback.log"
  CURRENT="$OUT/bench.json" timeout 250 bash ci/gpu_gate.sh bench 2>&1 | tail -40
  timeout 140 python3 scripts/gpu_atomic_dq.py --out "$OUT/atomic_dq" --budget-s 80 2>&1 | tail -16
  timeout 60 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
    --dtype bf16,fp16 --regime all --no-progress --json "$OUT/check.json" 2>&1 | tail -3
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  SBBENCH_INSTALLED=1 MINUTES_DECODE=${MINUTES_DECODE:-2} timeout 180 bash scripts/tune_new_gpu.sh tune_decode
  timeout 30 sbbench export --storage "sqlite:///$OUT/tune_decode.db" --out sbbench/configs --min-speedup 1.02 2>&1 | tail -3
  cp "sbbench/configs/$device/triton.json" "$OUT/shipped_triton.json"
  timeout 110 python3 scripts/gpu_decode.py --out "$OUT" --budget-s 30 2>&1 | tail -30
  timeout 150 python3 -m pytest -q -m gpu tests/ > "$OUT/pytest_gpu.log" 2>&1
  tail -4 "$OUT/pytest_gpu.log"
  timeout 50 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
    --dtype bf16,fp16 --regime all --no-progress --json "$OUT/check_varlen.json" 2>&1 | tail -3
  timeout 40 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16 \
    --regime all --no-progress --json "$OUT/check_16k.json" 2>&1 | tail -3
}

gpu0 > "$OUT/gpu0.log" 2>&1 &
gpu1 > "$OUT/gpu1.log" 2>&1 &
wait
cat "$OUT/gpu1.log" "$OUT/gpu0.log"
