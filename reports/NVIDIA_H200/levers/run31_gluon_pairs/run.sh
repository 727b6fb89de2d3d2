#!/usr/bin/env bash
# Run 31, one GPU: run 27's ab.py with the pair variants (two tiles per loop iteration, each
# one's matrix products overlapping the other's transform), bf16 T=4k/8k/16k and fp16 T=4k.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run31}
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 400 python3 reports/NVIDIA_H200/levers/run27_gluon/ab.py "$D" pairs > "$D/ab.log" 2>&1
echo "exit $?" >> "$D/ab.log"
tar czf "${OUT:-/tmp}/run31.tgz" -C "$(dirname "$D")" "$(basename "$D")"
tail -14 "$D/ab.log"
