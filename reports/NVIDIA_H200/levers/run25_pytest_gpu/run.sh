#!/usr/bin/env bash
# Run 25, one GPU, code and configs as committed (the fp16 entries of runs 21-24): pytest -m gpu.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run25}
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 220 python3 -m pytest -q -m gpu tests/ > "$D/pytest_gpu.log" 2>&1
tar czf "${OUT:-/tmp}/run25.tgz" -C "$(dirname "$D")" "$(basename "$D")"
tail -n 3 "$D/pytest_gpu.log"
