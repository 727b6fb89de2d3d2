"""The regression gate (`sbbench gate`) on synthetic rows (the workflows that run it: test_workflows.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sbbench.cli import app
from sbbench.core.results import SCHEMA_VERSION, make_row, write_rows
from sbbench.harness.gate import (
    IMPROVEMENT, MISSING_BASELINE, MISSING_CURRENT, NOISE, REGRESSION, UNCHANGED, GateInputError, GateSettings,
    compare_rows, load_settings,
)

ROOT = Path(__file__).resolve().parent.parent
H100 = "NVIDIA H100 80GB HBM3"
ENV = dict(torch_version="2.11.0+cu130", triton_version="3.6.0", sbbench_version="0.1.0", git_commit="0123456789ab")
runner = CliRunner()


def bench_row(backend="triton", seqlen=4096, mode="fwd", regime="dense", latency=1.0, spread=0.01, device=H100, **extra):
    """A bench row whose 20th/80th latency percentiles sit `spread` (relative) around the median."""
    fields = dict(
        command="bench", device=device, **ENV, backend=backend, implementation=backend, comparator="fa2",
        batch=4, heads=12, kv_heads=12, seqlen=seqlen, head_dim=128, dtype="bfloat16", attend_current=False,
        varlen=False, mode=mode, regime=regime, status="ok", latency_ms=latency,
        latency_q20_ms=latency * (1 - spread), latency_q80_ms=latency * (1 + spread),
        tflops=1.0 / latency, peak_mem_mib=100.0,
    )
    fields.update(extra)
    return make_row(**fields)


def grid(scale=None, spread=0.01, device=H100):
    """Two backends x two modes x three lengths; `scale` maps (backend, mode, seqlen) to a factor."""
    rows = []
    for backend, base in (("fa2", 1.0), ("triton", 1.9)):
        for mode in ("fwd", "fwdbwd"):
            for seqlen in (1024, 4096, 8192):
                latency = base * (seqlen / 1024) ** 2 * (3.5 if mode == "fwdbwd" else 1.0) * 0.05
                latency *= (scale or {}).get((backend, mode, seqlen), 1.0)
                rows.append(bench_row(backend, seqlen, mode, latency=latency, spread=spread, device=device))
    return rows


def gate(tmp_path, baseline_rows, current_rows, *args):
    base, cur = tmp_path / "baseline.json", tmp_path / "current.json"
    write_rows(base, baseline_rows)
    write_rows(cur, current_rows)
    return runner.invoke(app, ["gate", str(base), str(cur), *args])


def assert_clean_exit(result, code):
    """The exit code is ours (typer.Exit), not an exception escaping with a traceback."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


# --- verdicts -----------------------------------------------------------------------------------


def test_identical_runs_pass(tmp_path):
    result = gate(tmp_path, grid(), grid())
    assert_clean_exit(result, 0)
    assert "12 matched: 0 regressions" in result.stdout
    assert "gate: pass" in result.stdout


def test_one_row_20_percent_slower_fails_and_names_it(tmp_path):
    result = gate(tmp_path, grid(), grid({("triton", "fwdbwd", 4096): 1.2}), "--json", str(tmp_path / "gate.json"))
    assert_clean_exit(result, 1)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REGRESSION")]
    assert len(lines) == 1, result.stdout
    assert "triton" in lines[0] and "fwdbwd" in lines[0] and "T=4096" in lines[0] and "+20.0%" in lines[0]
    assert "gate: FAIL" in result.stdout
    payload = json.loads((tmp_path / "gate.json").read_text())
    assert payload["verdict"] == "fail"
    assert payload["counts"][REGRESSION] == 1
    (regression,) = [c for c in payload["comparisons"] if c["status"] == REGRESSION]
    assert regression["key"]["backend"] == "triton" and regression["key"]["seqlen"] == 4096
    assert regression["change"] == pytest.approx(0.2)


def test_slowdown_inside_the_spread_is_noise_not_failure(tmp_path):
    # 2% slower, above a 1% threshold, but both runs scatter by +-3%: the spreads overlap.
    slower = {("triton", "fwd", 4096): 1.02}
    result = gate(tmp_path, grid(spread=0.03), grid(slower, spread=0.03), "--threshold", "0.01")
    assert_clean_exit(result, 0)
    noise = [line for line in result.stdout.splitlines() if line.startswith("noise")]
    assert len(noise) == 1 and "spreads overlap" in noise[0]


