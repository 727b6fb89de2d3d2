#!/usr/bin/env bash
# After the records run's gate flagged triton fwdbwd randn bf16 D=128 T=16384 (+5.5%), with the
# D=128 T=16384 backward entry back to pointer loads and the dK/dV kernel skipping heads for
# blocks no tile reached. GPU 0: the gate's sweep again (the new baseline) and the gate.
# GPU 1: bwd and fwdbwd at D=128 T=16384, dense and randn, shipped configs vs the same with
# bwd_loads=tma in that entry (overlay); the TMA tests on the GPU; the bf16 D=128 training table.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run4}
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 330 bash ci/gpu_gate.sh bench gate 2>&1 | tail -16
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  mkdir -p "/tmp/cfg_tma/$device"
  python3 - "$device" <<'PY'
import json, sys
path = f"sbbench/configs/{sys.argv[1]}/triton.json"
doc = json.load(open(path))
for e in doc["entries"]:
    k = e["key"]
    if (k["pass"], k["dtype"], k["head_dim"], k["gqa_group"], k["seqlen_bucket"]) == ("bwd", "bfloat16", 128, 1, 16384):
        e["config"]["bwd_loads"] = "tma"
json.dump(doc, open(f"/tmp/cfg_tma/{sys.argv[1]}/triton.json", "w"), indent=1)
PY
  for variant in pointer tma; do
    dir=""; [ $variant = tma ] && dir=/tmp/cfg_tma
    SBBENCH_CONFIG_DIR=$dir timeout 100 sbbench bench --backends fa2,triton --mode bwd,fwdbwd --batch 4 --heads 12 \
      --head-dim 128 --seqlens 16384 --dtype bf16 --regime dense,randn --no-progress --json "$D/ab_bwd_$variant.json" \
      2>&1 | grep -E "^(fa2|triton) " 
  done
  timeout 150 python3 -m pytest -q tests/test_triton.py -k "tma" 2>&1 | tail -2
  timeout 100 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
    --seqlens 4096,8192,16384 --dtype bf16 --regime dense --no-progress --json "$D/bench_training_bf16_d128.json" 2>&1 | tail -2
}

gpu0 > "$D/gpu0.log" 2>&1 &
gpu1 > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu1.log" "$D/gpu0.log"
