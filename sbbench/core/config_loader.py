"""Tuned launch configs: file format, search path and nearest-key lookup.

Standard library only, on purpose: another library can copy this one file (or import it alone)
to read the configs ``sbbench export`` writes, without importing torch, triton or sbbench's
kernels.

File: one JSON per device and backend, ``<device>/<backend>.json`` under a config directory,
where ``<device>`` is ``torch.cuda.get_device_name()`` with spaces as underscores::

    {"schema_version": 1, "device": "NVIDIA H100 80GB HBM3", "backend": "triton",
     "triton_version": "3.6.0", "torch_version": "2.11.0+cu130", "created": "...",
     "entries": [{"key": {"pass": "fwd", "dtype": "bfloat16", "head_dim": 128,
                          "gqa_group": 1, "attend_current": false, "seqlen_bucket": 4096},
                  "config": {...}, "latency_ms": 1.23, "default_latency_ms": 1.40,
                  "speedup_over_default": 1.14}]}

Lookup: the entry with the same pass, dtype, head dim, GQA group and attend_current and the
nearest sequence-length bucket (in log2 distance; ties go to the larger bucket, whose launch
grid is closer to saturating the GPU). When nothing matches the caller falls back to its default
config; both the fallback and a config made under another Triton version warn once.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
ENV_VAR = "SBBENCH_CONFIG_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn with ``message`` the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def device_file_stem(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"`` (safe as a file name)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", device_name.strip().replace(" ", "_"))


def seqlen_bucket(seqlen: int) -> int:
    """The power of two at or above ``seqlen``."""
    if seqlen < 1:
        raise ValueError(f"seqlen: expected a positive int, got {seqlen}")
    return 1 << (seqlen - 1).bit_length()


def config_search_path() -> list[Path]:
    """``$SBBENCH_CONFIG_DIR`` (os.pathsep-separated) first, then the configs shipped in the package."""
    dirs = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return dirs + [SHIPPED_DIR]


def config_file(directory: Path, device_name: str, backend: str) -> Path:
    return Path(directory) / device_file_stem(device_name) / f"{backend}.json"


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse and check one config file; raises ``ValueError`` naming the file when unusable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable config file ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: expected schema_version {SCHEMA_VERSION}")
    if not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: missing 'entries' list")
    return data


def load_tuned_configs(
    device_name: str, backend: str, search_path: Iterable[Path] | None = None
) -> tuple[dict[str, Any], Path] | None:
    """The first config file for (device, backend) on the search path, with its path."""
    for directory in search_path if search_path is not None else config_search_path():
        path = config_file(directory, device_name, backend)
        if path.is_file():
            try:
                return read_config_file(path), path
            except ValueError as exc:
                warn_once(f"sbbench: ignoring tuned configs: {exc}")
    return None


def _same_key(entry_key: dict[str, Any], key: dict[str, Any]) -> bool:
    return all(entry_key.get(name) == value for name, value in key.items() if name != "seqlen_bucket")


def lookup_config(
    device_name: str,
    backend: str,
    *,
    pass_: str,
    dtype: str,
    head_dim: int,
    gqa_group: int,
    attend_current: bool,
    seqlen: int,
    triton_version: str | None = None,
    search_path: Iterable[Path] | None = None,
) -> dict[str, Any] | None:
    """The tuned config nearest to this key, or None (the caller then uses its default)."""
    key = {
        "pass": pass_,
        "dtype": dtype,
        "head_dim": head_dim,
        "gqa_group": gqa_group,
        "attend_current": attend_current,
    }
    found = load_tuned_configs(device_name, backend, search_path)
    if found is None:
        warn_once(f"sbbench: no tuned {backend} configs for {device_name}; using the default config")
        return None
    entries = [e for e in found[0]["entries"] if _same_key(e.get("key", {}), key)]
    if not entries:
        warn_once(
            f"sbbench: no tuned {backend} config for {device_name} {key} in {found[1]}; "
            "using the default config"
        )
        return None
    data, path = found
    made_with = data.get("triton_version")
    if triton_version and made_with and made_with != triton_version:
        warn_once(
            f"sbbench: {path} was tuned under Triton {made_with}, running Triton {triton_version}; "
            "its configs may be slower here (re-run `sbbench tune`)"
        )
    target = math.log2(seqlen_bucket(seqlen))
    best = min(
        entries,
        key=lambda e: (abs(math.log2(e["key"]["seqlen_bucket"]) - target), -e["key"]["seqlen_bucket"]),
    )
    return dict(best["config"])


def write_config_file(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
