"""The one results schema shared by check, bench, tune, gate and report.

A result is a flat row (a dict; a pandas DataFrame for many). Every row carries the environment
(device, versions, git commit), what ran (backend, its implementation and config), the input
(shape, dtype, mode, regime) and its metrics. Each command writes one kind of row, declared here
as a TypedDict (:class:`BenchRow`, :class:`CheckRow`, :class:`TuneRow`, :class:`DecodeBenchRow`,
:class:`DecodeCheckRow`) and made by :func:`new_row`, which fills every declared column (None
where it does not apply, so tables line up) and refuses a column the kind does not declare.
Files are JSON with a schema version::

    {"schema_version": 1, "rows": [{...}, ...]}

written atomically (a temporary file renamed over the target).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, TypedDict, TypeVar

SCHEMA_VERSION = 1

# Columns every row has (None where they do not apply). Metric columns are listed so that
# tables and the gate agree on names; commands may add more metric columns.
IDENTITY_COLUMNS = (
    "command", "device", "compute_capability", "torch_version", "triton_version", "sbbench_version", "git_commit",
    "backend", "implementation", "config", "comparator",
    "batch", "heads", "kv_heads", "seqlen", "head_dim", "dtype", "attend_current", "varlen",
    "mode", "regime",
)
METRIC_COLUMNS = (
    "status", "error",
    # bench
    "latency_ms", "latency_q20_ms", "latency_q80_ms", "tflops", "peak_mem_mib", "speedup",
    "skipped_fraction",
    # check
    "tensor", "err_max", "err_rel_fro", "err_pt", "budget", "fa2_rel_err", "passed",
)


class ResultRow(TypedDict):
    """The columns every row has, of every command (:data:`IDENTITY_COLUMNS`, :data:`METRIC_COLUMNS`)."""

    # environment
    command: str
    device: str | None
    compute_capability: list[int] | None
    torch_version: str | None
    triton_version: str | None
    sbbench_version: str | None
    git_commit: str | None
    # what ran
    backend: str
    implementation: str | None
    config: dict[str, Any] | None
    comparator: str | None
    # input
    batch: int | None
    heads: int | None
    kv_heads: int | None
    seqlen: int | None
    head_dim: int | None
    dtype: str | None
    attend_current: bool | None
    varlen: bool | None
    mode: str | None
    regime: str | None
    # status: ok, pruned, unsupported, oom, error; error: why, in one line
    status: str | None
    error: str | None
    # bench metrics
    latency_ms: float | None
    latency_q20_ms: float | None
    latency_q80_ms: float | None
    tflops: float | None
    peak_mem_mib: float | None
    speedup: float | None
    skipped_fraction: float | None
    # check metrics
    tensor: str | None
    err_max: float | None
    err_rel_fro: float | None
    err_pt: float | None
    budget: float | None
    fa2_rel_err: float | None
    passed: bool | None


class BenchRow(ResultRow):
    """A row of ``sbbench bench`` (one backend, case, mode and regime)."""

    seed: int | None  # of the inputs; None: drawn fresh
    timer: str | None  # how the latency was measured
    runs: int | None  # timed runs behind the median
    total_tokens: int | None  # tokens in the batch (varlen: the packed total)
    notes: str | None


class CheckRow(ResultRow):
    """A row of ``sbbench check`` (one tensor of one backend, case and regime)."""

    seed: int | None
    atol_floor: float | None  # eps(dtype) * max|x_ref64|, part of ``budget``
    nonfinite: int | None  # NaN/Inf elements
    fa2_ratio: float | None  # err_rel_fro / fa2_rel_err
    notes: str | None


class DecodeCheckRow(ResultRow):
    """A row of ``sbbench decode-check`` (o or rem of one backend, decode case and regime)."""

    seed: int | None
    new_tokens: int | None  # queries per sequence
    atol_floor: float | None
    nonfinite: int | None
    skip_bound: float | None  # what block skipping may move, part of ``budget``


class DecodeBenchRow(ResultRow):
    """A row of ``sbbench decode-bench`` (one backend or softmax decoder, case and regime)."""

    new_tokens: int | None
    timer: str | None
    kv_tbps: float | None  # K/V bytes the queries must read / latency
    notes: str | None
    # latency of each softmax decoder / this row's latency (``speedup`` is over the first that ran)
    speedup_flash_attn_with_kvcache: float | None
    speedup_sdpa_flash: float | None
    speedup_sdpa_cudnn: float | None


# "pass" is a Python keyword, so it is declared in the functional form and inherited.
_TunePass = TypedDict("_TunePass", {"pass": str})


class TuneRow(ResultRow, _TunePass):
    """A row of ``sbbench tune`` (one trial; ``pass`` is the pass tuned, ``fwd``, ``bwd`` or
    ``decode``; decode rows have ``seqlen`` the cache length, as decode-bench rows)."""

    study: str
    sampler: str  # tpe or grid
    trial: int  # the trial's number in its study
    params: dict[str, Any]  # the tuned parameters (``config`` adds the fixed ones)
    is_default: bool
    warm_start: str | None  # the config file it was taken from
    checked: bool | None  # False: slower than the best checked config, numerics not checked
    default_latency_ms: float | None
    constraint: float | None  # worst error / budget of the numerics check (<= 0: within budget)
    check_worst: str | None  # the tensor and error of that worst case
    duration_s: float | None
    timing_s: float | None
    compile_s: float | None
    finished_after_s: float | None  # since the tuner started
    seqlen_bucket: int
    gqa_group: int
    batch_bucket: int | None  # decode keys only
    new_tokens: int | None  # decode: queries per sequence
    kv_tbps: float | None  # decode: K/V bytes the queries must read / latency
    datetime_start: str | None


RowT = TypeVar("RowT", bound=ResultRow)


def row_columns(row_type: type[ResultRow]) -> tuple[str, ...]:
    """Every column a row of ``row_type`` has, in declaration order."""
    return tuple(row_type.__annotations__)


def new_row(row_type: type[RowT], /, **fields: Any) -> RowT:
    """A row of ``row_type`` with every declared column (None where not given).

    Raises:
        TypeError: a field that ``row_type`` does not declare (declare it here first).
    """
    columns = row_columns(row_type)
    unknown = sorted(set(fields) - set(columns))
    if unknown:
        raise TypeError(f"fields: {row_type.__name__} has no column {', '.join(map(repr, unknown))}")
    row: dict[str, Any] = dict.fromkeys(columns)
    row.update(fields)
    if isinstance(row.get("config"), Mapping):
        row["config"] = dict(row["config"])
    return row  # type: ignore[return-value]


# The columns that identify "the same measurement" across two runs (used by the gate).
MATCH_COLUMNS = (
    "device", "backend", "batch", "heads", "kv_heads", "seqlen", "head_dim", "dtype",
    "attend_current", "varlen", "mode", "regime",
)


@functools.lru_cache(maxsize=None)
def _git_commit() -> str | None:
    # A copy of the tree without .git (a CI artifact, a GPU host) can say its commit.
    if os.environ.get("SBBENCH_GIT_COMMIT"):
        return os.environ["SBBENCH_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """A readable CPU model name (the 'device' of CPU rows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def device_name(device: Any = None) -> str:
    """``torch.cuda.get_device_name()`` for a CUDA device, a CPU model name otherwise."""
    import torch

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


@functools.lru_cache(maxsize=None)
def _versions() -> dict[str, str | None]:
    import torch

    from sbbench import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "sbbench_version": __version__,
        "git_commit": _git_commit(),
    }


