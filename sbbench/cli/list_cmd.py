"""``sbbench list``: every backend, whether it can run here, and why not."""

from __future__ import annotations

from tabulate import tabulate

from sbbench.cli.app import app
from sbbench.core.registry import all_backends


@app.command("list")
def list_backends() -> None:
    """Print every registered backend with available / unavailable and the reason."""
    rows = []
    for backend in all_backends():
        reason = backend.unavailable_reason()
        devices = "/".join(backend.devices)
        rows.append(
            [
                backend.name,
                backend.kind,
                "available" if reason is None else "unavailable",
                devices,
                reason or backend.description,
            ]
        )
    print(tabulate(rows, headers=["backend", "kind", "status", "devices", "notes"]))
