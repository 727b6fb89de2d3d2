#!/usr/bin/env bash
# Run 28, one GPU: (1) run 27's diag.py: where the Gluon forward's own-loads variants put NaNs;
# (2) a short `sbbench tune` of fp16 D=64 T=4096, forward and backward, on a fresh storage: the
# dtype warm start (bf16 entries for an fp16 study) as a user's tune runs it.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run28}
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
timeout 120 python3 reports/NVIDIA_H200/levers/run27_gluon/diag.py "$D" > "$D/diag.log" 2>&1
echo "exit $?" >> "$D/diag.log"
tar czf "${OUT:-/tmp}/run28.tgz" -C "$(dirname "$D")" "$(basename "$D")"
timeout 330 sbbench tune --backend triton --pass both --batch 4 --heads 24 --head-dim 64 --dtype fp16 \
  --seqlens 4096 --trials 6 --minutes 4.5 --storage "sqlite:///$D/tune.db" --json "$D/tune_fp16_warm.json" \
  --no-progress > "$D/tune.log" 2>&1
echo "exit $?" >> "$D/tune.log"
tar czf "${OUT:-/tmp}/run28.tgz" -C "$(dirname "$D")" "$(basename "$D")"
cat "$D/diag.log"; tail -40 "$D/tune.log"
