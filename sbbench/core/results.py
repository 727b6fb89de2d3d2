"""The one results schema shared by check, bench, tune, gate and report.

A result is a flat row (a dict; a pandas DataFrame for many). Every row carries the environment
(device, versions, git commit), what ran (backend, its implementation and config), the input
(shape, dtype, mode, regime) and its metrics. Files are JSON with a schema version::

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
from typing import Any, Iterable, Mapping

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


def make_row(**fields: Any) -> dict[str, Any]:
    """A row with every schema column present (None where not given) plus any extra fields."""
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


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results file; raises :class:`ResultsFileError` saying why it is unusable."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except OSError as exc:
        raise ResultsFileError(f"{path}: cannot read ({exc.strerror or exc})") from exc
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
