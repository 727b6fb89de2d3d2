#!/usr/bin/env bash
# Run 27, one GPU: ab.py (Gluon forward variants beside the Triton forward, FA2 and cuDNN).
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run27}
HERE=reports/NVIDIA_H200/levers/run27_gluon
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$D/gpu.txt" 2>&1
timeout 420 python3 $HERE/ab.py "$D" > "$D/ab.log" 2>&1
echo "exit $?" >> "$D/ab.log"
tar czf "${OUT:-/tmp}/run27.tgz" -C "$(dirname "$D")" "$(basename "$D")"
tail -15 "$D/ab.log"
