#!/usr/bin/env bash
# Run 15, one GPU: regcap_ab.py (the forward's register cap with host-made descriptors), then the
# records with the code and configs as committed: the gate sweep (bench.json, gated against the
# committed baseline) and sbbench check of packed varlen (check_varlen.json).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run15}
HERE=reports/NVIDIA_H200/levers/run15_fwd_regcap
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 80 python3 $HERE/regcap_ab.py "$D" > "$D/regcap_ab.log" 2>&1
tar czf "${OUT:-/tmp}/run15.tgz" -C "$(dirname "$D")" "$(basename "$D")"
CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 330 bash ci/gpu_gate.sh bench gate > "$D/gate.log" 2>&1
tar czf "${OUT:-/tmp}/run15.tgz" -C "$(dirname "$D")" "$(basename "$D")"
timeout 150 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check_varlen.json" > "$D/check_varlen.log" 2>&1
tar czf "${OUT:-/tmp}/run15.tgz" -C "$(dirname "$D")" "$(basename "$D")"
tail -8 "$D/regcap_ab.log"; grep -E "^(regression|improvement|noise)|matched|gate:" "$D/gate.log" | tail -30; tail -2 "$D/check_varlen.log"
