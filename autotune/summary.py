"""What a study did, for the summary table and the tune results rows: its best config against
the default, how its trials ended, and how well its time was spent (trials per minute, the
median trial's time, how long until it came within 2% of its final best)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sbbench.autotune import sampler as sampling
from sbbench.autotune.plan import Plan
from sbbench.autotune.store import TuneKey
from sbbench.core.results import TuneRow, new_row
from sbbench.harness.cases import Case

# "Within 2% of the final best": the time-to-solution figure of each study.
NEAR_BEST = 1.02


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
    best_source: str | None
    trials_total: int
    trials_this_run: int
    failed: int
    pruned: int
    infeasible: int
    unchecked: int
    untried: int
    space_size: int
    seconds_total: float
    budget_s: float | None = None
    used_s: float | None = None
    trials_per_minute: float | None = None
    median_trial_s: float | None = None
    seconds_to_near_best: float | None = None
    prepare_s: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.default_latency_ms and self.best_latency_ms:
            return self.default_latency_ms / self.best_latency_ms
        return None

    def to_record(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = self.key.to_attrs()
        data["speedup"] = self.speedup
        return data


def trial_seconds(t: FrozenTrial) -> float:
    """The GPU worker's time on a trial (what a study's time budget pays for); the trial's
    duration for trials recorded without it."""
    if isinstance(t.user_attrs.get("gpu_seconds"), (int, float)):
        return float(t.user_attrs["gpu_seconds"])
    d = t.duration
    return d.total_seconds() if d is not None else 0.0


def real_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that ran: no duplicates, no queued, running or interrupted ones."""
    return [t for t in trials if t.state.is_finished() and not sampling.is_duplicate(t)
            and not sampling.is_interrupted(t)]


def default_trial(trials: Sequence[FrozenTrial], space: sampling.Space, default: Mapping[str, Any]) -> FrozenTrial | None:
    want = sampling.params_key(space, default)
    matches = [t for t in trials if not sampling.is_interrupted(t) and sampling.params_key(space, t.params) == want]
    return matches[0] if matches else None


