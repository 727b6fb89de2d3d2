"""The harness: check, bench, sweeps, timing and their CLI, on the CPU at small shapes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sbbench.cli import app
from sbbench.core.registry import Backend, get_backend
from sbbench.core.results import IDENTITY_COLUMNS, METRIC_COLUMNS, SCHEMA_VERSION, read_rows
from sbbench.harness import timing
from sbbench.harness.bench import measure, run_bench
from sbbench.harness.cases import Case
from sbbench.harness.check import check_case, poisoned_outputs, row_failed, run_check
from sbbench.harness.sweep import build_sweep, cases_from_file, parse_ints, sweeps_from_flags

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WRONG = "plugins.wrong"  # tests/plugins/wrong.py, importable because tests/ is on sys.path
SMALL = Case(1, 2, 2, 64, 16, "float32")

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ---------------------------------------------------------------------------------------------
# check


def test_check_cli_fails_a_subtly_wrong_plugin(tmp_path):
    out = tmp_path / "check.json"
    result = invoke("check", "--backends", f"{WRONG}:drop_last_key", "--seqlens", "64", "--head-dim", "16",
                    "--regime", "dense,randn", "--no-progress", "--json", str(out))
    assert result.exit_code == 1, result.output
    rows = read_rows(out)
    by_tensor = {(r["regime"], r["tensor"]): r for r in rows}
    # Dropping the nearest key changes o and every gradient; rem (the stick) is unchanged.
    for regime in ("dense", "randn"):
        for tensor in ("o", "dq", "dk", "dv"):
            assert by_tensor[(regime, tensor)]["passed"] is False
            assert by_tensor[(regime, tensor)]["err_max"] > by_tensor[(regime, tensor)]["budget"]
        assert by_tensor[(regime, "rem")]["passed"] is True
    assert "FAIL" in result.output


def test_check_cli_passes_chunked(tmp_path):
    result = invoke("check", "--backends", "chunked", "--seqlens", "64,200", "--head-dim", "16",
                    "--batch", "2", "--heads", "4", "--kv-heads", "2", "--regime", "dense",
                    "--dtype", "float32,bfloat16", "--seed", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "0 failed" in result.output


def test_check_cli_passes_chunked_varlen_and_attend_current():
    result = invoke("check", "--backends", "chunked", "--seqlens", "96", "--head-dim", "16", "--batch", "3",
                    "--varlen", "--attend-current", "--regime", "dense", "--seed", "2", "--no-progress")
    assert result.exit_code == 0, result.output


def test_check_catches_unwritten_outputs():
    rows = check_case(f"{WRONG}:unwritten_tail", SMALL, "randn", fa2=False)
    o = next(r for r in rows if r["tensor"] == "o")
    # The poisoned torch.empty left NaN exactly where the backend wrote nothing: the last row
    # of every head.
    assert o["passed"] is False and o["nonfinite"] == SMALL.batch * SMALL.heads * SMALL.head_dim
    assert "NaN" in o["error"]


def test_check_enforces_the_output_dtype():
    rows = check_case(f"{WRONG}:float64_outputs", SMALL, "randn", fa2=False, grads=False)
    assert [(r["tensor"], r["passed"]) for r in rows] == [("o", False), ("rem", False)]
    assert "expected q's float32" in rows[0]["error"]


def test_check_budget_is_the_flash_attention_rule():
    rows = check_case("reference", Case(1, 2, 1, 48, 8, "bfloat16"), "peaked", fa2=False, seed=3)
    assert [r["tensor"] for r in rows] == ["o", "rem", "dq", "dk", "dv"]
    for r in rows:
        assert r["budget"] == pytest.approx(2 * r["err_pt"] + r["atol_floor"])
        # The reference in its own dtype is exactly what err_pt measures.
        assert r["err_max"] == pytest.approx(r["err_pt"]) and r["passed"] is True
        assert r["seed"] == 3 and r["status"] == "ok"


def test_check_reuses_the_references_of_a_fixed_seed(monkeypatch):
    import sbbench.harness.check as check

    calls = []
    real = check._oracle

    def counting(*args, **kwargs):
        calls.append(args[1].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(check, "_oracle", counting)
    case, oracles = Case(1, 2, 1, 40, 8, "float32"), {}
    first = check_case("chunked", case, "mixed", fa2=False, seed=5, oracles=oracles)
    assert calls == [torch.float64, torch.float32] and len(oracles) == 1
    again = check_case("chunked", case, "mixed", fa2=False, seed=5, oracles=oracles)
    assert len(calls) == 2  # the same inputs: nothing recomputed
    assert [(r["tensor"], r["err_max"], r["budget"]) for r in again] == \
        [(r["tensor"], r["err_max"], r["budget"]) for r in first]
    check_case("chunked", case, "mixed", fa2=False, seed=6, oracles=oracles)
    assert len(calls) == 4 and len(oracles) == 2  # other inputs: their own references
    # Without the cache every call computes its references.
    check_case("chunked", case, "mixed", fa2=False, seed=5)
    assert len(calls) == 6


def test_check_reports_fa2_unavailable_with_reason_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only behaviour; on a GPU fa2 runs")
    rows = check_case("reference", SMALL, "randn")
    assert all(r["fa2_rel_err"] is None for r in rows)
    assert all("fa2 anchor unavailable: needs a CUDA GPU" in r["notes"] for r in rows)


def test_check_softmax_comparator_against_softmax_oracle():
    def sdpa(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=inv_temp), None

    def sdpa_no_scale(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0), None

    good = Backend(name="sdpa", fn=sdpa, description="test", kind="softmax", gqa=False)
    bad = Backend(name="sdpa_bad", fn=sdpa_no_scale, description="test", kind="softmax", gqa=False)
    # float64, where SDPA's blockwise CPU kernel and the plain formula agree to ~1e-16, far
    # inside the budget: the verdicts cannot depend on the random draw.
    case = Case(1, 2, 2, 64, 16, "float64")
    rows = check_case(good, case, "randn", fa2=False)
    assert [r["tensor"] for r in rows] == ["o", "dq", "dk", "dv"]
    assert all(r["passed"] for r in rows), rows
    assert not any(r["passed"] for r in check_case(bad, case, "randn", fa2=False))


def test_check_backend_that_raises_marks_rows_and_goes_on():
    rows = run_check([f"{WRONG}:raises", "reference"], [SMALL], ["randn"], "cpu", fa2=False, progress=False)
    failing = [r for r in rows if r["backend"].endswith(":raises")]
    assert len(failing) == 5 and all(r["status"] == "error" and row_failed(r) for r in failing)
    assert "this backend always fails" in failing[0]["error"]
    assert [r["passed"] for r in rows if r["backend"] == "reference"] == [True] * 5


def test_poisoning_fills_empty_with_nan_and_restores_state():
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    with poisoned_outputs():
        assert torch.empty(1000).isnan().all()
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before


def test_check_unsupported_backend_is_not_a_failure():
    rows = check_case("fa2", SMALL, "randn") if not torch.cuda.is_available() else []
    for r in rows:
        assert r["status"] == "unsupported" and r["passed"] is None and not row_failed(r)


# ---------------------------------------------------------------------------------------------
# bench


def test_measure_modes_time_the_right_region():
    # slow_forward sleeps in its forward and has an instant backward: only fwd and fwdbwd may
    # include the sleep.
    from plugins.wrong import SLOW_FORWARD_S

    case = Case(1, 1, 1, 16, 8, "float32")
    rows = {m: measure(f"{WRONG}:slow_forward", case, m, "randn", device="cpu") for m in ("fwd", "bwd", "fwdbwd")}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["fwd"]["latency_ms"] >= SLOW_FORWARD_S * 1e3
    assert rows["fwdbwd"]["latency_ms"] >= SLOW_FORWARD_S * 1e3
    assert rows["bwd"]["latency_ms"] < SLOW_FORWARD_S * 1e3 / 2
    for r in rows.values():
        assert r["latency_q20_ms"] <= r["latency_ms"] <= r["latency_q80_ms"]
        assert r["peak_mem_mib"] is None and r["timer"].startswith("CPU")


def test_measure_row_contents():
    row = measure("chunked", SMALL, "fwdbwd", "dense", device="cpu", config={"fwd_block_q": 16})
    assert row["status"] == "ok", row["error"]
    assert row["tflops"] == pytest.approx(SMALL.flops("fwdbwd") / (row["latency_ms"] * 1e-3) / 1e12)
    assert row["config"]["fwd_block_q"] == 16 and "bwd_block_k" in row["config"]  # resolved, not just given
    assert row["command"] == "bench" and row["device"].startswith("CPU") and row["torch_version"]
    assert (row["mode"], row["regime"], row["seqlen"], row["dtype"]) == ("fwdbwd", "dense", 64, "float32")


def test_measure_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        measure("reference", SMALL, "forward", "dense")
    with pytest.raises(ValueError, match="regime"):
        measure("reference", SMALL, "fwd", "zeros")
    with pytest.raises(ValueError, match="config"):
        measure("chunked", SMALL, "fwd", "dense", config={"no_such_param": 1})


def test_measure_oom_and_unsupported_rows():
    assert measure(f"{WRONG}:out_of_memory", SMALL, "fwd", "dense")["status"] == "oom"
    row = measure("upstream", Case(1, 2, 2, 64, 16, "bfloat16"), "fwd", "dense")
    assert row["status"] == "unsupported" and row["error"]


def test_run_bench_marks_failures_goes_on_and_fills_speedup():
    rows = run_bench([f"{WRONG}:raises", "chunked"], [SMALL], ["fwd", "bwd"], ["dense"], "cpu",
                     baseline="reference", progress=False)
    assert len(rows) == 6  # the baseline is measured too, beside each mode
    by = {(r["backend"], r["mode"]): r for r in rows}
    for mode in ("fwd", "bwd"):
        assert by[(f"{WRONG}:raises", mode)]["status"] == "error"
        assert by[(f"{WRONG}:raises", mode)]["speedup"] is None
        assert by[("reference", mode)]["speedup"] == 1.0
        chunked = by[("chunked", mode)]
        assert chunked["status"] == "ok" and chunked["comparator"] == "reference"
        assert chunked["speedup"] == pytest.approx(by[("reference", mode)]["latency_ms"] / chunked["latency_ms"])


def test_bench_cli_marks_failing_rows_and_writes_schema(tmp_path):
    out, csv = tmp_path / "bench.json", tmp_path / "bench.csv"
    result = invoke("bench", "--backends", f"chunked,{WRONG}:raises", "--seqlens", "64", "--head-dim", "16",
                    "--mode", "fwd", "--regime", "randn", "--baseline", "reference", "--no-progress",
                    "--json", str(out), "--csv", str(csv))
    assert result.exit_code == 0, result.output
    assert "ERROR: RuntimeError: this backend always fails" in result.output
    payload = json.loads(out.read_text())
    assert payload["schema_version"] == SCHEMA_VERSION and payload["command"] == "bench"
    rows = read_rows(out)
    assert len(rows) == 3
    for r in payload["rows"]:
        assert set(IDENTITY_COLUMNS + METRIC_COLUMNS) <= set(r)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"chunked", "reference"}
    assert all(r["latency_ms"] > 0 and r["tflops"] > 0 for r in ok)
    assert csv.read_text().splitlines()[0].startswith("command,device")


def test_check_json_rows_carry_schema(tmp_path):
    out = tmp_path / "check.json"
    result = invoke("check", "--backends", "reference", "--seqlens", "32", "--head-dim", "8",
                    "--regime", "randn", "--mode", "fwd", "--no-progress", "--json", str(out))
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["command"] == "check"
    assert [r["tensor"] for r in payload["rows"]] == ["o", "rem"]  # --mode fwd: no gradients
    for r in payload["rows"]:
        assert set(IDENTITY_COLUMNS + METRIC_COLUMNS) <= set(r)
        assert r["device"] and r["torch_version"] and r["sbbench_version"]


def test_cli_bad_input_is_a_message_naming_the_flag_not_a_traceback():
    for args, flag in ((["check", "--backends", "nope"], "--backends"), (["bench", "--seqlens", "0"], "--seqlens"),
                       (["bench", "--heads", "6", "--kv-heads", "4"], "--kv-heads"),
                       (["bench", "--regime", "zeros"], "--regime"), (["bench", "--sweep", "/no/such/file.json"], "--sweep"),
                       (["bench", "--baseline", "nope"], "--baseline"),
                       (["check", "--backends", "no.such.module:fn"], "--backends")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert f"error: {flag}" in result.output and "Traceback" not in result.output, (args, result.output)


def test_library_errors_name_the_field_not_the_flag():
    with pytest.raises(ValueError, match="^kv_heads: 4 does not divide heads 6"):
        build_sweep("bench", device="cpu", backends="chunked", heads="6", kv_heads="4")
    with pytest.raises(ValueError, match="^seqlens: expected a positive integer"):
        build_sweep("bench", device="cpu", backends="chunked", seqlens="0")


# ---------------------------------------------------------------------------------------------
# sweeps


def test_sweep_flags_parse():
    assert parse_ints("1024..16384", "seqlens") == [1024, 2048, 4096, 8192, 16384]
    assert parse_ints("64,100", "seqlens") == [64, 100]
    with pytest.raises(ValueError, match="seqlens"):
        parse_ints("128..64", "seqlens")
    sweep = build_sweep("bench", device="cpu", backends="chunked", batch="1,2", heads="4", kv_heads="1,2",
                        head_dim="16", seqlens="32", dtype="bf16,fp32", mode="all", regime="dense")
    assert len(sweep.cases) == 2 * 2 * 2 and sweep.modes == ["fwd", "bwd", "fwdbwd"]
    assert {c.dtype for c in sweep.cases} == {"bfloat16", "float32"}


def test_sweep_defaults_by_device():
    gpu = build_sweep("bench", device="cuda", backends="fa2,triton")
    assert [c.seqlen for c in gpu.cases] == [1024, 2048, 4096, 8192, 16384]
    assert {(c.batch, c.heads, c.head_dim, c.dtype) for c in gpu.cases} == {(4, 12, 128, "bfloat16")}
    cpu = build_sweep("check", device="cpu")
    assert all(c.dtype == "float32" and c.seqlen <= 256 for c in cpu.cases)
    assert "fa2" not in cpu.backends and "chunked" in cpu.backends


def test_sweep_file_json_and_yaml(tmp_path):
    entries = [{"backends": "chunked", "seqlens": "64..128", "kv-heads": 1, "heads": 2, "head_dim": 8},
               {"backends": ["reference"], "modes": ["fwd"], "seqlens": 32, "varlen": True, "batch": 3}]
    (tmp_path / "s.json").write_text(json.dumps(entries))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(entries))
    for name in ("s.json", "s.yaml"):
        sweeps = sweeps_from_flags("bench", sweep_file=tmp_path / name, device="cpu")
        assert [s.backends for s in sweeps] == [["chunked"], ["reference"]]
        assert [c.seqlen for c in sweeps[0].cases] == [64, 128] and sweeps[0].cases[0].kv_heads == 1
        assert sweeps[1].modes == ["fwd"] and sweeps[1].cases[0].varlen
    # A flag given on the command line overrides the file's field in every sweep.
    overridden = sweeps_from_flags("bench", sweep_file=tmp_path / "s.json", device="cpu", dtype="float16")
    assert {c.dtype for s in overridden for c in s.cases} == {"float16"}
    (tmp_path / "bad.json").write_text(json.dumps([{"backend": "chunked"}]))
    with pytest.raises(ValueError, match="unknown field"):
        sweeps_from_flags("bench", sweep_file=tmp_path / "bad.json", device="cpu")


def test_shipped_gate_sweep():
    path = REPO / "sbbench" / "sweeps" / "gate.json"
    sweeps = sweeps_from_flags("bench", sweep_file=path, device="cuda")
    cases = cases_from_file(path, device="cuda")
    assert all(s.baseline == "fa2" and s.backends[0] == "fa2" for s in sweeps)
    assert {1024, 16384} <= {c.seqlen for c in cases}
    assert any(c.varlen for c in cases) and any(c.kv_heads < c.heads for c in cases)
    assert {"triton", "chunked", "compiled", "upstream"} <= {b for s in sweeps for b in s.backends}
    assert_measures_nothing_twice(sweeps)


def assert_measures_nothing_twice(sweeps) -> None:
    # The gate matches rows by backend, shape, mode and regime, and that includes the baseline,
    # which run_bench measures beside every case of every sweep.
    seen = set()
    for s in sweeps:
        for key in itertools.product(s.backends, s.cases, s.modes, s.regimes):
            assert key not in seen, key
            seen.add(key)


def test_device_gate_sweeps_cover_the_records_and_every_feature():
    for path in (REPO / "sbbench" / "sweeps").glob("gate_*.json"):
        sweeps = sweeps_from_flags("bench", sweep_file=path, device="cuda")
        cases = cases_from_file(path, device="cuda")
        assert all(s.baseline == "fa2" and s.backends[0] == "fa2" for s in sweeps)
        assert {(64, 16384), (128, 16384)} <= {(c.head_dim, c.seqlen) for c in cases}
        assert {"bfloat16", "float16"} <= {c.dtype for c in cases}
        assert any(c.varlen for c in cases) and any(c.kv_heads < c.heads for c in cases)
        assert any(c.attend_current for c in cases)
        assert {"dense", "mixed"} <= {r for s in sweeps for r in s.regimes}
        assert_measures_nothing_twice(sweeps)


# ---------------------------------------------------------------------------------------------
# timing and comparators


def test_timing_quantiles_and_cpu_timer():
    assert timing.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    calls = []
    t = timing.time_cpu(lambda: calls.append(time.sleep(0.002)), budget_s=0.05, min_runs=3, max_runs=10)
    assert 3 <= t.runs == len(calls) <= 10
    assert 2.0 <= t.q20_ms <= t.median_ms <= t.q80_ms
    assert timing.peak_memory_mib(lambda: None, "cpu") is None


def test_comparators_say_why_they_cannot_run():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only reasons")
    assert get_backend("fa2").unavailable_reason() == "needs a CUDA GPU (torch sees none)"
    assert get_backend("fa2").kind == "softmax"
    upstream = get_backend("upstream").unavailable_reason()
    assert upstream in ("package stickbreaking_attention not installed", "needs a CUDA GPU (torch sees none)")


# ---------------------------------------------------------------------------------------------
# the commands as a user runs them, with no arguments, on a CPU-only machine


def _cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(TESTS), CUDA_VISIBLE_DEVICES="")
    # A plain CPU machine: Triton's interpreter is opt-in there.
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.parametrize("command", ["check", "bench"])
def test_cli_without_arguments_on_cpu(command):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "from sbbench.cli import main; main()", command], capture_output=True, text=True,
                          timeout=120, env=_cli_env(), cwd=REPO)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend" in proc.stdout and "chunked" in proc.stdout and "-----" in proc.stdout  # the table
    if command == "check":
        assert "fa2 anchor unavailable: needs a CUDA GPU" in proc.stdout
    assert elapsed < 120


def test_skipping_widens_the_budget_of_o_and_rem_by_its_own_bound_only():
    from sbbench.harness.check import budget_metrics, skip_bound

    v = torch.full((2, 3), -4.0)
    assert skip_bound("rem", {"skip_log2": -30}, v) == 2.0**-30
    assert skip_bound("o", {"skip_log2": -30}, v) == 4 * 2.0**-30  # times max|v|
    assert skip_bound("dq", {"skip_log2": -30}, v) == 0.0
    assert skip_bound("rem", {"skip_log2": None}, v) == 0.0 and skip_bound("rem", None, v) == 0.0
    # A query at the end of a long cache: rem ~1e-20, so 2 err_pt + floor is ~1e-22, while a
    # kernel that stopped at a stick of 2^-30 is off by up to 2^-30 and no more.
    ref = torch.full((4,), 1e-20, dtype=torch.float64)
    low = ref * (1 + 1e-3)
    got = (ref + 2.0**-31).to(torch.float32)
    assert not budget_metrics(got, ref, low, torch.float32)["passed"]
    assert budget_metrics(got, ref, low, torch.float32, skip_bound("rem", {"skip_log2": -30}, v))["passed"]
    assert not budget_metrics(ref + 2.0**-29, ref, low, torch.float32, 2.0**-30)["passed"]
