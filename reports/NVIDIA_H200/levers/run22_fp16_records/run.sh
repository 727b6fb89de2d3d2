#!/usr/bin/env bash
# Run 22, one GPU, code and configs as committed (the fp16 entries that take the bf16 entries'
# launch parameters, run 21): sbbench check of triton at T=16384 (check_16k.json), the fp16 D=128
# T=16384 peaked check over seeds 0-2 (the case whose budget the backward's 32-key tile once
# exceeded: levers/run10_fp16_check; its backward entry is unchanged, its forward is new), then
# check.json (T=1024/4096, GQA, every regime) and the packed-varlen check.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run22}
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run22.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
timeout 100 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
  --regime all --no-progress --json "$D/check_16k.json" > "$D/check_16k.log" 2>&1; pack
tail -n 1 "$D/check_16k.log"
for seed in 0 1 2; do
  timeout 40 sbbench check --backends triton --batch 1 --heads 1 --head-dim 128 --seqlens 16384 --dtype fp16 \
    --regime peaked,dense --seed $seed --no-progress --json "$D/peaked_seed$seed.json" > "$D/peaked_seed$seed.log" 2>&1
  tail -n 1 "$D/peaked_seed$seed.log"
done; pack
timeout 150 sbbench check --backends triton --batch 2 --heads 4 --kv-heads 4,1 --head-dim 64,128 --seqlens 1024,4096 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check.json" > "$D/check.log" 2>&1; pack
tail -n 1 "$D/check.log"
timeout 170 sbbench check --backends triton --varlen --batch 4 --heads 4 --kv-heads 4,2 --head-dim 64,128 --seqlens 2048 \
  --dtype bf16,fp16 --regime all --no-progress --json "$D/check_varlen.json" > "$D/check_varlen.log" 2>&1; pack
tail -n 1 "$D/check_varlen.log"
python3 - "$D" <<'PY'
import json, sys
from pathlib import Path
print("fp16 D=128 T=16384: error / budget per tensor")
for f in sorted(Path(sys.argv[1]).glob("peaked_seed*.json")):
    for r in json.loads(f.read_text())["rows"]:
        print(f"{f.stem:<14} {r['regime']:<7} {r['tensor']:<4} {r['err_pt'] / max(r['budget'], 1e-30):.2f}  passed={r['passed']}")
PY
