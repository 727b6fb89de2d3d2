#!/usr/bin/env bash
# The records of reports/<device>/ made with the shipped configs, on two GPUs at once:
#
#   OUT=DIR bash scripts/records_two_gpus.sh
#
# GPU 0: the gate's sweep for this device (ci/gpu_gate.sh bench: bench.json, the gate's baseline;
#        D=64 and 128, bf16 and fp16, beside FA2 and cuDNN), gated against the committed
#        baseline (gate.json); the training table (bench_training.json: forward and
#        forward+backward, bf16 and fp16, D=128 H=12 and D=64 H=24, T=4096/8192/16384, B=4).
# GPU 1: decode numerics and speed (scripts/gpu_decode.py: decode_check.json, decode_bench.json);
#        pytest -m gpu (pytest_gpu.log); sbbench check of triton in bf16 and fp16, D=64 and 128,
#        GQA, every regime (check.json), packed varlen (check_varlen.json) and T=16384
#        (check_16k.json).
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

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  CURRENT="$OUT/bench.json" GATE_JSON="$OUT/gate.json" timeout 300 bash ci/gpu_gate.sh bench gate 2>&1 | tail -30
  for dtype in bf16 fp16; do
    for shape in "12 128" "24 64"; do
      set -- $shape
      timeout 100 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
        --seqlens 4096,8192,16384 --dtype $dtype --regime dense --no-progress \
        --json "$OUT/bench_training_${dtype}_d$2.json" 2>&1 | tail -3
    done
  done
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  timeout 130 python3 scripts/gpu_decode.py --out "$OUT" --budget-s 30 2>&1 | tail -30
  timeout 170 python3 -m pytest -q -m gpu tests/ > "$OUT/pytest_gpu.log" 2>&1
  tail -4 "$OUT/pytest_gpu.log"
  timeout 80 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
    --dtype bf16,fp16 --regime all --no-progress --json "$OUT/check.json" 2>&1 | tail -3
  timeout 60 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
    --dtype bf16,fp16 --regime all --no-progress --json "$OUT/check_varlen.json" 2>&1 | tail -3
  timeout 60 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
    --regime all --no-progress --json "$OUT/check_16k.json" 2>&1 | tail -3
}

gpu0 > "$OUT/gpu0.log" 2>&1 &
gpu1 > "$OUT/gpu1.log" 2>&1 &
wait
cat "$OUT/gpu1.log" "$OUT/gpu0.log"
