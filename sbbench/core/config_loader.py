"""Tuned launch configs: file format, search path and nearest-key lookup.

Standard library only, on purpose: another library can copy this one file (or import it alone)
to read the configs ``sbbench export`` writes, without importing torch, triton or sbbench's
kernels.

File: one JSON per device and backend, ``<device>/<backend>.json`` under a config directory,
where ``<device>`` is ``torch.cuda.get_device_name()`` with spaces as underscores::

    {"schema_version": 1, "device": "NVIDIA H100 80GB HBM3", "backend": "triton",
     "compute_capability": [9, 0],
     "triton_version": "3.6.0", "torch_version": "2.11.0+cu130", "created": "...",
     "entries": [{"key": {"pass": "fwd", "dtype": "bfloat16", "head_dim": 128,
                          "gqa_group": 1, "attend_current": false, "seqlen_bucket": 4096},
                  "config": {...}, "latency_ms": 1.23, "default_latency_ms": 1.40,
                  "speedup_over_default": 1.14}]}

A decode entry (``sb_attn_with_kvcache``'s launch parameters) has pass ``"decode"`` and one key
field more, ``batch_bucket`` (the power of two at or above the batch); its ``seqlen_bucket`` is
that of the cache length.

Which file: the device's own file, from the first directory of the search path that has one.
A device without its own file, when the caller gives its compute capability, uses the file of
the nearest device with the same capability (same architecture: the H100's configs suit an
H200 far better than the defaults). Nearest: the longest common prefix of the two device names
(as file-name stems, ignoring case), then name order. Otherwise the caller uses its default
config. Each of these fallbacks warns once, naming the file used.

Which entry: the one with the same pass, dtype, head dim, GQA group and attend_current and the
nearest sequence-length bucket (in log2 distance; ties go to the larger bucket, whose launch
grid is closer to saturating the GPU). For decode, the nearest batch bucket first (log2
distance, ties to the larger), then among the entries of that batch bucket the nearest
cache-length bucket by the same rule. A malformed entry (not an object, a key field missing
or of the wrong type, a config that is not an object of numbers and strings) is skipped with one
warning naming the file and the entry; so is an entry whose config the caller's ``validate``
rejects. A file made under another Triton version warns once.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

SCHEMA_VERSION = 1
ENV_VAR = "SBBENCH_CONFIG_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"
PASSES = ("fwd", "bwd", "decode")
# The fields of an entry's key and their JSON types.
KEY_FIELDS: dict[str, type] = {
    "pass": str,
    "dtype": str,
    "head_dim": int,
    "gqa_group": int,
    "attend_current": bool,
    "seqlen_bucket": int,
}
# The key field decode entries add (and fwd/bwd entries do not have).
DECODE_KEY_FIELDS: dict[str, type] = {"batch_bucket": int}


class ConfigWarning(UserWarning):
    """A tuned-config file is missing, malformed, or from elsewhere; the lookup went on without it."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn with ``message`` (a :class:`ConfigWarning`) the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, ConfigWarning, stacklevel=3)


def device_file_stem(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"`` (safe as a file name)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", device_name.strip().replace(" ", "_"))


def seqlen_bucket(seqlen: int) -> int:
    """The power of two at or above ``seqlen``."""
    return _bucket("seqlen", seqlen)


def batch_bucket(batch: int) -> int:
    """The power of two at or above ``batch`` (decode keys)."""
    return _bucket("batch", batch)


def _bucket(name: str, value: int) -> int:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return 1 << (value - 1).bit_length()


def config_search_path() -> list[Path]:
    """``$SBBENCH_CONFIG_DIR`` (os.pathsep-separated) first, then the configs shipped in the package."""
    dirs = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return dirs + [SHIPPED_DIR]


def config_file(directory: Path, device_name: str, backend: str) -> Path:
    return Path(directory) / device_file_stem(device_name) / f"{backend}.json"


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one config file and check its frame (schema version, an entries list); raises
    ``ValueError`` naming the file when unusable. Entries are returned as they are in the file:
    :func:`entry_problem` says which of them are usable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable config file ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: expected schema_version {SCHEMA_VERSION}")
    if not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: missing 'entries' list")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def entry_problem(entry: Any) -> str | None:
    """Why a file entry cannot be used, or None when it is well formed."""
    if not isinstance(entry, dict):
        return f"not an object but {type(entry).__name__}"
    key = entry.get("key")
    if not isinstance(key, dict):
        return "no 'key' object"
    fields = dict(KEY_FIELDS)
    if key.get("pass") == "decode":
        fields.update(DECODE_KEY_FIELDS)
    for name, kind in fields.items():
        if name not in key:
            return f"key.{name} missing"
        value = key[name]
        if kind is int:
            ok = _is_int(value) and value > 0
            wanted = "a positive integer"
        elif kind is bool:
            ok = isinstance(value, bool)
            wanted = "true or false"
        else:
            ok = isinstance(value, str) and bool(value)
            wanted = "a string"
        if not ok:
            return f"key.{name} is {json.dumps(value)}, expected {wanted}"
    if key["pass"] not in PASSES:
        return f"key.pass is {json.dumps(key['pass'])}, expected one of {', '.join(PASSES)}"
    config = entry.get("config")
    if not isinstance(config, dict):
        return "no 'config' object"
    for name, value in config.items():
        if not isinstance(value, (int, float, str)) or (isinstance(value, float) and not math.isfinite(value)):
            return f"config.{name} is {json.dumps(value)}, expected a number or a string"
    return None


