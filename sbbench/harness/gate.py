"""The regression gate: compare two benchmark runs and decide whether the current one is slower.

Rows are matched on :data:`sbbench.core.results.MATCH_COLUMNS` (device, backend, shape, dtype,
mode, regime). Only ``bench`` rows with ``status == "ok"`` and a latency take part; a row that
failed or was skipped on one side shows up as missing on that side, with its status.

The noise rule
--------------
Each bench row carries its median latency ``m`` and the 20th and 80th percentiles of its
repetitions, ``[q20, q80]``: the run's own spread. With ``b`` the baseline and ``c`` the current
row, and ``change = c.m / b.m - 1``, a row is

* a **regression** when it is slower by more than the threshold (``change > threshold``) *and*
  the two spreads do not overlap (``c.q20 > b.q80``: even the current run's fast repetitions are
  slower than the baseline's slow ones) *and* the absolute slowdown ``c.m - b.m`` exceeds
  ``min_delta_ms``;
* an **improvement** under the mirror conditions (``change < -threshold``, ``c.q80 < b.q20``,
  ``b.m - c.m > min_delta_ms``);
* **noise** when the medians differ by more than the threshold but the spreads overlap, the
  absolute difference is below ``min_delta_ms``, or either row's spread is wider than
  ``max_spread`` times its median: reported, never failing;
* **unchanged** otherwise.

A packed varlen row draws its sequence lengths at random from its seed, so a regression or
improvement between varlen rows whose seeds differ (or were not set) compares two workloads, not
two codes: it is reported as noise with that note. ``ci/gpu_gate.sh`` benches with a fixed seed.

The two conditions guard against different things. The spread test rejects differences the
measurements themselves cannot resolve (a noisy row whose repetitions scatter by 20% cannot show a
10% slowdown). The threshold rejects the drift between two runs that no single run's spread sees
(clock boosting, temperature, another tenant on the machine, a different driver): two tight runs
1% apart are both right. ``min_delta_ms`` is an absolute floor for kernels so short that timer
resolution and launch jitter dominate. ``max_spread`` (default 0.5: q80 - q20 above half the
median) catches the measurement that is not one distribution at all: a run disturbed part of the
time is bimodal, its median can come from either mode, and such a row says nothing about the code,
whichever way it moved. A row without percentiles is treated as having no spread, so only the
threshold and the floor protect it; the comparison says so in its note.

A row that was ok in the baseline and ``oom``, ``error`` or ``failed`` in the current run is a
**regression** too (a kernel that now runs out of memory or crashes is the worst slowdown), unless
``fail_on_error`` is off; then it is listed as missing in the current run. A row absent from the
current run, or ``unsupported`` there, is **missing** and fails only with ``fail_on_missing``.

Several ok rows with the same key in one file (the same input timed more than once, or under
several configs) are reduced to the fastest: the gate asks whether the backend can still do what it
did before.

Unusable input raises :class:`GateInputError` (the CLI exits 2): an unreadable or truncated file,
another schema version, a malformed latency, no usable bench rows, or runs from different devices,
which are never compared.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from sbbench.core.errors import ArgumentError
from sbbench.core.results import MATCH_COLUMNS, ResultsFileError, match_key, read_rows, read_text, shape_label, write_text_atomic

REGRESSION = "regression"
IMPROVEMENT = "improvement"
NOISE = "noise"
UNCHANGED = "unchanged"
MISSING_CURRENT = "missing in current"
MISSING_BASELINE = "missing in baseline"
# Statuses of a current row that make a baseline row that was ok a regression.
BROKEN_STATUSES = ("oom", "error", "failed")
STATUSES = (REGRESSION, IMPROVEMENT, NOISE, UNCHANGED, MISSING_CURRENT, MISSING_BASELINE)

GATE_JSON_VERSION = 1
# A packed varlen row's sequence lengths are drawn from its seed: rows with different seeds, or
# none, timed different workloads and are never judged against each other.
_UNSEEDED_VARLEN = "different inputs: packed lengths drawn from seed {} (baseline) and {} (current)"


class GateInputError(ValueError):
    """The two runs cannot be compared: the message says which file and why."""


class GateSettingError(GateInputError, ArgumentError):
    """A :class:`GateSettings` field out of range; ``argument`` names it."""


def _number(value: Any, finite: bool = True) -> bool:
    """An int or float (JSON true/false are not numbers), finite unless told otherwise."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) or not finite


