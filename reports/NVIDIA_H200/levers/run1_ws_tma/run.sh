#!/usr/bin/env bash
# The Hopper levers of issue 15 as an A/B on the two-GPU host, each variant in its own process
# beside FA2 and cuDNN (the variants were switched by environment variables read when the kernels
# module was imported: SB_EXP_FWD_TMA=1 loads K/V in the forward through device-side TMA tensor
# descriptors; SB_EXP_WS=1 marks the forward's, dQ's and dK/dV's main loops
# tl.range(warp_specialize=True)). Then the decode floor probe (scripts/gpu_decode_floor.py).
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/levers}
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }

variant() {  # name, tma, ws
  local name=$1
  export SB_EXP_FWD_TMA=$2 SB_EXP_WS=$3
  timeout 100 sbbench check --backends triton --batch 1 --heads 2 --head-dim 64,128 --seqlens 1024 --dtype bf16 \
    --regime all --no-progress --json "$D/check_$name.json" > "$D/check_$name.log" 2>&1
  echo "$name check: $(tail -1 "$D/check_$name.log")"
  for shape in "12 128" "24 64"; do
    set -- $shape
    timeout 150 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
      --seqlens 4096,16384 --dtype bf16 --regime dense --no-progress --json "$D/bench_${name}_d$2.json" \
      > "$D/bench_${name}_d$2.log" 2>&1
    echo "$name D=$2 rc=$?"; tail -12 "$D/bench_${name}_d$2.log"
  done
}

( export CUDA_VISIBLE_DEVICES=0; variant base 0 0; variant tma 1 0
  timeout 150 python3 scripts/gpu_decode_floor.py --out "$D/decode_floor" > "$D/decode_floor.log" 2>&1; tail -12 "$D/decode_floor.log"
) > "$D/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1; variant ws 0 1; variant tma_ws 1 1 ) > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu0.log" "$D/gpu1.log"