def test_same_slowdown_with_tight_spread_fails(tmp_path):
    # The counterpart of the test above: only the spread differs, so the spread rule decided it.
    slower = {("triton", "fwd", 4096): 1.02}
    result = gate(tmp_path, grid(spread=0.002), grid(slower, spread=0.002), "--threshold", "0.01")
    assert_clean_exit(result, 1)


@pytest.mark.parametrize(
    ("factor", "spread", "expected"),
    [
        # 4% slower: the current median lies above the baseline's q80 (1.03), but the current
        # run's q20 (1.04 * 0.97) does not, so the spreads still overlap.
        (1.04, 0.03, NOISE),
        (1.04, 0.005, REGRESSION),
        (0.96, 0.03, NOISE),
        (0.96, 0.005, IMPROVEMENT),
        (1.008, 0.0, UNCHANGED),  # under the threshold, whatever the spread
    ],
)
def test_noise_rule_uses_both_spreads(factor, spread, expected):
    base = [bench_row(latency=1.0, spread=spread)]
    cur = [bench_row(latency=factor, spread=spread)]
    (comparison,) = compare_rows(base, cur, GateSettings(threshold=0.01)).comparisons
    assert comparison.status == expected


def test_two_percent_inside_spread_passes_at_default_threshold(tmp_path):
    result = gate(tmp_path, grid(spread=0.03), grid({("fa2", "fwd", 8192): 1.02}, spread=0.03))
    assert_clean_exit(result, 0)
    assert "gate: pass" in result.stdout


def test_improvement_is_reported_and_passes(tmp_path):
    result = gate(tmp_path, grid(), grid({("triton", "fwd", 8192): 0.7}))
    assert_clean_exit(result, 0)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(IMPROVEMENT)]
    assert "triton" in line and "T=8192" in line and "-30.0%" in line


def test_missing_rows_are_listed_and_fail_only_on_request(tmp_path):
    current = grid()
    dropped = current.pop(0)  # fa2 fwd 1024 not measured at all
    unsupported = next(r for r in current if r["backend"] == "triton" and r["seqlen"] == 8192 and r["mode"] == "fwd")
    unsupported.update(status="unsupported", latency_ms=None, error="head dim 128 > 64")
    current.append(bench_row("chunked", 1024))  # new in the current run
    result = gate(tmp_path, grid(), current)
    assert_clean_exit(result, 0)
    missing = [line for line in result.stdout.splitlines() if line.startswith(MISSING_CURRENT)]
    assert len(missing) == 2
    assert any("fa2" in line and "T=1024" in line and "not measured" in line for line in missing)
    assert any("T=8192" in line and "unsupported: head dim 128 > 64" in line for line in missing)
    assert any(line.startswith(MISSING_BASELINE) and "chunked" in line for line in result.stdout.splitlines())
    assert dropped["backend"] == "fa2"

    strict = gate(tmp_path, grid(), current, "--fail-on-missing")
    assert_clean_exit(strict, 1)


@pytest.mark.parametrize("status, error", [
    ("oom", "CUDA out of memory. Tried to allocate 6.00 GiB"),
    ("error", "CUDA error: an illegal memory access was encountered\n  at ..."),
    ("failed", None),
])
def test_ok_row_that_broke_is_a_regression_by_default(tmp_path, status, error):
    current = grid()
    broken = next(r for r in current if r["backend"] == "triton" and r["seqlen"] == 8192 and r["mode"] == "fwdbwd")
    broken.update(status=status, latency_ms=None, latency_q20_ms=None, latency_q80_ms=None, error=error)
    result = gate(tmp_path, grid(), current, "--json", str(tmp_path / "gate.json"))
    assert_clean_exit(result, 1)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("REGRESSION")]
    assert "triton" in line and "fwdbwd" in line and "T=8192" in line and f"ok in baseline, now {status}" in line
    if error:
        assert error.splitlines()[0][:40] in line
    assert "1 regression," in result.stdout and "gate: FAIL" in result.stdout
    verdict = json.loads((tmp_path / "gate.json").read_text())
    assert verdict["verdict"] == "fail" and verdict["counts"][REGRESSION] == 1

    allowed = gate(tmp_path, grid(), current, "--allow-error")
    assert_clean_exit(allowed, 0)
    assert any(line.startswith(MISSING_CURRENT) and f"current row {status}" in line
               for line in allowed.stdout.splitlines())
    settings = tmp_path / "gate.toml"
    settings.write_text("[gate]\nfail_on_error = false\n")
    assert_clean_exit(gate(tmp_path, grid(), current, "--settings", str(settings)), 0)


