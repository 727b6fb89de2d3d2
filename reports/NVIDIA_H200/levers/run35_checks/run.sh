#!/usr/bin/env bash
# Run 35, one GPU, code and configs as committed (six H200 backward entries with
# bwd_state_layout=blocks): sbbench check of triton at T=16384 (check_16k.json), then the dense
# and packed-varlen checks (check.json, check_varlen.json), the commands of the H200 records.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run35}
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { mkdir -p "${OUT:-/tmp}/run35"; cp -r "$D"/. "${OUT:-/tmp}/run35/"; }
timeout 110 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
  --regime all --no-progress --json "$D/check_16k.json" > "$D/check_16k.log" 2>&1; pack
tail -n 1 "$D/check_16k.log"
timeout 170 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check.json" > "$D/check.log" 2>&1; pack
tail -n 1 "$D/check.log"
timeout 90 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check_varlen.json" > "$D/check_varlen.log" 2>&1; pack
tail -n 1 "$D/check_varlen.log"
