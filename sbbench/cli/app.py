"""The Typer application every command module registers on, and how its commands word errors."""

from typing import Mapping

import typer

from sbbench.core.errors import ArgumentError

app = typer.Typer(
    name="sbbench",
    help="Stick-breaking attention: check numerics, benchmark, tune and gate its backends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Stick-breaking attention: check numerics, benchmark, tune and gate its backends."""


def flag_message(exc: Exception, flags: Mapping[str, str] | None = None) -> str:
    """An error for the shell: a library :class:`ArgumentError` names its argument, shown here as
    the command's flag (``flags[argument]``, else ``--`` and the name with dashes); any other
    error as it is."""
    if not isinstance(exc, ArgumentError):
        return str(exc)
    flag = (flags or {}).get(exc.argument) or "--" + exc.argument.replace("_", "-")
    return f"{flag}: {exc.message}"
