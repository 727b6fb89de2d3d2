"""``sbbench tune``: one resumable Optuna study per tuned-config key, trials run in worker processes.

A run (``run_tuning``) plans its studies (:mod:`.plan`: one per case and pass, the backward
first), opens or resumes each in the storage (:mod:`.studies`), and runs them one after the
other (:mod:`.loop`), each within its share of the time budget:

* a study starts from the default config, then the same key's configs tuned on other GPUs of
  the same architecture, then searches (TPE, or the exhaustive grid);
* configs the backend's launch filter rejects (too much shared memory, too many registers) or
  that failed to launch in an earlier study are never launched;
* the objective is the median latency of the pass being tuned (``measure`` mode ``fwd`` or
  ``bwd``, with the other pass's parameters at their defaults; ``measure_decode`` for the
  ``decode`` pass, the decode entry point's parameters, keyed by batch and cache-length bucket
  too); a config slower than twice the best so far is cut after one timed run (PRUNED);
* a config faster than the best checked one is checked against the numerics budget; outside it,
  the trial is *infeasible* and TPE's ``constraints_func`` steers away from it;
* a config that fails to compile, raises, kills or hangs its worker is a FAIL trial with the
  reason, and the study goes on; no config is run twice (``sampler.DedupSampler``), so a killed
  and restarted tuner loses no finished trial and repeats none.

Several GPUs (``devices``) work on the same study at once, one timing worker each. Tuners on
several machines share studies through a PostgreSQL storage URL.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import optuna

from sbbench.autotune import sampler as sampling
from sbbench.autotune.compare import TpeGridComparison, compare_tpe_grid
from sbbench.autotune.loop import CompilePool, Reporter, StudyRun
from sbbench.autotune.memory import UnlaunchableConfigs
from sbbench.autotune.plan import (
    DEFAULT_TPE_TRIALS,
    Plan,
    TuneError,
    TuneSettings,
    WarmStart,
    budget_shares,
    compile_ahead_within_memory,
    decode_problem_for,
    plan_studies,
    problem_for,
    restrict_space,
    search_pace,
    timing_input_bytes,
)
from sbbench.autotune.store import TuneKey, open_storage
from sbbench.autotune.studies import enqueue_start, open_study, reap_stale_trials, resolve_study, study_exists
from sbbench.autotune.summary import StudySummary, summarize_study, trial_rows
from sbbench.autotune.worker import Worker, import_plugins, visible_gpu_ids
from sbbench.core.errors import ArgumentError
from sbbench.core.registry import Backend, get_backend
from sbbench.harness.cases import Case
from sbbench.harness.decode import DecodeCase

__all__ = ["Reporter", "TuneError", "TuneInterrupted", "TuneResult", "TuneSettings", "run_tuning"]


class TuneInterrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C, SIGTERM); ``result`` holds what was finished."""

    def __init__(self, result: "TuneResult") -> None:
        super().__init__("interrupted")
        self.result = result


@dataclass
class TuneResult:
    summaries: list[StudySummary] = field(default_factory=list)
    comparisons: list[TpeGridComparison] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    storage_url: str = ""


# ---------------------------------------------------------------------------------------------
# workers


def _gpus(settings: TuneSettings) -> list[tuple[int, str] | None]:
    import torch

    if settings.devices:
        if not torch.cuda.is_available():
            raise TuneError("devices", "no CUDA GPU is visible on this machine (leave it out to tune on the CPU)")
        count = torch.cuda.device_count()
        bad = [d for d in settings.devices if d < 0 or d >= count]
        if bad:
            raise TuneError("devices", f"{bad} out of range; this machine shows {count} GPU(s) (0..{count - 1})")
        if len(set(settings.devices)) != len(settings.devices):
            raise TuneError("devices", f"{list(settings.devices)} names a GPU twice")
        try:
            return list(visible_gpu_ids(settings.devices))
        except ArgumentError as exc:
            raise TuneError("devices", exc.message) from None
    if torch.cuda.is_available():
        return list(visible_gpu_ids([0]))
    return [None] * settings.cpu_workers


def _compile_worker_count(settings: TuneSettings, on_gpu: bool) -> int:
    if settings.compile_workers is not None:
        return settings.compile_workers
    if not on_gpu:
        return 0  # the CPU runs Triton in its interpreter: nothing to build ahead
    return max(1, min(8, (os.cpu_count() or 2) - 2))


def _start_all(workers: Sequence[Worker]) -> None:
    errors: list[BaseException] = []

    def start(w: Worker) -> None:
        try:
            w.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for w in workers:
            w.close()
        raise TuneError("devices", f"a worker could not start: {errors[0]}")


