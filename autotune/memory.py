"""Configs that could not be launched on a device, remembered across studies and runs.

A config that runs out of shared memory or registers does so at every sequence length, so
once one study has paid to find out, no later study of the same device, backend, pass, dtype,
head dim, GQA group and attend_current launches it again. Kept per host in the cache
directory (``unlaunchable.json``), written atomically.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Mapping

from sbbench.autotune.store import TuneKey, cache_dir
from sbbench.core.results import write_text_atomic


def _scope(key: TuneKey) -> str:
    # Everything of the key but the sequence-length bucket.
    return "/".join(str(x) for x in (key.device, key.backend, key.pass_, key.dtype, key.head_dim,
                                     key.gqa_group, int(key.attend_current)))


def _cell(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(sorted(params.items())), default=str)


class UnlaunchableConfigs:
    """The remembered configs, with the reason each one failed."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "unlaunchable.json"
        self._lock = threading.Lock()
        self._known: dict[str, dict[str, str]] = self._read()

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {scope: dict(cells) for scope, cells in data.items() if isinstance(cells, dict)}

    def reason(self, key: TuneKey, params: Mapping[str, Any]) -> str | None:
        """Why ``params`` could not be launched for ``key``'s scope, or None if not known to fail."""
        return self._known.get(_scope(key), {}).get(_cell(params))

    def add(self, key: TuneKey, params: Mapping[str, Any], reason: str) -> None:
        with self._lock:
            self._known.setdefault(_scope(key), {})[_cell(params)] = reason[:300]
            try:
                write_text_atomic(self.path, json.dumps(self._known, indent=1, sort_keys=True) + "\n")
            except OSError:
                pass  # remembering is an optimisation; this run still knows
