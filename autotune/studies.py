"""The tuner's side of the Optuna storage: opening, resuming and refusing studies, queueing the
configs a study starts from, and cleaning up after a stopped tuner.

Optuna's public API cannot set an attribute on a trial that has already been told, nor read
one trial by id; the tuner needs both (a trial stopped mid-run is marked ``interrupted`` after
the fact). Every such use of the storage's private API goes through :func:`_trial_storage`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict
from typing import Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from sbbench.autotune import sampler as sampling
from sbbench.autotune.plan import Plan, TuneError, TuneSettings, space_tag
from sbbench.autotune.store import STUDY_SCHEMA, study_lock


def _trial_storage(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> tuple[Any, int]:
    """The study's storage and the trial's id in it (Optuna private API)."""
    return study._storage, trial._trial_id


def set_trial_attrs(study: optuna.Study, trial: optuna.Trial | FrozenTrial, attrs: Mapping[str, Any]) -> None:
    """Set user attributes on a trial in any state."""
    storage, trial_id = _trial_storage(study, trial)
    for name, value in attrs.items():
        storage.set_trial_user_attr(trial_id, name, value)


def frozen(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> FrozenTrial:
    """The stored state of one trial."""
    storage, trial_id = _trial_storage(study, trial)
    return storage.get_trial(trial_id)


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def study_exists(storage: Any, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def study_attrs(plan: Plan, settings: TuneSettings, env: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "sbbench_schema": STUDY_SCHEMA,
        "key": plan.key.to_attrs(),
        "sampler": plan.sampler,
        "case": asdict(plan.case),
        "check_case": asdict(plan.check_case) if plan.check_case else None,
        "checked": plan.check_case is not None,
        "regime": settings.regime,
        "space": {name: list(choices) for name, choices in plan.space.items()},
        "default_params": plan.default,
        "torch_version": env.get("torch_version"),
        "triton_version": env.get("triton_version"),
        "sbbench_version": env.get("sbbench_version"),
        "compute_capability": env.get("compute_capability"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# What a study must keep to stay comparable, and the setting a user changes to alter it.
_MUST_MATCH = {
    "case": "cases",
    "regime": "regime",
    "space": "space",
    "torch_version": "torch_version",
    "triton_version": "triton_version",
}


def _conflict(plan: Plan, have: Mapping[str, Any], wanted: Mapping[str, Any]) -> TuneError | None:
    for attr, argument in _MUST_MATCH.items():
        if have.get(attr) != wanted[attr]:
            return TuneError(argument, f"study {plan.study_name!r} in this storage was tuned with {attr} "
                             f"{have.get(attr)!r}, this run has {wanted[attr]!r}; trials would not be comparable. "
                             "Use another storage (or delete that study) to tune afresh.")
    return None


def resolve_study(storage: Any, plan: Plan, settings: TuneSettings, env: Mapping[str, Any]) -> str | None:
    """Before anything runs: give ``plan`` a study of its own if the backend's space changed
    since its study began (returns a note saying so), and refuse a study begun on another case,
    regime or versions."""
    with study_lock(storage):
        return _resolve_study(storage, plan, settings, env)


def _resolve_study(storage: Any, plan: Plan, settings: TuneSettings, env: Mapping[str, Any]) -> str | None:
    if not study_exists(storage, plan.study_name):
        return None
    wanted = jsonable(study_attrs(plan, settings, env))
    have = storage.get_study_user_attrs(storage.get_study_id_from_name(plan.study_name))
    note = None
    if have.get("space") is not None and have.get("space") != wanted["space"]:
        # New or removed choices: the old study's trials stay where they are (export still
        # sees them) and this space gets a study of its own.
        plan.study_name = plan.study_name + "-" + space_tag(plan.space)
        note = (f"the config space of {plan.key.backend} changed since {plan.key.study_name(plan.sampler)} "
                f"began; tuning in {plan.study_name}")
        if not study_exists(storage, plan.study_name):
            return note
        have = storage.get_study_user_attrs(storage.get_study_id_from_name(plan.study_name))
    if have:
        problem = _conflict(plan, have, wanted)
        if problem:
            raise problem
    return note


def open_study(storage: Any, plan: Plan, settings: TuneSettings, env: Mapping[str, Any],
               sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """``plan``'s study, begun with this run's settings if new; refused (``TuneError``) if
    another tuner began it a moment ago with other settings."""
    with study_lock(storage):
        study = optuna.create_study(
            storage=storage, study_name=plan.study_name, direction="minimize", sampler=sampler, load_if_exists=True
        )
        wanted = jsonable(study_attrs(plan, settings, env))
        have = study.user_attrs
        if not have:
            for name, value in wanted.items():
                study.set_user_attr(name, value)
            return study
    problem = _conflict(plan, have, wanted)
    if problem:
        raise problem
    return study


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_interrupted(study: optuna.Study, trial: optuna.Trial | FrozenTrial, why: str) -> None:
    """End a trial that measured nothing as an interrupted FAIL: its config counts as untried."""
    set_trial_attrs(study, trial, {"interrupted": True, "status": "interrupted", "error": why})
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


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
            mark_interrupted(study, t, "the tuner running this trial stopped")
            reaped += 1
    return reaped


def enqueue_start(study: optuna.Study, plan: Plan) -> int:
    """Queue the configs a study tries before it searches: the default, then the warm-start
    configs, each unless the study already ran, runs or queues it. Returns how many were queued."""
    taken = sampling.taken_keys(plan.space, study.get_trials(deepcopy=False))
    queued = 0
    starts = [(dict(plan.default), {"is_default": True})]
    starts += [(w.params, {"warm_start": w.source}) for w in plan.warm_start]
    for params, attrs in starts:
        cell = sampling.params_key(plan.space, params)
        if cell in taken:
            continue
        taken.add(cell)
        study.enqueue_trial(params, user_attrs=attrs)
        queued += 1
    return queued
