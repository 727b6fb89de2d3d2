"""``sbbench tune`` and ``sbbench export`` on the CPU: resumable studies, crash-safe trials, the
numerics budget as a constraint, the TPE-vs-grid comparison, and exported configs that
``sb_attn`` then uses.

Tiny shapes throughout; the test-only backends and shared fixtures are in tests/tune_helpers.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import optuna
import pytest
import torch
from optuna.trial import TrialState

from sbbench.core import registry
from sbbench.core.results import TuneRow, row_columns

# env and test_backends are fixtures: imported here so that pytest finds them.
from tune_helpers import FLAKY, PLUGIN, STEADY, _cli, _real, _study_names, _summary_line, _trials, _tune, env, test_backends  # noqa: F401


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
    # Every column a tune row carries is declared in the schema, and every declared one is there.
    assert all(tuple(r) == row_columns(TuneRow) for r in rows), set(rows[0]) ^ set(row_columns(TuneRow))
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


def test_a_study_another_tuner_is_beginning_is_checked_whole(tmp_path, test_backends, monkeypatch):
    """Two tuners started together on one key: one creates the study and writes its settings
    one attribute at a time, the other checks it in between. The check must see all the
    settings, not refuse the study as tuned on another case."""
    from tune_helpers import check_while_another_begins

    assert check_while_another_begins(f"sqlite:///{tmp_path / 's.db'}", monkeypatch) is None


def test_tuners_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path):
    """Processes of one sweep script started at once on a new SQLite file: each that finds no
    tables creates them, and without a lock between them the slower ones fail ("UNIQUE
    constraint failed: alembic_version.version_num"). All must open it."""
    from tune_helpers import open_storage_together

    failed = open_storage_together(f"sqlite:///{tmp_path / 'shared.db'}", processes=8)
    assert not failed, failed


def test_export_with_nothing_to_export_says_so(env):
    result = _cli("export", "--storage", f"sqlite:///{env / 'empty.db'}", "--out", str(env / "out"))
    assert result.exit_code == 2 and "--storage" in result.output and "Traceback" not in result.output


def test_default_outside_a_restricted_space_starts_from_its_first_choice():
    from types import SimpleNamespace

    from sbbench.autotune.sampler import default_params

    backend = SimpleNamespace(default_config={"bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_num_warps": 4})
    space = {"bwd_dkdv_BLOCK_N": (128,), "bwd_dkdv_num_warps": (4, 8)}
    assert default_params(backend, space) == {"bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_num_warps": 4}
