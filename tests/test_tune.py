"""``sbbench tune`` and ``sbbench export`` on the CPU: resumable studies, crash-safe trials, the
numerics budget as a constraint, the TPE-vs-grid comparison, and exported configs that
``sb_attn`` then uses.

Tiny shapes throughout. Trials run in spawned worker processes, which import this module (by
``--import test_tune:register_test_backends``) to register the test-only backends below.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState
from typer.testing import CliRunner

from sbbench.core import registry
from sbbench.core.registry import Param, register_backend

TESTS_DIR = Path(__file__).resolve().parent
FLAKY = "tune_test_flaky"
STEADY = "tune_test_steady"
PLUGIN = "test_tune:register_test_backends"
# Sleeps make the test backends' speed known in advance: CPU timings of a tiny input are noise,
# a 5 ms sleep against a 15 ms one is not. "wrong" is the fastest, so a tuner that ignored the
# numerics budget would pick it.
SLEEP_S = {"good": 0.015, "fast": 0.005, "wrong": 0.0, "slow": 0.15}
PRUNE = "tune_test_prune"


def _test_backend_fn(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
    from sbbench.kernels.reference import dense_naive

    variant = (config or {}).get("variant", "good")
    if variant == "raise":
        raise RuntimeError("deliberate failure of this config")
    if variant == "exit":
        os._exit(7)  # a crash no try/except survives, like a segfault
    if variant == "hang":
        time.sleep(3600)
    if variant == "oor":
        raise RuntimeError("OutOfResources: out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    time.sleep(SLEEP_S[variant])
    o, rem = dense_naive(q, k, v, inv_temp, attend_current)
    if variant == "wrong":
        o = o * 1.5  # outside any error budget
    return o, rem


def register_test_backends() -> None:
    """Register the test-only backends (idempotent: the tuner calls it in every process)."""
    spaces = {
        FLAKY: ("good", "fast", "wrong", "raise", "exit", "hang"),
        STEADY: ("good", "fast", "wrong"),
        PRUNE: ("good", "slow", "oor", "fast"),
    }
    for name, variants in spaces.items():
        if name in registry._REGISTRY:
            continue
        register_backend(
            name,
            description="test-only backend of tests/test_tune.py",
            devices=("cpu",),
            config_space=(Param("variant", variants, "fwd"),),
            default_config={"variant": "good"},
        )(_test_backend_fn)


@pytest.fixture
def test_backends(monkeypatch):
    # Workers are spawned with this process's sys.path: make sure they can import this module.
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    register_test_backends()
    yield
    # Other test modules iterate over every registered backend: leave no test backend behind.
    for name in (FLAKY, STEADY, PRUNE):
        registry._REGISTRY.pop(name, None)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SBBENCH_CONFIG_DIR", raising=False)
    # One thread per worker: on a small shared CI machine, multi-threaded CPU kernels of tiny
    # inputs time the scheduler, not the config (and make each trial slow).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def _cli(*args: str):
    from sbbench.cli import app

    result = CliRunner().invoke(app, list(args))
    return result


def _tune(storage: str, *args: str):
    result = _cli("tune", "--storage", storage, "--no-progress", "--check-seqlen", "32", *args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _study_names(storage: str) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage))


def _trials(storage: str, name: str):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _summary_line(output: str, backend: str) -> str:
    """The row of the summary table (not the progress lines, not the comparison table)."""
    return next(l for l in output.splitlines()
                if l.startswith(f"{backend} fwd") and "study" not in l and "cells" not in l)


def _real(trials):
    return [t for t in trials if t.state.is_finished() and t.user_attrs.get("duplicate_of") is None]


# ---------------------------------------------------------------------------------------------
# chunked: tune, resume, export, and sb_attn picking the export up


CHUNKED_FLAGS = ("--backend", "chunked", "--batch", "1", "--heads", "2", "--head-dim", "16", "--seqlens", "64",
                 "--dtype", "float16")


def test_chunked_tune_resume_export_used_by_sb_attn(env, monkeypatch):
    storage = f"sqlite:///{env / 'tune.db'}"
    first = _tune(storage, *CHUNKED_FLAGS, "--trials", "2", "--json", str(env / "run1.json"))
    names = _study_names(storage)
    assert len(names) == 2 and all("/chunked/" in n and n.endswith("/tpe") for n in names)
    assert any("/fwd/float16/d16/g1/ac0/T64/" in n for n in names)
    assert "speedup" in first.output and "best config" in first.output and "trials/min" in first.output
    fwd_name = next(n for n in names if "/fwd/" in n)
    before = {n: _real(_trials(storage, n)) for n in names}
    assert all(len(v) == 2 for v in before.values())
    # The default config was enqueued first and ran.
    for trials in before.values():
        assert trials[0].user_attrs.get("is_default") and trials[0].state == TrialState.COMPLETE

    # A tuner killed mid-trial leaves a RUNNING trial behind; the next run marks it interrupted
    # and does not count its config as tried.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.load_study(study_name=fwd_name, storage=storage)
    stale = study.ask({n: optuna.distributions.CategoricalDistribution([16, 32, 64, 128, 256, 512])
                       for n in ("fwd_block_q", "fwd_block_k")})
    stale.set_user_attr("host", socket.gethostname())
    stale.set_user_attr("pid", dead.pid)

    second = _tune(storage, *CHUNKED_FLAGS, "--trials", "2", "--json", str(env / "run2.json"))
    assert "resuming after 2 trial(s)" in second.output
    after = {n: _real(_trials(storage, n)) for n in names}
    for name in names:
        ran = [t for t in after[name] if not t.user_attrs.get("interrupted")]
        assert len(ran) == 4, name  # the trial count grew by --trials
        # Finished trials are kept as they were...
        assert [(t.number, t.params, t.value) for t in before[name]] == [(t.number, t.params, t.value) for t in ran[:2]]
        # ...and no config ran twice, nor was the default enqueued again.
        params = [tuple(sorted(t.params.items())) for t in ran]
        assert len(set(params)) == len(params)
        assert sum(bool(t.user_attrs.get("is_default")) for t in ran) == 1
    reaped = next(t for t in _trials(storage, fwd_name) if t.number == stale.number)
    assert reaped.state == TrialState.FAIL and reaped.user_attrs.get("interrupted") is True

    # The same keys on another shape would mix incomparable timings in one study: refused, by flag,
    # before any trial runs.
    _trials_before_conflict = {n: _trials(storage, n) for n in names}
    other = _cli("tune", "--storage", storage, "--no-progress", *CHUNKED_FLAGS, "--batch", "2", "--trials", "1")
    assert other.exit_code == 2 and "--batch" in other.output and "Traceback" not in other.output
    assert all(len(_trials(storage, n)) == len(_trials_before_conflict[n]) for n in names)

    # --json: one results row per trial, in the results schema.
    payload = json.loads((env / "run2.json").read_text())
    rows = payload["rows"]
    assert payload["schema_version"] == 1 and len(rows) == 8
    assert {r["command"] for r in rows} == {"tune"} and {r["pass"] for r in rows} == {"fwd", "bwd"}
    # CPU timings of tiny inputs are noisy: a config may be cut after one run (pruned), still timed.
    assert all(r["status"] in ("ok", "pruned") and r["latency_ms"] > 0 and isinstance(r["trial"], int) for r in rows)
    assert all(set(r["config"]) == {"fwd_block_q", "fwd_block_k", "bwd_block_q", "bwd_block_k"} for r in rows)

    # export: one file for (this CPU, chunked), per key the fastest feasible trial.
    out = env / "configs"
    exported = _cli("export", "--storage", storage, "--out", str(out), "--min-speedup", "1")
    assert exported.exit_code == 0, exported.output
    assert f"SBBENCH_CONFIG_DIR={out}" in exported.output  # out is not on the search path yet
    from sbbench.core import config_loader
    from sbbench.core.results import cpu_name

    path = config_loader.config_file(out, cpu_name(), "chunked")
    data = config_loader.read_config_file(path)
    assert data["torch_version"] == torch.__version__ and data["backend"] == "chunked"
    best = {}
    for name in names:
        done = [t for t in after[name] if t.state == TrialState.COMPLETE]
        best[name] = min(done, key=lambda t: t.value)
    assert len(data["entries"]) == 2
    for entry in data["entries"]:
        name = next(n for n in names if f"/{entry['key']['pass']}/" in n)
        assert entry["config"] == best[name].params
        assert entry["latency_ms"] == pytest.approx(best[name].value)
        default = next(t for t in after[name] if t.user_attrs.get("is_default"))
        assert entry["default_latency_ms"] == pytest.approx(default.value)
        assert entry["speedup_over_default"] == pytest.approx(default.value / best[name].value)

    # With the default margin, a key keeps its default config unless the best is 2% faster.
    margin = _cli("export", "--storage", storage, "--out", str(env / "configs_margin"))
    assert margin.exit_code == 0, margin.output
    for entry in config_loader.read_config_file(config_loader.config_file(env / "configs_margin", cpu_name(),
                                                                          "chunked"))["entries"]:
        name = next(n for n in names if f"/{entry['key']['pass']}/" in n)
        default = next(t for t in after[name] if t.user_attrs.get("is_default"))
        wanted = best[name] if best[name].value * 1.02 <= default.value else default
        assert entry["config"] == wanted.params and entry["latency_ms"] == pytest.approx(wanted.value)
    bad = _cli("export", "--storage", storage, "--out", str(env / "x"), "--min-speedup", "0.5")
    assert bad.exit_code == 2 and "--min-speedup" in bad.output and not (env / "x").exists()

    monkeypatch.setenv("SBBENCH_CONFIG_DIR", str(out))
    looked_up = {}
    for pass_ in ("fwd", "bwd"):
        looked_up.update(config_loader.lookup_config(
            cpu_name(), "chunked", pass_=pass_, dtype="float16", head_dim=16, gqa_group=1, attend_current=False,
            seqlen=64,
        ))
    tuned = {**best[next(n for n in names if "/fwd/" in n)].params, **best[next(n for n in names if "/bwd/" in n)].params}
    assert looked_up == tuned

    # sb_attn hands chunked the exported config. The default is swapped for a decoy that differs
    # from the export in every parameter, so this fails if the file were not read.
    original = registry.get_backend("chunked")
    seen = []

    def spy(q, k, v, inv_temp, attend_current, **kw):
        seen.append(dict(kw["config"]))
        return original.fn(q, k, v, inv_temp, attend_current, **kw)

    decoy = {name: next(c for c in (16, 32, 64, 128, 256, 512) if c != value) for name, value in tuned.items()}
    monkeypatch.setitem(registry._REGISTRY, "chunked", dataclasses.replace(original, fn=spy, default_config=decoy))
    from sbbench import sb_attn

    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float16) for _ in range(3))
    o, rem = sb_attn(q, k, v, backend="chunked")
    assert seen == [tuned]
    ref_o, _ = sb_attn(q.double(), k.double(), v.double(), backend="reference")
    assert torch.allclose(o.double(), ref_o, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# failures, crashes, hangs and the numerics budget


def test_failing_configs_are_recorded_and_run_goes_on(env, test_backends):
    storage = f"sqlite:///{env / 'tune.db'}"
    result = _tune(storage, "--backend", FLAKY, "--import", PLUGIN, "--pass", "fwd", "--batch", "1", "--heads", "1",
                   "--head-dim", "8", "--seqlens", "32", "--dtype", "float32", "--regime", "randn",
                   "--trials", "6", "--trial-timeout", "8")
    (name,) = _study_names(storage)
    trials = {t.params["variant"]: t for t in _real(_trials(storage, name))}
    assert set(trials) == {"good", "fast", "wrong", "raise", "exit", "hang"}  # every config, once
    assert trials["raise"].state == TrialState.FAIL
    assert trials["raise"].user_attrs["status"] == "error"
    assert "deliberate failure" in trials["raise"].user_attrs["error"]
    assert trials["exit"].state == TrialState.FAIL and trials["exit"].user_attrs["status"] == "crashed"
    assert "exit code 7" in trials["exit"].user_attrs["error"]
    assert trials["hang"].state == TrialState.FAIL and trials["hang"].user_attrs["status"] == "timeout"
    assert trials["hang"].duration.total_seconds() < 60

    # Outside the budget: completed with its latency, but infeasible for Optuna (constraint > 0,
    # stored where the docs put it and read by TPE's constraints_func).
    wrong = trials["wrong"]
    assert wrong.state == TrialState.COMPLETE and wrong.user_attrs["status"] == "infeasible"
    assert wrong.user_attrs["constraint"][0] > 0
    assert list(wrong.system_attrs["constraints"]) == wrong.user_attrs["constraint"]
    for ok in ("good", "fast"):
        assert trials[ok].state == TrialState.COMPLETE and trials[ok].user_attrs["constraint"][0] <= 0
        assert list(trials[ok].system_attrs["constraints"]) == trials[ok].user_attrs["constraint"]
    assert wrong.value < trials["fast"].value < trials["good"].value  # the sleeps, as designed

    line = _summary_line(result.output, FLAKY)
    assert "variant=fast" in line.split(" tpe ", 1)[1]  # best config: the fastest feasible one
    cells = line.split()
    assert cells[-2:] == ["0/3/1/0", "0/6"]  # pruned/failed/infeasible/unchecked, untried/space

    out = env / "configs"
    exported = _cli("export", "--storage", storage, "--out", str(out), "--backend", FLAKY)
    assert exported.exit_code == 0, exported.output
    from sbbench.core import config_loader
    from sbbench.core.results import cpu_name

    entry = config_loader.read_config_file(config_loader.config_file(out, cpu_name(), FLAKY))["entries"][0]
    assert entry["config"] == {"variant": "fast"}


# ---------------------------------------------------------------------------------------------
# the grid, and TPE against it


def _steady_flags(*extra: str) -> tuple[str, ...]:
    return ("--backend", STEADY, "--import", PLUGIN, "--pass", "fwd", "--batch", "1", "--heads", "1", "--head-dim",
            "8", "--seqlens", "32", "--dtype", "float32", "--regime", "randn", *extra)


def test_grid_runs_every_cell_once_and_compares_with_tpe(env, test_backends):
    from sbbench.autotune.tuner import TuneSettings, run_tuning
    from sbbench.harness.cases import Case

    storage = f"sqlite:///{env / 'tune.db'}"
    # Two workers on one study, as with --devices 0,1 on a GPU host (here two CPU workers), and
    # more trials asked for than the grid has cells: each cell runs once, then the run stops.
    settings = TuneSettings(
        backend=STEADY, cases=[Case(1, 1, 1, 32, 8, "float32")], passes=("fwd",), regime="randn", sampler="grid",
        n_trials=10, storage=storage, check_seqlen=32, plugins=[PLUGIN], cpu_workers=2,
    )
    first = run_tuning(settings)
    (grid_name,) = _study_names(storage)
    assert grid_name.endswith("/grid")
    grid = _real(_trials(storage, grid_name))
    assert sorted(t.params["variant"] for t in grid) == ["fast", "good", "wrong"]
    assert {t.user_attrs["worker"] for t in grid} == {"cpu#0", "cpu#1"}
    (summary,) = first.summaries
    assert (summary.trials_this_run, summary.failed, summary.infeasible, summary.untried) == (3, 0, 1, 0)
    assert summary.best_params == {"variant": "fast"}

    result = _tune(storage, *_steady_flags("--sampler", "tpe", "--trials", "2"))
    tpe_name = grid_name[: -len("grid")] + "tpe"
    tpe = sorted(_real(_trials(storage, tpe_name)), key=lambda t: t.number)
    assert len(tpe) == 2 and tpe[0].params == {"variant": "good"}
    assert "TPE against the exhaustive grid" in result.output
    row = next(l for l in result.output.splitlines() if l.startswith(f"{STEADY} fwd") and "cells" in l)
    grid_best = min(t.value for t in grid if t.params["variant"] != "wrong")
    assert f"{grid_best:.4g} (3/3 cells)" in row
    hit = next((i for i, t in enumerate(tpe) if t.params["variant"] != "wrong" and t.value <= 1.02 * grid_best), None)
    if hit is None:
        assert "not yet (2 trials)" in row
    else:
        assert f"{hit + 1} trials (trial {tpe[hit].number}:" in row


def test_comparison_counts_trials_and_seconds_until_within_two_percent(tmp_path):
    from sbbench.autotune.store import TuneKey
    from sbbench.autotune.tuner import compare_tpe_grid

    storage = f"sqlite:///{tmp_path / 'cmp.db'}"
    key = TuneKey("Test GPU", "triton", "fwd", "bfloat16", 128, 1, False, 4096)
    dist = {"x": optuna.distributions.CategoricalDistribution([1, 2, 3, 4])}
    t0 = dt.datetime(2026, 1, 1)

    def add(study, x, value, seconds, constraint, state=TrialState.COMPLETE):
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, trial_id=0, state=state, value=value, params={"x": x}, distributions=dist,
            datetime_start=t0, datetime_complete=t0 + dt.timedelta(seconds=seconds),
            user_attrs={"constraint": [constraint]}, system_attrs={}, intermediate_values={},
        ))

    def study(sampler):
        made = optuna.create_study(study_name=key.study_name(sampler), storage=storage)
        for name, value in (("sbbench_schema", 1), ("key", key.to_attrs()), ("sampler", sampler),
                            ("space", {"x": [1, 2, 3, 4]})):
            made.set_user_attr(name, value)
        return made

    grid, tpe = study("grid"), study("tpe")
    # The grid's best feasible latency is 5.0: x=3 is faster but outside the numerics budget.
    for x, value, constraint in ((1, 10.0, -0.5), (2, 5.0, -0.5), (3, 4.0, 0.5), (4, 9.0, -0.5)):
        add(grid, x, value, 1.0, constraint)
    # TPE: 10 ms, a failed trial, then 5.05 ms (within 2% of 5.0) at its 3rd trial, 2+3+4 s in.
    add(tpe, 1, 10.0, 2.0, -1.0)
    add(tpe, 4, None, 3.0, -1.0, state=TrialState.FAIL)
    add(tpe, 2, 5.05, 4.0, -1.0)
    add(tpe, 3, 4.0, 1.0, -1.0)
    c = compare_tpe_grid(storage, key)
    assert c is not None
    assert c.grid_best_ms == 5.0 and c.grid_trials == 4 and c.grid_cells == 4 and c.grid_complete
    assert c.grid_seconds == pytest.approx(4.0)
    assert c.tpe_trials_needed == 3 and c.tpe_seconds_needed == pytest.approx(9.0)
    assert c.tpe_hit_trial == 2 and c.tpe_hit_ms == 5.05
    assert c.tpe_trials_total == 4
    # Without a grid study there is nothing to compare.
    other = TuneKey("Test GPU", "triton", "bwd", "bfloat16", 128, 1, False, 4096)
    assert compare_tpe_grid(storage, other) is None


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "args, flag",
    [
        (("--pass", "sideways"), "--pass"),
        (("--sampler", "random"), "--sampler"),
        (("--trials", "0"), "--trials"),
        (("--devices", "a,b"), "--devices"),
        (("--backend", "nope"), "--backend"),
        (("--seqlens", "0"), "--seqlens"),
        (("--regime", "dense,randn"), "--regime"),
        (("--storage", "not-a-url"), "--storage"),
        (("--space", "fwd_block_q"), "--space"),
        (("--space", "nope=1"), "--space"),
        (("--space", "fwd_block_q=7"), "--space"),
        pytest.param(("--devices", "0"), "--devices",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="valid on a GPU machine")),
    ],
)
def test_bad_input_names_the_flag(env, args, flag):
    result = _cli("tune", "--storage", f"sqlite:///{env / 'x.db'}", "--backend", "chunked", *args)
    assert result.exit_code == 2, result.output
    assert flag in result.output and "Traceback" not in result.output


def test_space_restriction_is_a_study_of_its_own(test_backends):
    from sbbench.autotune.tuner import TuneError, TuneSettings, plan_studies
    from sbbench.harness.cases import Case

    backend = registry.get_backend(FLAKY)
    case = Case(1, 1, 1, 32, 8, "float32")

    def plan(space):
        settings = TuneSettings(backend=FLAKY, cases=[case], passes=("fwd",), space=space)
        (only,), _ = plan_studies(backend, settings, "Dev X", "cpu")
        return only

    full, cut = plan({}), plan({"variant": ["fast", "wrong"]})
    assert full.study_name.endswith("/tpe") and len(full.space["variant"]) == 6
    # The default ("good") stays in so that the speedup over it is still measured.
    assert cut.space == {"variant": ("good", "fast", "wrong")}
    assert cut.study_name.startswith(full.study_name + "-s") and cut.study_name != full.study_name
    with pytest.raises(TuneError, match="'slow' is not a choice of variant") as raised:
        plan({"variant": ["slow"]})
    assert raised.value.argument == "space"


def test_changed_backend_space_gets_a_study_of_its_own(tmp_path, test_backends):
    from sbbench.autotune.store import open_storage
    from sbbench.autotune.plan import TuneSettings, plan_studies
    from sbbench.autotune.studies import resolve_study
    from sbbench.harness.cases import Case

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    settings = TuneSettings(backend=FLAKY, cases=[Case(1, 1, 1, 32, 8, "float32")], passes=("fwd",))
    (plan,), _ = plan_studies(registry.get_backend(FLAKY), settings, "Dev X", "cpu")
    base = plan.study_name
    old = optuna.create_study(study_name=base, storage=storage)
    old.set_user_attr("space", {"variant": ["good", "fast"]})  # as if the backend had fewer choices then
    note = resolve_study(storage, plan, settings, {"torch_version": torch.__version__})
    assert plan.study_name.startswith(base + "-s") and "changed" in note


def test_export_with_nothing_to_export_says_so(env):
    result = _cli("export", "--storage", f"sqlite:///{env / 'empty.db'}", "--out", str(env / "out"))
    assert result.exit_code == 2 and "--storage" in result.output and "Traceback" not in result.output


def test_default_outside_a_restricted_space_starts_from_its_first_choice():
    from types import SimpleNamespace

    from sbbench.autotune.sampler import default_params

    backend = SimpleNamespace(default_config={"bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_num_warps": 4})
    space = {"bwd_dkdv_BLOCK_N": (128,), "bwd_dkdv_num_warps": (4, 8)}
    assert default_params(backend, space) == {"bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_num_warps": 4}


# ---------------------------------------------------------------------------------------------
# time goes to configs that can win


def _prune_settings(env, **extra):
    from sbbench.autotune.tuner import TuneSettings
    from sbbench.harness.cases import Case

    fields = dict(backend=PRUNE, cases=[Case(1, 1, 1, 32, 8, "float32")], passes=("fwd",), regime="randn",
                  sampler="grid", storage=f"sqlite:///{env / 'tune.db'}", check_seqlen=32, plugins=[PLUGIN])
    fields.update(extra)
    return TuneSettings(**fields)


def test_a_config_ten_times_slower_is_cut_after_one_timed_run(env, test_backends):
    from sbbench.autotune.tuner import run_tuning

    result = run_tuning(_prune_settings(env))
    (name,) = _study_names(f"sqlite:///{env / 'tune.db'}")
    trials = {t.params["variant"]: t for t in _real(_trials(f"sqlite:///{env / 'tune.db'}", name))}
    good, slow = trials["good"], trials["slow"]
    assert good.user_attrs["is_default"] and good.state == TrialState.COMPLETE  # the default runs first, in full
    assert slow.state == TrialState.PRUNED and slow.user_attrs["status"] == "pruned"
    # What was measured is kept: one run of ~150 ms, against the default's ~15 ms.
    assert slow.user_attrs["latency_ms"] > 5 * good.value
    assert slow.intermediate_values[0] == slow.user_attrs["latency_ms"]
    assert "one timed run" in slow.user_attrs["error"] or "first timed run" in slow.user_attrs["error"]
    # Never timed to the end: the warm-up and one run, a fraction of a full timing of it.
    assert slow.user_attrs["timing_seconds"] < 1.0
    (summary,) = result.summaries
    assert summary.pruned == 1 and summary.best_params == {"variant": "fast"}
    # Out of resources: failed, and remembered, so another study of the same scope skips it.
    assert trials["oor"].state == TrialState.FAIL
    again = run_tuning(_prune_settings(env, cases=[Case_(64)]))
    (other,) = [n for n in _study_names(f"sqlite:///{env / 'tune.db'}") if n != name]
    oor = next(t for t in _trials(f"sqlite:///{env / 'tune.db'}", other) if t.params.get("variant") == "oor")
    assert oor.user_attrs["status"] == "unlaunchable" and "worker" not in oor.user_attrs
    assert again.summaries[0].failed == 1


def Case_(seqlen):
    from sbbench.harness.cases import Case

    return Case(1, 1, 1, seqlen, 8, "float32")


def test_only_configs_faster_than_the_best_are_checked_and_only_checked_ones_exported(env, test_backends):
    from sbbench.autotune.export import export_configs
    from sbbench.autotune.tuner import run_tuning
    from sbbench.core import config_loader
    from sbbench.core.results import cpu_name

    storage = f"sqlite:///{env / 'tune.db'}"
    run_tuning(_prune_settings(env, backend=STEADY))
    (name,) = _study_names(storage)
    trials = {t.params["variant"]: t for t in _real(_trials(storage, name))}
    # "good" (the default, checked first) and "fast" and "wrong" (each faster than the best
    # checked so far when it ran) are checked; "wrong" fails the budget.
    assert trials["wrong"].user_attrs["status"] == "infeasible"
    assert all(trials[v].user_attrs["checked"] is True for v in ("good", "fast"))
    # A config slower than the best checked one is not checked, and never exported.
    study = optuna.load_study(study_name=name, storage=storage)
    slow = study.ask({"variant": optuna.distributions.CategoricalDistribution(["good", "fast", "wrong"])})
    slow.set_user_attr("checked", False)
    study.tell(slow, 0.0001)  # fastest of all, but unchecked
    export_configs(storage, env / "out", min_speedup=1.0)
    entry = config_loader.read_config_file(config_loader.config_file(env / "out", cpu_name(), STEADY))["entries"][0]
    assert entry["trial"] == trials["fast"].number and entry["config"] == {"variant": "fast"}


def test_the_time_budget_is_shared_so_every_study_runs(env, test_backends):
    from sbbench.autotune.plan import PASS_WEIGHT, budget_shares
    from sbbench.autotune.tuner import run_tuning

    result = run_tuning(_prune_settings(env, backend=STEADY, sampler="tpe", n_trials=50, time_budget_s=9.0,
                                        cases=[Case_(32), Case_(64), Case_(128)]))
    assert len(result.summaries) == 3
    for summary in result.summaries:
        assert summary.trials_this_run >= 1 and summary.budget_s is not None
        assert summary.median_trial_s is not None and summary.trials_per_minute > 0
    # Shares are taken of what is left as each study starts (workers' start-up counts too): the
    # first gets at most a third of the run.
    assert 0 < result.summaries[0].budget_s <= 3.0
    assert sum(s.used_s for s in result.summaries) < 9.0 + 5.0  # running trials finish first
    # The backward gets 2.5 times the forward's share, and goes first (see plan_studies).
    plans = [SimpleNamespace(weight=PASS_WEIGHT["bwd"]), SimpleNamespace(weight=PASS_WEIGHT["fwd"])]
    assert budget_shares(plans, 70.0) == pytest.approx([50.0, 20.0])


def test_warm_start_queues_the_default_then_other_gpus_configs(tmp_path, test_backends):
    from sbbench.autotune.plan import TuneSettings, WarmStart, plan_studies
    from sbbench.autotune.store import open_storage
    from sbbench.autotune.studies import enqueue_start, open_study
    from sbbench.autotune import sampler as sampling
    from sbbench.harness.cases import Case

    backend = registry.get_backend(FLAKY)
    found = [WarmStart({"variant": "fast"}, "A/triton.json"), WarmStart({"variant": "good"}, "B/triton.json"),
             WarmStart({"variant": "fast"}, "C/triton.json"), WarmStart({"variant": "nope"}, "D/triton.json")]
    settings = TuneSettings(backend=FLAKY, cases=[Case(1, 1, 1, 32, 8, "float32")], passes=("fwd",))
    (plan,), _ = plan_studies(backend, settings, "Dev X", "cpu", siblings=lambda key, case: found)
    # The default is not repeated, nor is a config two files share; a value outside the space is dropped.
    assert [(w.params, w.source) for w in plan.warm_start] == [({"variant": "fast"}, "A/triton.json")]
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = open_study(storage, plan, settings, {}, sampling.make_sampler("tpe", plan.space, 0))
    assert enqueue_start(study, plan) == 2 and enqueue_start(study, plan) == 0
    first, second = (study.ask(fixed_distributions=sampling.distributions(plan.space)) for _ in range(2))
    assert first.params == {"variant": "good"} and first.user_attrs["is_default"]
    assert second.params == {"variant": "fast"} and second.user_attrs["warm_start"] == "A/triton.json"
    cold = TuneSettings(backend=FLAKY, cases=settings.cases, passes=("fwd",), warm_start=False)
    (plan,), _ = plan_studies(backend, cold, "Dev X", "cpu", siblings=lambda key, case: found)
    assert plan.warm_start == []


def test_compile_workers_build_each_config_before_it_is_timed(env):
    from sbbench.autotune.tuner import TuneSettings, run_tuning
    from sbbench.harness.cases import Case

    storage = f"sqlite:///{env / 'tune.db'}"
    settings = TuneSettings(backend="chunked", cases=[Case(1, 2, 2, 64, 16, "float16")], passes=("fwd",),
                            n_trials=3, storage=storage, check_seqlen=32, compile_workers=2)
    result = run_tuning(settings)
    (name,) = _study_names(storage)
    timed = _real(_trials(storage, name))
    assert len(timed) == 3 and result.summaries[0].trials_this_run == 3
    assert all(t.user_attrs.get("compile_seconds", 0) > 0 for t in timed)


def test_the_triton_launch_filter_rejects_configs_that_cannot_win():
    import math

    from sbbench.core.problem import AttnProblem

    backend = registry.get_backend("triton")

    def problem(d):
        return AttnProblem(batch=4, heads=24, kv_heads=24, seqlen=4096, head_dim=d, dtype=torch.bfloat16,
                           device_type="cuda", attend_current=False, inv_temp=1 / math.sqrt(d))

    for d in (64, 128):
        assert backend.launch_filter(problem(d), backend.default_config, {}) is None
    # A 256x128 forward tile on 2 warps keeps thousands of values per thread: it spills.
    huge = {**backend.default_config, "fwd_BLOCK_M": 256, "fwd_BLOCK_N": 128, "fwd_num_warps": 2}
    assert "spill" in backend.launch_filter(problem(64), huge, {})
    # Four stages of 128-key tiles at D=128 do not fit in a block's shared memory.
    deep = {**backend.default_config, "fwd_BLOCK_N": 128, "fwd_num_stages": 4, "fwd_num_warps": 8}
    assert "shared memory" in backend.launch_filter(problem(128), deep, {"shared_memory_per_block": 232448})
    # The shipped H100 configs all pass.
    from sbbench.core import config_loader

    shipped = config_loader.read_config_file(config_loader.SHIPPED_DIR / "NVIDIA_H100_80GB_HBM3" / "triton.json")
    for entry in shipped["entries"]:
        config = {**backend.default_config, **entry["config"]}
        assert backend.launch_filter(problem(entry["key"]["head_dim"]), config, {}) is None, entry["config"]


@given(st.data())
@settings(max_examples=40, deadline=None)
def test_neighbours_move_the_given_number_of_parameters_one_choice_each(data):
    from sbbench.autotune.sampler import neighbours

    space = {f"p{i}": tuple(range(data.draw(st.integers(1, 4)))) for i in range(data.draw(st.integers(1, 4)))}
    params = {name: data.draw(st.sampled_from(choices)) for name, choices in space.items()}
    changes = data.draw(st.integers(1, 2))
    moves = neighbours(space, params, changes)
    assert len({tuple(sorted(m.items())) for m in moves}) == len(moves)
    for move in moves:
        moved = [n for n in space if move[n] != params[n]]
        assert len(moved) == changes
        assert all(abs(space[n].index(move[n]) - space[n].index(params[n])) == 1 for n in moved)
    # Every single-parameter step that exists is offered.
    if changes == 1:
        assert len(moves) == sum((space[n].index(params[n]) > 0) + (space[n].index(params[n]) < len(space[n]) - 1)
                                 for n in space)


def test_tpe_alternates_with_local_moves_around_the_best_config(tmp_path):
    from sbbench.autotune import sampler as sampling

    space = {"a": tuple(range(10)), "b": tuple(range(10))}
    study = optuna.create_study(sampler=sampling.make_sampler("tpe", space, seed=3, startup_trials=4))
    dists = sampling.distributions(space)
    for _ in range(24):
        trial = study.ask(fixed_distributions=dists)
        study.tell(trial, (trial.params["a"] - 7) ** 2 + (trial.params["b"] - 2) ** 2 + 1.0)
    best = study.best_trial.params
    assert study.best_value <= 2.0, best  # local moves walk to the optimum (7, 2) within a few trials
    trials = study.get_trials()
    for t in trials[5:]:
        if t.number % 2 == 0:  # a local move: one step from the best config when it was asked
            earlier = [u for u in trials if u.number < t.number]
            inc = min(earlier, key=lambda u: u.value).params
            steps = sorted(abs(t.params[n] - inc[n]) for n in space)
            assert steps in ([0, 1], [1, 1]), (t.number, t.params, inc)
