#!/usr/bin/env bash
# Run 18, one GPU, code and configs as committed (bwd_descriptors=host in the shipped D=64 T=16384
# bf16 backward entry): the gate sweep (bench.json) gated against the committed baseline, then the
# bf16 D=64 training table.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run18}
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run18.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 190 bash ci/gpu_gate.sh bench gate > "$D/gate.log" 2>&1; pack
grep -E "^(regression|improvement|noise|REGRESSION)|matched|gate:" "$D/gate.log" | tail -12
timeout 50 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads 24 --head-dim 64 \
  --seqlens 4096,8192,16384 --dtype bf16 --regime dense --no-progress \
  --json "$D/bench_training_bf16_d64.json" > "$D/bench_training_bf16_d64.log" 2>&1; pack
tail -n 2 "$D/bench_training_bf16_d64.log"
