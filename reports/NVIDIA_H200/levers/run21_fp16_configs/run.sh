#!/usr/bin/env bash
# Run 21, one GPU: ab.py (fp16 inputs under their shipped H200 configs and under the bf16 entries of
# the same keys).
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run21}
HERE=reports/NVIDIA_H200/levers/run21_fp16_configs
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 300 python3 $HERE/ab.py "$D" > "$D/ab.log" 2>&1
tar czf "${OUT:-/tmp}/run21.tgz" -C "$(dirname "$D")" "$(basename "$D")"
tail -8 "$D/ab.log"