def _entry_label(path: Path, index: int, entry: Any) -> str:
    key = entry.get("key") if isinstance(entry, dict) else None
    return f"{path}: entry {index}" + (f" (key {json.dumps(key, sort_keys=True)})" if isinstance(key, dict) else "")


def _capability_of(value: Any) -> tuple[int, int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 0 for v in value):
        return (value[0], value[1])
    return None


@dataclass(frozen=True)
class TunedFile:
    """One usable config file: its path, its fields, and its well-formed entries (with their
    indices in the file, for messages)."""

    path: Path
    data: dict[str, Any]
    entries: tuple[tuple[int, dict[str, Any]], ...]
    device: str
    compute_capability: tuple[int, int] | None


# Parsed files by path, with the (mtime, size) they were parsed at: a lookup per call stays cheap
# and a file rewritten by `sbbench export` is read again.
_parsed: dict[Path, tuple[tuple[int, int], TunedFile | None]] = {}


def load_file(path: Path) -> TunedFile | None:
    """The usable part of one config file, or None (with a warning) when the file is unusable.
    Each malformed entry is left out with one warning naming the file and the entry."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        data = read_config_file(path)
    except ValueError as exc:
        warn_once(f"sbbench: ignoring tuned configs: {exc}")
        _parsed[path] = (stamp, None)
        return None
    entries = []
    for index, entry in enumerate(data["entries"]):
        problem = entry_problem(entry)
        if problem is None:
            entries.append((index, entry))
        else:
            warn_once(f"sbbench: {_entry_label(path, index, entry)} skipped: {problem}")
    capability = _capability_of(data.get("compute_capability"))
    if capability is None and data.get("compute_capability") is not None:
        warn_once(f"sbbench: {path}: compute_capability is {json.dumps(data['compute_capability'])}, "
                  "expected [major, minor]; ignored")
    device = data.get("device") if isinstance(data.get("device"), str) else path.parent.name
    tuned = TunedFile(path, data, tuple(entries), device, capability)
    _parsed[path] = (stamp, tuned)
    return tuned


def _search(search_path: Iterable[Path] | None) -> list[Path]:
    return [Path(p) for p in (search_path if search_path is not None else config_search_path())]


def _own_file(device_name: str, backend: str, search_path: list[Path]) -> TunedFile | None:
    for directory in search_path:
        path = config_file(directory, device_name, backend)
        if path.is_file():
            tuned = load_file(path)
            if tuned is not None:
                return tuned
    return None


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a.lower(), b.lower()]))


def _check_capability(compute_capability: Any) -> tuple[int, int] | None:
    if compute_capability is None:
        return None
    capability = _capability_of(compute_capability)
    if capability is None:
        raise ValueError(f"compute_capability: expected (major, minor) as two ints, got {compute_capability!r}")
    return capability


def same_architecture_files(
    device_name: str,
    backend: str,
    compute_capability: tuple[int, int],
    search_path: Iterable[Path] | None = None,
) -> list[TunedFile]:
    """The usable files for ``backend`` of the other devices with this compute capability,
    nearest device first (longest common name prefix, then name). A device's file is taken
    from the first directory of the search path that has one, as for the device itself."""
    capability = _check_capability(compute_capability)
    own = device_file_stem(device_name)
    seen = {own}
    found = []
    for directory in _search(search_path):
        try:
            subdirs = sorted(p for p in Path(directory).iterdir() if p.is_dir())
        except OSError:
            continue
        for subdir in subdirs:
            path = subdir / f"{backend}.json"
            if subdir.name in seen or not path.is_file():
                continue
            tuned = load_file(path)
            if tuned is None:
                continue
            seen.add(subdir.name)
            if tuned.compute_capability == capability:
                found.append(tuned)
    return sorted(found, key=lambda f: (-_common_prefix(f.path.parent.name, own), f.path.parent.name))


def load_tuned_configs(
    device_name: str, backend: str, search_path: Iterable[Path] | None = None
) -> tuple[dict[str, Any], Path] | None:
    """The device's own config file for ``backend`` on the search path, with its path (its
    entries: the well-formed ones)."""
    tuned = _own_file(device_name, backend, _search(search_path))
    if tuned is None:
        return None
    return {**tuned.data, "entries": [entry for _, entry in tuned.entries]}, tuned.path


def _distance(entry: dict[str, Any], field: str, target: int) -> tuple[float, int]:
    """Log2 distance of the entry's bucket ``field`` from ``target`` (a bucket), the larger
    bucket first on a tie."""
    bucket = entry["key"][field]
    return abs(math.log2(bucket) - math.log2(target)), -bucket


def _nearest_entry(
    tuned: TunedFile,
    key: dict[str, Any],
    seqlen: int,
    validate: Callable[[dict[str, Any]], str | None] | None,
    batch: int | None = None,
) -> dict[str, Any] | None:
    matching = [(i, e) for i, e in tuned.entries if all(e["key"][name] == value for name, value in key.items())]
    target = seqlen_bucket(seqlen)
    if key["pass"] == "decode":
        wanted = batch_bucket(batch)
        matching.sort(key=lambda ie: (_distance(ie[1], "batch_bucket", wanted), _distance(ie[1], "seqlen_bucket", target)))
    else:
        matching.sort(key=lambda ie: _distance(ie[1], "seqlen_bucket", target))
    for index, entry in matching:
        problem = validate(dict(entry["config"])) if validate is not None else None
        if problem is None:
            return dict(entry["config"])
        warn_once(f"sbbench: {_entry_label(tuned.path, index, entry)} skipped: {problem}")
    return None


def _lookup_key(pass_: str, dtype: str, head_dim: int, gqa_group: int, attend_current: bool,
                batch: int | None) -> dict[str, Any]:
    if pass_ not in PASSES:
        raise ValueError(f"pass_: expected one of {', '.join(PASSES)}, got {pass_!r}")
    if pass_ == "decode":
        batch_bucket(batch)  # a decode lookup needs the batch: ValueError naming it otherwise
    return {"pass": pass_, "dtype": dtype, "head_dim": head_dim, "gqa_group": gqa_group, "attend_current": attend_current}


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
    batch: int | None = None,
    triton_version: str | None = None,
    compute_capability: tuple[int, int] | None = None,
    search_path: Iterable[Path] | None = None,
    validate: Callable[[dict[str, Any]], str | None] | None = None,
    warn_default: bool = True,
) -> dict[str, Any] | None:
    """The tuned config nearest to this key, or None (the caller then uses its default).

    ``seqlen``: the sequence length (decode: the cache length); ``batch``: the batch, needed
    (only) for ``pass_="decode"``.

    ``compute_capability`` (``(major, minor)``) lets a device without its own file use the file
    of the nearest device of the same capability. ``validate(config)`` returns why the caller
    cannot use a config (or None); such entries are skipped with a warning naming the file.
    ``warn_default=False`` falls back to the default silently where tuning does not apply.
    """
    capability = _check_capability(compute_capability)
    search = _search(search_path)
    tuned = _own_file(device_name, backend, search)
    if tuned is None and capability is not None:
        nearest = same_architecture_files(device_name, backend, capability, search)
        if nearest:
            tuned = nearest[0]
            warn_once(f"sbbench: no tuned {backend} configs for {device_name}; using those of {tuned.device} "
                      f"(same compute capability {capability[0]}.{capability[1]}): {tuned.path}")
    if tuned is None:
        if warn_default:
            warn_once(f"sbbench: no tuned {backend} configs for {device_name}; using defaults")
        return None
    key = _lookup_key(pass_, dtype, head_dim, gqa_group, attend_current, batch)
    found = _nearest_entry(tuned, key, seqlen, validate, batch)
    if found is None:
        if warn_default:
            ac = " attend_current" if attend_current else ""
            warn_once(f"sbbench: no tuned {backend} config for {pass_} {dtype} D{head_dim} g{gqa_group}{ac} "
                      f"in {tuned.path}; using defaults")
        return None
    made_with = tuned.data.get("triton_version")
    if triton_version and made_with and made_with != triton_version:
        warn_once(
            f"sbbench: {tuned.path} was tuned under Triton {made_with}, running Triton {triton_version}; "
            "its configs may be slower here (re-run `sbbench tune`)"
        )
    return found


def same_architecture_configs(
    device_name: str,
    backend: str,
    compute_capability: tuple[int, int],
    *,
    pass_: str,
    dtype: str,
    head_dim: int,
    gqa_group: int,
    attend_current: bool,
    seqlen: int,
    batch: int | None = None,
    search_path: Iterable[Path] | None = None,
    validate: Callable[[dict[str, Any]], str | None] | None = None,
    include_own: bool = False,
) -> list[tuple[dict[str, Any], Path]]:
    """The nearest-bucket config of this key from every file of the same compute capability
    other than the device's own, nearest device first, each with its file; empty when none
    (a tuner's warm start: configs that won on a sibling GPU are worth trying first). With
    ``include_own``, the device's own file comes first (for another dtype's key: see
    :data:`SIBLING_DTYPES`)."""
    key = _lookup_key(pass_, dtype, head_dim, gqa_group, attend_current, batch)
    search = _search(search_path)
    files = same_architecture_files(device_name, backend, compute_capability, search)
    own = _own_file(device_name, backend, search) if include_own else None
    if own is not None:
        files.insert(0, own)
    found = []
    for tuned in files:
        config = _nearest_entry(tuned, key, seqlen, validate, batch)
        if config is not None:
            found.append((config, tuned.path))
    return found


# The 16-bit float dtypes whose tuned configs are worth trying for each other: the same kernels
# at the same tiles, their values in one format or the other (float32 inputs take other code
# paths, whose best tiles differ).
SIBLING_DTYPES = {"float16": "bfloat16", "bfloat16": "float16"}


def write_config_file(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
