"""What a tuning run will do before anything runs: its settings, one study per key and pass, the
space each study searches, the configs it starts from, and how much of the time budget it gets.

The ``decode`` pass tunes a backend's decode entry point (``sb_attn_with_kvcache``): each case
becomes a :class:`~sbbench.harness.decode.DecodeCase` (its seqlen the cache length, with
``TuneSettings.new_tokens`` queries per sequence), keyed by batch and cache-length bucket.

Nothing here touches a GPU or the study storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from sbbench.autotune import sampler as sampling
from sbbench.autotune.store import SAMPLERS, TuneKey
from sbbench.core.errors import ArgumentError
from sbbench.core.registry import Backend
from sbbench.core.tuned import config_key
from sbbench.harness.cases import Case
from sbbench.harness.decode import DecodeCase

DEFAULT_TPE_TRIALS = 30
# A trial whose first timed run is this many times slower than the study's best so far is cut
# there: at 2x it cannot become the best, and timing it to the end would cost more than the
# best config's whole trial.
DEFAULT_PRUNE_FACTOR = 2.0
# Share of a run's time budget per pass, in proportion to the pass's share of a training step
# (causal attention's backward does 2.5x the forward's FLOPs), so the pass that costs users
# most gets most of the search.
PASS_WEIGHT = {"fwd": 1.0, "bwd": 2.5, "decode": 1.0}
# Besides the timing regime, a config's numerics are checked where block skipping happens, so a
# skip threshold that breaks the budget cannot pass on data where nothing is skipped.
CHECK_REGIMES = ("mixed",)


class TuneError(ArgumentError):
    """A tuning run that cannot start. ``argument`` names the setting at fault (a
    :class:`TuneSettings` field, or ``space`` for one of its entries); the CLI renders it as
    its flag."""


@dataclass
class TuneSettings:
    """Everything one ``sbbench tune`` run needs. ``n_trials`` counts per study; ``time_budget_s``
    bounds the whole run and is shared among its studies (see :func:`budget_shares`)."""

    backend: str
    cases: Sequence[Case]
    passes: Sequence[str] = ("fwd", "bwd")
    # Trials are timed on this regime; "dense" skips nothing, the worst case, so a tuned config
    # is never slower there than the default. The numerics check also runs on CHECK_REGIMES.
    regime: str = "dense"
    sampler: str = "tpe"
    n_trials: int | None = None  # None: 30 for TPE, the whole space for the grid
    time_budget_s: float | None = None
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
    new_tokens: int = 1  # decode: queries per sequence (Tq)
    measure_kwargs: Mapping[str, Any] = field(default_factory=dict)
    check_kwargs: Mapping[str, Any] = field(default_factory=dict)
    worker_startup_timeout: float = 600.0
    # Without a GPU: how many CPU workers share the studies (tests exercise the several-GPU path
    # this way; for real CPU timings keep 1, since workers would compete for the cores).
    cpu_workers: int = 1
    # Restrict parameters to some of their choices (the default value always stays in, so the
    # default config is still measured): a smaller space for the TPE-vs-grid comparison.
    space: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    # Start each new study from the tuned configs of other GPUs of the same architecture.
    warm_start: bool = True
    # Processes compiling upcoming configs while the GPU times the current one. None: the host's
    # cores less two, at most 8, on a GPU; none on the CPU, where there is nothing to compile.
    compile_workers: int | None = None
    prune_factor: float | None = DEFAULT_PRUNE_FACTOR

    def validate(self) -> None:
        """Raise :class:`TuneError` naming the first bad setting."""
        if self.sampler not in SAMPLERS:
            raise TuneError("sampler", f"expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if not self.passes or any(p not in PASS_WEIGHT for p in self.passes):
            raise TuneError("passes", f"expected fwd, bwd, both or decode, got {list(self.passes)}")
        if isinstance(self.new_tokens, bool) or not isinstance(self.new_tokens, int) or self.new_tokens < 1:
            raise TuneError("new_tokens", f"expected a positive int, got {self.new_tokens!r}")
        positive = {"n_trials": self.n_trials, "time_budget_s": self.time_budget_s,
                    "trial_timeout": self.trial_timeout, "check_seqlen": self.check_seqlen}
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise TuneError(name, f"expected a positive number, got {value}")
        if self.startup_trials < 0:
            raise TuneError("startup_trials", f"expected 0 or more, got {self.startup_trials}")
        if self.compile_workers is not None and self.compile_workers < 0:
            raise TuneError("compile_workers", f"expected 0 or more, got {self.compile_workers}")
        if self.prune_factor is not None and not self.prune_factor > 1.0:
            raise TuneError("prune_factor", f"expected a number above 1 (or None: never cut), got {self.prune_factor}")
        if not self.cases:
            raise TuneError("cases", "no case to tune")


@dataclass
class Plan:
    """One study to run: its key, the case it is timed on, the space of its pass, and the configs
    it tries before searching (the default first, then other GPUs' tuned configs)."""

    key: TuneKey
    sampler: str
    case: Case | DecodeCase  # DecodeCase for the decode pass
    check_case: Case | DecodeCase | None
    space: sampling.Space
    default: dict[str, Any]
    # The backend's whole space for this pass: a study over less gets a name of its own.
    full_space: sampling.Space = field(default_factory=dict)
    study_name: str = ""
    warm_start: list["WarmStart"] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.study_name:
            self.study_name = self.key.study_name(self.sampler)
            if self.full_space and _space_json(self.space) != _space_json(self.full_space):
                self.study_name += "-" + space_tag(self.space)

    @property
    def weight(self) -> float:
        return PASS_WEIGHT[self.key.pass_]


@dataclass(frozen=True)
class WarmStart:
    """A config a study tries before it searches, and where it came from."""

    params: dict[str, Any]
    source: str


def _space_json(space: Mapping[str, Sequence[Any]]) -> str:
    return json.dumps({name: list(choices) for name, choices in sorted(space.items())}, default=str)


def space_tag(space: Mapping[str, Sequence[Any]]) -> str:
    """A short stable name for a search space (studies over different spaces never mix)."""
    return "s" + hashlib.sha1(_space_json(space).encode()).hexdigest()[:8]


_MISSING = object()


def restrict_space(backend: Backend, full: sampling.Space, wanted: Mapping[str, Sequence[Any]],
                   pass_: str = "fwd") -> sampling.Space:
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
                raise TuneError("space", f"{value!r} is not a choice of {name} (choices: "
                                f"{', '.join(str(c) for c in full[name])})")
            if match not in picked:
                picked.append(match)
        default = sampling.pass_defaults(backend, pass_).get(name, full[name][0])
        if default not in picked:
            picked.append(default)
        space[name] = tuple(c for c in full[name] if c in picked)
    return space


def problem_for(case: Case, device_type: str):
    from sbbench.core.problem import AttnProblem

    return AttnProblem(
        batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, seqlen=case.seqlen, head_dim=case.head_dim,
        dtype=case.torch_dtype, device_type=device_type, attend_current=case.attend_current,
        inv_temp=1.0 / math.sqrt(case.head_dim),
    )


def decode_problem_for(case: DecodeCase, device_type: str):
    """The ``DecodeProblem`` of the harness's inputs for ``case`` (a cache of exactly the slots
    the queries need), built from the shapes alone."""
    from sbbench.core.decode_problem import DecodeProblem

    return DecodeProblem(
        batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, seqlen=case.cache_len + case.new_tokens,
        head_dim=case.head_dim, dtype=case.torch_dtype, device_type=device_type, attend_current=case.attend_current,
        inv_temp=1.0 / math.sqrt(case.head_dim), new_tokens=case.new_tokens, cache_capacity=case.capacity,
    )


# The decode oracle is linear in the cache length (one row of keys per query), so its check
# can afford caches this many times check_seqlen: enough splits and tiles for the merge and
# block skipping of the tuned config to matter.
DECODE_CHECK_SCALE = 8


def decode_check_case_for(case: DecodeCase, check_seqlen: int) -> DecodeCase:
    """The decode case the numerics budget is checked on: the tuned case's dtype, head dim, GQA
    group, Tq and attend_current, with at most two sequences and two kv heads and a cache of
    at most ``DECODE_CHECK_SCALE * check_seqlen`` tokens."""
    group = case.heads // case.kv_heads
    kv = min(case.kv_heads, 2)
    return dataclasses.replace(case, batch=min(case.batch, 2), heads=kv * group, kv_heads=kv,
                               cache_len=min(case.cache_len, DECODE_CHECK_SCALE * check_seqlen))


def check_case_for(case: Case, check_seqlen: int) -> Case:
    """The case the numerics budget is checked on: the tuned case's dtype, head dim, GQA group
    and attend_current, but short and narrow, because the float64 oracle is O(T^2) in memory
    (B=4, H=12, T=16384 would need ~100 GB per T x T tensor)."""
    group = case.heads // case.kv_heads
    kv = min(case.kv_heads, 2)
    return Case(batch=1, heads=kv * group, kv_heads=kv, seqlen=min(case.seqlen, check_seqlen),
                head_dim=case.head_dim, dtype=case.dtype, attend_current=case.attend_current)


def case_text(case: Case | DecodeCase) -> str:
    ac = " attend_current" if case.attend_current else ""
    tq = f" Tq={case.new_tokens}" if isinstance(case, DecodeCase) else ""
    return f"B={case.batch} H={case.heads} Hkv={case.kv_heads} T={case.seqlen}{tq} D={case.head_dim} {case.dtype}{ac}"


def _study_case(backend: Backend, case: Case, pass_: str, settings: TuneSettings, device_type: str):
    """(the case a study of ``pass_`` times, its config key, why it cannot run or None)."""
    if pass_ == "decode":
        timed: Case | DecodeCase = DecodeCase(
            batch=case.batch, heads=case.heads, kv_heads=case.kv_heads, cache_len=case.seqlen,
            head_dim=case.head_dim, new_tokens=settings.new_tokens, dtype=case.dtype,
            attend_current=case.attend_current,
        )
        problem = decode_problem_for(timed, device_type)
        return timed, config_key(problem, pass_), backend.decode_unsupported_reason(problem)
    problem = problem_for(case, device_type)
    return case, config_key(problem, pass_), backend.unsupported_reason(problem)


# The tuned configs of other GPUs of the same architecture for one key.
SiblingLookup = Callable[[TuneKey, "Case | DecodeCase"], list[WarmStart]]


def plan_studies(
    backend: Backend, settings: TuneSettings, device: str, device_type: str,
    siblings: SiblingLookup | None = None,
) -> tuple[list[Plan], list[str]]:
    """The studies of a run (one per key and pass, first case of each key wins), most valuable
    first, and notes on cases that were left out."""
    plans: list[Plan] = []
    notes: list[str] = []
    seen: dict[str, Case | DecodeCase] = {}
    for pass_ in settings.passes:
        full = sampling.pass_space(backend, pass_)
        space = restrict_space(backend, full, settings.space, pass_)
        if not space:
            notes.append(f"{backend.name} has no {pass_} parameters: pass {pass_} not tuned")
            continue
        for case in settings.cases:
            if case.varlen:
                notes.append(f"{case_text(case)}: packed varlen cases are not tuned (the key has no varlen)")
                continue
            timed, k, reason = _study_case(backend, case, pass_, settings, device_type)
            if reason is not None:
                notes.append(f"{case_text(timed)}: {backend.name} cannot run it here ({reason})")
                continue
            key = TuneKey(device=device, backend=backend.name, pass_=pass_, dtype=k["dtype"], head_dim=k["head_dim"],
                          gqa_group=k["gqa_group"], attend_current=k["attend_current"], seqlen_bucket=k["seqlen_bucket"],
                          batch_bucket=k.get("batch_bucket"))
            name = key.study_name(settings.sampler) + space_tag(space)
            if name in seen:
                batch = "" if key.batch_bucket is None else f"batch bucket {key.batch_bucket}, "
                notes.append(f"{case_text(timed)}: same key as {case_text(seen[name])} ({batch}seqlen bucket "
                             f"{key.seqlen_bucket}); tuned once")
                continue
            seen[name] = timed
            check_case = None
            if settings.check:
                check_case = (decode_check_case_for(timed, settings.check_seqlen) if pass_ == "decode"
                              else check_case_for(timed, settings.check_seqlen))
            plan = Plan(key, settings.sampler, timed, check_case, space,
                        sampling.default_params(backend, space, pass_), full_space=full)
            if settings.warm_start and siblings is not None:
                plan.warm_start = _warm_configs(plan, siblings(key, timed))
            plans.append(plan)
    # The backward first: with a budget too small for everything, the pass that costs a
    # training step most is the one that must not go untuned.
    plans.sort(key=lambda p: -p.weight)
    return plans, notes


def _warm_configs(plan: Plan, found: Sequence[WarmStart]) -> list[WarmStart]:
    """Other GPUs' configs of this key cut to this study's space, without repeats or the default."""
    taken = {sampling.params_key(plan.space, plan.default)}
    kept = []
    for warm in found:
        params = dict(plan.default)
        params.update({name: value for name, value in warm.params.items() if name in plan.space})
        if any(params[name] not in choices for name, choices in plan.space.items()):
            continue  # a value this run's space does not offer
        cell = sampling.params_key(plan.space, params)
        if cell not in taken:
            taken.add(cell)
            kept.append(WarmStart(params, warm.source))
    return kept


def search_pace(cells: int, startup_trials: int, compile_workers: int) -> tuple[int, int]:
    """(random start-up trials, configs asked ahead of the GPU) for a space of ``cells`` configs.

    Both delay the search's feedback: start-up trials are drawn blind, and a config asked ahead
    is chosen before the results of the ones in flight. In a space of tens of thousands of
    configs neither matters; in a small one (a restricted space of a few dozen) ten blind draws
    and eight in flight would spend a fifth of the space before the model or the local moves
    see a result. So both shrink with the space: a tenth of it for the start-up (at least 2), a
    twelfth for the look-ahead (at least 1)."""
    return min(startup_trials, max(2, cells // 10)), min(compile_workers, max(1, cells // 12))


# Share of the GPU's memory that copies of one study's timing inputs may take: the timing
# worker's and one per config compiling ahead (each compile worker makes its own).
INPUTS_MEMORY_SHARE = 0.6


def timing_input_bytes(case: Case | DecodeCase, pass_: str) -> int:
    """About what one worker allocates for a study's timing inputs: q, k, v (or the KV cache),
    and for a backward the outputs and gradients of the same sizes."""
    size = case.torch_dtype.itemsize * case.head_dim
    if isinstance(case, DecodeCase):
        return size * case.batch * (case.heads * case.new_tokens + 2 * case.kv_heads * case.capacity)
    qkv = size * case.batch * case.seqlen * (case.heads + 2 * case.kv_heads)
    return qkv * (1 if pass_ == "fwd" else 3)


def compile_ahead_within_memory(lookahead: int, input_bytes: int, total_memory: int | None) -> int:
    """``lookahead`` capped so that the timing worker's inputs and one copy per config compiling
    ahead fit in ``INPUTS_MEMORY_SHARE`` of the GPU's memory (a decode study of 64 sequences of
    128k tokens holds 34 GB of cache per copy)."""
    if not total_memory or input_bytes <= 0:
        return lookahead
    return max(0, min(lookahead, int(INPUTS_MEMORY_SHARE * total_memory // input_bytes) - 1))


def budget_shares(plans: Sequence[Plan], remaining_s: float) -> list[float]:
    """Seconds for each study still to run, in proportion to its pass's weight, out of what is
    left of the run's budget. Recomputed as each study starts, so time a study did not use
    (its space ran out, its trials finished early) passes to the ones after it."""
    total = sum(p.weight for p in plans)
    return [max(remaining_s, 0.0) * p.weight / total for p in plans] if total else []
