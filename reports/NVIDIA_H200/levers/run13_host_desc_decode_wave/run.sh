#!/usr/bin/env bash
# Run 13, one GPU: ab.py (forward K/V descriptors made on the host and no per-row stats without
# gradients; decode one-wave launches without the board, wave-round stagger, PDL merge), then
# pytest -m gpu of the Triton training and decode kernels. Needs .whl/ab/decode_before.py: the
# previous commit's kernels/triton_sb/decode.py with its op renamed to sbbench_ab::.
set -uo pipefail
export PYTHONUNBUFFERED=1
export SBBENCH_GIT_COMMIT=${SBBENCH_GIT_COMMIT:-$(cat .commit 2>/dev/null || echo unknown)}
D=${RESULTS:-/tmp/run13}
HERE=reports/NVIDIA_H200/levers/run13_host_desc_decode_wave
mkdir -p "$D"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
timeout 330 python3 $HERE/ab.py "$D" > "$D/ab.log" 2>&1; tail -22 "$D/ab.log"
timeout 200 python3 -m pytest -q -m gpu tests/test_triton.py tests/test_decode_triton.py > "$D/pytest_gpu.log" 2>&1
tail -3 "$D/pytest_gpu.log"
tar czf "${OUT:-/tmp}/run13.tgz" -C "$(dirname "$D")" "$(basename "$D")"
