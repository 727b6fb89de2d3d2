"""What the tuner tests share: test-only backends whose speed and numerics are known in advance,
the fixtures that register them and isolate the caches, and helpers that drive ``sbbench tune``.

Trials run in spawned worker processes, which import this module (``--import
tune_helpers:register_test_backends``, :data:`PLUGIN`) to register the test-only backends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from sbbench.core import registry
from sbbench.core.registry import Param, register_backend

TESTS_DIR = Path(__file__).resolve().parent
FLAKY = "tune_test_flaky"
STEADY = "tune_test_steady"
PLUGIN = "tune_helpers:register_test_backends"
# Sleeps make the test backends' speed known in advance: CPU timings of a tiny input are noise,
# a 5 ms sleep against a 15 ms one is not. "wrong" is the fastest, so a tuner that ignored the
# numerics budget would pick it.
SLEEP_S = {"good": 0.015, "fast": 0.005, "wrong": 0.0, "slow": 0.15, "first-slow": 0.015}
PRUNE = "tune_test_prune"
# Its first call in a process takes FIRST_CALL_S longer, like a GPU process's first launches.
# Long beside a trial's own time (a tenth of a second or so), so that a trial that took the slow
# call is told apart from one a loaded machine stretched.
SLOW_START = "tune_test_slow_start"
FIRST_CALL_S = 3.0
_called_before: set[str] = set()
# When set, every call of a test backend appends "<variant> <T>" to this file.
CALL_LOG_ENV = "SBBENCH_TEST_CALL_LOG"


def _test_backend_fn(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
    from sbbench.kernels.reference import dense_naive

    variant = (config or {}).get("variant", "good")
    if os.environ.get(CALL_LOG_ENV):
        with open(os.environ[CALL_LOG_ENV], "a") as log:
            log.write(f"{variant} {q.shape[2]}\n")
    if variant == "first-slow" and variant not in _called_before:
        _called_before.add(variant)
        time.sleep(FIRST_CALL_S)
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
        SLOW_START: ("first-slow", "fast"),
    }
    for name, variants in spaces.items():
        if name in registry._REGISTRY:
            continue
        register_backend(
            name,
            description="test-only backend of tests/tune_helpers.py",
            devices=("cpu",),
            config_space=(Param("variant", variants, "fwd"),),
            default_config={"variant": variants[0]},
        )(_test_backend_fn)


@pytest.fixture
def test_backends(monkeypatch):
    # Workers are spawned with this process's sys.path: make sure they can import this module.
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    register_test_backends()
    yield
    # Other test modules iterate over every registered backend: leave no test backend behind.
    for name in (FLAKY, STEADY, PRUNE, SLOW_START):
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


# Run by each process of open_storage_together: wait for the shared start instant, then open.
_OPEN_AT = """
import sys, time
from sbbench.autotune.store import open_storage
url, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    open_storage(url)
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(1)
"""


def open_storage_together(url: str, processes: int, lead_s: float = 8.0) -> list[str]:
    """Open the tuning storage ``url`` from ``processes`` processes at one instant, ``lead_s``
    after the call (time enough for each to import optuna and SQLAlchemy), as tuners started
    together do; the output of each process that failed."""
    start = time.time() + lead_s
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, url, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(processes)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    return [out for proc, out in zip(procs, outputs) if proc.returncode != 0]


def check_while_another_begins(url: str, monkeypatch, write_s: float = 0.05) -> str | None:
    """Check a study (``resolve_study``) while another tuner, in a thread, is beginning it: the
    study is created and has its first settings attribute, and each further one takes
    ``write_s`` to write. Returns what the check returned; raises what it raised."""
    import threading

    import torch

    from sbbench.autotune import sampler as sampling
    from sbbench.autotune.plan import TuneSettings, plan_studies
    from sbbench.autotune.store import open_storage
    from sbbench.autotune.studies import open_study, resolve_study, study_exists
    from sbbench.harness.cases import Case

    storage = open_storage(url)
    settings = TuneSettings(backend=FLAKY, cases=[Case(1, 1, 1, 32, 8, "float32")], passes=("fwd",))
    (plan,), _ = plan_studies(registry.get_backend(FLAKY), settings, "Dev X", "cpu")
    env = {"torch_version": torch.__version__}
    set_user_attr = optuna.Study.set_user_attr

    def slow_set_user_attr(study, key, value):
        time.sleep(write_s)
        set_user_attr(study, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", slow_set_user_attr)
    failures: list[BaseException] = []

    def begin() -> None:
        try:
            open_study(storage, plan, settings, env, sampling.make_sampler("tpe", plan.space, 0))
        except BaseException as exc:  # handed to the test below
            failures.append(exc)

    other = threading.Thread(target=begin)
    other.start()
    try:
        deadline = time.monotonic() + 60
        while not (study_exists(storage, plan.study_name)
                   and storage.get_study_user_attrs(storage.get_study_id_from_name(plan.study_name))):
            assert not failures and time.monotonic() < deadline, f"the other tuner never began its study: {failures}"
            time.sleep(0.005)
        return resolve_study(storage, plan, settings, env)
    finally:
        other.join()
        assert not failures, f"the tuner beginning the study failed: {failures}"
