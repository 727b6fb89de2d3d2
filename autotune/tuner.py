"""``sbbench tune``: one resumable Optuna study per tuned-config key, trials run in worker processes.

For each case of the sweep and each pass, the tuner opens (or resumes) the study of that key in
the RDB storage, enqueues the backend's default config once, and then asks and tells trials:

* the objective is the median latency of the pass being tuned (``measure`` mode ``fwd`` or
  ``bwd``), with the other pass's parameters at their defaults;
* a trial whose outputs break the numerics budget (``check_case`` rows not all passed) is
  *infeasible*: it completes with its latency, and TPE's ``constraints_func`` reads the stored
  ``user_attrs['constraint']`` (worst err/budget - 1) so the model steers away from it;
* a config that fails to compile, runs out of resources, raises, kills or hangs its worker is a
  FAIL trial with the reason in ``user_attrs`` and the study goes on (see ``worker.py``);
* no config is run twice (``sampler.DedupSampler``), so a killed and restarted tuner loses no
  finished trial and repeats none; a trial it was running is marked ``interrupted`` and its
  config becomes untried again.

Several GPUs (``devices``) work on the same study at once: one thread per GPU asks a trial,
hands it to that GPU's worker process and tells the result. Tuners on several machines share
studies through a PostgreSQL storage URL; each then runs its own GPUs the same way.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import signal
import socket
import threading
import time
import uuid
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sbbench.autotune import sampler as sampling
from sbbench.autotune.store import SAMPLERS, STUDY_SCHEMA, TuneKey, open_storage
from sbbench.autotune.worker import Worker, import_plugins, visible_gpu_ids
from sbbench.core.registry import Backend, get_backend
from sbbench.core.results import make_row
from sbbench.core.tuned import config_key
from sbbench.harness.cases import Case

DEFAULT_TPE_TRIALS = 30
# The tuner aims for the grid's best within this factor when comparing TPE with the grid.
WITHIN_GRID = 1.02


class TuneError(ValueError):
    """A tuning run that cannot start, with a message naming the argument at fault."""


class TuneInterrupted(KeyboardInterrupt):
    """The run was stopped (Ctrl-C, SIGTERM); ``result`` holds what was finished."""

    def __init__(self, result: "TuneResult") -> None:
        super().__init__("interrupted")
        self.result = result


@dataclass
class TuneSettings:
    """Everything one ``sbbench tune`` run needs. ``n_trials`` and ``study_timeout`` count per
    study; ``timeout`` bounds the whole run and is shared evenly among the studies still to do."""

    backend: str
    cases: Sequence[Case]
    passes: Sequence[str] = ("fwd", "bwd")
    regime: str = "mixed"
    sampler: str = "tpe"
    n_trials: int | None = None  # None: 30 for TPE, the whole space for the grid
    timeout: float | None = None
    storage: str | None = None
    devices: Sequence[int] | None = None  # GPU indices; None: GPU 0 when there is one, else the CPU
    trial_timeout: float = 300.0
    check: bool = True
    check_seqlen: int = 1024
    seed: int = 0
    startup_trials: int = 10
    plugins: Sequence[str] = ()
    input_seed: int = 20241017
    stale_after: float = 3600.0
    measure_kwargs: Mapping[str, Any] = field(default_factory=dict)
    check_kwargs: Mapping[str, Any] = field(default_factory=dict)
    worker_startup_timeout: float = 600.0
    # Without a GPU: how many CPU workers share the studies (tests exercise the several-GPU path
    # this way; for real CPU timings keep 1, since workers would compete for the cores).
    cpu_workers: int = 1
    # Restrict parameters to some of their choices (the default value always stays in, so the
    # default config is still measured): a smaller space for the TPE-vs-grid comparison.
    space: Mapping[str, Sequence[Any]] = field(default_factory=dict)


@dataclass
class Plan:
    """One study to run: its key, the case it is timed on, the space of its pass."""

    key: TuneKey
    sampler: str
    case: Case
    check_case: Case | None
    space: sampling.Space
    default: dict[str, Any]
    # The backend's whole space for this pass: a study over less gets a name of its own.
    full_space: sampling.Space = field(default_factory=dict)
    study_name: str = ""

    def __post_init__(self) -> None:
        if not self.study_name:
            self.study_name = self.key.study_name(self.sampler)
            if self.full_space and _space_json(self.space) != _space_json(self.full_space):
                self.study_name += "-" + space_tag(self.space)


def _space_json(space: Mapping[str, Sequence[Any]]) -> str:
    return json.dumps({name: list(choices) for name, choices in sorted(space.items())}, default=str)


def space_tag(space: Mapping[str, Sequence[Any]]) -> str:
    """A short stable name for a search space (studies over different spaces never mix)."""
    return "s" + hashlib.sha1(_space_json(space).encode()).hexdigest()[:8]


def restrict_space(backend: Backend, full: sampling.Space, wanted: Mapping[str, Sequence[Any]]) -> sampling.Space:
    """``full`` with the parameters named in ``wanted`` cut down to those values (each must be
    one of the parameter's choices; the default value always stays, so the default config is
    still measured). Names of the other pass are ignored here."""
    space = dict(full)
    for name, values in wanted.items():
        if name not in space:
            continue
        picked = []
        for value in values:
            match = next((c for c in full[name] if c == value or str(c) == str(value)), _MISSING)
            if match is _MISSING:
                raise TuneError(f"--space: {value!r} is not a choice of {name} (choices: "
                                f"{', '.join(str(c) for c in full[name])})")
            if match not in picked:
                picked.append(match)
        default = backend.default_config.get(name, full[name][0])
        if default not in picked:
            picked.append(default)
        space[name] = tuple(c for c in full[name] if c in picked)
    return space


_MISSING = object()


@dataclass
class StudySummary:
    key: TuneKey
    sampler: str
    study_name: str
    case: Case
    default_params: dict[str, Any]
    default_latency_ms: float | None
    default_status: str | None
    best_params: dict[str, Any] | None
    best_latency_ms: float | None
    best_trial: int | None
    trials_total: int
    trials_this_run: int
    failed: int
    infeasible: int
    untried: int
    space_size: int
    seconds_total: float
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.default_latency_ms and self.best_latency_ms:
            return self.default_latency_ms / self.best_latency_ms
        return None


@dataclass
class Comparison:
    """How long TPE took to come within 2% of the grid's best, for one key."""

    key: TuneKey
    grid_best_ms: float | None
    grid_trials: int
    grid_cells: int
    grid_seconds: float
    tpe_trials_total: int
    tpe_trials_needed: int | None
    tpe_seconds_needed: float | None
    tpe_hit_trial: int | None
    tpe_hit_ms: float | None

    @property
    def grid_complete(self) -> bool:
        return self.grid_trials >= self.grid_cells


