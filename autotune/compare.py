"""TPE against the exhaustive grid for one key: how much of the grid's time TPE needed to come
within 2% of the grid's best config (both studies over the same space, in one storage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from sbbench.autotune import sampler as sampling
from sbbench.autotune.store import TuneKey, list_studies, open_storage
from sbbench.autotune.studies import jsonable
from sbbench.autotune.summary import NEAR_BEST, real_trials, trial_seconds


@dataclass
class TpeGridComparison:
    """How long TPE took to come within 2% of the grid's best, for one key."""

    key: TuneKey
    grid_best_ms: float | None
    grid_best_params: dict[str, Any] | None
    grid_trials: int
    grid_cells: int
    grid_seconds: float
    tpe_trials_total: int
    tpe_trials_needed: int | None
    tpe_seconds_needed: float | None
    tpe_hit_trial: int | None
    tpe_hit_ms: float | None
    tpe_hit_params: dict[str, Any] | None

    @property
    def grid_complete(self) -> bool:
        return self.grid_trials >= self.grid_cells

    @property
    def time_fraction(self) -> float | None:
        """TPE's time to within 2% as a fraction of the grid's whole time."""
        if self.tpe_seconds_needed is None or not self.grid_seconds:
            return None
        return self.tpe_seconds_needed / self.grid_seconds


def wall_seconds(trials: Sequence[FrozenTrial]) -> float:
    """A study's elapsed time: when its last trial finished, counted from the study's start in
    the run (trials recorded without that time add their durations instead)."""
    stamps = [t.user_attrs.get("finished_after_seconds") for t in trials]
    if stamps and all(isinstance(s, (int, float)) for s in stamps):
        return float(max(stamps))
    return sum(trial_seconds(t) for t in trials)


def compare_tpe_grid(storage: Any, key: TuneKey, space: sampling.Space | None = None) -> TpeGridComparison | None:
    """TPE against the grid for one key (over the same space, ``space`` or the grid's), when
    both studies exist: the grid's best checked latency and its wall time, and how many TPE
    trials and wall seconds it took TPE to come within 2% of that best."""
    if isinstance(storage, str):
        storage = open_storage(storage)
    found: dict[str, list[Any]] = {"tpe": [], "grid": []}
    for s in list_studies(storage, key.backend):
        if s.key == key and s.sampler in found:
            found[s.sampler].append(s)
    want = None if space is None else jsonable({n: list(c) for n, c in space.items()})
    pairs = [(g, t) for g in found["grid"] for t in found["tpe"]
             if g.attrs.get("space") == t.attrs.get("space") and (want is None or g.attrs.get("space") == want)]
    if not pairs:
        return None
    grid_s, tpe_s = pairs[0]
    grid = optuna.load_study(study_name=grid_s.name, storage=storage)
    tpe = optuna.load_study(study_name=tpe_s.name, storage=storage)
    grid_space = {n: tuple(c) for n, c in (grid_s.attrs.get("space") or {}).items()}
    grid_trials = real_trials(grid.get_trials(deepcopy=False))
    grid_best = sampling.best_checked_latency(grid_trials)
    grid_best_trial = next((t for t in grid_trials if t.state == TrialState.COMPLETE and t.value == grid_best), None)
    tpe_trials = sorted(real_trials(tpe.get_trials(deepcopy=False)),
                        key=lambda t: (t.user_attrs.get("finished_after_seconds") or 0.0, t.number))
    needed = seconds = hit_trial = hit_ms = hit_params = None
    if grid_best is not None:
        for count, t in enumerate(tpe_trials, start=1):
            if (t.state == TrialState.COMPLETE and sampling.is_feasible(t) and not sampling.is_unchecked(t)
                    and t.value is not None and t.value <= NEAR_BEST * grid_best):
                needed, hit_trial, hit_ms, hit_params = count, t.number, t.value, dict(t.params)
                seconds = wall_seconds(tpe_trials[:count])
                break
    return TpeGridComparison(
        key=key, grid_best_ms=grid_best, grid_best_params=dict(grid_best_trial.params) if grid_best_trial else None,
        grid_trials=len(grid_trials),
        grid_cells=int(grid_s.attrs.get("admissible_cells") or (sampling.space_size(grid_space) if grid_space
                                                               else len(grid_trials))),
        grid_seconds=wall_seconds(grid_trials), tpe_trials_total=len(tpe_trials),
        tpe_trials_needed=needed, tpe_seconds_needed=seconds, tpe_hit_trial=hit_trial, tpe_hit_ms=hit_ms,
        tpe_hit_params=hit_params,
    )
