"""``sbbench gate`` (fail CI on a slowdown) and ``sbbench report`` (the markdown a person reads)."""

from __future__ import annotations

from pathlib import Path
from typing import List, NoReturn, Optional

import typer

from sbbench.cli.app import app, flag_message

# Exit codes of ``sbbench gate``: CI tells a slowdown (1) from a broken comparison (2).
EXIT_PASS, EXIT_REGRESSION, EXIT_UNUSABLE = 0, 1, 2


def _fail(command: str, message: str) -> NoReturn:
    typer.echo(f"sbbench {command}: error: {message}", err=True)
    raise typer.Exit(EXIT_UNUSABLE)


@app.command("gate")
def gate(
    baseline: Path = typer.Argument(..., help="Results JSON of the reference run (e.g. reports/<device>/bench.json).", show_default=False),
    current: Path = typer.Argument(..., help="Results JSON of the run under test.", show_default=False),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Relative slowdown that counts as a regression (0.05 = 5%); default 0.05.",
        show_default=False,
    ),
    min_delta_ms: Optional[float] = typer.Option(
        None, "--min-delta-ms", help="Ignore differences smaller than this many milliseconds; default 0.",
        show_default=False,
    ),
    max_spread: Optional[float] = typer.Option(
        None, "--max-spread", help="A row whose q80 - q20 exceeds this fraction of its median is too noisy to fail; default 0.5.",
        show_default=False,
    ),
    fail_on_missing: Optional[bool] = typer.Option(
        None, "--fail-on-missing/--allow-missing",
        help="Also fail when a baseline row is missing or failed in the current run; default: allow.",
        show_default=False,
    ),
    fail_on_error: Optional[bool] = typer.Option(
        None, "--fail-on-error/--allow-error",
        help="Count a row that was ok in the baseline and is oom, error or failed now as a regression; default: yes.",
        show_default=False,
    ),
    settings_file: Optional[Path] = typer.Option(
        None, "--settings", help="TOML settings file with a gate table (e.g. ci/gate.toml); options given here win.",
        show_default=False,
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the comparison as JSON to this file.", show_default=False),
    show_all: bool = typer.Option(False, "--all", help="List unchanged rows too."),
) -> None:
    """Compare two bench runs of one device; exit 1 on a regression.

    A row regresses when its median is slower than the baseline's by more
    than --threshold AND its 20th latency percentile is above the baseline's
    80th: the two runs' spreads do not overlap, so noise cannot fail it. A row
    that was ok in the baseline and is oom, error or failed now regresses too.

    Exit 0: no regression. 1: regression. 2: unusable input (unreadable or
    truncated file, another schema, runs from different devices).
    """
    from sbbench.harness.gate import GateInputError, GateSettings, compare_files, format_result, load_settings, write_json

    try:
        values = load_settings(settings_file) if settings_file is not None else {}
    except GateInputError as exc:
        _fail("gate", f"--settings: {exc}")
    for name, value in (("threshold", threshold), ("min_delta_ms", min_delta_ms), ("max_spread", max_spread),
                        ("fail_on_missing", fail_on_missing), ("fail_on_error", fail_on_error)):
        if value is not None:
            values[name] = value
    try:
        settings = GateSettings(**values)
    except GateInputError as exc:
        _fail("gate", flag_message(exc))
    try:
        result = compare_files(baseline, current, settings)
    except GateInputError as exc:
        _fail("gate", str(exc))
    typer.echo(format_result(result, show_all=show_all))
    if json_out is not None:
        try:
            write_json(json_out, result.to_json())
        except OSError as exc:
            _fail("gate", f"--json: cannot write {json_out} ({exc.strerror or exc})")
    raise typer.Exit(result.exit_code)


@app.command("report")
def report(
    results: List[Path] = typer.Argument(..., help="Results JSON files (bench, check and tune rows of one device).", show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Report folder; default reports/<device>/report/ (device name, spaces as underscores).",
        show_default=False,
    ),
) -> None:
    """Write a markdown report (README.md) with tables and PNG plots.

    Bench rows give TFLOP/s, speedup over fa2 and peak memory against
    sequence length; check rows a pass/fail summary against the error budget;
    tune rows the best latency against trial. All rows must be of one device.
    Exit 2, writing nothing, for rows it cannot place (no device, or no
    bench, check or tune rows at all).
    """
    from sbbench.harness.report import ReportInputError, write_report

    try:
        written = write_report(results, out)
    except ReportInputError as exc:
        _fail("report", flag_message(exc))
    except OSError as exc:  # disk full, permissions changed under us: the old report stays
        _fail("report", f"--out: cannot write the report ({exc.strerror or exc}: {exc.filename or ''})")
    typer.echo(f"wrote {written.markdown} with {len(written.plots)} plot(s)")
    for command, count in written.left_out.items():
        typer.echo(f"note: {count} {command} row(s) left out: the report has sections for bench, check and tune rows",
                   err=True)
