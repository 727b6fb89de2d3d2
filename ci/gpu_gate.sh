#!/usr/bin/env bash
# The GPU gate's steps, run by .github/workflows/gpu.yml and by hand on any GPU machine:
#
#   bash ci/gpu_gate.sh device    print reports/<device>'s <device> (also to $GITHUB_OUTPUT as stem=...)
#   bash ci/gpu_gate.sh bench     bench the gate sweep into $CURRENT
#   bash ci/gpu_gate.sh gate      gate $CURRENT against reports/<device>/bench.json (ci/gate.toml)
#   bash ci/gpu_gate.sh report    sbbench report of $CURRENT (and check.json if present) into $REPORT_DIR
#
# Several steps may be given at once (`bash ci/gpu_gate.sh bench gate`). <device> is
# torch.cuda.get_device_name() with spaces as underscores. Environment: SWEEP (default
# sbbench/sweeps/gate_<device>.json when the device has one, else sbbench/sweeps/gate.json), SEED (the inputs' seed,
# default 0), CURRENT (default current.json), BASELINE (default
# reports/<device>/bench.json), GATE_JSON (default gate.json), REPORT_DIR (default report-current).
# Exit status: sbbench's (gate: 1 on a regression, 2 on unusable input); a GPU without a committed
# baseline is a warning, not a failure, so a new device can run CI before its baseline exists.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP=${SWEEP:-}
CURRENT=${CURRENT:-current.json}
GATE_JSON=${GATE_JSON:-gate.json}
REPORT_DIR=${REPORT_DIR:-report-current}

device_stem() {
  python3 -c '
import sys, torch
from sbbench.core.config_loader import device_file_stem
if not torch.cuda.is_available():
    sys.exit("ci/gpu_gate.sh: no CUDA GPU visible to torch")
print(device_file_stem(torch.cuda.get_device_name()))'
}

[ $# -gt 0 ] || { echo "usage: bash ci/gpu_gate.sh device|bench|gate|report ..." >&2; exit 2; }
for step in "$@"; do
  case "$step" in
    device)
      stem=$(device_stem)
      echo "$stem"
      if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "stem=$stem" >> "$GITHUB_OUTPUT"; fi
      ;;
    bench)
      # A device with its own sweep (sbbench/sweeps/gate_<device>.json) is gated on that one.
      sweep=${SWEEP:-sbbench/sweeps/gate_$(device_stem).json}
      [ -f "$sweep" ] || sweep=sbbench/sweeps/gate.json
      echo "sweep: $sweep"
      # A fixed seed: the same inputs in every run (packed varlen lengths are drawn from it).
      sbbench bench --sweep "$sweep" --seed "${SEED:-0}" --json "$CURRENT" --no-progress
      ;;
    gate)
      baseline=${BASELINE:-reports/$(device_stem)/bench.json}
      if [ ! -f "$baseline" ]; then
        echo "::warning::no committed baseline $baseline for this GPU; gate skipped (commit one to gate this device)"
        continue
      fi
      sbbench gate "$baseline" "$CURRENT" --settings ci/gate.toml --json "$GATE_JSON"
      ;;
    report)
      inputs=("$CURRENT")
      if [ -f check.json ]; then inputs+=(check.json); fi
      sbbench report "${inputs[@]}" --out "$REPORT_DIR"
      ;;
    *)
      echo "ci/gpu_gate.sh: unknown step '$step' (device, bench, gate or report)" >&2; exit 2;;
  esac
done
