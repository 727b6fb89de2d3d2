"""``sbbench tune --json`` keeps every finished trial when the run is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tune_helpers import FLAKY, PLUGIN, TESTS_DIR


def test_sigint_keeps_the_finished_trials_in_the_json_file(tmp_path):
    out = tmp_path / "tune.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    env.pop("SBBENCH_CONFIG_DIR", None)
    # "hang" keeps the run busy after the quick configs: the stop comes while a trial runs.
    cmd = [sys.executable, "-c", "from sbbench.cli import main; main()", "tune", "--backend", FLAKY, "--import", PLUGIN, "--pass", "fwd",
           "--batch", "1", "--heads", "1", "--head-dim", "8", "--seqlens", "32", "--dtype", "float32",
           "--regime", "randn", "--sampler", "grid", "--trial-timeout", "60", "--check-seqlen", "32",
           "--storage", f"sqlite:///{tmp_path / 'tune.db'}", "--json", str(out), "--no-progress"]
    # preexec_fn: SIGINT back to its default, which a runner starting the tests in the background
    # (``cmd &`` in a script) leaves ignored for its children.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    rows: list = []
    while time.monotonic() < deadline and len(rows) < 2:
        time.sleep(0.5)
        if out.exists():
            rows = json.loads(out.read_text())["rows"]  # valid JSON at every moment
        assert proc.poll() is None, proc.stdout.read()
    assert len(rows) >= 2, "no trial rows written while the run went on"
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    final = json.loads(out.read_text())["rows"]
    assert len(final) >= len(rows) and {r["command"] for r in final} == {"tune"}
    assert {r["trial"] for r in rows} <= {r["trial"] for r in final}