@dataclass
class TuneResult:
    summaries: list[StudySummary] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    storage_url: str = ""


class Reporter:
    """What the tuner tells its caller while it runs; the CLI draws a progress bar from it."""

    def message(self, text: str) -> None:
        pass

    def start_study(self, plan: Plan, planned: int, resumed: int) -> None:
        pass

    def trial_done(self, plan: Plan, trial: FrozenTrial, best_ms: float | None) -> None:
        pass

    def end_study(self, summary: StudySummary) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# planning


def _problem(case: Case, device_type: str):
    from sbbench.core.problem import AttnProblem

    return AttnProblem(
        batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, seqlen=case.seqlen, head_dim=case.head_dim,
        dtype=case.torch_dtype, device_type=device_type, attend_current=case.attend_current,
        inv_temp=1.0 / math.sqrt(case.head_dim),
    )


def check_case_for(case: Case, check_seqlen: int) -> Case:
    """The case the numerics budget is checked on: the tuned case's dtype, head dim, GQA group
    and attend_current, but short and narrow, because the float64 oracle is O(T^2) in memory
    (B=4, H=12, T=16384 would need ~100 GB per T x T tensor)."""
    group = case.heads // case.kv_heads
    kv = min(case.kv_heads, 2)
    return Case(batch=1, heads=kv * group, kv_heads=kv, seqlen=min(case.seqlen, check_seqlen),
                head_dim=case.head_dim, dtype=case.dtype, attend_current=case.attend_current)


