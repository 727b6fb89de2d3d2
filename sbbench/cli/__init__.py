"""The ``sbbench`` command. Each group of commands lives in its own module and registers itself
on the one Typer app; importing them here wires the CLI together."""

from sbbench.cli.app import app
from sbbench.cli import list_cmd  # noqa: F401

for _module in ("harness_cmds", "tune_cmds", "gate_cmds", "decode_cmds"):
    try:
        __import__(f"sbbench.cli.{_module}")
    except ModuleNotFoundError as _exc:  # a command group not written yet
        if _exc.name != f"sbbench.cli.{_module}":
            raise


def main() -> None:
    app()