def compute_capability(device: Any = None) -> list[int] | None:
    """``[major, minor]`` of a CUDA device (what tuned configs transfer between), None otherwise."""
    import torch

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type != "cuda":
        return None
    return list(torch.cuda.get_device_capability(device))


def environment(device: Any = None) -> dict[str, Any]:
    """The environment columns of a row measured on ``device``."""
    return {"device": device_name(device), "compute_capability": compute_capability(device), **_versions()}


# Shape columns in the order a label names them, with their abbreviations.
SHAPE_ABBREVIATIONS = {"batch": "B", "heads": "H", "kv_heads": "Hkv", "seqlen": "T", "new_tokens": "Tq", "head_dim": "D"}
SHAPE_FLAGS = ("varlen", "attend_current")


def shape_label(row: Mapping[str, Any], columns: Iterable[str] = tuple(SHAPE_ABBREVIATIONS),
                flags: Iterable[str] = SHAPE_FLAGS) -> str:
    """``B=4 H=12 T=4096 D=128`` for a row (or a case's columns): each of ``columns`` the row has,
    kv heads only where they differ from heads, then each of ``flags`` that is set. The one
    label of a shape in tables, reports, the gate and progress bars."""
    parts = []
    for column in columns:
        value = row.get(column)
        if value is None or (column == "kv_heads" and value == row.get("heads")):
            continue
        parts.append(f"{SHAPE_ABBREVIATIONS[column]}={value}")
    parts += [flag for flag in flags if row.get(flag)]
    return " ".join(parts)


def make_row(**fields: Any) -> dict[str, Any]:
    """A row of any kind: every :class:`ResultRow` column present (None where not given) plus any
    other fields as given. For rows read from a file (which may come from a plug-in or an older
    writer); commands make theirs with :func:`new_row`."""
    row: dict[str, Any] = {name: None for name in IDENTITY_COLUMNS + METRIC_COLUMNS}
    row.update(fields)
    if isinstance(row.get("config"), Mapping):
        row["config"] = dict(row["config"])
    return row


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, renamed over the
    target. A reader (or a Ctrl-C mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], **meta: Any) -> Path:
    """Write rows as a results file, atomically."""
    payload = {"schema_version": SCHEMA_VERSION, **meta, "rows": [dict(r) for r in rows]}
    return write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def match_key(row: Mapping[str, Any], ignore: Iterable[str] = ()) -> tuple:
    """The values of :data:`MATCH_COLUMNS` (less ``ignore``): rows with equal keys measured the
    same thing, so a resumed sweep skips them and the gate compares them."""
    skip = set(ignore)
    return tuple(row.get(c) for c in MATCH_COLUMNS if c not in skip)


class ResultsFileError(ValueError):
    """A results file that cannot be used: unreadable, not JSON, or another schema."""


def read_text(path: Path, error: type[Exception]) -> str:
    """The text of ``path``; ``error`` naming the file and why when it cannot be read."""
    try:
        return path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results file; raises :class:`ResultsFileError` saying why it is unusable."""
    path = Path(path)
    text = read_text(path, ResultsFileError)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsFileError(f"{path}: not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from exc
    if not isinstance(payload, dict) or "rows" not in payload:
        raise ResultsFileError(f"{path}: not an sbbench results file (no 'rows')")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise ResultsFileError(
            f"{path}: schema_version {payload.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    rows = payload["rows"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ResultsFileError(f"{path}: 'rows' must be a list of objects")
    return [make_row(**r) for r in rows]


def to_frame(rows: Iterable[Mapping[str, Any]]):
    """Rows as a pandas DataFrame with the schema's columns first."""
    import pandas as pd

    frame = pd.DataFrame([make_row(**r) for r in rows])
    first = [c for c in IDENTITY_COLUMNS + METRIC_COLUMNS if c in frame.columns]
    return frame[first + [c for c in frame.columns if c not in first]]
