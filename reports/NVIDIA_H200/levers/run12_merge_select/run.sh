#!/usr/bin/env bash
# Run 12, one GPU: ab_merge_select.py; then, with the merge that selects (SB_DECODE_SELECT_DROPPED=1),
# pytest -m gpu of the decode kernel's tests and scripts/gpu_decode.py (the decode records, kept
# only if the A/B keeps the change).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run12}
HERE=reports/NVIDIA_H200/levers/run12_merge_select
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 200 python3 $HERE/ab_merge_select.py "$D" 2>&1 | tail -9
export SB_DECODE_SELECT_DROPPED=1
timeout 90 python3 -m pytest -q -m gpu tests/test_decode_triton.py > "$D/pytest_gpu.log" 2>&1
tail -2 "$D/pytest_gpu.log"
timeout 110 python3 scripts/gpu_decode.py --out "$D/decode" --budget-s 20 2>&1 | tail -22
tar czf "${OUT:-/tmp}/run12.tgz" -C "$(dirname "$D")" "$(basename "$D")"
