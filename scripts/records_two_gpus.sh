#!/usr/bin/env bash
# The records of reports/<device>/ made with the shipped configs, on two GPUs at once:
#
#   OUT=DIR bash scripts/records_two_gpus.sh
#
# GPU 0: bench at D=64 (H=24) and D=128 (H=12) beside FA2 and cuDNN (bench_d64.json,
#        bench_d128.json); the same-architecture fallback (this GPU's own file removed:
#        bench_fallback_d64.json and the warning it printed); pytest -m gpu (pytest_gpu.log).
# GPU 1: decode numerics and speed (scripts/gpu_decode.py); sbbench check of triton in bf16 and
#        fp16, D=64 and 128, GQA, every regime, T up to 16384, and packed varlen (check*.json).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
bench=(sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --dtype bf16 --regime dense)

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  "${bench[@]}" --heads 24 --head-dim 64 --seqlens 4096,8192,16384 --json "$OUT/bench_d64.json" 2>&1 | tail -20
  "${bench[@]}" --heads 12 --head-dim 128 --seqlens 4096,8192,16384 --json "$OUT/bench_d128.json" 2>&1 | tail -20
  mv "sbbench/configs/$device" /tmp/own_configs
  sbbench bench --backends fa2,triton --mode fwdbwd --batch 4 --heads 24 --head-dim 64 --seqlens 4096,16384 \
    --dtype bf16 --regime dense --json "$OUT/bench_fallback_d64.json" 2>&1 | tail -8
  mv /tmp/own_configs "sbbench/configs/$device"
  timeout 240 python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15 > "$OUT/pytest_gpu.log"
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 260 python3 scripts/gpu_decode.py --out "$OUT" --budget-s 120 2>&1 | tail -30
  sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
    --dtype bf16,fp16 --regime all --json "$OUT/check.json" 2>&1 | tail -3
  sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16 \
    --regime all --json "$OUT/check_16k.json" 2>&1 | tail -3
  sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
    --dtype bf16,fp16 --regime all --json "$OUT/check_varlen.json" 2>&1 | tail -3
}

gpu0 > "$OUT/gpu0.log" 2>&1 &
gpu1 > "$OUT/gpu1.log" 2>&1 &
wait
cat "$OUT/gpu1.log" "$OUT/gpu0.log" "$OUT/pytest_gpu.log"
