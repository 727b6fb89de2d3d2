#!/usr/bin/env bash
# Run 16, one GPU, code and configs as committed (the forward register cap in the shipped file):
# pytest -m gpu, sbbench check at T=16384 (check_16k.json), the bf16 training tables
# (bench_training_bf16_d{128,64}.json: forward and forward+backward beside FA2 and cuDNN).
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run16}
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run16.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
timeout 170 python3 -m pytest -q -m gpu tests/ > "$D/pytest_gpu.log" 2>&1; pack
timeout 70 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
  --regime all --no-progress --json "$D/check_16k.json" > "$D/check_16k.log" 2>&1; pack
for shape in "12 128" "24 64"; do
  set -- $shape
  timeout 110 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
    --seqlens 4096,8192,16384 --dtype bf16 --regime dense --no-progress \
    --json "$D/bench_training_bf16_d$2.json" > "$D/bench_training_bf16_d$2.log" 2>&1; pack
done
tail -2 "$D/pytest_gpu.log"; tail -1 "$D/check_16k.log"; tail -1 "$D"/bench_training_bf16_d*.log