@dataclass(frozen=True)
class GateSettings:
    """How strict the gate is. ``threshold`` is relative (0.05 = 5% slower)."""

    threshold: float = 0.05
    min_delta_ms: float = 0.0
    max_spread: float = 0.5
    fail_on_missing: bool = False
    fail_on_error: bool = True

    def __post_init__(self) -> None:
        if not (_number(self.threshold) and 0 <= self.threshold < 10):
            raise GateSettingError("threshold", f"expected a fraction in [0, 10), got {self.threshold!r}")
        if not (_number(self.min_delta_ms) and self.min_delta_ms >= 0):
            raise GateSettingError("min_delta_ms", f"expected a number >= 0, got {self.min_delta_ms!r}")
        # max_spread may be inf: "never call a row too noisy".
        if not (_number(self.max_spread, finite=False) and self.max_spread > 0):
            raise GateSettingError("max_spread", f"expected a number > 0, got {self.max_spread!r}")
        for name in ("fail_on_missing", "fail_on_error"):
            if not isinstance(getattr(self, name), bool):
                raise GateSettingError(name, f"expected true or false, got {getattr(self, name)!r}")


def load_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``[gate]`` table of a TOML settings file (such as ``ci/gate.toml``), checked.

    Returns only the keys present, so that command-line options can override them one by one.
    """
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomllib arrived in 3.11
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise GateInputError(f"{path}: reading TOML settings needs Python 3.11+ or the tomli package") from None
    text = read_text(path, GateInputError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GateInputError(f"{path}: not valid TOML: {exc}") from exc
    table = data.get("gate", data)
    if not isinstance(table, dict):
        raise GateInputError(f"{path}: [gate] must be a table")
    known = {"threshold", "min_delta_ms", "max_spread", "fail_on_missing", "fail_on_error"}
    unknown = sorted(set(table) - known - {"gate"})
    if unknown:
        raise GateInputError(f"{path}: unknown gate setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    settings = {k: table[k] for k in known if k in table}
    try:
        GateSettings(**settings)  # validate now, so an error names the file rather than an option
    except GateInputError as exc:
        raise GateInputError(f"{path}: {exc}") from None
    return settings


@dataclass(frozen=True)
class RowTiming:
    """One side of a comparison (a matched bench row of one run): median and spread in ms."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    has_spread: bool
    repeats: int = 1  # how many ok rows shared this key (the fastest is kept)
    seed: int | None = None  # the inputs' seed (None: drawn at random)


@dataclass
class RowComparison:
    """The verdict on one matched key: its status, both sides' timings and the relative change."""

    key: dict[str, Any]
    status: str
    baseline: RowTiming | None = None
    current: RowTiming | None = None
    change: float | None = None  # current / baseline - 1
    note: str = ""


@dataclass
class RunInfo:
    path: str
    device: str | None
    torch_version: str | None = None
    triton_version: str | None = None
    sbbench_version: str | None = None
    git_commit: str | None = None
    bench_rows: int = 0


@dataclass
class GateResult:
    settings: GateSettings
    baseline: RunInfo
    current: RunInfo
    comparisons: list[RowComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def with_status(self, status: str) -> list[RowComparison]:
        return [c for c in self.comparisons if c.status == status]

    def counts(self) -> dict[str, int]:
        return {status: len(self.with_status(status)) for status in STATUSES}

    @property
    def failed(self) -> bool:
        if self.with_status(REGRESSION):
            return True
        return self.settings.fail_on_missing and bool(self.with_status(MISSING_CURRENT))

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "gate_schema_version": GATE_JSON_VERSION,
            "verdict": "fail" if self.failed else "pass",
            "settings": asdict(self.settings),
            "baseline": asdict(self.baseline),
            "current": asdict(self.current),
            "counts": self.counts(),
            "notes": list(self.notes),
            "comparisons": [asdict(c) for c in self.comparisons],
        }


def _timing(row: Mapping[str, Any], path: Path, index: int) -> RowTiming:
    """The row's latency and spread; a malformed value makes the whole file unusable."""
    median = row["latency_ms"]
    where = f"{path}: row {index} ({row.get('backend')}, seqlen {row.get('seqlen')}, {row.get('mode')})"
    if not _number(median) or median <= 0:
        raise GateInputError(f"{where}: latency_ms must be a positive number, got {median!r}")
    quantiles = []
    for name in ("latency_q20_ms", "latency_q80_ms"):
        value = row.get(name)
        if value is None:
            quantiles.append(None)
        elif not _number(value) or value <= 0:
            raise GateInputError(f"{where}: {name} must be a positive number or null, got {value!r}")
        else:
            quantiles.append(float(value))
    q20, q80 = quantiles
    has_spread = q20 is not None and q80 is not None
    # Percentiles from another estimator may sit a hair on the wrong side of the median; the
    # interval must contain the median for the overlap test to mean anything.
    lo = min(q20, median) if q20 is not None else median
    hi = max(q80, median) if q80 is not None else median
    seed = row.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise GateInputError(f"{where}: seed must be an integer or null, got {seed!r}")
    return RowTiming(float(median), float(lo), float(hi), has_spread, seed=seed)


