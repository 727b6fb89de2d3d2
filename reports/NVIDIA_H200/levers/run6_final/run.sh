#!/usr/bin/env bash
# The final records of the session's code (run 5 again after the dK/dV head skip was limited to TMA loads) and shipped configs: GPU 0 the gate's sweep (the new
# baseline, reports/NVIDIA_H200/bench.json) gated against the committed one; GPU 1 the training
# table (bf16 and fp16, D=128 H=12 and D=64 H=24, T=4096/8192/16384, beside FA2 and cuDNN).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run6}
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
( export CUDA_VISIBLE_DEVICES=0
  CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 300 bash ci/gpu_gate.sh bench gate 2>&1 | tail -16
) > "$D/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  for dtype in bf16 fp16; do
    for shape in "12 128" "24 64"; do
      set -- $shape
      timeout 100 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
        --seqlens 4096,8192,16384 --dtype $dtype --regime dense --no-progress \
        --json "$D/bench_training_${dtype}_d$2.json" 2>&1 | tail -1
    done
  done
) > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu1.log" "$D/gpu0.log"