def test_fail_on_error_must_be_a_bool(tmp_path):
    settings = tmp_path / "gate.toml"
    settings.write_text("[gate]\nfail_on_error = 1\n")
    result = gate(tmp_path, grid(), grid(), "--settings", str(settings))
    assert_clean_exit(result, 2)
    assert "fail_on_error: expected true or false" in result.output


def test_min_delta_floor_and_duplicates():
    base = [bench_row(seqlen=128, latency=0.010, spread=0.0)]
    cur = [bench_row(seqlen=128, latency=0.012, spread=0.0)]  # +20% but only 2 us
    assert compare_rows(base, cur).comparisons[0].status == REGRESSION
    floored = compare_rows(base, cur, GateSettings(min_delta_ms=0.005)).comparisons[0]
    assert floored.status == NOISE and "2.0 us" in floored.note
    # Two current rows for one input: the fastest counts.
    twice = [bench_row(seqlen=128, latency=0.0101, spread=0.0)] + cur
    (comparison,) = compare_rows(base, twice).comparisons
    assert comparison.status == UNCHANGED and comparison.current.repeats == 2


def test_bimodal_row_is_noise_unless_max_spread_allows_it(tmp_path):
    # A baseline disturbed part of the time: median from the fast mode, q80 from the slow one.
    base = grid()
    row = next(r for r in base if r["backend"] == "triton" and r["mode"] == "fwd" and r["seqlen"] == 1024)
    row.update(latency_ms=0.1, latency_q20_ms=0.09, latency_q80_ms=4.0)
    current = grid()
    next(r for r in current if r["backend"] == "triton" and r["mode"] == "fwd" and r["seqlen"] == 1024).update(
        latency_ms=5.0, latency_q20_ms=4.95, latency_q80_ms=5.05)
    result = gate(tmp_path, base, current)
    assert_clean_exit(result, 0)
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(NOISE)]
    assert "baseline spread 3910% of its median" in line
    assert_clean_exit(gate(tmp_path, base, current, "--max-spread", "100"), 1)


def test_rows_without_spread_fall_back_to_threshold():
    base = [bench_row(latency=1.0, latency_q20_ms=None, latency_q80_ms=None)]
    cur = [bench_row(latency=1.06, latency_q20_ms=None, latency_q80_ms=None)]
    (comparison,) = compare_rows(base, cur).comparisons
    assert comparison.status == REGRESSION and "no spread" in comparison.note


def test_check_and_tune_rows_are_ignored():
    check = make_row(command="check", device=H100, backend="triton", seqlen=4096, mode="fwd", regime="dense",
                     status="ok", tensor="o", err_max=1e-3, budget=2e-3, passed=True)
    # A fast tuner trial on a grid input: read as a bench row, it would make the current run look
    # 100x slower.
    fast = next(r["latency_ms"] for r in grid() if r["backend"] == "triton" and r["mode"] == "fwd" and r["seqlen"] == 4096)
    tune = bench_row(latency=fast / 100, command="tune")
    result = compare_rows(grid() + [check, tune], grid())
    assert {c.status for c in result.comparisons} == {UNCHANGED}


# --- unusable input: exit 2, a message, no traceback ------------------------------------------


def test_different_devices_refused(tmp_path):
    result = gate(tmp_path, grid(), grid(device="NVIDIA A100-SXM4-80GB"))
    assert_clean_exit(result, 2)
    assert "different devices" in result.stderr
    assert H100 in result.stderr and "NVIDIA A100-SXM4-80GB" in result.stderr
    assert "gate:" not in result.stdout  # no verdict printed for runs that were not compared


