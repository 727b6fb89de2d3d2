#!/usr/bin/env bash
# Run 10, two GPUs: fp16 D=128 T=16384 peaked, the numerics check that failed once in the
# records of 4e83b85 (dq over budget with the re-tuned fp16 configs), over seeds 0-5, with the
# shipped (re-tuned) configs on GPU 0 and the fp16 configs shipped before (configs_before) on GPU 1.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run10}
HERE=reports/NVIDIA_H200/levers/run10_fp16_check
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
checks() {  # label
  for seed in 0 1 2 3 4 5; do
    timeout 40 sbbench check --backends triton --batch 1 --heads 1 --head-dim 128 --seqlens 16384 --dtype fp16 \
      --regime peaked,dense --seed $seed --no-progress --json "$D/$1_seed$seed.json" 2>&1 | tail -1
  done
}
( export CUDA_VISIBLE_DEVICES=0; checks retuned ) > "$D/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1; export SBBENCH_CONFIG_DIR=$HERE/configs_before; checks before ) > "$D/gpu1.log" 2>&1 &
wait
python3 - "$D" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
print(f"{'configs':<8} {'seed':>4} {'regime':<7} " + " ".join(f"{t + ' err/budget':>16}" for t in ("o", "dq", "dk", "dv")))
for label in ("retuned", "before"):
    for seed in range(6):
        f = d / f"{label}_seed{seed}.json"
        if not f.exists():
            continue
        rows = json.loads(f.read_text())["rows"]
        for regime in ("peaked", "dense"):
            cells = []
            for t in ("o", "dq", "dk", "dv"):
                r = next((r for r in rows if r["regime"] == regime and r["tensor"] == t), None)
                cells.append(f"{r['err_max'] / r['budget']:.2f}{'' if r['passed'] else ' FAIL'}" if r and r.get("budget") else "-")
            print(f"{label:<8} {seed:>4} {regime:<7} " + " ".join(f"{c:>16}" for c in cells))
PY
tar czf "${OUT:-/tmp}/run10.tgz" -C "$(dirname "$D")" "$(basename "$D")"
