"""``sbbench export``: the best feasible config of every tuned key, as config files.

One JSON file per device and backend in the format of :mod:`sbbench.core.config_loader`
(``<out>/<device>/<backend>.json``), written with its ``write_config_file`` (atomically). Per key
the entry holds the config of the fastest trial that stayed within the numerics budget, over
every study of that key (TPE and grid), its latency, the default config's latency measured in
the same study, and the speedup. Decode keys (pass ``decode``, with their batch bucket) go in
the same file. Backends read the files through ``config_loader.lookup_config``
(their ``tuned_config`` hooks) when ``<out>`` is on the search path: ``$SBBENCH_CONFIG_DIR``, or
the package's shipped ``sbbench/configs``.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sbbench.autotune import sampler as sampling
from sbbench.autotune.store import StoredStudy, TuneKey, list_studies, open_storage
from sbbench.core import config_loader
from sbbench.core.errors import ArgumentError


@dataclass
class ExportedEntry:
    device: str
    backend: str
    entry: dict[str, Any]


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    entries: list[ExportedEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    on_search_path: bool = True


# A tuned config replaces the default only when it is this much faster: a "win" within the
# run-to-run noise of a latency median (about 1%) is a coin toss on the tuning regime, and a
# config marginally faster on `mixed` can be clearly slower on another regime such as `dense`.
DEFAULT_MIN_SPEEDUP = 1.02


def _best_of(study: optuna.Study, stored: StoredStudy, min_speedup: float = DEFAULT_MIN_SPEEDUP) -> dict[str, Any] | None:
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state == TrialState.COMPLETE and not sampling.is_duplicate(t) and t.value is not None]
    # A config whose numerics were not checked (it was slower than a checked one when it ran)
    # is never exported: a wrong-but-fast config must not reach a config file.
    feasible = [t for t in trials if sampling.is_feasible(t) and not sampling.is_unchecked(t)]
    if not feasible:
        return None
    best = min(feasible, key=lambda t: t.value)
    space = {n: tuple(c) for n, c in stored.attrs.get("space", {}).items()}
    default = stored.attrs.get("default_params") or {}
    want = sampling.params_key(space, default)
    default_trial = next((t for t in trials if sampling.params_key(space, t.params) == want), None)
    default_ms = default_trial.value if default_trial is not None else None
    if (default_trial is not None and sampling.is_feasible(default_trial)
            and best.value * min_speedup > default_ms):
        best = default_trial
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not sampling.is_duplicate(t)
                and not sampling.is_interrupted(t)]
    return {
        "key": stored.key.entry_key(),
        "config": dict(best.params),
        "latency_ms": best.value,
        "default_latency_ms": default_ms,
        "speedup_over_default": (default_ms / best.value) if default_ms else None,
        "default_feasible": None if default_trial is None else sampling.is_feasible(default_trial),
        "sampler": stored.sampler,
        "study": stored.name,
        "trial": best.number,
        "trials": len(finished),
        "case": stored.attrs.get("case"),
        "regime": stored.attrs.get("regime"),
    }


def export_configs(
    storage_url: str | None, out_dir: Path, backend: str | None = None, min_speedup: float = DEFAULT_MIN_SPEEDUP
) -> ExportResult:
    """Write the config files for every (device, backend) tuned in ``storage_url``; per key the
    fastest feasible config, or the default unless that is ``min_speedup`` times faster."""
    if not (isinstance(min_speedup, (int, float)) and min_speedup >= 1.0):
        raise ArgumentError("min_speedup", f"expected a number >= 1, got {min_speedup!r}")
    storage = open_storage(storage_url)
    studies = list_studies(storage, backend)
    result = ExportResult()
    if not studies:
        what = f"backend {backend!r}" if backend else "any backend"
        result.notes.append(f"no sbbench studies of {what} in this storage")
        return result

    groups: dict[tuple[str, str], list[StoredStudy]] = {}
    for s in studies:
        groups.setdefault((s.key.device, s.key.backend), []).append(s)

    for (device, backend_name), members in sorted(groups.items()):
        # A file records one Triton version: configs lose speed across releases, so studies made
        # under another version than the newest are left out rather than mislabelled.
        newest = max(members, key=lambda s: str(s.attrs.get("created", "")))
        versions = {"triton_version": newest.attrs.get("triton_version"), "torch_version": newest.attrs.get("torch_version")}
        kept = []
        for s in members:
            if s.attrs.get("triton_version") != versions["triton_version"]:
                result.notes.append(f"{s.name}: tuned under triton {s.attrs.get('triton_version')}, "
                                    f"not the newest {versions['triton_version']}; left out")
            else:
                kept.append(s)
        best: dict[TuneKey, dict[str, Any]] = {}
        for s in kept:
            study = optuna.load_study(study_name=s.name, storage=storage)
            entry = _best_of(study, s, min_speedup)
            if entry is None:
                result.notes.append(f"{s.name}: no trial within the numerics budget yet; nothing to export")
                continue
            current = best.get(s.key)
            if current is None or entry["latency_ms"] < current["latency_ms"]:
                best[s.key] = entry
        if not best:
            continue
        path = config_loader.config_file(out_dir, device, backend_name)
        entries = {_key_tuple(e["key"]): e for e in _previous_entries(path, versions["triton_version"], result)}
        for entry in best.values():
            entries[_key_tuple(entry["key"])] = entry
            result.entries.append(ExportedEntry(device, backend_name, entry))
        data = {
            "schema_version": config_loader.SCHEMA_VERSION,
            "device": device,
            "backend": backend_name,
            **versions,
            **_capability_field(device, kept),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "entries": [entries[k] for k in sorted(entries)],
        }
        try:
            config_loader.write_config_file(path, data)
        except OSError as exc:
            raise ArgumentError("out_dir", f"cannot write {path} ({exc.strerror or exc})") from None
        result.files.append(path)

    search = [p.resolve() for p in config_loader.config_search_path()]
    result.on_search_path = Path(out_dir).resolve() in search
    return result


def _capability_field(device: str, studies: list[StoredStudy]) -> dict[str, Any]:
    """``compute_capability`` as the studies recorded it (the tuner's environment), else from
    this machine's GPU when it is that device; omitted when unknown (a CPU, or a storage
    exported on another machine), and the file is then used only by its own device."""
    for s in sorted(studies, key=lambda s: str(s.attrs.get("created", "")), reverse=True):
        capability = s.attrs.get("compute_capability")
        if isinstance(capability, (list, tuple)) and len(capability) == 2:
            return {"compute_capability": [int(capability[0]), int(capability[1])]}
    import torch

    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if torch.cuda.get_device_name(index) == device:
                return {"compute_capability": list(torch.cuda.get_device_capability(index))}
    return {}


def _key_tuple(key: dict[str, Any]) -> tuple:
    return tuple(str(key.get(name)) for name in ("pass", "dtype", "head_dim", "gqa_group", "attend_current", "seqlen_bucket",
                                                 "batch_bucket"))


def _previous_entries(path: Path, triton_version: Any, result: ExportResult) -> list[dict[str, Any]]:
    """Entries already in ``path`` for keys not exported now are kept (several storages, or
    several machines, may fill one file), unless they were made under another Triton version."""
    if not path.is_file():
        return []
    try:
        data = config_loader.read_config_file(path)
    except ValueError as exc:
        result.notes.append(f"{exc}; overwritten")
        return []
    if data.get("triton_version") != triton_version:
        result.notes.append(f"{path}: made under triton {data.get('triton_version')}; its entries are replaced")
        return []
    kept = []
    for index, entry in enumerate(data["entries"]):
        problem = config_loader.entry_problem(entry)
        if problem is None:
            kept.append(entry)
        else:
            result.notes.append(f"{path}: entry {index} dropped: {problem}")
    return kept
