#!/usr/bin/env bash
# Run 14, one GPU: fwd_ab.py (dense-regime A/B of the forward's descriptors), then with the code
# as committed: the decode records (scripts/gpu_decode.py), sbbench check of triton (bf16, fp16,
# D=64/128, GQA, every regime; packed varlen; T=16384) and pytest -m gpu.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run14}
HERE=reports/NVIDIA_H200/levers/run14_host_desc_dense
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 100 python3 $HERE/fwd_ab.py "$D" > "$D/fwd_ab.log" 2>&1
timeout 130 python3 scripts/gpu_decode.py --out "$D" --budget-s 20 > "$D/decode.log" 2>&1
timeout 80 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check.json" > "$D/check.log" 2>&1
timeout 60 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check_varlen.json" >> "$D/check.log" 2>&1
timeout 60 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
  --regime all --no-progress --json "$D/check_16k.json" >> "$D/check.log" 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/ > "$D/pytest_gpu.log" 2>&1
tar czf "${OUT:-/tmp}/run14.tgz" -C "$(dirname "$D")" "$(basename "$D")"
tail -8 "$D/fwd_ab.log"; tail -24 "$D/decode.log"; grep -E "rows|failed" "$D/check.log" | tail -6; tail -3 "$D/pytest_gpu.log"
