"""Search spaces and the sampler that never repeats a tried config.

A backend's config space is small and categorical (block sizes, warps, stages, skip_log2), and a
trial costs seconds of GPU time, so the tuner must never pay twice for the same config: not
after a restart (a resumed TPE with the same seed would replay its random start-up draws), not
when TPE's model keeps pointing at the best cell, and not in the grid. :class:`DedupSampler`
wraps a model (TPE) and falls back to a random *untried* cell whenever the model proposes a
config the study has already run, is running or has queued.

The ``grid`` sampler is the same wrapper with no model: every trial draws a random untried cell,
which is what Optuna's ``GridSampler`` does, except that it also honours the enqueued default
config, retries cells whose trial was interrupted by killing the tuner, and does not call
``study.stop()`` (which raises outside ``study.optimize``) when the grid is exhausted.

Trials are classified through their user attributes, which the tuner sets:
``interrupted`` (the tuner was stopped mid-trial: the cell counts as untried) and ``duplicate_of``
(a proposal that raced with another tuner and was not run).
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from sbbench.core.errors import ArgumentError
from sbbench.core.registry import Backend

Space = dict[str, tuple[Any, ...]]
ParamsKey = tuple[Any, ...]
# Whether a config (this pass's parameters) is worth launching at all; see Backend.launch_filter.
Admissible = Callable[[Mapping[str, Any]], bool]
# Spaces up to this many cells are enumerated (and filtered) once; larger ones are sampled.
ENUMERATE_MAX = 200_000


def pass_defaults(backend: Backend, pass_: str) -> Mapping[str, Any]:
    """The default config of the entry point that runs ``pass_`` (the decode entry point's for
    ``decode``, else the backend's)."""
    return backend.decode_default_config if pass_ == "decode" else backend.default_config


def pass_space(backend: Backend, pass_: str) -> Space:
    """The choices of each parameter of one pass; the default value is always a choice, so the
    default config can be enqueued as a trial like any other."""
    space: Space = {}
    defaults = pass_defaults(backend, pass_)
    for param in backend.params(pass_):  # type: ignore[arg-type]
        choices = tuple(param.choices)
        default = defaults.get(param.name, choices[0] if choices else None)
        if default not in choices:
            choices = choices + (default,)
        space[param.name] = choices
    return space


def default_params(backend: Backend, space: Space, pass_: str = "fwd") -> dict[str, Any]:
    """The backend's default config within ``space``: a space restricted to exclude a default
    value (``space={"bwd_dkdv_BLOCK_N": [128]}``) starts from its first choice instead, as a trial
    outside the space's choices could not be told to the sampler."""
    params = {}
    defaults = pass_defaults(backend, pass_)
    for name, choices in space.items():
        default = defaults.get(name, choices[0])
        params[name] = default if default in choices else choices[0]
    return params


def space_size(space: Space) -> int:
    return math.prod(len(c) for c in space.values())


def distributions(space: Space) -> dict[str, BaseDistribution]:
    return {name: CategoricalDistribution(list(choices)) for name, choices in space.items()}


def params_key(space: Space, params: Mapping[str, Any]) -> ParamsKey:
    return tuple(params.get(name) for name in sorted(space))


def trial_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's params; a queued trial's come from its fixed params."""
    if trial.state == TrialState.WAITING:
        return dict(trial.system_attrs.get("fixed_params", {}))
    return dict(trial.params)


def is_duplicate(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get("duplicate_of") is not None


def is_interrupted(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get("interrupted"))


def counts_as_tried(trial: FrozenTrial) -> bool:
    """Whether a trial's config must not be run again."""
    if trial.state == TrialState.FAIL:
        return not is_interrupted(trial)
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def taken_keys(space: Space, trials: Iterable[FrozenTrial], exclude_number: int | None = None) -> set[ParamsKey]:
    return {
        params_key(space, trial_params(t))
        for t in trials
        if t.number != exclude_number and counts_as_tried(t)
    }


class Cells:
    """The cells of a space worth trying: every combination of choices that ``admissible``
    accepts (all of them without a filter). Enumerated once when the space is small enough."""

    def __init__(self, space: Space, admissible: Admissible | None = None) -> None:
        self.space = dict(space)
        self.names = sorted(space)
        self.admissible = admissible
        self._listed: list[ParamsKey] | None = None
        if space_size(space) <= ENUMERATE_MAX:
            every = itertools.product(*(space[n] for n in self.names))
            self._listed = [c for c in every if self._ok(c)]

    def _ok(self, cell: ParamsKey) -> bool:
        return self.admissible is None or bool(self.admissible(dict(zip(self.names, cell))))

    def allows(self, params: Mapping[str, Any]) -> bool:
        cell = params_key(self.space, params)
        return _in_space(self.space, cell) and self._ok(cell)

    @property
    def size(self) -> int:
        """How many cells may be tried (the filtered count for an enumerated space)."""
        return len(self._listed) if self._listed is not None else space_size(self.space)

    def untried(self, trials: Iterable[FrozenTrial]) -> int:
        taken = {k for k in taken_keys(self.space, trials) if _in_space(self.space, k) and self._ok(k)}
        return self.size - len(taken)

    def random_untried(self, taken: set[ParamsKey], rng: random.Random) -> dict[str, Any] | None:
        """A uniformly random admissible cell not in ``taken``, or None when none is left."""
        if self._listed is not None:
            free = [cell for cell in self._listed if cell not in taken]
            return dict(zip(self.names, rng.choice(free))) if free else None
        # A huge space is never exhausted by a tuning run: rejection sampling finds a free cell.
        for _ in range(10_000):
            cell = tuple(rng.choice(self.space[n]) for n in self.names)
            if cell not in taken and self._ok(cell):
                return dict(zip(self.names, cell))
        return None


def _in_space(space: Space, key: ParamsKey) -> bool:
    return all(v in space[name] for name, v in zip(sorted(space), key))


def constraint_of(trial: FrozenTrial) -> Sequence[float]:
    """``constraints_func`` for Optuna: the value the tuner stored in ``user_attrs['constraint']``
    (err/budget - 1 of the worst tensor; <= 0 is within the numerics budget)."""
    value = trial.user_attrs.get("constraint")
    if value is None:
        return (0.0,)  # not checked (--no-check): feasible as far as anyone knows
    return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in constraint_of(trial))