def _bench_rows(
    rows: list[dict[str, Any]], path: Path
) -> tuple[dict[tuple, RowTiming], dict[tuple, tuple[str, str]]]:
    """Usable timings by key, and for keys with no usable row, its status and why (status and error)."""
    timings: dict[tuple, list[RowTiming]] = {}
    unusable: dict[tuple, tuple[str, str]] = {}
    for index, row in enumerate(rows):
        if row.get("command") != "bench":
            continue
        key = match_key(row)
        if row.get("status") == "ok" and row.get("latency_ms") is not None:
            timings.setdefault(key, []).append(_timing(row, path, index))
        else:
            status = str(row.get("status") or "no latency")
            reason = status
            if row.get("error"):
                reason += f": {str(row['error']).splitlines()[0][:120]}"
            unusable.setdefault(key, (status, reason))
    usable = {}
    for key, found in timings.items():
        fastest = min(found, key=lambda t: t.median_ms)
        usable[key] = replace(fastest, repeats=len(found))
    return usable, {k: v for k, v in unusable.items() if k not in usable}


def _sort_key(key: tuple) -> tuple:
    # Keys mix ints, strings, bools and None; order numbers as numbers (512 before 4096).
    return tuple((v is None, type(v).__name__, v if isinstance(v, (int, float)) else str(v)) for v in key)


def _run_info(rows: list[dict[str, Any]], path: Path, device: str | None, count: int) -> RunInfo:
    def joined(column: str) -> str | None:
        values = sorted({str(r[column]) for r in rows if r.get(column) is not None})
        return ", ".join(values) if values else None

    return RunInfo(
        path=str(path), device=device, torch_version=joined("torch_version"),
        triton_version=joined("triton_version"), sbbench_version=joined("sbbench_version"),
        git_commit=joined("git_commit"), bench_rows=count,
    )


