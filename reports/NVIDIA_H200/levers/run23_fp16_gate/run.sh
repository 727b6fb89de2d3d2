#!/usr/bin/env bash
# Run 23, one GPU, code and configs as committed (run 21's fp16 entries): the gate sweep
# (bench.json, the new baseline) gated against the committed one, then the fp16 training tables
# (bench_training_fp16_d{128,64}.json: forward and forward+backward beside FA2 and cuDNN).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run23}
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run23.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 230 bash ci/gpu_gate.sh bench gate > "$D/gate.log" 2>&1; pack
grep -E "^(regression|improvement|noise|REGRESSION)|matched|gate:" "$D/gate.log" | tail -14
for shape in "12 128" "24 64"; do
  set -- $shape
  timeout 70 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
    --seqlens 4096,8192,16384 --dtype fp16 --regime dense --no-progress \
    --json "$D/bench_training_fp16_d$2.json" > "$D/bench_training_fp16_d$2.log" 2>&1; pack
  tail -n 14 "$D/bench_training_fp16_d$2.log"
done