def best_checked_latency(trials: Iterable[FrozenTrial]) -> float | None:
    """The fastest complete trial within the numerics budget whose numerics were checked (or
    ran with checking off): what a new config must beat."""
    values = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None
              and is_feasible(t) and not is_unchecked(t)]
    return min(values) if values else None


def is_unchecked(trial: FrozenTrial) -> bool:
    """A trial whose numerics were not checked because it was slower than the study's best
    checked config when it ran: it may guide the search, never be exported."""
    return trial.user_attrs.get("checked") is False


def neighbours(space: Space, params: Mapping[str, Any], changes: int) -> list[dict[str, Any]]:
    """Configs that differ from ``params`` in ``changes`` parameters, each moved to a choice
    next to its own (choices are declared in order: tiles, warps, stages ascending)."""
    steps: dict[str, list[Any]] = {}
    for name, choices in space.items():
        if params.get(name) in choices:
            i = choices.index(params[name])
            steps[name] = [choices[j] for j in (i - 1, i + 1) if 0 <= j < len(choices)]
    found = []
    for names in itertools.combinations(sorted(steps), changes):
        for values in itertools.product(*(steps[n] for n in names)):
            moved = dict(params)
            moved.update(zip(names, values))
            found.append(moved)
    return found


class DedupSampler(BaseSampler):
    """Proposes only configs the study has not tried, running or queued.

    ``inner`` is the model (TPE) or None for the exhaustive grid. Every parameter is sampled
    jointly through ``sample_relative`` over the whole space (it is known up front), so a
    complete proposal can be checked against the study before the trial starts.

    With a model, from trial number ``local_after`` on, every other proposal is a local move
    instead: the best checked config so far with one parameter (else two) moved to a neighbouring
    choice (TPE's proposal when nothing has been checked yet). Launch parameters interact little beyond their neighbours, so refining the
    incumbent finds in a few trials what TPE's density model, spread over a space of tens of
    thousands of configs, takes many to find.
    """

    def __init__(self, space: Space, inner: BaseSampler | None, seed: int | None = None, retries: int = 16,
                 cells: Cells | None = None, local_after: int | None = None) -> None:
        self._space = dict(space)
        self._cells = cells if cells is not None else Cells(space)
        self._dists = distributions(space)
        self._inner = inner
        self._rng = random.Random(seed)
        self._retries = retries
        self._local_after = local_after

    def _local_move(self, trials: Sequence[FrozenTrial], taken: set[ParamsKey]) -> dict[str, Any] | None:
        best = best_checked_latency(trials)
        incumbent = next((t for t in trials if t.state == TrialState.COMPLETE and t.value == best), None)
        if incumbent is None:
            return None
        for changes in (1, 2):
            moves = neighbours(self._space, trial_params(incumbent), changes)
            self._rng.shuffle(moves)
            for move in moves:
                if params_key(self._space, move) not in taken and self._cells.allows(move):
                    return move
        return None

    @property
    def inner(self) -> BaseSampler | None:
        return self._inner

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._dists)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if "fixed_params" in trial.system_attrs:
            return {}  # an enqueued trial (the default config): its params are given
        trials = study.get_trials(deepcopy=False)
        taken = taken_keys(self._space, trials, exclude_number=trial.number)
        if self._inner is not None:
            # Counted in trials asked, not finished: with configs compiled ahead, results arrive
            # several trials late, and waiting for them would postpone every local move.
            if self._local_after is not None and trial.number >= self._local_after and trial.number % 2 == 0:
                move = self._local_move(trials, taken)
                if move is not None:
                    return move
            for _ in range(self._retries):
                proposal = self._inner.sample_relative(study, trial, search_space)
                if set(proposal) != set(self._space):
                    break  # the model is still in its random start-up phase
                if params_key(self._space, proposal) not in taken and self._cells.allows(proposal):
                    return proposal
        cell = self._cells.random_untried(taken, self._rng)
        # None: the space is exhausted; the tuner notices before asking, except in a race with
        # another tuner, where it marks the repeat as a duplicate instead of running it.
        return cell if cell is not None else {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if self._inner is not None:
            return self._inner.sample_independent(study, trial, param_name, param_distribution)
        choices = self._space.get(param_name) or tuple(param_distribution.choices)  # type: ignore[attr-defined]
        return self._rng.choice(choices)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._inner is not None:
            self._inner.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        if self._inner is not None:
            self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._rng.seed()
        if self._inner is not None:
            self._inner.reseed_rng()


def make_sampler(kind: str, space: Space, seed: int, startup_trials: int = 10, cells: Cells | None = None) -> DedupSampler:
    """``tpe``: multivariate TPE that treats trials outside the numerics budget as infeasible,
    alternating with local moves around the best config from trial ``startup_trials`` on;
    ``grid``: every cell once, in random order. Both propose only ``cells`` (default: all)."""
    if kind == "grid":
        return DedupSampler(space, None, seed=seed, cells=cells)
    if kind != "tpe":
        raise ArgumentError("kind", f"expected tpe or grid, got {kind!r}")
    with warnings.catch_warnings():
        # Optuna 5 prefers Trial.set_constraint and warns about constraints_func; the value kept in
        # user_attrs is what export and the summaries read too, so it stays the one place.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            multivariate=True, constraints_func=constraint_of, seed=seed, n_startup_trials=startup_trials
        )
    return DedupSampler(space, tpe, seed=seed, cells=cells, local_after=startup_trials)

