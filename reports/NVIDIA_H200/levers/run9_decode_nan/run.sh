#!/usr/bin/env bash
# Run 9, two GPUs. GPU 0: fp16 forward and forward+backward with the shipped configs against the
# configs exported by run 8's fp16 tunes (TMA loads in the space), D=128 H=12 and D=64 H=24,
# beside FA2. GPU 1: diagnose.py (the decode check that failed in run 8's tuner).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run9}
HERE=reports/NVIDIA_H200/levers/run9_decode_nan
R8=reports/NVIDIA_H200/levers/run8_decode_grid
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
( export CUDA_VISIBLE_DEVICES=0
  for which in shipped retuned; do
    for shape in "12 128" "24 64"; do
      set -- $shape
      dir=()
      [ $which = retuned ] && dir=(env SBBENCH_CONFIG_DIR="$R8/configs_tune_fp16_d$2")
      timeout 100 "${dir[@]}" sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
        --seqlens 4096,16384 --dtype fp16 --regime dense --no-progress --json "$D/fp16_${which}_d$2.json" 2>&1 | tail -1
    done
  done
) > "$D/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  timeout 240 python3 $HERE/diagnose.py "$D" 2>&1 | tail -14
) > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu1.log" "$D/gpu0.log"
python3 - "$D" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
print(f"{'D':>4} {'T':>6} {'mode':>7} {'FA2/shipped':>12} {'FA2/retuned':>12}")
for hd in (128, 64):
    runs = {w: json.loads((d / f"fp16_{w}_d{hd}.json").read_text())["rows"] for w in ("shipped", "retuned")
            if (d / f"fp16_{w}_d{hd}.json").exists()}
    if len(runs) < 2:
        continue
    for r in runs["shipped"]:
        if r["backend"] != "triton" or r["latency_ms"] is None:
            continue
        key = lambda x: (x["seqlen"], x["mode"])
        ratio = {}
        for w, rows in runs.items():
            t = next(x for x in rows if x["backend"] == "triton" and key(x) == key(r))
            f = next(x for x in rows if x["backend"] == "fa2" and key(x) == key(r))
            ratio[w] = f"{f['latency_ms'] / t['latency_ms']:.3f}x ({t['latency_ms']:.3f})"
        print(f"{hd:>4} {r['seqlen']:>6} {r['mode']:>7} {ratio['shipped']:>12} {ratio['retuned']:>12}")
PY
tar czf "${OUT:-/tmp}/run9.tgz" -C "$(dirname "$D")" "$(basename "$D")"