def test_truncated_json_exit_2(tmp_path):
    base, cur = tmp_path / "baseline.json", tmp_path / "current.json"
    write_rows(base, grid())
    text = json.dumps({"schema_version": SCHEMA_VERSION, "rows": grid()})
    cur.write_text(text[: len(text) // 2])
    result = runner.invoke(app, ["gate", str(base), str(cur)])
    assert_clean_exit(result, 2)
    assert "current.json" in result.stderr and "not valid JSON" in result.stderr


def test_truncated_json_through_the_console_entry_point(tmp_path):
    # A real process: the exit status CI sees, and stderr free of a Python traceback.
    base, cur = tmp_path / "baseline.json", tmp_path / "current.json"
    write_rows(base, grid())
    cur.write_text('{"schema_version": 1, "rows": [{"command": "bench", "lat')
    proc = subprocess.run([sys.executable, "-c", "from sbbench.cli import main; main()", "gate", str(base), str(cur)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_schema_version_exit_2(tmp_path):
    base, cur = tmp_path / "baseline.json", tmp_path / "current.json"
    write_rows(base, grid())
    cur.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "rows": grid()}))
    result = runner.invoke(app, ["gate", str(base), str(cur)])
    assert_clean_exit(result, 2)
    assert "schema_version" in result.stderr


def test_not_a_results_file_and_missing_file_exit_2(tmp_path):
    base, other = tmp_path / "baseline.json", tmp_path / "other.json"
    write_rows(base, grid())
    other.write_text("[1, 2, 3]")
    result = runner.invoke(app, ["gate", str(base), str(other)])
    assert_clean_exit(result, 2)
    assert "not an sbbench results file" in result.stderr
    result = runner.invoke(app, ["gate", str(tmp_path / "absent.json"), str(base)])
    assert_clean_exit(result, 2)
    assert "absent.json" in result.stderr and "cannot read" in result.stderr


def test_malformed_latency_and_no_bench_rows_exit_2(tmp_path):
    bad = grid()
    bad[3]["latency_ms"] = "fast"
    result = gate(tmp_path, grid(), bad)
    assert_clean_exit(result, 2)
    assert "latency_ms must be a positive number" in result.stderr and "row 3" in result.stderr
    failed = [dict(r, status="error", latency_ms=None) for r in grid()]
    result = gate(tmp_path, grid(), failed)
    assert_clean_exit(result, 2)
    assert "no bench rows with status ok" in result.stderr


def test_bad_threshold_names_the_option(tmp_path):
    result = gate(tmp_path, grid(), grid(), "--threshold", "-0.1")
    assert_clean_exit(result, 2)
    assert "--threshold" in result.stderr


# --- settings file -----------------------------------------------------------------------------


def test_settings_file_and_command_line_override(tmp_path):
    settings = tmp_path / "gate.toml"
    settings.write_text("[gate]\nthreshold = 0.5\n")
    slower = grid({("triton", "fwd", 1024): 1.2})
    assert_clean_exit(gate(tmp_path, grid(), slower, "--settings", str(settings)), 0)  # 20% < 50%
    assert_clean_exit(gate(tmp_path, grid(), slower, "--settings", str(settings), "--threshold", "0.05"), 1)
    settings.write_text("[gate]\nthreshhold = 0.5\n")
    result = gate(tmp_path, grid(), slower, "--settings", str(settings))
    assert_clean_exit(result, 2)
    assert "--settings" in result.stderr and "threshhold" in result.stderr


def test_committed_gate_settings_are_valid():
    settings = load_settings(ROOT / "ci" / "gate.toml")
    assert 0 < settings["threshold"] <= 0.2
    assert GateSettings(**settings).threshold == settings["threshold"]
    with pytest.raises(GateInputError):
        GateSettings(threshold=float("nan"))



@pytest.mark.parametrize("seeds", [(None, None), (0, None), (0, 1)])
def test_varlen_rows_drawn_from_different_seeds_are_not_judged(seeds):
    """Packed varlen lengths come from the seed: a 30% change between rows of different seeds (or
    none) compares two workloads, so it is noise with that note; dense rows are judged as ever."""
    bseed, cseed = seeds
    base = [bench_row(varlen=True, latency=1.0, seed=bseed), bench_row(seqlen=8192, latency=1.0, seed=bseed)]
    cur = [bench_row(varlen=True, latency=1.3, seed=cseed), bench_row(seqlen=8192, latency=1.3, seed=cseed)]
    result = compare_rows(base, cur)
    by_varlen = {c.key["varlen"]: c for c in result.comparisons}
    assert by_varlen[True].status == NOISE and "different inputs" in by_varlen[True].note
    assert by_varlen[False].status == REGRESSION


def test_varlen_rows_of_one_seed_are_judged():
    base = [bench_row(varlen=True, latency=1.0, seed=0)]
    cur = [bench_row(varlen=True, latency=1.3, seed=0)]
    assert compare_rows(base, cur).comparisons[0].status == REGRESSION


def test_a_malformed_seed_is_named():
    with pytest.raises(GateInputError, match="seed must be an integer or null, got 'x'"):
        compare_rows([bench_row(seed="x")], [bench_row()])
