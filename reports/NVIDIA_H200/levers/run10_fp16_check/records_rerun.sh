set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=$(cat .commit)
export OUT=${OUT:-/tmp/out}; D=/tmp/rec2; mkdir -p $D
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
( export CUDA_VISIBLE_DEVICES=0
  CURRENT="$D/bench.json" GATE_JSON="$D/gate.json" timeout 280 bash ci/gpu_gate.sh bench gate 2>&1 | tail -12
) > $D/gpu0.log 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  for shape in "12 128" "24 64"; do set -- $shape
    timeout 100 sbbench bench --backends fa2,cudnn,triton --mode fwd,fwdbwd --batch 4 --heads $1 --head-dim $2 \
      --seqlens 4096,8192,16384 --dtype fp16 --regime dense --no-progress --json "$D/bench_training_fp16_d$2.json" 2>&1 | tail -1
  done
  timeout 60 sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16,fp16 \
    --regime all --no-progress --json "$D/check_16k.json" 2>&1 | tail -1
) > $D/gpu1.log 2>&1 &
wait; cat $D/gpu1.log $D/gpu0.log
tar czf $OUT/rec2.tgz -C /tmp rec2