def _devices(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    return {str(r["device"]) for r in rows if r.get("command") == "bench" and r.get("device") is not None}


def _relative_spread(t: RowTiming) -> float:
    return (t.q80_ms - t.q20_ms) / t.median_ms


def _classify(b: RowTiming, c: RowTiming, s: GateSettings) -> tuple[str, str]:
    change = c.median_ms / b.median_ms - 1
    delta = c.median_ms - b.median_ms
    notes = []
    if not (b.has_spread and c.has_spread):
        notes.append("no spread recorded; threshold only")
    if b.repeats > 1 or c.repeats > 1:
        notes.append(f"fastest of {b.repeats} baseline / {c.repeats} current rows")
    if abs(change) > s.threshold:
        wide = [f"{side} spread {_relative_spread(t):.0%} of its median" for side, t in (("baseline", b), ("current", c))
                if _relative_spread(t) > s.max_spread]
        if wide:
            return NOISE, "; ".join([" and ".join(wide) + " (too noisy to judge)"] + notes)
    if change > s.threshold:
        if c.q20_ms <= b.q80_ms:
            return NOISE, "; ".join(["spreads overlap"] + notes)
        if delta <= s.min_delta_ms:
            return NOISE, "; ".join([f"slower by only {delta * 1000:.1f} us"] + notes)
        return REGRESSION, "; ".join(notes)
    if change < -s.threshold:
        if c.q80_ms >= b.q20_ms:
            return NOISE, "; ".join(["spreads overlap"] + notes)
        if -delta <= s.min_delta_ms:
            return NOISE, "; ".join([f"faster by only {-delta * 1000:.1f} us"] + notes)
        return IMPROVEMENT, "; ".join(notes)
    return UNCHANGED, "; ".join(notes)


def compare_rows(
    baseline_rows: list[dict[str, Any]],
    current_rows: list[dict[str, Any]],
    settings: GateSettings | None = None,
    *,
    baseline_path: str | os.PathLike = "baseline",
    current_path: str | os.PathLike = "current",
) -> GateResult:
    """Compare two runs' rows (already read); raises :class:`GateInputError` when they cannot be."""
    settings = settings or GateSettings()
    bpath, cpath = Path(baseline_path), Path(current_path)

    bdev, cdev = _devices(baseline_rows), _devices(current_rows)
    for path, devs in ((bpath, bdev), (cpath, cdev)):
        if len(devs) > 1:
            raise GateInputError(f"{path}: bench rows from several devices ({'; '.join(sorted(devs))}); gate one device at a time")
    if bdev and cdev and bdev != cdev:
        raise GateInputError(
            "refusing to compare runs from different devices: "
            f"baseline {bpath} ran on {next(iter(bdev))!r}, current {cpath} on {next(iter(cdev))!r}"
        )

    bok, bbad = _bench_rows(baseline_rows, bpath)
    cok, cbad = _bench_rows(current_rows, cpath)
    for path, ok in ((bpath, bok), (cpath, cok)):
        if not ok:
            raise GateInputError(f"{path}: no bench rows with status ok and a latency; nothing to compare")

    device = next(iter(bdev or cdev), None)
    result = GateResult(
        settings=settings,
        baseline=_run_info(baseline_rows, bpath, device, len(bok)),
        current=_run_info(current_rows, cpath, device, len(cok)),
    )
    for column in ("torch_version", "triton_version"):
        old, new = getattr(result.baseline, column), getattr(result.current, column)
        if old != new:
            result.notes.append(f"{column.replace('_', ' ')} differs: baseline {old}, current {new}")

    for key in sorted(set(bok) | set(cok), key=_sort_key):
        named = dict(zip(MATCH_COLUMNS, key))
        b, c = bok.get(key), cok.get(key)
        if b is None:
            note = f"baseline row {bbad[key][1]}" if key in bbad else "new row"
            result.comparisons.append(RowComparison(named, MISSING_BASELINE, current=c, note=note))
        elif c is None:
            status, reason = cbad.get(key, (None, "not measured"))
            if settings.fail_on_error and status in BROKEN_STATUSES:
                result.comparisons.append(RowComparison(named, REGRESSION, baseline=b, note=f"ok in baseline, now {reason}"))
            else:
                note = f"current row {reason}" if key in cbad else reason
                result.comparisons.append(RowComparison(named, MISSING_CURRENT, baseline=b, note=note))
        else:
            status, note = _classify(b, c, settings)
            if named.get("varlen") and status in (REGRESSION, IMPROVEMENT) and (b.seed is None or b.seed != c.seed):
                status, note = NOISE, _UNSEEDED_VARLEN.format(b.seed, c.seed)
            change = c.median_ms / b.median_ms - 1
            result.comparisons.append(RowComparison(named, status, b, c, change, note))
    return result


def compare_files(
    baseline: str | os.PathLike, current: str | os.PathLike, settings: GateSettings | None = None
) -> GateResult:
    """Read and compare two results files; every unusable input raises :class:`GateInputError`."""
    try:
        baseline_rows = read_rows(baseline)
        current_rows = read_rows(current)
    except ResultsFileError as exc:
        raise GateInputError(str(exc)) from exc
    return compare_rows(baseline_rows, current_rows, settings, baseline_path=baseline, current_path=current)


def _fmt_timing(t: RowTiming | None) -> str:
    if t is None:
        return "-"
    if not t.has_spread:
        return f"{t.median_ms:.4g}"
    return f"{t.median_ms:.4g} [{t.q20_ms:.4g}-{t.q80_ms:.4g}]"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_result(result: GateResult, *, show_all: bool = False) -> str:
    """Human-readable verdict: header, a table of everything that changed or is missing, counts."""
    from tabulate import tabulate

    s = result.settings
    lines = [
        f"device:   {result.baseline.device}",
        f"baseline: {result.baseline.path} (commit {result.baseline.git_commit}, {result.baseline.bench_rows} rows)",
        f"current:  {result.current.path} (commit {result.current.git_commit}, {result.current.bench_rows} rows)",
        f"rule:     slower by > {s.threshold:.1%} and current q20 above baseline q80"
        + (f" and by > {s.min_delta_ms * 1000:.1f} us" if s.min_delta_ms else "")
        + f"; rows with q80 - q20 > {s.max_spread:.0%} of the median are noise",
    ]
    lines += [f"note:     {n}" for n in result.notes]
    order = [REGRESSION, IMPROVEMENT, MISSING_CURRENT, MISSING_BASELINE, NOISE] + ([UNCHANGED] if show_all else [])
    table = []
    for status in order:
        for c in result.with_status(status):
            k = c.key
            table.append([
                status.upper() if status == REGRESSION else status, k["backend"], k["mode"], k["regime"],
                k["dtype"], shape_label(k), _fmt_timing(c.baseline), _fmt_timing(c.current),
                "-" if c.change is None else f"{c.change:+.1%}", c.note,
            ])
    if table:
        lines += ["", tabulate(table, headers=["status", "backend", "mode", "regime", "dtype", "shape",
                                               "baseline ms [q20-q80]", "current ms [q20-q80]", "change", "note"])]
    counts = result.counts()
    matched = sum(counts[x] for x in (REGRESSION, IMPROVEMENT, NOISE, UNCHANGED))
    lines += [
        "",
        f"{matched} matched: {_plural(counts[REGRESSION], 'regression')}, "
        f"{_plural(counts[IMPROVEMENT], 'improvement')}, "
        f"{counts[NOISE]} within noise, {counts[UNCHANGED]} unchanged; "
        f"{counts[MISSING_CURRENT]} missing in current, {counts[MISSING_BASELINE]} missing in baseline",
        "gate: FAIL" if result.failed else "gate: pass",
    ]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON atomically (temporary file in the same folder, then rename)."""
    return write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")
