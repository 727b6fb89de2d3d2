#!/usr/bin/env bash
# Run 29, one GPU: (1) run 27's ab.py with the occupancy variants (the producer warp under a cap of
# 80 registers: three programs per SM), bf16, T=4096/16384; (2) Nsight Compute on prof.py's
# launches (D=64, T=4096): the Triton forward, Gluon without and with the producer warp at 80 and
# 128 registers; run 20's sections and summary.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run29}
HERE=reports/NVIDIA_H200/levers/run29_gluon_occupancy
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run29.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
timeout 200 python3 reports/NVIDIA_H200/levers/run27_gluon/ab.py "$D" occupancy > "$D/ab.log" 2>&1
echo "exit $?" >> "$D/ab.log"; pack
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 240 "$NCU" --clock-control none --kernel-name "regex:sb_fwd" \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
  --section LaunchStats --section SchedulerStats \
  --metrics "regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
  --csv --page raw python3 $HERE/prof.py > "$D/ncu_fwd_d64.csv" 2> "$D/ncu_fwd_d64.err"
echo "ncu rc=$? $(wc -l < "$D/ncu_fwd_d64.csv") lines"; tail -3 "$D/ncu_fwd_d64.err"
python3 reports/NVIDIA_H200/levers/run20_pipes/summarize.py "$D" > "$D/summary.txt" 2>&1; pack
tail -8 "$D/ab.log"; cat "$D/summary.txt"
