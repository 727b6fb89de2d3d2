#!/usr/bin/env bash
# Run 20, one GPU: Nsight Compute on one training step's kernels (the second step of step.py), bf16,
# B=4, causal, dense, T=4096, D=64 (H=24) and D=128 (H=12): the triton backend's forward, dQ and
# dK/dV kernels with the shipped H200 configs, and FA2's kernels beside them. Per kernel: duration,
# issue-slot use, per-pipe instruction rates (% of peak), tensor-pipe activity, warps eligible per
# cycle and the stall reasons (ncu_*.csv, raw page). Clocks left alone (--clock-control none).
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run20}
HERE=reports/NVIDIA_H200/levers/run20_pipes
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run20.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
for shape in "24 64" "12 128"; do
  set -- $shape
  for which in triton fa2; do
    if [ $which = triton ]; then filter="regex:sb_"; n=3; else filter="regex:flash|dot_do_o|convert_dq"; n=4; fi
    timeout 200 "$NCU" --clock-control none --kernel-name "$filter" --launch-skip $n --launch-count $n \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section SchedulerStats \
      --metrics "regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
      --csv --page raw python3 $HERE/step.py $which $1 $2 4096 > "$D/ncu_${which}_d$2.csv" 2> "$D/ncu_${which}_d$2.err"
    echo "$which d$2 rc=$? $(wc -l < "$D/ncu_${which}_d$2.csv") lines"; tail -2 "$D/ncu_${which}_d$2.err"; pack
  done
done
python3 $HERE/summarize.py "$D" | tee "$D/summary.txt"; pack