def plan_studies(
    backend: Backend, settings: TuneSettings, device: str, device_type: str
) -> tuple[list[Plan], list[str]]:
    """The studies of a run (one per key and pass, first case of each key wins) and notes on
    cases that were left out."""
    plans: list[Plan] = []
    notes: list[str] = []
    seen: dict[str, Case] = {}
    for pass_ in settings.passes:
        full = sampling.pass_space(backend, pass_)
        space = restrict_space(backend, full, settings.space)
        if not space:
            notes.append(f"{backend.name} has no {pass_} parameters: pass {pass_} not tuned")
            continue
        for case in settings.cases:
            if case.varlen:
                notes.append(f"{_case_text(case)}: packed varlen cases are not tuned (the key has no varlen)")
                continue
            problem = _problem(case, device_type)
            reason = backend.unsupported_reason(problem)
            if reason is not None:
                notes.append(f"{_case_text(case)}: {backend.name} cannot run it here ({reason})")
                continue
            k = config_key(problem, pass_)
            key = TuneKey(device=device, backend=backend.name, pass_=pass_, dtype=k["dtype"], head_dim=k["head_dim"],
                          gqa_group=k["gqa_group"], attend_current=k["attend_current"], seqlen_bucket=k["seqlen_bucket"])
            name = key.study_name(settings.sampler) + space_tag(space)
            if name in seen:
                notes.append(f"{_case_text(case)}: same key as {_case_text(seen[name])} (seqlen bucket "
                             f"{key.seqlen_bucket}); tuned once")
                continue
            seen[name] = case
            plans.append(Plan(key, settings.sampler, case,
                              check_case_for(case, settings.check_seqlen) if settings.check else None,
                              space, sampling.default_params(backend, space), full_space=full))
    return plans, notes


def _case_text(case: Case) -> str:
    ac = " attend_current" if case.attend_current else ""
    return f"B={case.batch} H={case.heads} Hkv={case.kv_heads} T={case.seqlen} D={case.head_dim} {case.dtype}{ac}"


