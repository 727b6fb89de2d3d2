#!/usr/bin/env bash
# Run 19, one GPU: ab.py (the weights' exponent out of the scan's product, against the kernels at
# 9b22f58: .whl/ab/kernels_9b22f58.py is `git show 9b22f58:kernels/triton_sb/kernels.py`), then
# with the code as committed sbbench check of triton (bf16, fp16, D=64/128, GQA, every regime).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run19}
HERE=reports/NVIDIA_H200/levers/run19_scan_offsets
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run19.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
timeout 330 python3 $HERE/ab.py "$D" .whl/ab/kernels_9b22f58.py > "$D/ab.log" 2>&1; pack
tail -12 "$D/ab.log"
timeout 150 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check.json" > "$D/check.log" 2>&1; pack
grep -E "rows|failed" "$D/check.log" | tail -3
