"""Where the tuner spends its time: configs that cannot win are cut after one run and not
checked, the time budget is shared between studies, warm starts and compile workers, the Triton
launch filter, and the local moves around the best config. Helpers in tests/tune_helpers.py."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from sbbench.core import registry

# env and test_backends are fixtures: imported here so that pytest finds them.
from tune_helpers import CALL_LOG_ENV, FIRST_CALL_S, FLAKY, PLUGIN, PRUNE, SLOW_START, STEADY, _real, _study_names, _trials, env, test_backends  # noqa: F401


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


def test_a_studys_set_up_is_timed_apart_from_its_trials(env, test_backends):
    from sbbench.autotune.summary import trial_seconds
    from sbbench.autotune.tuner import run_tuning

    storage = f"sqlite:///{env / 'tune.db'}"
    (summary,) = run_tuning(_prune_settings(env, backend=SLOW_START)).summaries
    (name,) = _study_names(storage)
    trials = _real(_trials(storage, name))
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    # The process's slow first call happened in the set-up, not in the default's trial, and the
    # set-up's time is in the study's time used.
    assert summary.prepare_s >= FIRST_CALL_S
    assert all(trial_seconds(t) < FIRST_CALL_S for t in trials)
    assert summary.used_s >= summary.prepare_s + sum(trial_seconds(t) for t in trials) - 0.05


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


def test_warm_start_takes_the_sibling_dtypes_configs_of_this_gpu(tmp_path, test_backends, monkeypatch):
    """A float16 study on a GPU whose file holds the key's bfloat16 config starts from it too,
    named by its file and dtype; a float32 study does not."""
    from sbbench.autotune.plan import TuneSettings, plan_studies
    from sbbench.autotune.tuner import _sibling_lookup
    from sbbench.core import config_loader
    from sbbench.harness.cases import Case

    backend = registry.get_backend(FLAKY)
    path = config_loader.config_file(tmp_path, "Dev X", FLAKY)
    config_loader.write_config_file(path, {
        "schema_version": config_loader.SCHEMA_VERSION, "device": "Dev X", "backend": FLAKY,
        "compute_capability": [9, 0],
        "entries": [{"key": {"pass": "fwd", "dtype": "bfloat16", "head_dim": 8, "gqa_group": 1,
                             "attend_current": False, "seqlen_bucket": 32}, "config": {"variant": "fast"}}]})
    monkeypatch.setenv("SBBENCH_CONFIG_DIR", str(tmp_path))
    lookup = _sibling_lookup(backend, {"compute_capability": [9, 0]})
    plans = {}
    for dtype in ("float16", "float32"):
        settings = TuneSettings(backend=FLAKY, cases=[Case(1, 1, 1, 32, 8, dtype)], passes=("fwd",))
        (plans[dtype],), _ = plan_studies(backend, settings, "Dev X", "cpu", siblings=lookup)
    assert [(w.params, w.source) for w in plans["float16"].warm_start] == [({"variant": "fast"}, f"{path} (bfloat16)")]
    assert plans["float32"].warm_start == []


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


def test_compile_workers_also_build_the_check_cases_kernels(env, test_backends, monkeypatch):
    from sbbench.autotune.tuner import run_tuning

    log = env / "calls.log"
    monkeypatch.setenv(CALL_LOG_ENV, str(log))
    run_tuning(_prune_settings(env, cases=[Case_(64)], compile_workers=2))
    calls = set(log.read_text().split("\n"))
    # "slow" is pruned, so never checked: its call at the check case's length (32) can only have
    # come from a compile worker, which builds what the check will run before any trial needs it.
    assert {"slow 64", "slow 32"} <= calls


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
    # A 128x64 dK/dV tile with 3 stages at D=128: its pipelined tiles fit (224 KiB), but with the
    # score tile staged for the second product it needs 257 KiB (what Triton asked for on the H200).
    staged = {**backend.default_config, "bwd_dkdv_BLOCK_M": 128, "bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_num_stages": 3,
              "bwd_dkdv_num_warps": 8}
    assert "bwd_dkdv" in backend.launch_filter(problem(128), staged, {"shared_memory_per_block": 232448})
    assert backend.launch_filter(problem(128), {**staged, "bwd_dkdv_num_stages": 2}, {"shared_memory_per_block": 232448}) is None
    # The shipped configs all pass.
    from sbbench.core import config_loader

    for device in ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"):
        shipped = config_loader.read_config_file(config_loader.SHIPPED_DIR / device / "triton.json")
        for entry in shipped["entries"]:
            if entry["key"]["pass"] == "decode":
                continue
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


@pytest.mark.parametrize("cells,startup,workers,expected", [
    (66_000, 10, 8, (10, 8)),  # a whole pass's space: the settings as given
    (48, 10, 8, (4, 4)),       # a restricted space: a tenth blind, a twelfth in flight
    (12, 10, 8, (2, 1)),
    (5, 10, 0, (2, 0)),        # no compile workers: nothing asked ahead
])
def test_search_pace_shrinks_with_the_space(cells, startup, workers, expected):
    from sbbench.autotune.plan import search_pace

    assert search_pace(cells, startup, workers) == expected


def test_configs_compiling_ahead_fit_in_the_gpus_memory():
    from sbbench.autotune.plan import compile_ahead_within_memory, timing_input_bytes
    from sbbench.harness.cases import Case
    from sbbench.harness.decode import DecodeCase

    gib = 1 << 30
    big = DecodeCase(batch=64, heads=32, kv_heads=8, cache_len=131072, head_dim=128, dtype="bfloat16")
    cache_bytes = 2 * 64 * 8 * 131072 * 128 * 2  # K and V: 32 GiB
    assert cache_bytes <= timing_input_bytes(big, "decode") < 1.01 * cache_bytes
    # 141 GB: the timing worker's copy and one compiling ahead, not eight.
    assert compile_ahead_within_memory(8, timing_input_bytes(big, "decode"), 141 * 10**9) == 1
    assert compile_ahead_within_memory(8, timing_input_bytes(big, "decode"), 40 * gib) == 0
    small = Case(4, 24, 24, 16384, 64, "bfloat16")
    assert compile_ahead_within_memory(8, timing_input_bytes(small, "bwd"), 141 * 10**9) == 8
    assert timing_input_bytes(small, "bwd") == 3 * timing_input_bytes(small, "fwd")
    assert compile_ahead_within_memory(8, 123, None) == 8  # CPU: no limit known


def test_compile_workers_drop_large_inputs_after_each_config(monkeypatch):
    from sbbench.autotune import worker

    monkeypatch.setattr(worker, "KEEP_COMPILE_INPUTS_BYTES", 100)
    cache = {("inputs", "big"): {"q": torch.zeros(100), "lengths": [1, 2]}, ("check_inputs", "small"): {"q": torch.zeros(10)},
             "oracles": {("k",): (torch.zeros(1000), None)}}
    worker._release_large_inputs(cache, "cpu")
    assert set(cache) == {("check_inputs", "small"), "oracles"}


def test_the_decode_launch_filter_rejects_configs_that_cannot_fit():
    from sbbench.autotune.plan import decode_problem_for
    from sbbench.core import config_loader
    from sbbench.harness.decode import DecodeCase

    backend = registry.get_backend("triton")
    problem = decode_problem_for(DecodeCase(batch=1, heads=32, kv_heads=8, cache_len=32768, head_dim=128, dtype="bfloat16"), "cuda")
    h200 = {"shared_memory_per_block": 232448}
    base = dict(backend.decode_default_config)
    assert backend.decode_launch_filter(problem, base, h200) is None
    # 128-key tiles at D=128: four stages fit on the H200, five asked Triton for 264 KiB.
    assert backend.decode_launch_filter(problem, {**base, "BLOCK_N": 128, "num_stages": 4}, h200) is None
    assert "shared memory" in backend.decode_launch_filter(problem, {**base, "BLOCK_N": 128, "num_stages": 5}, h200)
    assert "BLOCK_N" in backend.decode_launch_filter(problem, {**base, "BLOCK_N": 24}, h200)
    shipped = config_loader.read_config_file(config_loader.SHIPPED_DIR / "NVIDIA_H200" / "triton.json")
    for entry in shipped["entries"]:
        if entry["key"]["pass"] == "decode":
            assert backend.decode_launch_filter(problem, {**base, **entry["config"]}, h200) is None, entry["config"]
