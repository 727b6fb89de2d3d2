#!/usr/bin/env bash
# TMA loads (fwd_loads / bwd_loads = "tma") against the pointer loads, on the two-GPU host:
# GPU 0: the shipped H200 configs as they are, then the same configs with fwd_loads and
# bwd_loads set to "tma" (an overlay config folder), forward, backward and forward+backward at
# D=128 (H=12) and D=64 (H=24), T=4096/8192/16384, FA2 and cuDNN in each run; then the decode
# floor probe (scripts/gpu_decode_floor.py) with pointer loads and with TMA loads in the decode
# kernel (SB_EXP_DECODE_TMA=1, read when the module is imported).
# GPU 1: sbbench tune --pass both at D=128 and at D=64 with the two new parameters in the space.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/levers2}
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  mkdir -p "/tmp/cfg_tma/$device"
  python3 - "$device" <<'PY'
import json, sys
path = f"sbbench/configs/{sys.argv[1]}/triton.json"
doc = json.load(open(path))
for e in doc["entries"]:
    p = e["key"]["pass"]
    if p in ("fwd", "bwd"):
        e["config"][f"{p}_loads"] = "tma"
json.dump(doc, open(f"/tmp/cfg_tma/{sys.argv[1]}/triton.json", "w"), indent=1)
PY
  for shape in "12 128" "24 64"; do
    set -- $shape
    timeout 120 sbbench bench --backends fa2,cudnn,triton --mode fwd,bwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
      --seqlens 4096,8192,16384 --dtype bf16 --regime dense --no-progress --json "$D/ab_pointer_d$2.json" \
      > "$D/ab_pointer_d$2.log" 2>&1; tail -3 "$D/ab_pointer_d$2.log"
    SBBENCH_CONFIG_DIR=/tmp/cfg_tma timeout 120 sbbench bench --backends fa2,triton --mode fwd,bwd,fwdbwd --batch 4 \
      --heads $1 --head-dim $2 --seqlens 4096,8192,16384 --dtype bf16 --regime dense --no-progress \
      --json "$D/ab_tma_d$2.json" > "$D/ab_tma_d$2.log" 2>&1; tail -3 "$D/ab_tma_d$2.log"
  done
  timeout 100 python3 scripts/gpu_decode_floor.py --out "$D/decode_floor" > "$D/decode_floor.log" 2>&1
  tail -9 "$D/decode_floor.log"
  SB_EXP_DECODE_TMA=1 timeout 100 python3 scripts/gpu_decode_floor.py --out "$D/decode_floor_tma" \
    > "$D/decode_floor_tma.log" 2>&1
  tail -9 "$D/decode_floor_tma.log"
}

gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  for shape in "12 128 3.5" "24 64 3.5"; do
    set -- $shape
    timeout 260 sbbench tune --backend triton --pass both --batch 4 --heads $1 --head-dim $2 --dtype bf16 \
      --seqlens 4096,16384 --minutes $3 --storage "sqlite:///$D/tune_loads_d$2.db" --json "$D/tune_loads_d$2.json" \
      --no-progress > "$D/tune_loads_d$2.log" 2>&1; tail -8 "$D/tune_loads_d$2.log"
    timeout 30 sbbench export --storage "sqlite:///$D/tune_loads_d$2.db" --out "$D/configs_tune" --min-speedup 1.02 2>&1 | tail -4
  done
}

gpu0 > "$D/gpu0.log" 2>&1 &
gpu1 > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu0.log" "$D/gpu1.log"