def _start_workers(settings: TuneSettings) -> tuple[list[Worker], list[Worker]]:
    """The timing workers (one per device) and the compile workers (on the first GPU)."""
    gpus = _gpus(settings)
    labels = [None if g is not None or len(gpus) == 1 else f"cpu#{i}" for i, g in enumerate(gpus)]
    timing = [Worker(g, settings.plugins, settings.worker_startup_timeout, label) for g, label in zip(gpus, labels)]
    compiling = [Worker(gpus[0], settings.plugins, settings.worker_startup_timeout, f"compile#{i}", role="compile")
                 for i in range(_compile_worker_count(settings, gpus[0] is not None))]
    _start_all(timing + compiling)
    names = {w.info["device"] for w in timing if w.info}
    if len(names) > 1:
        for w in timing + compiling:
            w.close()
        raise TuneError("devices", f"the GPUs are different models ({', '.join(sorted(names))}); "
                        "a study holds one device's timings, so tune each model in its own run")
    return timing, compiling


# ---------------------------------------------------------------------------------------------
# the run


def _check_backend(settings: TuneSettings) -> Backend:
    try:
        import_plugins(settings.plugins)
    except ArgumentError as exc:
        raise TuneError("plugins", exc.message) from None
    try:
        backend = get_backend(settings.backend)
    except ArgumentError as exc:
        raise TuneError("backend", exc.message) from None
    if backend.kind != "stickbreaking":
        raise TuneError("backend", f"{backend.name!r} is a {backend.kind} comparator, not a stick-breaking backend")
    if "decode" in settings.passes and backend.decode is None:
        raise TuneError("backend", f"{backend.name!r} has no KV-cache decode entry point to tune")
    if not any(backend.decode_config_space if p == "decode" else backend.config_space for p in settings.passes):
        raise TuneError("backend", f"{backend.name!r} has no launch parameters to tune")
    known = {p.name for p in backend.config_space + backend.decode_config_space}
    unknown = sorted(set(settings.space) - known)
    if unknown:
        raise TuneError("space", f"backend {backend.name!r} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
    for pass_ in settings.passes:  # bad values are usage errors before any worker starts
        restrict_space(backend, sampling.pass_space(backend, pass_), settings.space, pass_)
    return backend


def _sibling_lookup(backend: Backend, env: Mapping[str, Any]):
    """Warm-start configs of a key: from the tuned files of other GPUs of this architecture, then
    the same key's configs in the other 16-bit float dtype, on this GPU and those."""
    capability = env.get("compute_capability")
    if not capability:
        return None
    from sbbench.core.config_loader import SIBLING_DTYPES, same_architecture_configs

    def lookup(key: TuneKey, case: Case | DecodeCase) -> list[WarmStart]:
        common = dict(pass_=key.pass_, head_dim=key.head_dim, gqa_group=key.gqa_group,
                      attend_current=key.attend_current, seqlen=case.seqlen, batch=key.batch_bucket)
        found = [WarmStart(dict(config), str(path)) for config, path in
                 same_architecture_configs(key.device, backend.name, tuple(capability), dtype=key.dtype, **common)]
        sibling = SIBLING_DTYPES.get(key.dtype)
        if sibling is not None:
            found += [WarmStart(dict(config), f"{path} ({sibling})") for config, path in same_architecture_configs(
                key.device, backend.name, tuple(capability), dtype=sibling, include_own=True, **common)]
        return found

    return lookup


def _cells(plan: Plan, backend: Backend, device_type: str, limits: Mapping[str, Any]) -> sampling.Cells:
    """The configs of ``plan``'s space the backend's launch filter lets through."""
    decode = plan.key.pass_ == "decode"
    judge = backend.decode_launch_filter if decode else backend.launch_filter
    if judge is None:
        return sampling.Cells(plan.space)
    problem = decode_problem_for(plan.case, device_type) if decode else problem_for(plan.case, device_type)
    space, defaults = (backend.decode_config_space, backend.decode_default_config) if decode \
        else (backend.config_space, backend.default_config)
    base = {**{p.name: p.choices[0] for p in space}, **defaults}

    def admissible(params: Mapping[str, Any]) -> bool:
        return judge(problem, {**base, **params}, limits) is None

    return sampling.Cells(plan.space, admissible)


def run_tuning(settings: TuneSettings, reporter: Reporter | None = None) -> TuneResult:
    """Run (or resume) the studies of ``settings``; see the module docstring."""
    reporter = reporter or Reporter()
    settings.validate()
    backend = _check_backend(settings)
    try:
        storage = open_storage(settings.storage)
    except ArgumentError as exc:
        raise TuneError("storage", exc.message) from None

    started_at = time.monotonic()
    deadline = None if settings.time_budget_s is None else started_at + settings.time_budget_s
    timing, compiling = _start_workers(settings)
    workers = timing + compiling
    env = dict(timing[0].info or {})
    limits = dict(env.get("device_limits") or {})
    result = TuneResult(workers=[dict(w.info or {}) for w in timing], storage_url=str(storage.url))
    device_type = "cuda" if timing[0].gpu is not None else "cpu"
    plans, notes = plan_studies(backend, settings, env["device"], device_type, _sibling_lookup(backend, env))
    result.skipped = notes
    for note in notes:
        reporter.message(f"note: {note}")
    try:
        if not plans:
            raise TuneError("cases", "nothing to tune (" + "; ".join(notes or ["no case"]) + ")")
        for plan in plans:  # every study checked before any runs: a bad setting fails fast
            note = resolve_study(storage, plan, settings, env)
            if note:
                reporter.message(f"note: {note}")
    except TuneError:
        for w in workers:
            w.close()
        raise

    stop = threading.Event()
    run_id = uuid.uuid4().hex[:12]
    pool = CompilePool(compiling, settings.trial_timeout) if compiling else None
    unlaunchable = UnlaunchableConfigs()
    previous = _sigterm_to_interrupt()
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        for index, plan in enumerate(plans):
            budget_s = None
            if deadline is not None:
                budget_s = budget_shares(plans[index:], deadline - time.monotonic())[0]
            summary = _run_study(plan, backend, settings, storage, timing, pool, unlaunchable, stop, reporter,
                                 run_id, env, device_type, limits, budget_s, result.summaries)
            reporter.end_study(summary)
    except KeyboardInterrupt:
        _finish(result, storage, plans, settings)
        raise TuneInterrupted(result) from None
    finally:
        if pool is not None:
            pool.close()
        for w in workers:
            w.close()
        optuna.logging.set_verbosity(optuna_level)
        _restore_sigterm(previous)
    _finish(result, storage, plans, settings)
    return result


def _run_study(plan: Plan, backend: Backend, settings: TuneSettings, storage: Any, timing: Sequence[Worker],
               pool: CompilePool | None, unlaunchable: UnlaunchableConfigs, stop: threading.Event,
               reporter: Reporter, run_id: str, env: Mapping[str, Any], device_type: str,
               limits: Mapping[str, Any], budget_s: float | None, summaries: list[StudySummary]) -> StudySummary:
    """Run one study within ``budget_s`` seconds; its summary is appended to ``summaries`` even
    when the run is interrupted."""
    cells = _cells(plan, backend, device_type, limits)
    # Reseeded per run (by the study's trial count) so a resumed study does not replay the
    # random draws of the previous run, and offset by the study's name so that studies of
    # different keys explore differently; DedupSampler catches whatever collides anyway.
    resumed_trials = len(optuna.load_study(study_name=plan.study_name, storage=storage).trials) \
        if study_exists(storage, plan.study_name) else 0
    seed = settings.seed + zlib.crc32(plan.study_name.encode()) % 100_003 + resumed_trials
    startup, lookahead = search_pace(cells.size, settings.startup_trials, len(pool) if pool is not None else 0)
    lookahead = compile_ahead_within_memory(lookahead, timing_input_bytes(plan.case, plan.key.pass_),
                                            limits.get("total_memory"))
    sampler = sampling.make_sampler(plan.sampler, plan.space, seed, startup, cells)
    study = open_study(storage, plan, settings, env, sampler)
    study.set_user_attr("admissible_cells", cells.size)
    reaped = reap_stale_trials(study, settings.stale_after, socket.gethostname())
    if reaped:
        reporter.message(f"{plan.study_name}: {reaped} trial(s) of a stopped tuner marked interrupted; "
                         "their configs will be retried")
    enqueue_start(study, plan)
    # A time budget alone lets a study run as many trials as its share of the time allows.
    if settings.n_trials is not None:
        trial_budget = settings.n_trials
    elif plan.sampler == "grid" or budget_s is not None:
        trial_budget = cells.size
    else:
        trial_budget = DEFAULT_TPE_TRIALS
    begun = time.monotonic()
    study_deadline = None if budget_s is None else begun + budget_s
    trials = study.get_trials(deepcopy=False)
    resumed = sum(1 for t in trials if t.state.is_finished() and not sampling.is_duplicate(t)
                  and not sampling.is_interrupted(t))
    reporter.start_study(plan, min(trial_budget, cells.untried(trials) + 1), resumed, budget_s)
    runner = StudyRun(study, plan, backend, settings, timing, trial_budget, study_deadline, stop, reporter, run_id,
                      env, cells, pool, unlaunchable, lookahead)
    try:
        runner.run()
    finally:
        summary = summarize_study(study, plan, runner.numbers, cells, budget_s, time.monotonic() - begun,
                                  runner.prepare_seconds)
        if runner.exhausted:
            summary.note = "space exhausted"
        elif study_deadline is not None and time.monotonic() >= study_deadline:
            summary.note = "time share used"
        summaries.append(summary)
    return summary


def _finish(result: TuneResult, storage: Any, plans: Sequence[Plan], settings: TuneSettings) -> None:
    result.rows = []
    for plan in plans:
        if not study_exists(storage, plan.study_name):
            continue
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        result.rows.extend(trial_rows(study, plan, settings.regime))
    seen: set[TuneKey] = set()
    for plan in plans:
        if plan.key in seen:
            continue
        seen.add(plan.key)
        comparison = compare_tpe_grid(storage, plan.key, plan.space)
        if comparison is not None:
            result.comparisons.append(comparison)


def _sigterm_to_interrupt() -> Any:
    # `timeout` and job schedulers stop a run with SIGTERM: treat it like Ctrl-C so running
    # trials are marked interrupted (and retried next time) instead of left RUNNING.
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
