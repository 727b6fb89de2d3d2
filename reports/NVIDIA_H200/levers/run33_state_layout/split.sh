#!/usr/bin/env bash
# Run 33, second call (one GPU), after run.sh's A/B showed D=64 T>=8k slower: per-kernel times.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run33}
HERE=reports/NVIDIA_H200/levers/run33_state_layout
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 240 python3 $HERE/kernels_split.py "$D" .whl/ab/kernels_a8c3fb8.py > "$D/kernels_split.log" 2>&1
mkdir -p "${OUT:-/tmp}/run33"; cp "$D"/kernels_split.* "${OUT:-/tmp}/run33/"
tail -7 "$D/kernels_split.log"
