"""The Typer application every command module registers on."""

import typer

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
