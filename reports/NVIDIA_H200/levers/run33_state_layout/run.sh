#!/usr/bin/env bash
# Run 33, one GPU: ab.py (the boundary states block-major, against the kernels at
# a8c3fb8: .whl/ab/kernels_a8c3fb8.py is `git show a8c3fb8:kernels/triton_sb/kernels.py`), then
# with the code under test sbbench check of triton (bf16, fp16, D=64/128, GQA, every regime), dense
# and packed varlen.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run33}
HERE=reports/NVIDIA_H200/levers/run33_state_layout
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { mkdir -p "${OUT:-/tmp}/run33"; cp -r "$D"/. "${OUT:-/tmp}/run33/"; }
timeout 250 python3 $HERE/ab.py "$D" .whl/ab/kernels_a8c3fb8.py > "$D/ab.log" 2>&1; pack
tail -16 "$D/ab.log"
timeout 170 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check.json" > "$D/check.log" 2>&1; pack
grep -E "rows|failed" "$D/check.log" | tail -3
timeout 120 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check_varlen.json" > "$D/check_varlen.log" 2>&1; pack
grep -E "rows|failed" "$D/check_varlen.log" | tail -3
