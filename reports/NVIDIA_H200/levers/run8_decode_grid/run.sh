#!/usr/bin/env bash
# Run 8, two GPUs. GPU 0: fp16 re-tuned with the current space (TMA loads included), D=128 H=12
# then D=64 H=24, 2.5 minutes each, exported. GPU 1: the decode grid (grid_decode.py), then the
# decode tune with the read-flush timer and the auto split count that leaves no split empty.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run8}
HERE=reports/NVIDIA_H200/levers/run8_decode_grid
mkdir -p "$D"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
tune_fp16() {  # name heads head_dim
  timeout 200 sbbench tune --backend triton --batch 4 --heads $2 --head-dim $3 --dtype fp16 --seqlens 4096,16384 \
    --minutes 2.5 --storage "sqlite:///$D/$1.db" --json "$D/$1.json" --no-progress > "$D/$1.log" 2>&1
  tail -4 "$D/$1.log"
  sbbench export --storage "sqlite:///$D/$1.db" --out "$D/configs_$1" --min-speedup 1.02 2>&1 | tail -4
}
( export CUDA_VISIBLE_DEVICES=0
  tune_fp16 tune_fp16_d128 12 128
  tune_fp16 tune_fp16_d64 24 64
) > "$D/gpu0.log" 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 $HERE/grid_decode.py "$D/grid" 2>&1 | tail -14
  timeout 190 sbbench tune --backend triton --pass decode --batch 1,16,64 --heads 32 --kv-heads 8 --head-dim 128 \
    --seqlens 32768,131072 --dtype bf16 --minutes 2.5 --storage "sqlite:///$D/tune_decode.db" \
    --json "$D/tune_decode.json" --no-progress > "$D/tune_decode.log" 2>&1
  tail -8 "$D/tune_decode.log"
  sbbench export --storage "sqlite:///$D/tune_decode.db" --out "$D/configs_tune_decode" --min-speedup 1.02 2>&1 | tail -8
) > "$D/gpu1.log" 2>&1 &
wait
cat "$D/gpu0.log" "$D/gpu1.log"
rm -f "$D"/grid/trace_*.json
tar czf "${OUT:-/tmp}/run8.tgz" -C "$(dirname "$D")" "$(basename "$D")"
