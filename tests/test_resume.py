"""Rows saved as they finish: an interrupted or crashed sweep keeps every finished row, and
``--resume`` runs only the rows still missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sbbench.cli import app
from sbbench.core.results import SCHEMA_VERSION, match_key, read_rows
from sbbench.harness import bench as bench_module
from sbbench.harness.bench import run_bench
from sbbench.harness.cases import Case
from sbbench.harness.check import run_check

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SMALL = Case(1, 2, 2, 32, 16, "float32")
# bench: 4 lengths x 2 modes x 2 backends = 16 rows of about a quarter second each (the CPU timer's
# budget), so a SIGINT after the first row lands mid-sweep.
SWEEP = ["--backends", "reference,chunked", "--baseline", "reference", "--seqlens", "16,32,64,128",
         "--head-dim", "16", "--mode", "fwd,fwdbwd", "--no-progress"]
TOTAL = 16


def _rows_on_disk(path: Path) -> list[dict] | None:
    """The rows of a results file, or None while it does not exist yet. Every read must parse:
    the file is replaced atomically, so it is never half-written."""
    if not path.exists():
        return None
    payload = json.loads(path.read_text())
    assert payload["schema_version"] == SCHEMA_VERSION and payload["command"] == "bench"
    return payload["rows"]


def _sbbench(*args: str) -> list[str]:
    return [sys.executable, "-c", "from sbbench.cli import main; main()", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    return env


def _default_sigint() -> None:
    # A runner that starts the tests in the background (``cmd &`` in a script) leaves SIGINT
    # ignored, and the child would inherit that: give it the default disposition back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_keeps_finished_rows_and_resume_runs_only_the_rest(tmp_path):
    out = tmp_path / "part.json"
    proc = subprocess.Popen(_sbbench("bench", *SWEEP, "--json", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        seen: list[dict] | None = None
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _rows_on_disk(out)
            if seen:
                break
            time.sleep(0.02)
        assert seen, "no row was written before the sweep ended or the deadline"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "--resume" in stderr
    kept = read_rows(out)
    assert 1 <= len(kept) < TOTAL
    # The table of the rows so far is printed: one line per kept row under the header.
    assert "ms" in stdout and stdout.count(" ok") >= len(kept)

    resumed = subprocess.run(_sbbench("bench", *SWEEP, "--json", str(out), "--resume"), capture_output=True,
                             text=True, env=_env(), cwd=REPO, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{len(kept)} rows already in" in resumed.stderr
    final = read_rows(out)
    assert len(final) == TOTAL
    assert len({match_key(r) for r in final}) == TOTAL  # every measurement once
    # The interrupted run's rows are still there, unchanged: a rerun would have new timings.
    by_key = {match_key(r): r for r in final}
    for row in kept:
        again = by_key[match_key(row)]
        assert (again["latency_ms"], again["latency_q20_ms"], again["runs"]) == (
            row["latency_ms"], row["latency_q20_ms"], row["runs"])
    # Speedups cover old and new rows alike.
    assert all(r["speedup"] is not None for r in final if r["status"] == "ok")


def test_run_bench_saves_after_every_row_and_skips_done_rows(monkeypatch):
    calls = []
    real = bench_module.measure

    def counting(backend, case, mode, regime, **kw):
        calls.append((backend.name, case.seqlen, mode))
        return real(backend, case, mode, regime, **kw)

    monkeypatch.setattr(bench_module, "measure", counting)
    cases = [SMALL, Case(1, 2, 2, 64, 16, "float32")]
    saved = []
    first = run_bench(["chunked"], cases[:1], ["fwd"], ["dense"], "cpu", "reference", False,
                      on_row=lambda rows: saved.append(len(rows)))
    assert saved == [1, 2] and len(first) == 2
    calls.clear()
    rows = run_bench(["chunked"], cases, ["fwd"], ["dense"], "cpu", "reference", False, done_rows=first)
    assert calls == [("reference", 64, "fwd"), ("chunked", 64, "fwd")]  # the T=32 pair is not rerun
    assert rows[:2] == first[:2]
    assert len(rows) == 4 and all(r["speedup"] is not None for r in rows)


def test_run_check_skips_done_cases():
    first = run_check(["reference"], [SMALL], ["dense"], "cpu", fa2=False, progress=False)
    saved = []
    rows = run_check(["reference"], [SMALL], ["dense", "randn"], "cpu", fa2=False, progress=False,
                     done_rows=first, on_row=lambda rows: saved.append(len(rows)))
    assert rows[: len(first)] == first
    assert {r["regime"] for r in rows[len(first):]} == {"randn"}
    assert saved == [len(rows)]  # one save, after the one check that ran


def test_crash_mid_sweep_keeps_rows_and_prints_the_table(tmp_path, monkeypatch):
    out = tmp_path / "crash.json"
    real = bench_module.measure
    count = []

    def crashing(*args, **kw):
        count.append(1)
        if len(count) == 3:
            raise MemoryError("host ran out of memory outside any backend")
        return real(*args, **kw)

    monkeypatch.setattr(bench_module, "measure", crashing)
    result = CliRunner().invoke(app, ["bench", *SWEEP, "--json", str(out)])
    assert isinstance(result.exception, MemoryError)
    assert len(read_rows(out)) == 2
    assert "reference" in result.output and "q20-q80 ms" in result.output  # the table so far


def test_resume_refuses_another_commands_file(tmp_path):
    out = tmp_path / "check.json"
    runner = CliRunner()
    assert runner.invoke(app, ["check", "--backends", "reference", "--seqlens", "32", "--head-dim", "16",
                               "--regime", "dense", "--no-progress", "--json", str(out)]).exit_code == 0
    result = runner.invoke(app, ["bench", *SWEEP, "--json", str(out), "--resume"])
    assert result.exit_code == 2 and "check rows, not bench rows" in result.output
    result = runner.invoke(app, ["bench", *SWEEP, "--resume"])
    assert result.exit_code == 2 and "--resume: needs --json" in result.output


@pytest.mark.parametrize("command", ["check", "bench"])
def test_help_shows_the_default_shapes(command):
    from sbbench.harness.sweep import DEFAULT_SHAPES

    text = " ".join(CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output.split())
    gpu, cpu = DEFAULT_SHAPES[("cuda", command)], DEFAULT_SHAPES[("cpu", command)]
    assert f"GPU: {gpu['batch'][0]}; CPU: {cpu['batch'][0]}" in text
    assert f"GPU: {gpu['head_dim'][0]}" in text and f"CPU: {cpu['head_dim'][0]}" in text
    assert str(cpu["seqlens"][0]) in text and str(gpu["seqlens"][-1]) in text
