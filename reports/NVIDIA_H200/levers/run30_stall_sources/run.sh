#!/usr/bin/env bash
# Run 30, one GPU: where in each kernel's machine code the warps stall. Nsight Compute's source
# counters (warp-state samples per SASS instruction) on the second training step of run 20's
# step.py (bf16, B=4, causal, dense, T=4096, the shipped H200 configs): D=64 H=24 and D=128 H=12,
# the forward, dQ and dK/dV kernels. Per kernel a CSV of the source page (SASS), digested by
# digest.py into the top stalling instructions and the stall reasons per instruction kind.
set -uo pipefail
export PYTHONUNBUFFERED=1
D=${RESULTS:-/tmp/run30}
HERE=reports/NVIDIA_H200/levers/run30_stall_sources
mkdir -p "$D"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
pack() { tar czf "${OUT:-/tmp}/run30.tgz" -C "$(dirname "$D")" "$(basename "$D")"; }
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
"$NCU" --version > "$D/ncu_version.txt" 2>&1
"$NCU" --help 2>&1 | grep -i -A3 "print-source\|page " > "$D/ncu_help_source.txt"
for shape in "24 64" "12 128"; do
  set -- $shape
  timeout 200 "$NCU" --clock-control none --kernel-name "regex:sb_" --launch-skip 3 --launch-count 3 \
    --section SourceCounters --section WarpStateStats --section LaunchStats --section Occupancy \
    --import-source no -o "$D/src_d$2" --force-overwrite \
    python3 reports/NVIDIA_H200/levers/run20_pipes/step.py triton $1 $2 4096 > "$D/profile_d$2.log" 2>&1
  echo "profile d$2 rc=$?"; tail -2 "$D/profile_d$2.log"
  "$NCU" --import "$D/src_d$2.ncu-rep" --page source --csv --print-source sass > "$D/src_d$2.csv" 2> "$D/src_d$2.err"
  echo "export d$2 rc=$? $(wc -l < "$D/src_d$2.csv") lines"; head -c 300 "$D/src_d$2.err"
  gzip -f "$D/src_d$2.csv"
  "$NCU" --import "$D/src_d$2.ncu-rep" --page raw --csv > "$D/raw_d$2.csv" 2>/dev/null
  pack
done
python3 $HERE/digest.py "$D" > "$D/digest.txt" 2>&1; pack
head -c 6000 "$D/digest.txt"
