"""Running one study: asking Optuna for configs, compiling them ahead, timing them on the GPU,
and telling the results.

The GPU times one config at a time, but building a config's kernels takes seconds of CPU time
and no GPU. So the study keeps a few configs asked ahead of the GPU, each handed to a compile
worker (:class:`CompilePool`) as soon as it is asked; the timing worker then finds its
kernels already built. A config that cannot win is cut after its first timed run (the worker's
``prune_above_ms``), and only a config faster than the study's best checked one is checked
against the numerics budget (``check_below_ms``), since only it could become the best.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sbbench.autotune import sampler as sampling
from sbbench.autotune.memory import UnlaunchableConfigs
from sbbench.autotune.plan import CHECK_REGIMES, Plan, TuneSettings
from sbbench.autotune.studies import frozen, jsonable, mark_interrupted, set_trial_attrs
from sbbench.autotune.summary import default_trial, real_trials, trial_row
from sbbench.autotune.worker import TrialOutcome, Worker, is_resource_error
from sbbench.core.registry import Backend


class Reporter:
    """What the tuner tells its caller while it runs; the CLI draws a progress bar from it."""

    def message(self, text: str) -> None:
        pass

    def start_study(self, plan: Plan, planned: int, resumed: int, budget_s: float | None) -> None:
        pass

    def trial_done(self, plan: Plan, trial: FrozenTrial, best_ms: float | None, row: Mapping[str, Any]) -> None:
        """A trial was told; ``row`` is its results row (what the tune results file holds)."""

    def end_study(self, summary: Any) -> None:
        pass


class CompilePool:
    """Worker processes that build configs' kernels without launching them (role ``compile``),
    so that compiling the next configs overlaps timing the current one."""

    def __init__(self, workers: Sequence[Worker], timeout: float) -> None:
        self.workers = list(workers)
        self.timeout = timeout
        self._idle: queue.Queue[Worker] = queue.Queue()
        for w in self.workers:
            self._idle.put(w)
        self._executor = ThreadPoolExecutor(max_workers=max(1, len(self.workers)), thread_name_prefix="sbbench-compile")

    def __len__(self) -> int:
        return len(self.workers)

    def submit(self, task: Mapping[str, Any]) -> Future:
        def job() -> TrialOutcome:
            worker = self._idle.get()
            try:
                return worker.run(task, self.timeout)
            finally:
                self._idle.put(worker)

        return self._executor.submit(job)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for w in self.workers:
            w.kill()
            w.close()


@dataclass
class _Pending:
    """A config asked of Optuna and maybe being compiled, not yet timed."""

    trial: optuna.Trial
    compiled: Future | None
    asked_at: float


class StudyRun:
    """The threads (one per timing worker) that run the trials of one study, and the queue of
    configs asked ahead of them."""

    def __init__(self, study: optuna.Study, plan: Plan, backend: Backend, settings: TuneSettings,
                 workers: Sequence[Worker], budget: int, deadline: float | None, stop: threading.Event,
                 reporter: Reporter, run_id: str, env: Mapping[str, Any], cells: sampling.Cells,
                 compile_pool: CompilePool | None = None, unlaunchable: UnlaunchableConfigs | None = None,
                 lookahead: int | None = None) -> None:
        self.study, self.plan, self.backend, self.settings = study, plan, backend, settings
        self.workers, self.budget, self.deadline, self.stop = workers, budget, deadline, stop
        self.reporter, self.run_id, self.env, self.cells = reporter, run_id, env, cells
        self.compile_pool, self.unlaunchable = compile_pool, unlaunchable
        self.lock = threading.Lock()
        self.asked = 0
        self.numbers: list[int] = []
        self.pending: list[_Pending] = []
        self.errors: list[BaseException] = []
        self.exhausted = False
        self.prepare_seconds = 0.0
        self.started_at = time.monotonic()
        self.host = socket.gethostname()
        self.dists = sampling.distributions(plan.space)
        # Configs asked ahead of the GPU (see plan.search_pace); at most one per compile worker.
        compilers = len(compile_pool) if compile_pool is not None else 0
        self.lookahead = compilers if lookahead is None else min(lookahead, compilers)

    # -- threads ---------------------------------------------------------------------------

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
            self._abandon("the tuner was stopped during this trial", running_too=True)
            raise
        self._abandon("not timed: the study's time or trial budget ran out first")
        if self.errors:
            raise self.errors[0]

    def _abandon(self, why: str, running_too: bool = False) -> None:
        """Configs asked but never timed (and, when stopping, trials still RUNNING) become
        interrupted FAIL trials, so their configs stay untried for the next run."""
        with self.lock:
            for item in self.pending:
                mark_interrupted(self.study, item.trial, why)
            self.pending.clear()
            if running_too:
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    if t.number in self.numbers:
                        mark_interrupted(self.study, t, why)

    def _loop(self, worker: Worker, done: threading.Event) -> None:
        prepared = False
        try:
            while True:
                with self.lock:
                    item = self._next()
                if item is None:
                    return
                if not prepared:
                    # After the first configs are asked, so that they compile meanwhile.
                    self._prepare(worker)
                    prepared = True
                compile_outcome = self._wait_compiled(item)
                started = time.monotonic()
                if compile_outcome is not None and _compile_says_unlaunchable(compile_outcome):
                    outcome = compile_outcome
                else:
                    outcome = worker.run(self._task(item.trial), self.settings.trial_timeout)
                with self.lock:
                    self._record(item, outcome, worker, started, compile_outcome)
        except BaseException as exc:  # surfaces in run(); the other threads stop too
            self.errors.append(exc)
            self.stop.set()
        finally:
            done.set()

    def _prepare(self, worker: Worker) -> None:
        """The study's set-up on one timing worker (inputs, first launches, the check's
        references), timed apart from the trials; a failure here is left for the first trial
        to meet and record."""
        started = time.monotonic()
        task = self._task(None, prepare=True)
        worker.run(task, self.settings.trial_timeout)
        with self.lock:
            self.prepare_seconds = max(self.prepare_seconds, time.monotonic() - started)

    def _wait_compiled(self, item: _Pending) -> TrialOutcome | None:
        if item.compiled is None:
            return None
        try:
            return item.compiled.result(timeout=self.settings.trial_timeout + 60)
        except Exception:  # a lost compile worker: the timing worker compiles for itself
            return None

    # -- asking ----------------------------------------------------------------------------

    def _next(self) -> _Pending | None:
        """The next config to time: keep ``lookahead`` configs asked and compiling, then take
        one whose compile has finished (the oldest if none has)."""
        if self._stopping():
            return None
        while len(self.pending) < max(1, self.lookahead + 1):
            trial = self._ask()
            if trial is None:
                break
            future = self.compile_pool.submit(self._task(trial, compile_only=True)) if self.compile_pool else None
            self.pending.append(_Pending(trial, future, time.monotonic()))
        if not self.pending:
            return None
        ready = next((p for p in self.pending if p.compiled is None or p.compiled.done()), self.pending[0])
        self.pending.remove(ready)
        return ready

    def _stopping(self) -> bool:
        if self.stop.is_set():
            return True
        # Every study gets its turn: its first config runs even when the studies before it
        # overran their shares.
        return self.deadline is not None and time.monotonic() >= self.deadline and self.asked > 0

    def _ask(self) -> optuna.Trial | None:
        while True:
            if self._stopping() or self.asked >= self.budget:
                return None
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and self.cells.untried(trials) <= 0:
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
            self.asked += 1
            self.numbers.append(trial.number)
            set_trial_attrs(self.study, trial, {
                "host": self.host, "pid": os.getpid(), "run_id": self.run_id,
                "git_commit": self.env.get("git_commit"), "config": self._config(trial.params),
            })
            known = self.unlaunchable.reason(self.plan.key, trial.params) if self.unlaunchable else None
            if known is not None:
                # Failed to launch in an earlier study of this scope: recorded, not run again.
                set_trial_attrs(self.study, trial, {"status": "unlaunchable", "error": known})
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            return trial

    def _config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        # Every parameter named, so the backend's tuned-config files play no part in the timing.
        decode = self.plan.key.pass_ == "decode"
        space = self.backend.decode_config_space if decode else self.backend.config_space
        defaults = sampling.pass_defaults(self.backend, self.plan.key.pass_)
        config = {p.name: defaults.get(p.name, p.choices[0]) for p in space}
        config.update(defaults)
        config.update(params)
        return config

    def _task(self, trial: optuna.Trial | None, compile_only: bool = False, prepare: bool = False) -> dict[str, Any]:
        """The worker's task for ``trial``; with ``prepare``, the study's set-up (no trial, the
        default config)."""
        task = {
            "trial": None if trial is None else trial.number,
            "backend": self.backend.name,
            "case": asdict(self.plan.case),
            "mode": self.plan.key.pass_,
            "regime": self.settings.regime,
            "config": self._config({} if trial is None else trial.params),
            "input_seed": self.settings.input_seed,
            "check_case": asdict(self.plan.check_case) if self.plan.check_case else None,
        }
        if compile_only:
            return task
        best = sampling.best_checked_latency(self.study.get_trials(deepcopy=False))
        task.update(
            prepare=prepare,
            check_seed=self.settings.input_seed,
            check_regimes=list(dict.fromkeys([self.settings.regime, *CHECK_REGIMES])),
            measure_kwargs=dict(self.settings.measure_kwargs),
            check_kwargs=dict(self.settings.check_kwargs),
            check_below_ms=best,
            prune_above_ms=None if best is None or self.settings.prune_factor is None else best * self.settings.prune_factor,
        )
        return task

    # -- telling ---------------------------------------------------------------------------

    def _record(self, item: _Pending, outcome: TrialOutcome, worker: Worker, started: float,
                compile_outcome: TrialOutcome | None) -> None:
        trial, reply = item.trial, outcome.reply
        now = time.monotonic()
        attrs: dict[str, Any] = {
            "worker": worker.label,
            "gpu_seconds": now - started,
            "waited_for_compile_seconds": max(0.0, started - item.asked_at) if item.compiled is not None else 0.0,
            "finished_after_seconds": now - self.started_at,
        }
        if compile_outcome is not None and compile_outcome.reply.get("worker_seconds") is not None:
            attrs["compile_seconds"] = float(compile_outcome.reply["worker_seconds"])
        for name in ("latency_q20_ms", "latency_q80_ms", "kv_tbps", "implementation", "skipped_fraction", "worker_seconds",
                     "timing_seconds", "check_worst", "checked"):
            if reply.get(name) is not None:
                attrs[name] = jsonable(reply[name])
        value: float | None = None
        state = TrialState.FAIL
        if outcome.ok:
            value = float(reply["latency_ms"])
            attrs["latency_ms"] = value
            if "constraint" in reply:
                attrs["constraint"] = [float(reply["constraint"])]
            attrs["status"] = "ok" if reply.get("constraint", 0.0) <= 0 else "infeasible"
            state = TrialState.COMPLETE
        elif outcome.status == "pruned":
            value = float(reply["latency_ms"])
            attrs.update(latency_ms=value, status="pruned", error=str(reply.get("error") or ""))
            state = TrialState.PRUNED
        else:
            # A worker killed because the tuner is stopping says nothing about its config.
            interrupted = self.stop.is_set() and outcome.status in ("crashed", "timeout")
            if interrupted:
                attrs["interrupted"] = True
            attrs["status"] = "interrupted" if interrupted else outcome.status
            attrs["error"] = str(reply.get("error") or "")[:1500]
            if reply.get("traceback"):
                attrs["traceback"] = str(reply["traceback"])[-1500:]
            if not interrupted and self.unlaunchable is not None and is_resource_error(attrs["error"]):
                self.unlaunchable.add(self.plan.key, trial.params, attrs["error"].splitlines()[0] if attrs["error"] else "")
        try:
            set_trial_attrs(self.study, trial, attrs)
        finally:
            # The state is what resuming relies on: tell it even if an attribute failed to save.
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value)
            elif state == TrialState.PRUNED:
                trial.report(value, step=0)  # TPE ranks pruned trials by this value
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        trials = self.study.get_trials(deepcopy=False)
        done = frozen(self.study, trial)
        default = default_trial(real_trials(trials), self.plan.space, self.plan.default)
        default_ms = default.value if default is not None and default.state == TrialState.COMPLETE else None
        row = trial_row(done, self.plan, self.study.user_attrs, self.settings.regime, default_ms, default)
        self.reporter.trial_done(self.plan, done, sampling.best_checked_latency(trials), row)


def _compile_says_unlaunchable(outcome: TrialOutcome) -> bool:
    """A compile that failed for the config's own sake (too many resources, a rejected launch
    parameter): timing it would fail the same way, so the trial ends here."""
    if outcome.status != "error":
        return False
    text = str(outcome.reply.get("error") or "")
    return is_resource_error(text) or text.startswith("ValueError: config")