def _best(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    value = sampling.best_checked_latency(trials)
    return next((t for t in trials if t.state == TrialState.COMPLETE and t.value == value), None) if value else None


def seconds_to_near_best(trials: Sequence[FrozenTrial], best_ms: float | None) -> float | None:
    """Wall seconds from the study's start in this run until a checked trial first came within
    2% of ``best_ms``."""
    if best_ms is None:
        return None
    hits = [t.user_attrs["finished_after_seconds"] for t in trials
            if t.state == TrialState.COMPLETE and t.value is not None and t.value <= NEAR_BEST * best_ms
            and sampling.is_feasible(t) and not sampling.is_unchecked(t)
            and isinstance(t.user_attrs.get("finished_after_seconds"), (int, float))]
    return min(hits) if hits else None


def summarize_study(study: optuna.Study, plan: Plan, run_numbers: Sequence[int], cells: sampling.Cells,
              budget_s: float | None = None, used_s: float | None = None,
              prepare_s: float | None = None) -> StudySummary:
    """The numbers of the summary table for one study."""
    trials = real_trials(study.get_trials(deepcopy=False))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = _best(trials)
    default = default_trial(trials, plan.space, plan.default)
    this_run = [t for t in trials if t.number in set(run_numbers)]
    seconds = [trial_seconds(t) for t in this_run]
    return StudySummary(
        key=plan.key, sampler=plan.sampler, study_name=plan.study_name, case=plan.case,
        default_params=dict(plan.default),
        default_latency_ms=default.value if default is not None and default.state == TrialState.COMPLETE else None,
        default_status=None if default is None else str(default.user_attrs.get("status", default.state.name.lower())),
        best_params=dict(best.params) if best else None,
        best_latency_ms=best.value if best else None,
        best_trial=best.number if best else None,
        best_source=None if best is None else ("default" if best.user_attrs.get("is_default")
                                               else best.user_attrs.get("warm_start") or plan.sampler),
        trials_total=len(trials),
        trials_this_run=len(this_run),
        failed=len([t for t in trials if t.state == TrialState.FAIL]),
        pruned=len([t for t in trials if t.state == TrialState.PRUNED]),
        infeasible=len([t for t in complete if not sampling.is_feasible(t)]),
        unchecked=len([t for t in complete if sampling.is_unchecked(t)]),
        untried=cells.untried(study.get_trials(deepcopy=False)),
        space_size=cells.size,
        seconds_total=sum(trial_seconds(t) for t in trials),
        budget_s=budget_s,
        used_s=used_s,
        trials_per_minute=len(this_run) / (used_s / 60.0) if used_s else None,
        median_trial_s=statistics.median(seconds) if seconds else None,
        seconds_to_near_best=seconds_to_near_best(this_run, best.value if best else None),
        prepare_s=prepare_s,
    )


def trial_rows(study: optuna.Study, plan: Plan, regime: str) -> list[TuneRow]:
    """One results-schema row per trial (command "tune"), for the tune results file and ``sbbench report``."""
    attrs = study.user_attrs
    trials = real_trials(study.get_trials(deepcopy=False))
    default = default_trial(trials, plan.space, plan.default)
    default_ms = default.value if default is not None and default.state == TrialState.COMPLETE else None
    return [trial_row(t, plan, attrs, regime, default_ms, default) for t in sorted(trials, key=lambda t: t.number)]


def trial_row(t: FrozenTrial, plan: Plan, study_attrs: Mapping[str, Any], regime: str, default_ms: float | None,
              default: FrozenTrial | None) -> TuneRow:
    ua = t.user_attrs
    latency = t.value if t.state == TrialState.COMPLETE else None
    status = str(ua.get("status") or ("ok" if t.state == TrialState.COMPLETE else "error"))
    measured = ua.get("latency_ms") if t.state == TrialState.PRUNED else latency
    return new_row(
        TuneRow, command="tune", device=plan.key.device, torch_version=study_attrs.get("torch_version"),
        triton_version=study_attrs.get("triton_version"), sbbench_version=study_attrs.get("sbbench_version"),
        git_commit=ua.get("git_commit"), backend=plan.key.backend, implementation=ua.get("implementation"),
        config=ua.get("config") or dict(t.params), **plan.case.columns(), mode=plan.key.pass_, regime=regime,
        status=status, error=ua.get("error"), latency_ms=measured,
        latency_q20_ms=ua.get("latency_q20_ms"), latency_q80_ms=ua.get("latency_q80_ms"),
        tflops=plan.case.flops(plan.key.pass_) / (latency * 1e-3) / 1e12 if latency and plan.key.pass_ != "decode" else None,
        speedup=default_ms / latency if default_ms and latency else None,
        skipped_fraction=ua.get("skipped_fraction"),
        passed=None if latency is None or ua.get("constraint") is None else sampling.is_feasible(t),
        # tune columns
        **{"pass": plan.key.pass_}, study=plan.study_name, sampler=plan.sampler, trial=t.number,
        params=dict(t.params), is_default=bool(ua.get("is_default")) or (default is not None and t.number == default.number),
        warm_start=ua.get("warm_start"), checked=ua.get("checked"),
        default_latency_ms=default_ms, constraint=(ua.get("constraint") or [None])[0],
        check_worst=ua.get("check_worst"), duration_s=trial_seconds(t), timing_s=ua.get("timing_seconds"),
        compile_s=ua.get("compile_seconds"), finished_after_s=ua.get("finished_after_seconds"),
        seqlen_bucket=plan.key.seqlen_bucket, gqa_group=plan.key.gqa_group, batch_bucket=plan.key.batch_bucket,
        kv_tbps=ua.get("kv_tbps") if latency else None,
        datetime_start=t.datetime_start.isoformat() if t.datetime_start else None,
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
        elif ua.get("checked") is False:
            text += " (slower than the best: not checked)"
    elif trial.state == TrialState.PRUNED:
        text = f"pruned after one run: {ua.get('latency_ms', float('nan')):.4g} ms"
    else:
        text = f"{status}: {(str(ua.get('error') or '').splitlines() or [''])[0][:160]}"
    tag = " (default)" if ua.get("is_default") else (f" (from {ua['warm_start']})" if ua.get("warm_start") else "")
    return f"trial {trial.number}{tag} [{params}]: {text}"
