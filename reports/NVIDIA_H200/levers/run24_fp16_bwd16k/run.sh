#!/usr/bin/env bash
# Run 24, one GPU, code and configs as committed: the fp16 D=128 T=16384 backward entry takes the
# bf16 entry's launch parameters (run 21: forward+backward 65.4 -> 59.6 ms), whose 32-key dQ tile
# once failed the peaked gradient check beside the earlier fp16 forward (levers/run10_fp16_check).
# sbbench check at T=16384 (check_16k.json: seed 0) and fp16 D=128 T=16384, every regime, seeds
# 1-3; then, only if every row passed, the gate sweep (bench.json, gated against the committed
# baseline) and the fp16 D=128 training table.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run24}
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run24.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
failed=0
timeout 100 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
  --regime all --no-progress --json "$D/check_16k.json" > "$D/check_16k.log" 2>&1 || failed=1
tail -n 1 "$D/check_16k.log"; pack
for seed in 1 2 3; do
  timeout 50 sbbench check --backends triton --batch 1 --heads 1 --head-dim 128 --seqlens 16384 --dtype fp16 \
    --regime all --seed $seed --no-progress --json "$D/fp16_d128_seed$seed.json" > "$D/fp16_d128_seed$seed.log" 2>&1 \
    || failed=1
  tail -n 1 "$D/fp16_d128_seed$seed.log"
done; pack
python3 - "$D" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
print("fp16 D=128 T=16384, err_max / budget")
files = [("seed0", d / "check_16k.json")] + [(f"seed{s}", d / f"fp16_d128_seed{s}.json") for s in (1, 2, 3)]
for label, f in files:
    if not f.exists():
        continue
    rows = [r for r in json.loads(f.read_text())["rows"] if r["dtype"] == "float16" and r["head_dim"] == 128]
    for regime in ("dense", "peaked", "mixed", "randn"):
        cells = []
        for t in ("o", "dq", "dk", "dv"):
            r = next((r for r in rows if r["regime"] == regime and r["tensor"] == t), None)
            cells.append(f"{t} {r['err_max'] / r['budget']:.2f}{'' if r['passed'] else ' FAIL'}" if r and r.get("budget") else f"{t} -")
        print(f"{label:<6} {regime:<7} " + "  ".join(cells))
PY
[ $failed = 0 ] || { echo "a check failed: no gate sweep"; exit 1; }
CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 230 bash ci/gpu_gate.sh bench gate > "$D/gate.log" 2>&1; pack
grep -E "^(regression|improvement|noise|REGRESSION)|matched|gate:" "$D/gate.log" | tail -10
timeout 70 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
  --seqlens 4096,8192,16384 --dtype fp16 --regime dense --no-progress \
  --json "$D/bench_training_fp16_d128.json" > "$D/bench_training_fp16_d128.log" 2>&1; pack
tail -n 12 "$D/bench_training_fp16_d128.log"
