#!/usr/bin/env bash
# Run 7, on two GPUs. GPU 0: the bf16 softplus polynomial of degree 5 (shipped) against degree
# 4 (SB_BF16_POLY4=1), forward and forward+backward at D=128 H=12 beside FA2, then its checks.
# GPU 1: the decode A/B (ab_decode.py: separate merge kernel vs merge fused into the split
# kernel), pytest -m gpu of the decode and triton tests, then the degree-4 A/B at D=64 H=24.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run7}
HERE=reports/NVIDIA_H200/levers/run7_fused_merge
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
bench() {  # poly heads head_dim
  SB_BF16_POLY4=$1 timeout 110 sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads $2 \
    --head-dim $3 --seqlens 4096,8192,16384 --dtype bf16 --regime dense --no-progress \
    --json "$D/poly$1_d$3.json" 2>&1 | tail -1
}
( export CUDA_VISIBLE_DEVICES=0
  bench 0 12 128; bench 1 12 128
  export SB_BF16_POLY4=1
  timeout 70 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
    --dtype bf16 --regime all --no-progress --json "$D/check_poly4.json" 2>&1 | tail -2
  timeout 50 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
    --dtype bf16 --regime all --no-progress --json "$D/check_varlen_poly4.json" 2>&1 | tail -2
  timeout 50 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16 \
    --regime all --no-progress --json "$D/check_16k_poly4.json" 2>&1 | tail -2
) > "$D/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 $HERE/ab_decode.py "$D/decode" 2>&1 | tail -9
  timeout 120 python3 -m pytest -q -m gpu tests/test_decode_triton.py tests/test_decode_harness.py tests/test_triton.py > "$D/pytest_gpu.log" 2>&1
  tail -3 "$D/pytest_gpu.log"
  bench 0 24 64; bench 1 24 64
) > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu0.log" "$D/gpu1.log"
python3 - "$D" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
print(f"{'D':>4} {'T':>6} {'mode':>7} {'fa2 ms':>8} {'deg5 ms':>8} {'deg4 ms':>8} {'deg5/FA2':>9} {'deg4/FA2':>9}")
for hd in (128, 64):
    runs = {}
    for p in (0, 1):
        f = d / f"poly{p}_d{hd}.json"
        if f.exists():
            runs[p] = json.loads(f.read_text())["rows"]
    if len(runs) < 2:
        continue
    for r0 in runs[0]:
        if r0["backend"] != "triton" or r0["latency_ms"] is None:
            continue
        key = lambda r: (r["seqlen"], r["mode"])
        r1 = next(r for r in runs[1] if r["backend"] == "triton" and key(r) == key(r0))
        f0 = next(r for r in runs[0] if r["backend"] == "fa2" and key(r) == key(r0))
        f1 = next(r for r in runs[1] if r["backend"] == "fa2" and key(r) == key(r0))
        print(f"{hd:>4} {r0['seqlen']:>6} {r0['mode']:>7} {f0['latency_ms']:>8.3f} {r0['latency_ms']:>8.3f} "
              f"{r1['latency_ms']:>8.3f} {f0['latency_ms'] / r0['latency_ms']:>8.3f}x {f1['latency_ms'] / r1['latency_ms']:>8.3f}x")
PY
tar czf "${OUT:-/tmp}/run7.tgz" -C "$(dirname "$D")" "$(basename "$D")"
