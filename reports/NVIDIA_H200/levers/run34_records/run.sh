#!/usr/bin/env bash
# Run 34, one GPU, code and configs as committed (bwd_state_layout=blocks in six H200 backward
# entries, from run 33): the gate sweep (bench.json, the new baseline) gated against the
# committed one, then the GPU tests (pytest -m gpu: bit-identical backward three times with the
# tuned configs, bf16 and varlen numerics).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run34}
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { mkdir -p "${OUT:-/tmp}/run34"; cp -r "$D"/. "${OUT:-/tmp}/run34/"; }
if [ "${VARLEN_AB:-0}" != 1 ]; then
CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 260 bash ci/gpu_gate.sh bench gate > "$D/gate.log" 2>&1; pack
grep -E "^(regression|improvement|noise|REGRESSION)|matched|gate:" "$D/gate.log" | tail -14
timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$D/pytest_gpu.log" 2>&1; pack
tail -n 3 "$D/pytest_gpu.log"
fi
# Second call (VARLEN_AB=1), after the gate flagged the packed-varlen row: rows against blocks.
if [ "${VARLEN_AB:-0}" = 1 ]; then
  timeout 150 python3 reports/NVIDIA_H200/levers/run34_records/varlen_ab.py "$D" > "$D/varlen_ab.log" 2>&1; pack
  tail -3 "$D/varlen_ab.log"
fi
