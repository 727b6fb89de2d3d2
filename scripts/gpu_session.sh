#!/usr/bin/env bash
# The GPU runs of record, one stage per device call (each fits in a 10-minute call):
#   bash scripts/gpu_session.sh check|bench|sweep|varlen|probe|ab|memcheck|tune|tune_bwd|tune_bwd_regs|grid|final
# Results land in $OUT (copied by the lead into reports/<device>/). Needs the optuna wheels in
# .whl/ (see ../shared/wheels) for the tune stages.
set -uo pipefail
export PYTHONUNBUFFERED=1
# The device copy of the tree has no .git: name the commit for the result rows.
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .device
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
STORAGE="sqlite:///$PWD/.device/tune.db"
for stage in "$@"; do
  case "$stage" in
    check)
      # Issue 3: bf16 within budget at T up to 16384 in all four regimes (pytest, gpu marker),
      # then the check of record for every GPU backend, with FlashAttention-2's error beside it.
      python3 -m pytest -q -m gpu tests/ 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
      sbbench check --backends triton,chunked,compiled --batch 2 --heads 4 --kv-heads 4,2 --head-dim 64,128 \
        --seqlens 1024,4096 --dtype bf16,fp16 --regime all --json "$OUT/check.json" 2>&1 | tail -4
      # D=64 too: its tuned backward at T >= 8192 runs the dK/dV kernel with 2 stages.
      sbbench check --backends triton --batch 1 --heads 1 --head-dim 64,128 --seqlens 16384 --dtype bf16 \
        --regime all --json "$OUT/check_16k.json" 2>&1 | tail -14
      ;;
    bench)
      # Issue 4's sweep (every backend, D=128) and issue 3's speed targets (D=64 H=24; randn
      # with skipping; memory), one results file.
      sbbench bench --backends fa2,triton,compiled,chunked --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
        --seqlens 1024..16384 --dtype bf16 --regime dense --json "$OUT/bench_d128.json" 2>&1 | tail -45
      sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads 24 --head-dim 64 \
        --seqlens 4096,8192,16384 --dtype bf16 --regime dense --json "$OUT/bench_d64.json" 2>&1 | tail -14
      sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
        --seqlens 4096,16384 --dtype bf16 --regime randn,mixed,peaked --json "$OUT/bench_regimes.json" 2>&1 | tail -20
      ;;
    sweep)
      # The gate's baseline (README: "Regression gate"): the whole H100 sweep in one run.
      timeout -s TERM 580 sbbench bench --sweep sbbench/sweeps/h100.json --json "$OUT/bench.json" 2>&1 | tail -40
      ;;
    varlen)
      # Packed varlen (ragged, one sequence of length 1) in bf16/fp16, and fp32 (IEEE dots,
      # exact scans) on the GPU, after the pytest gpu marker.
      python3 -m pytest -q -m gpu tests/ 2>&1 | tail -3
      sbbench check --backends triton,chunked --varlen --batch 4 --heads 4 --kv-heads 2 --head-dim 64,128 \
        --seqlens 2048 --dtype bf16,fp16 --regime all --json "$OUT/check_varlen.json" 2>&1 | tail -3
      sbbench check --backends triton --batch 2 --heads 4 --kv-heads 2 --head-dim 80,128 --seqlens 1000 \
        --dtype fp32 --regime all --json "$OUT/check_fp32.json" 2>&1 | tail -3
      ;;
    probe)
      # Per-kernel times of backward tile variants beside FA2, and D=64 T=16k memory: for
      # choosing defaults after a kernel change (not figures of record).
      python3 scripts/gpu_bwd_probe.py 2>&1 | tail -30
      ;;
    ab)
      # Kernel variants side by side in one call: GPU tests on the working tree, then the probe's
      # first AB_PAIRS (default 2) pairs per head dim, or the pairs PROBE_PAIR_SPECS names (see
      # gpu_bwd_probe.py), on each .device/ab/<name>/{kernels,op}.py swapped in (e.g. the previous
      # revision's, from git show REV:kernels/triton_sb/kernels.py), then the working tree's files
      # restored.
      python3 -m pytest -q -m gpu tests/test_triton.py 2>&1 | tail -4 | tee "$OUT/pytest_gpu_triton.log"
      mkdir -p .device/ab_keep && cp kernels/triton_sb/kernels.py kernels/triton_sb/op.py .device/ab_keep/
      for variant in .device/ab/*/; do
        name=$(basename "$variant")
        cp "$variant/kernels.py" "$variant/op.py" kernels/triton_sb/
        echo "== $name"
        PROBE_PAIRS=${AB_PAIRS:-2} PROBE_NAME="bwd_ab_$name" timeout 200 python3 scripts/gpu_bwd_probe.py 2>&1 | tail -8
      done
      cp .device/ab_keep/kernels.py .device/ab_keep/op.py kernels/triton_sb/
      ;;
    tune_bwd_regs)
      # After the fence-free dQ kernel: at D=64, the dQ register cap (168 fits a third program per
      # SM) and 2-stage dK/dV, which gpu_bwd_probe.py round 3 found 6% and 5% faster there (both
      # slower at D=128), over the tuned tiles. Each trial passes the numerics constraint first.
      timeout -s TERM 280 sbbench tune --backend triton --pass bwd --batch 4 --heads 12 --head-dim 64 \
        --seqlens 4096,16384 --dtype bf16 --regime mixed --sampler grid --trial-timeout 60 --no-progress \
        --storage "$STORAGE" --space bwd_BLOCK_M=64 --space bwd_BLOCK_N=32 --space bwd_num_warps=4 \
        --space bwd_num_stages=3 --space bwd_dkdv_BLOCK_M=64 --space bwd_dkdv_BLOCK_N=64 \
        --space bwd_dkdv_num_warps=4 --space bwd_maxnreg=0,168 --space bwd_dkdv_num_stages=1,2 \
        --timeout 270 --json "$OUT/tune_bwd_regs_d64.json" 2>&1 | tail -8
      mkdir -p "$OUT/configs" && cp -r sbbench/configs/. "$OUT/configs/"
      sbbench export --storage "$STORAGE" --out "$OUT/configs" 2>&1 | tail -12
      ;;
    memcheck)
      python3 scripts/memory_by_hand.py 2>&1 | tee "$OUT/memory_by_hand.log"
      ;;
    tune)
      # Issue 5: TPE per key (D=64 and 128; T=4096 and 16384 buckets, which the nearest-bucket
      # lookup extends to 2048..16384), fwd and bwd, mixed regime, over a space without the
      # choices that cannot win on an H100 (16-wide tiles for D>=64, 2 warps).
      timeout -s TERM $((${TUNE_SECONDS:-520} + 40)) sbbench tune --backend triton --pass both --batch 4 --heads 12 --head-dim 128,64 \
        --seqlens 4096,16384 --dtype bf16 --regime mixed --trials ${TUNE_TRIALS:-12} --startup-trials 5 --timeout ${TUNE_SECONDS:-520} \
        --trial-timeout 60 --storage "$STORAGE" --json "$OUT/tune_tpe.json" --no-progress \
        --space fwd_BLOCK_M=64,128 --space fwd_BLOCK_N=32,64,128 --space fwd_num_warps=4,8 \
        --space fwd_num_stages=1,2,3 --space skip_check_keys=128,256,512,1024 --space skip_checks=1,2 \
        --space skip_log2=-30,-24,-20 --space scan=dot \
        --space bwd_BLOCK_M=32,64,128 --space bwd_BLOCK_N=16,32,64 --space bwd_num_warps=4,8 \
        --space bwd_num_stages=1,2 --space bwd_dkdv_BLOCK_M=16,32,64 --space bwd_dkdv_BLOCK_N=64,128 \
        --space bwd_dkdv_num_warps=4,8 --space bwd_dkdv_num_stages=1 2>&1 | tail -40
      sbbench export --storage "$STORAGE" --out "$OUT/configs" 2>&1 | tail -22
      cp .device/tune.db "$OUT/tune.db"
      ;;
    tune_bwd)
      # After the backward's rework: the dQ / dK/dV tiles per head dim, exhaustively over the
      # choices gpu_bwd_probe.py found competitive, 1-stage dK/dV only (2 stages miscompiled dK
      # before: see kernels/triton_sb/__init__.py). Exported over a copy of the shipped configs
      # (export merges, so the forward entries stay).
      B="--backend triton --pass bwd --batch 4 --heads 12 --seqlens 4096,16384 --dtype bf16 --regime mixed \
         --sampler grid --trial-timeout 60 --no-progress --storage $STORAGE --space bwd_BLOCK_M=64 \
         --space bwd_num_warps=4 --space bwd_num_stages=3 --space bwd_dkdv_BLOCK_N=64 --space bwd_dkdv_num_stages=1"
      timeout -s TERM 330 sbbench tune $B --head-dim 128 --space bwd_BLOCK_N=32 --space bwd_dkdv_BLOCK_M=32,64,128 \
        --space bwd_dkdv_num_warps=4,8 --timeout 320 --json "$OUT/tune_bwd_d128.json" 2>&1 | tail -8
      timeout -s TERM 230 sbbench tune $B --head-dim 64 --space bwd_BLOCK_N=32,64 --space bwd_dkdv_BLOCK_M=32,64 \
        --space bwd_dkdv_num_warps=4 --timeout 220 --json "$OUT/tune_bwd_d64.json" 2>&1 | tail -8
      mkdir -p "$OUT/configs" && cp -r sbbench/configs/. "$OUT/configs/"
      sbbench export --storage "$STORAGE" --out "$OUT/configs" 2>&1 | tail -12
      cp .device/tune.db "$OUT/tune_bwd.db"
      ;;
    grid)
      # Issue 5: the exhaustive grid beside TPE on one key (D=128, T=8192, fwd) over 36 cells,
      # then export every study's best feasible config.
      S="--backend triton --pass fwd --batch 4 --heads 12 --head-dim 128 --seqlens 8192 --dtype bf16 --regime mixed \
         --trial-timeout 60 --no-progress --storage $STORAGE --space fwd_BLOCK_M=64,128 --space fwd_BLOCK_N=32,64,128 \
         --space fwd_num_warps=4,8 --space fwd_num_stages=1,2,3 --space skip_log2=-30 --space skip_check_keys=256 \
         --space skip_checks=1 --space scan=dot"
      timeout -s TERM 330 sbbench tune $S --sampler grid --timeout 320 --json "$OUT/tune_grid.json" 2>&1 | tail -6
      timeout -s TERM 200 sbbench tune $S --sampler tpe --trials 18 --startup-trials 5 --timeout 190 \
        --json "$OUT/tune_tpe36.json" 2>&1 | tail -12
      sbbench export --storage "$STORAGE" --out "$OUT/configs" 2>&1 | tail -22
      cp .device/tune.db "$OUT/tune.db"
      ;;
    final)
      # With the tuned configs shipped in sbbench/configs/: the mixed regime (what was tuned) and
      # the dense speed targets, D=128 (H=12) and D=64 (H=24).
      sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads 12 --head-dim 128 \
        --seqlens 2048,4096,8192,16384 --dtype bf16 --regime mixed,dense --json "$OUT/bench_tuned_d128.json" 2>&1 | tail -34
      sbbench bench --backends fa2,triton --mode fwd,fwdbwd --batch 4 --heads 24 --head-dim 64 \
        --seqlens 4096,8192,16384 --dtype bf16 --regime dense --json "$OUT/bench_tuned_d64.json" 2>&1 | tail -14
      ;;
    *)
      echo "unknown stage $stage"; exit 2;;
  esac
done
