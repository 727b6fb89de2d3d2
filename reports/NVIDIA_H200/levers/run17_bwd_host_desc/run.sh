#!/usr/bin/env bash
# Run 17, one GPU: bwd_ab.py (the backward's walked tiles through host-made descriptors), then
# with the code as committed: sbbench check at T=16384 (the shipped entries that read the
# backward's tiles with TMA), pytest -m gpu, and the gate sweep (bench.json) gated against the
# committed baseline.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run17}
HERE=reports/NVIDIA_H200/levers/run17_bwd_host_desc
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run17.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
timeout 120 python3 $HERE/bwd_ab.py "$D" > "$D/bwd_ab.log" 2>&1; pack
tail -6 "$D/bwd_ab.log"
timeout 70 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
  --regime all --no-progress --json "$D/check_16k.json" > "$D/check_16k.log" 2>&1; pack
tail -n 1 "$D/check_16k.log"
timeout 130 python3 -m pytest -q -m gpu tests/ > "$D/pytest_gpu.log" 2>&1; pack
tail -n 1 "$D/pytest_gpu.log"
CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 260 bash ci/gpu_gate.sh bench gate > "$D/gate.log" 2>&1; pack
grep -E "^(regression|improvement|noise)|matched|gate:" "$D/gate.log" | tail -12
