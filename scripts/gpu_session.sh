#!/usr/bin/env bash
# The GPU runs whose results are committed under reports/<device>/, one stage per call (each stage
# fits in about ten minutes):
#
#   OUT=DIR bash scripts/gpu_session.sh STAGE [STAGE...]
#
#   check          pytest -m gpu, then `sbbench check` of every GPU backend (check.json, check_16k.json)
#   varlen         `sbbench check` of packed varlen (bf16/fp16) and of float32 (check_varlen.json, check_fp32.json)
#   bench          the results the device README quotes (bench_d128.json, bench_d64.json, bench_regimes.json)
#   sweep          the gate's baseline: ci/gpu_gate.sh bench, the whole gate sweep (bench.json)
#   memcheck       the bench memory column against a by-hand measurement (memory_by_hand.log)
#   probe          per-kernel backward times of launch variants beside FA2 (bwd_probe.json)
#   ab             the probe on kernel variants swapped in from .device/ab/<name>/{kernels,op}.py
#
# Tuning a GPU is scripts/tune_new_gpu.sh. Copy what a stage wrote into reports/<device>/ and
# commit; `sbbench report reports/<device>/*.json --out reports/<device>/report` remakes the tables.
set -uo pipefail
export PYTHONUNBUFFERED=1
# A copy of the tree without .git can name its commit for the result rows in .commit.
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device
# A host without a package index installs optuna and friends from wheels put in .whl/.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }

for stage in "$@"; do
  case "$stage" in
    check)
      python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
      sbbench check --backends triton,chunked,compiled --batch 2 --heads 4 --kv-heads 4,2 --head-dim 64,128 \
        --seqlens 1024,4096 --dtype bf16,fp16 --regime all --json "$OUT/check.json" 2>&1 | tail -4
      # Long sequences too: the tuned D=64 backward at T >= 8192 runs the dK/dV kernel with 2 stages.
      sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16 \
        --regime all --json "$OUT/check_16k.json" 2>&1 | tail -14
      ;;
    varlen)
      sbbench check --backends triton,chunked --varlen --batch 4 --heads 4 --kv-heads 2 --head-dim 64,128 \
        --seqlens 2048 --dtype bf16,fp16 --regime all --json "$OUT/check_varlen.json" 2>&1 | tail -3
      sbbench check --backends triton --batch 2 --heads 4 --kv-heads 2 --head-dim 80,128 --seqlens 1000 \
        --dtype fp32 --regime all --json "$OUT/check_fp32.json" 2>&1 | tail -3
      ;;
    bench)
      # Every backend at D=128; fa2 and triton at D=64 (H=24); the skipping regimes at D=128.
      sbbench bench --backends fa2,triton,compiled,chunked --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
        --seqlens 1024..16384 --dtype bf16 --regime dense --json "$OUT/bench_d128.json" 2>&1 | tail -45
      sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads 24 --head-dim 64 \
        --seqlens 4096,8192,16384 --dtype bf16 --regime dense --json "$OUT/bench_d64.json" 2>&1 | tail -14
      sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
        --seqlens 4096,16384 --dtype bf16 --regime randn,mixed,peaked --json "$OUT/bench_regimes.json" 2>&1 | tail -20
      ;;
    sweep)
      # The same sweep the GPU workflow gates (ci/gpu_gate.sh names it).
      CURRENT="$OUT/bench.json" timeout -s TERM 580 bash ci/gpu_gate.sh bench 2>&1 | tail -40
      ;;
    memcheck)
      python3 scripts/memory_by_hand.py 2>&1 | tee "$OUT/memory_by_hand.log"
      ;;
    probe)
      python3 scripts/gpu_bwd_probe.py --out "$OUT" 2>&1 | tail -30
      ;;
    ab)
      # Each .device/ab/<name>/ holds a kernels.py and op.py (e.g. another revision's, from
      # `git show REV:kernels/triton_sb/kernels.py`); each is swapped in for one probe run, then
      # the working tree's files are restored. AB_PAIRS (default 2) pairs per head dim are timed,
      # or the pairs PROBE_PAIR_SPECS names (gpu_bwd_probe.py --pairs).
      python3 -m pytest -q -m gpu tests/test_triton.py 2>&1 | tail -4 | tee "$OUT/pytest_gpu_triton.log"
      mkdir -p .device/ab_keep && cp kernels/triton_sb/kernels.py kernels/triton_sb/op.py .device/ab_keep/
      pairs=(--max-pairs "${AB_PAIRS:-2}")
      if [ -n "${PROBE_PAIR_SPECS:-}" ]; then pairs=(--pairs "$PROBE_PAIR_SPECS"); fi
      for variant in .device/ab/*/; do
        name=$(basename "$variant")
        cp "$variant/kernels.py" "$variant/op.py" kernels/triton_sb/
        echo "== $name"
        timeout 200 python3 scripts/gpu_bwd_probe.py --out "$OUT" --name "bwd_ab_$name" "${pairs[@]}" 2>&1 | tail -8
      done
      cp .device/ab_keep/kernels.py .device/ab_keep/op.py kernels/triton_sb/
      ;;
    *)
      echo "unknown stage $stage"; exit 2;;
  esac
done