# ---------------------------------------------------------------------------------------------
# studies


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _study_attrs(plan: Plan, settings: TuneSettings, env: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "sbbench_schema": STUDY_SCHEMA,
        "key": plan.key.to_attrs(),
        "sampler": plan.sampler,
        "case": asdict(plan.case),
        "check_case": asdict(plan.check_case) if plan.check_case else None,
        "regime": settings.regime,
        "space": {name: list(choices) for name, choices in plan.space.items()},
        "default_params": plan.default,
        "torch_version": env.get("torch_version"),
        "triton_version": env.get("triton_version"),
        "sbbench_version": env.get("sbbench_version"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


_CONFLICTS = {
    "case": "--batch/--heads/--kv-heads/--seqlens",
    "regime": "--regime",
    "space": "the config space",
    "torch_version": "the torch version",
    "triton_version": "the triton version",
}


def _conflict(plan: Plan, have: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    # Trials of one study must be comparable: it continues only on the same case, regime, space
    # and versions it was started with.
    for attr, what in _CONFLICTS.items():
        if have.get(attr) != wanted[attr]:
            return (f"{what}: study {plan.study_name!r} in this storage was tuned with {attr} "
                    f"{have.get(attr)!r}, this run has {wanted[attr]!r}; trials would not be comparable. "
                    "Use another --storage (or delete that study) to tune afresh.")
    return None


def _resolve_study(storage: Any, plan: Plan, settings: TuneSettings, env: Mapping[str, Any], reporter: Reporter) -> None:
    """Before anything runs: give ``plan`` a study of its own if the backend's space changed
    since its study began, and refuse a study begun on another case, regime or versions."""
    if not _study_exists(storage, plan.study_name):
        return
    wanted = _jsonable(_study_attrs(plan, settings, env))
    have = storage.get_study_user_attrs(storage.get_study_id_from_name(plan.study_name))
    if have.get("space") is not None and have.get("space") != wanted["space"]:
        # New or removed choices: the old study's trials stay where they are (export still
        # sees them) and this space gets a study of its own.
        plan.study_name = plan.study_name + "-" + space_tag(plan.space)
        reporter.message(f"note: the config space of {plan.key.backend} changed since "
                         f"{plan.key.study_name(plan.sampler)} began; tuning in {plan.study_name}")
        if not _study_exists(storage, plan.study_name):
            return
        have = storage.get_study_user_attrs(storage.get_study_id_from_name(plan.study_name))
    if have:
        problem = _conflict(plan, have, wanted)
        if problem:
            raise TuneError(problem)


def _open_study(storage: Any, plan: Plan, settings: TuneSettings, env: Mapping[str, Any], seed: int) -> optuna.Study:
    sampler = sampling.make_sampler(plan.sampler, plan.space, seed, settings.startup_trials)
    study = optuna.create_study(
        storage=storage, study_name=plan.study_name, direction="minimize", sampler=sampler, load_if_exists=True
    )
    wanted = _jsonable(_study_attrs(plan, settings, env))
    have = study.user_attrs
    if not have:
        for name, value in wanted.items():
            study.set_user_attr(name, value)
        return study
    problem = _conflict(plan, have, wanted)  # another tuner may have begun it a moment ago
    if problem:
        raise TuneError(problem)
    return study


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale_trials(study: optuna.Study, stale_after: float, host: str) -> int:
    """Mark RUNNING trials whose tuner is gone as interrupted FAIL trials (their configs become
    untried again): a tuner on this host whose process is dead, or any tuner silent for longer
    than ``stale_after`` seconds. Returns how many were reaped."""
    now = _dt.datetime.now()
    reaped = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner_host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        dead = owner_host == host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)
        started = t.datetime_start
        old = started is not None and (now - started).total_seconds() > stale_after
        if dead or old:
            trial_id = t._trial_id
            study._storage.set_trial_user_attr(trial_id, "interrupted", True)
            study._storage.set_trial_user_attr(trial_id, "status", "interrupted")
            study._storage.set_trial_user_attr(trial_id, "error", "the tuner running this trial stopped")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            reaped += 1
    return reaped


def _enqueue_default(study: optuna.Study, plan: Plan) -> bool:
    """Queue the default config unless the study already ran, runs or queues it."""
    want = sampling.params_key(plan.space, plan.default)
    for t in study.get_trials(deepcopy=False):
        if sampling.counts_as_tried(t) and sampling.params_key(plan.space, sampling.trial_params(t)) == want:
            return False
    study.enqueue_trial(dict(plan.default), user_attrs={"is_default": True})
    return True


# ---------------------------------------------------------------------------------------------
# running


class _StudyRun:
    """The threads (one per worker) that ask, run and tell trials of one study."""

    def __init__(self, study: optuna.Study, plan: Plan, backend: Backend, settings: TuneSettings,
                 workers: Sequence[Worker], budget: int, deadline: float | None, stop: threading.Event,
                 reporter: Reporter, run_id: str, env: Mapping[str, Any]) -> None:
        self.study, self.plan, self.backend, self.settings = study, plan, backend, settings
        self.workers, self.budget, self.deadline, self.stop = workers, budget, deadline, stop
        self.reporter, self.run_id, self.env = reporter, run_id, env
        self.lock = threading.Lock()
        self.started = 0
        self.numbers: list[int] = []
        self.errors: list[BaseException] = []
        self.exhausted = False
        self.host = socket.gethostname()
        self.dists = sampling.distributions(plan.space)

    def run(self) -> None:
        # Completion is signalled by events, not Thread.join: a join interrupted by Ctrl-C can
        # report a thread finished while it still runs, and then its trial would be left RUNNING.
        done = [threading.Event() for _ in self.workers]
        threads = [threading.Thread(target=self._loop, args=(w, d), name=f"tune-{w.label}", daemon=True)
                   for w, d in zip(self.workers, done)]
        for t in threads:
            t.start()
        try:
            for d in done:
                while not d.wait(0.2):
                    pass
        except KeyboardInterrupt:
            self.stop.set()
            for w in self.workers:
                w.kill()  # the threads see their workers die, record the trials, and stop
            for d in done:
                d.wait(60)
            self._abandon_running()
            raise
        if self.errors:
            raise self.errors[0]

    def _abandon_running(self) -> None:
        """Safety net when stopping: a trial of this run still RUNNING (its thread did not get to
        record it) becomes an interrupted FAIL, so its config is retried by the next run."""
        with self.lock:
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number in self.numbers:
                    for name, value in (("interrupted", True), ("status", "interrupted"),
                                        ("error", "the tuner was stopped during this trial")):
                        self.study._storage.set_trial_user_attr(t._trial_id, name, value)
                    self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def _loop(self, worker: Worker, done: threading.Event) -> None:
        try:
            while True:
                with self.lock:
                    trial = self._next_trial()
                if trial is None:
                    return
                outcome = worker.run(self._task(trial), self.settings.trial_timeout)
                with self.lock:
                    self._record(trial, outcome, worker)
        except BaseException as exc:  # surfaces in run(); the other threads stop too
            self.errors.append(exc)
            self.stop.set()
        finally:
            done.set()

    def _next_trial(self) -> optuna.Trial | None:
        while True:
            if self.stop.is_set() or self.started >= self.budget:
                return None
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return None
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and sampling.untried_count(self.plan.space, trials) <= 0:
                self.exhausted = True
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                trial = self.study.ask(fixed_distributions=self.dists)
            mine = sampling.params_key(self.plan.space, trial.params)
            others = self.study.get_trials(deepcopy=False)
            twin = next((t for t in others if t.number != trial.number and sampling.counts_as_tried(t)
                         and sampling.params_key(self.plan.space, sampling.trial_params(t)) == mine), None)
            if twin is not None:
                # Only in a race with another tuner on this storage: record, do not run.
                trial.set_user_attr("duplicate_of", twin.number)
                trial.set_user_attr("status", "duplicate")
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            self.started += 1
            self.numbers.append(trial.number)
            for name, value in (("host", self.host), ("pid", os.getpid()), ("run_id", self.run_id),
                                ("git_commit", self.env.get("git_commit"))):
                trial.set_user_attr(name, value)
            trial.set_user_attr("config", self._config(trial.params))
            return trial

    def _config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        # Every parameter named, so the backend's tuned-config files play no part in the timing.
        config = {p.name: self.backend.default_config.get(p.name, p.choices[0]) for p in self.backend.config_space}
        config.update(self.backend.default_config)
        config.update(params)
        return config

    def _task(self, trial: optuna.Trial) -> dict[str, Any]:
        return {
            "trial": trial.number,
            "backend": self.backend.name,
            "case": asdict(self.plan.case),
            "check_case": asdict(self.plan.check_case) if self.plan.check_case else None,
            "mode": self.plan.key.pass_,
            "regime": self.settings.regime,
            "config": self._config(trial.params),
            "input_seed": self.settings.input_seed,
            "measure_kwargs": dict(self.settings.measure_kwargs),
            "check_kwargs": dict(self.settings.check_kwargs),
        }

    def _record(self, trial: optuna.Trial, outcome: Any, worker: Worker) -> None:
        reply = outcome.reply
        attrs: dict[str, Any] = {"worker": worker.label}
        for name in ("latency_q20_ms", "latency_q80_ms", "implementation", "skipped_fraction", "worker_seconds",
                     "check_worst"):
            if reply.get(name) is not None:
                attrs[name] = _jsonable(reply[name])
        if outcome.ok:
            latency = float(reply["latency_ms"])
            attrs["latency_ms"] = latency
            if "constraint" in reply:
                attrs["constraint"] = [float(reply["constraint"])]
            attrs["status"] = "ok" if reply.get("constraint", 0.0) <= 0 else "infeasible"
        else:
            # A worker killed because the tuner is stopping says nothing about its config.
            interrupted = self.stop.is_set() and outcome.status in ("crashed", "timeout")
            if interrupted:
                attrs["interrupted"] = True
            attrs["status"] = "interrupted" if interrupted else outcome.status
            attrs["error"] = str(reply.get("error") or "")[:1500]
            if reply.get("traceback"):
                attrs["traceback"] = str(reply["traceback"])[-1500:]
        try:
            for name, value in attrs.items():
                trial.set_user_attr(name, value)
        finally:
            # The state is what resuming relies on: tell it even if an attribute failed to save.
            if outcome.ok:
                self.study.tell(trial, float(reply["latency_ms"]))
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        frozen = self.study._storage.get_trial(trial._trial_id)
        self.reporter.trial_done(self.plan, frozen, _best_latency(self.study.get_trials(deepcopy=False)))


def _best_latency(trials: Iterable[FrozenTrial]) -> float | None:
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and sampling.is_feasible(t) and t.value is not None]
    return min(values) if values else None


def _start_workers(settings: TuneSettings) -> list[Worker]:
    import torch

    if settings.devices:
        if not torch.cuda.is_available():
            raise TuneError("--devices: no CUDA GPU is visible on this machine (leave --devices out to tune on the CPU)")
        count = torch.cuda.device_count()
        bad = [d for d in settings.devices if d < 0 or d >= count]
        if bad:
            raise TuneError(f"--devices: {bad} out of range; this machine shows {count} GPU(s) (0..{count - 1})")
        if len(set(settings.devices)) != len(settings.devices):
            raise TuneError(f"--devices: {list(settings.devices)} names a GPU twice")
        try:
            gpus: list[tuple[int, str] | None] = list(visible_gpu_ids(settings.devices))
        except ValueError as exc:
            raise TuneError(str(exc)) from None
    elif torch.cuda.is_available():
        gpus = list(visible_gpu_ids([0]))
    else:
        gpus = [None] * settings.cpu_workers
    labels = [None if g is not None or len(gpus) == 1 else f"cpu#{i}" for i, g in enumerate(gpus)]
    workers = [Worker(g, settings.plugins, settings.worker_startup_timeout, label) for g, label in zip(gpus, labels)]
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
        raise TuneError(f"tune: {errors[0]}")
    names = {w.info["device"] for w in workers if w.info}
    if len(names) > 1:
        for w in workers:
            w.close()
        raise TuneError(f"--devices: the GPUs are different models ({', '.join(sorted(names))}); "
                        "a study holds one device's timings, so tune each model in its own run")
    return workers


def run_tuning(settings: TuneSettings, reporter: Reporter | None = None) -> TuneResult:
    """Run (or resume) the studies of ``settings``; see the module docstring."""
    reporter = reporter or Reporter()
    if settings.sampler not in SAMPLERS:
        raise TuneError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {settings.sampler!r}")
    bad_passes = [p for p in settings.passes if p not in ("fwd", "bwd")]
    if bad_passes or not settings.passes:
        raise TuneError(f"--pass: expected fwd, bwd or both, got {list(settings.passes)}")
    if settings.n_trials is not None and settings.n_trials < 1:
        raise TuneError(f"--trials: expected a positive number, got {settings.n_trials}")
    if settings.timeout is not None and settings.timeout <= 0:
        raise TuneError(f"--timeout: expected a positive number of seconds, got {settings.timeout}")
    if settings.trial_timeout <= 0:
        raise TuneError(f"--trial-timeout: expected a positive number of seconds, got {settings.trial_timeout}")
    if not settings.cases:
        raise TuneError("--seqlens: no case to tune")
    try:
        import_plugins(settings.plugins)
        backend = get_backend(settings.backend)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        raise TuneError(text if text.startswith("--") else f"--backend: {text.removeprefix('backend: ')}") from None
    if not backend.config_space:
        raise TuneError(f"--backend: {backend.name!r} has no launch parameters to tune")
    known = {p.name for p in backend.config_space}
    unknown = sorted(set(settings.space) - known)
    if unknown:
        raise TuneError(f"--space: backend {backend.name!r} has no parameter(s) {unknown}; its parameters are "
                        f"{sorted(known)}")
    for pass_ in settings.passes:  # bad values are usage errors before any worker starts
        restrict_space(backend, sampling.pass_space(backend, pass_), settings.space)
    if backend.kind != "stickbreaking":
        raise TuneError(f"--backend: {backend.name!r} is a {backend.kind} comparator, not a stick-breaking backend")
    try:
        storage = open_storage(settings.storage)
    except ValueError as exc:
        raise TuneError(str(exc)) from None

    started_at = time.monotonic()
    deadline = None if settings.timeout is None else started_at + settings.timeout
    workers = _start_workers(settings)
    env = dict(workers[0].info or {})
    result = TuneResult(workers=[dict(w.info or {}) for w in workers], storage_url=str(storage.url))
    device_type = "cuda" if workers[0].gpu is not None else "cpu"
    plans, notes = plan_studies(backend, settings, env["device"], device_type)
    result.skipped = notes
    for note in notes:
        reporter.message(f"note: {note}")
    if not plans:
        for w in workers:
            w.close()
        raise TuneError("--backend/--seqlens: nothing to tune (" + "; ".join(notes or ["no case"]) + ")")

    try:
        for plan in plans:  # every study checked before any runs: a bad flag fails fast
            _resolve_study(storage, plan, settings, env, reporter)
    except TuneError:
        for w in workers:
            w.close()
        raise

    stop = threading.Event()
    run_id = uuid.uuid4().hex[:12]
    host = socket.gethostname()
    previous = _sigterm_to_interrupt()
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_numbers: dict[str, list[int]] = {}
    try:
        for index, plan in enumerate(plans):
            if deadline is not None and time.monotonic() >= deadline:
                reporter.message(f"timeout reached: {plan.key.label()} [{plan.sampler}] and later studies not run")
                break
            # Reseeded per run (by the study's trial count) so a resumed study does not replay the
            # random draws of the previous run; DedupSampler catches whatever collides anyway.
            probe = optuna.load_study(study_name=plan.study_name, storage=storage) if _study_exists(storage, plan.study_name) else None
            # Offset by the study's name too, so that studies of different keys explore differently.
            seed = settings.seed + zlib.crc32(plan.study_name.encode()) % 100_003 + (len(probe.trials) if probe is not None else 0)
            study = _open_study(storage, plan, settings, env, seed)
            reaped = reap_stale_trials(study, settings.stale_after, host)
            if reaped:
                reporter.message(f"{plan.study_name}: {reaped} trial(s) of a stopped tuner marked interrupted; their configs will be retried")
            _enqueue_default(study, plan)
            budget = settings.n_trials or (DEFAULT_TPE_TRIALS if plan.sampler == "tpe" else sampling.space_size(plan.space))
            study_deadline = None
            if deadline is not None:
                share = (deadline - time.monotonic()) / (len(plans) - index)
                study_deadline = time.monotonic() + max(share, 0.0)
            untried = sampling.untried_count(plan.space, study.get_trials(deepcopy=False))
            resumed = sum(1 for t in study.get_trials(deepcopy=False)
                          if t.state.is_finished() and not sampling.is_duplicate(t) and not sampling.is_interrupted(t))
            reporter.start_study(plan, min(budget, untried + 1), resumed)
            runner = _StudyRun(study, plan, backend, settings, workers, budget, study_deadline, stop, reporter, run_id, env)
            try:
                runner.run()
            except KeyboardInterrupt:
                run_numbers[plan.study_name] = runner.numbers
                result.summaries.append(summarize(study, plan, runner.numbers, settings.regime))
                raise
            run_numbers[plan.study_name] = runner.numbers
            summary = summarize(study, plan, runner.numbers, settings.regime)
            if runner.exhausted:
                summary.note = "space exhausted" if not summary.note else summary.note
            result.summaries.append(summary)
            reporter.end_study(summary)
    except KeyboardInterrupt:
        _finish(result, storage, plans, settings, env)
        raise TuneInterrupted(result) from None
    finally:
        for w in workers:
            w.close()
        optuna.logging.set_verbosity(optuna_level)
        _restore_sigterm(previous)
    _finish(result, storage, plans, settings, env)
    return result


def _finish(result: TuneResult, storage: Any, plans: Sequence[Plan], settings: TuneSettings, env: Mapping[str, Any]) -> None:
    result.rows = []
    for plan in plans:
        if not _study_exists(storage, plan.study_name):
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


def _study_exists(storage: Any, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


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


# ---------------------------------------------------------------------------------------------
# summaries, rows, comparison


def _seconds(t: FrozenTrial) -> float:
    d = t.duration
    return d.total_seconds() if d is not None else 0.0


def _real(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that ran (or were stopped) for real: no duplicates, no queued or running ones."""
    return [t for t in trials if t.state.is_finished() and not sampling.is_duplicate(t)]


def _default_trial(trials: Sequence[FrozenTrial], space: sampling.Space, default: Mapping[str, Any]) -> FrozenTrial | None:
    want = sampling.params_key(space, default)
    matches = [t for t in trials if not sampling.is_interrupted(t) and sampling.params_key(space, t.params) == want]
    return matches[0] if matches else None


def summarize(study: optuna.Study, plan: Plan, run_numbers: Sequence[int], regime: str) -> StudySummary:
    """The numbers of the summary table for one study."""
    trials = _real(study.get_trials(deepcopy=False))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    feasible = [t for t in complete if sampling.is_feasible(t)]
    best = min(feasible, key=lambda t: t.value) if feasible else None
    default = _default_trial(trials, plan.space, plan.default)
    this_run = set(run_numbers)
    return StudySummary(
        key=plan.key, sampler=plan.sampler, study_name=plan.study_name, case=plan.case,
        default_params=dict(plan.default),
        default_latency_ms=default.value if default is not None and default.state == TrialState.COMPLETE else None,
        default_status=None if default is None else str(default.user_attrs.get("status", default.state.name.lower())),
        best_params=dict(best.params) if best else None,
        best_latency_ms=best.value if best else None,
        best_trial=best.number if best else None,
        trials_total=len([t for t in trials if not sampling.is_interrupted(t)]),
        trials_this_run=len([t for t in trials if t.number in this_run and not sampling.is_interrupted(t)]),
        failed=len([t for t in trials if t.state == TrialState.FAIL and not sampling.is_interrupted(t)]),
        infeasible=len(complete) - len(feasible),
        untried=sampling.untried_count(plan.space, study.get_trials(deepcopy=False)),
        space_size=sampling.space_size(plan.space),
        seconds_total=sum(_seconds(t) for t in trials),
    )


def trial_rows(study: optuna.Study, plan: Plan, regime: str) -> list[dict[str, Any]]:
    """One results-schema row per trial (command "tune"), for ``--json`` and ``sbbench report``."""
    attrs = study.user_attrs
    # Interrupted trials measured nothing (the tuner was stopped); their configs run again later.
    trials = [t for t in _real(study.get_trials(deepcopy=False)) if not sampling.is_interrupted(t)]
    default = _default_trial(trials, plan.space, plan.default)
    default_ms = default.value if default is not None and default.state == TrialState.COMPLETE else None
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        ua = t.user_attrs
        latency = t.value if t.state == TrialState.COMPLETE else None
        status = str(ua.get("status") or ("ok" if t.state == TrialState.COMPLETE else "error"))
        rows.append(make_row(
            command="tune", device=plan.key.device, torch_version=attrs.get("torch_version"),
            triton_version=attrs.get("triton_version"), sbbench_version=attrs.get("sbbench_version"),
            git_commit=ua.get("git_commit"), backend=plan.key.backend, implementation=ua.get("implementation"),
            config=ua.get("config") or dict(t.params), **asdict(plan.case), mode=plan.key.pass_, regime=regime,
            status=status, error=ua.get("error"), latency_ms=latency,
            latency_q20_ms=ua.get("latency_q20_ms"), latency_q80_ms=ua.get("latency_q80_ms"),
            tflops=plan.case.flops(plan.key.pass_) / (latency * 1e-3) / 1e12 if latency else None,
            speedup=default_ms / latency if default_ms and latency else None,
            skipped_fraction=ua.get("skipped_fraction"),
            passed=None if latency is None or ua.get("constraint") is None else sampling.is_feasible(t),
            # tune columns
            **{"pass": plan.key.pass_}, study=plan.study_name, sampler=plan.sampler, trial=t.number,
            params=dict(t.params), is_default=bool(ua.get("is_default")) or (default is not None and t.number == default.number),
            default_latency_ms=default_ms, constraint=(ua.get("constraint") or [None])[0],
            check_worst=ua.get("check_worst"), duration_s=_seconds(t), seqlen_bucket=plan.key.seqlen_bucket,
            gqa_group=plan.key.gqa_group,
            datetime_start=t.datetime_start.isoformat() if t.datetime_start else None,
        ))
    return rows


def compare_tpe_grid(storage: Any, key: TuneKey, space: sampling.Space | None = None) -> Comparison | None:
    """TPE against the grid for one key (over the same space, ``space`` or the grid's), when
    both studies exist: the grid's best feasible latency, and how many TPE trials (and seconds,
    summed over trial durations, failures included) it took TPE to come within 2% of it."""
    from sbbench.autotune.store import list_studies

    if isinstance(storage, str):
        storage = open_storage(storage)
    found: dict[str, list[Any]] = {"tpe": [], "grid": []}
    for s in list_studies(storage, key.backend):
        if s.key == key and s.sampler in found:
            found[s.sampler].append(s)
    want = None if space is None else _jsonable({n: list(c) for n, c in space.items()})
    pairs = [(g, t) for g in found["grid"] for t in found["tpe"]
             if g.attrs.get("space") == t.attrs.get("space") and (want is None or g.attrs.get("space") == want)]
    if not pairs:
        return None
    grid_s, tpe_s = pairs[0]
    grid = optuna.load_study(study_name=grid_s.name, storage=storage)
    tpe = optuna.load_study(study_name=tpe_s.name, storage=storage)
    grid_space = {n: tuple(c) for n, c in (grid_s.attrs.get("space") or {}).items()}
    grid_trials = [t for t in _real(grid.get_trials(deepcopy=False)) if not sampling.is_interrupted(t)]
    grid_best = _best_latency(grid_trials)
    tpe_trials = sorted((t for t in _real(tpe.get_trials(deepcopy=False)) if not sampling.is_interrupted(t)),
                        key=lambda t: t.number)
    needed = seconds = hit_trial = hit_ms = None
    if grid_best is not None:
        count, spent = 0, 0.0
        for t in tpe_trials:
            count += 1
            spent += _seconds(t)
            if (t.state == TrialState.COMPLETE and sampling.is_feasible(t) and t.value is not None
                    and t.value <= WITHIN_GRID * grid_best):
                needed, seconds, hit_trial, hit_ms = count, spent, t.number, t.value
                break
    return Comparison(
        key=key, grid_best_ms=grid_best, grid_trials=len(grid_trials),
        grid_cells=sampling.space_size(grid_space) if grid_space else len(grid_trials),
        grid_seconds=sum(_seconds(t) for t in grid_trials), tpe_trials_total=len(tpe_trials),
        tpe_trials_needed=needed, tpe_seconds_needed=seconds, tpe_hit_trial=hit_trial, tpe_hit_ms=hit_ms,
    )


def describe_trial(trial: FrozenTrial) -> str:
    """One line for a finished trial (the progress log when output is not a terminal)."""
    ua = trial.user_attrs
    params = " ".join(f"{k}={v}" for k, v in sorted(trial.params.items()))
    status = ua.get("status") or trial.state.name.lower()
    if trial.state == TrialState.COMPLETE:
        text = f"{trial.value:.4g} ms"
        if status == "infeasible":
            text += f" INFEASIBLE ({ua.get('check_worst')})"
    else:
        text = f"{status}: {(str(ua.get('error') or '').splitlines() or [''])[0][:160]}"
    tag = " (default)" if ua.get("is_default") else ""
    return f"trial {trial.number}{tag} [{params}]: {text}"

