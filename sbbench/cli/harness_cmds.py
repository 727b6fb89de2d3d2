"""``sbbench check`` and ``sbbench bench``: the harness on the command line.

Both take the shared sweep flags (sbbench.harness.sweep) or a sweep file, print a table, and
can write the rows as JSON (and CSV for bench). ``check`` exits 1 when any row fails its budget
or errors; ``bench`` marks failing rows and exits 0 unless its input is unusable. Bad input
(unknown backend, bad flag value, unreadable sweep file) is a one-line message and exit 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional

import typer
from tabulate import tabulate

from sbbench.cli.app import app, flag_message
from sbbench.cli.sweep_opts import BENCH, CHECK
from sbbench.core.results import (
    ResultsFileError,
    device_name,
    read_rows,
    shape_label,
    to_frame,
    write_rows,
    write_text_atomic,
)
from sbbench.harness.sweep import Sweep, sweeps_from_flags

JsonOpt = Annotated[Optional[Path], typer.Option(
    "--json", help="Write the rows to this JSON results file, each row as it finishes (an interrupted sweep "
    "keeps every finished row). An existing file is replaced unless --resume is given.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Keep the rows already in the --json file and run only the missing ones (matched on "
    "device, backend, shape, dtype, mode and regime); speedups are recomputed over old and new rows. Failed rows "
    "count as done: delete them from the file to run them again.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Write the rows to this CSV file.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed the random inputs (default: fresh every run).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# The library names the backend a single call runs; check and bench take a list.
HARNESS_FLAGS = {"backend": "--backends"}


def _fail_usage(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _sweeps(command: str, sweep_file: Path | None, device: str | None, **flags: Any) -> list[Sweep]:
    try:
        return sweeps_from_flags(command, sweep_file=sweep_file, device=device, **flags)
    except (ValueError, TypeError) as exc:
        raise _fail_usage(flag_message(exc, HARNESS_FLAGS)) from None


def _print_notes(sweeps: Iterable[Sweep]) -> None:
    for note in dict.fromkeys(n for s in sweeps for n in s.notes):
        typer.echo(f"note: {note}")


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def _status(row: Mapping[str, Any], width: int = 70) -> str:
    status = row.get("status")
    if status == "ok" and row.get("passed") is not False:
        return "ok"
    label = {"error": "ERROR", "oom": "OOM", "unsupported": "unsupported"}.get(status, "FAIL")
    if status == "ok":
        label = "FAIL"
    error = row.get("error") or ""
    return f"{label}: {error[:width]}" if error else label


def _write_outputs(rows: list[dict[str, Any]], command: str, json_path: Path | None, csv_path: Path | None = None) -> None:
    if json_path is not None:
        write_rows(json_path, rows, command=command)
        typer.echo(f"wrote {len(rows)} rows to {json_path}")
    if csv_path is not None:
        frame = to_frame(rows)
        frame["config"] = [json.dumps(c, sort_keys=True) if c is not None else "" for c in frame["config"]]
        write_text_atomic(csv_path, frame.to_csv(index=False))
        typer.echo(f"wrote {len(rows)} rows to {csv_path}")


def _implementations(rows: Iterable[Mapping[str, Any]]) -> None:
    seen = {}
    for row in rows:
        ran = row.get("status") not in ("unsupported", None)
        if ran and row.get("implementation") and row["implementation"] != row["backend"]:
            seen.setdefault(row["backend"], row["implementation"])
    for backend, implementation in seen.items():
        typer.echo(f"{backend}: {implementation}")


def check_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table of check rows."""
    headers = ["backend", "shape", "dtype", "regime", "tensor", "err_max", "err_rel_fro", "err_pt",
               "budget", "fa2_rel_err", "result"]
    body = [
        [r["backend"], shape_label(r), r["dtype"], r["regime"], r.get("tensor") or "", _fmt(r.get("err_max")),
         _fmt(r.get("err_rel_fro")), _fmt(r.get("err_pt")), _fmt(r.get("budget")), _fmt(r.get("fa2_rel_err")),
         _status(r)]
        for r in rows
    ]
    return tabulate(body, headers=headers, disable_numparse=True)


def bench_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table of bench rows."""
    headers = ["backend", "shape", "dtype", "mode", "regime", "ms", "q20-q80 ms", "TFLOP/s", "peak MiB",
               "speedup", "skipped", "result"]
    body = []
    for r in rows:
        spread = f"{_fmt(r.get('latency_q20_ms'))}-{_fmt(r.get('latency_q80_ms'))}" if r.get("latency_ms") else ""
        body.append([
            r["backend"], shape_label(r), r["dtype"], r["mode"], r["regime"], _fmt(r.get("latency_ms"), ".4g"), spread,
            _fmt(r.get("tflops"), ".3g"), _fmt(r.get("peak_mem_mib"), ".1f"), _fmt(r.get("speedup"), ".2f"),
            _fmt(r.get("skipped_fraction"), ".2f"), _status(r),
        ])
    return tabulate(body, headers=headers, disable_numparse=True)


class _Progress:
    """The rows of a sweep so far, saved to ``--json`` after every finished row."""

    def __init__(self, command: str, json_path: Path | None, rows: list[dict[str, Any]]) -> None:
        self.command, self.json_path, self.rows = command, json_path, rows

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        if self.json_path is not None:
            write_rows(self.json_path, rows, command=self.command)


def _previous_rows(command: str, json_path: Path | None, resume: bool, sweeps: list[Sweep]) -> list[dict[str, Any]]:
    """The rows a ``--resume`` keeps (none without it), checked to belong to this command and device."""
    if not resume:
        if json_path is not None and json_path.exists():
            typer.echo(f"note: replacing {json_path} (--resume would keep its rows)", err=True)
        return []
    if json_path is None:
        raise _fail_usage("--resume: needs --json, the file whose rows to keep")
    if not json_path.exists():
        typer.echo(f"note: --resume: {json_path} does not exist yet; starting a new sweep", err=True)
        return []
    try:
        rows = read_rows(json_path)
    except ResultsFileError as exc:
        raise _fail_usage(f"--resume: {exc}") from None
    others = sorted({str(r.get("command")) for r in rows} - {command})
    if others:
        raise _fail_usage(f"--resume: {json_path} holds {', '.join(others)} rows, not {command} rows")
    here = {device_name(s.device) for s in sweeps}
    there = sorted({str(r["device"]) for r in rows if r.get("device") is not None} - here)
    if there:
        raise _fail_usage(f"--resume: {json_path} was measured on {'; '.join(there)}, this run is on "
                          f"{'; '.join(sorted(here))}")
    typer.echo(f"resuming: {len(rows)} rows already in {json_path} are kept and not run again", err=True)
    return rows


def _run_sweeps(run: Callable[[Sweep, list[dict[str, Any]]], list[dict[str, Any]]], sweeps: list[Sweep],
                progress: _Progress, table: Callable[[list[dict[str, Any]]], str]) -> bool:
    """Run every sweep, each resuming from the rows before it; True when Ctrl-C stopped it.

    Rows are already on disk as they finish; on an interruption or a crash the table of the rows so
    far is printed before the command ends.
    """
    try:
        for s in sweeps:
            progress.rows = run(s, progress.rows)
    except (ValueError, TypeError) as exc:
        raise _fail_usage(flag_message(exc, HARNESS_FLAGS)) from None
    except KeyboardInterrupt:
        return True
    except Exception:
        typer.echo(table(progress.rows))
        where = f", saved in {progress.json_path}" if progress.json_path is not None else ""
        typer.echo(f"error: the sweep stopped after {len(progress.rows)} rows{where}", err=True)
        raise
    return False


def _interrupted(progress: _Progress) -> typer.Exit:
    where = f"; they are in {progress.json_path} (add --resume to run the rest)" if progress.json_path else ""
    typer.echo(f"interrupted: {len(progress.rows)} rows finished{where}", err=True)
    return typer.Exit(EXIT_INTERRUPTED)


@app.command("check")
def check_command(
    backends: CHECK.backends = None,
    mode: CHECK.mode = None,
    batch: CHECK.batch = None,
    heads: CHECK.heads = None,
    kv_heads: CHECK.kv_heads = None,
    head_dim: CHECK.head_dim = None,
    seqlens: CHECK.seqlens = None,
    dtype: CHECK.dtype = None,
    regime: CHECK.regime = None,
    attend_current: CHECK.attend_current = None,
    varlen: CHECK.varlen = None,
    device: CHECK.device = None,
    sweep: CHECK.sweep = None,
    json_path: JsonOpt = None,
    resume: ResumeOpt = False,
    seed: SeedOpt = None,
    fa2: Annotated[bool, typer.Option("--fa2/--no-fa2", help="Measure the FlashAttention-2 anchor beside each row.")] = True,
    progress: ProgressOpt = True,
) -> None:
    """Check numerics against the float64 oracle with FlashAttention-2's budget (2*err_pt + floor).

    Exits 1 when any row fails (over budget, NaN/Inf, or the backend raised), else 0; 130 when
    interrupted (the finished rows are kept in --json).
    """
    from sbbench.harness.check import row_failed, run_check

    sweeps = _sweeps(
        "check", sweep, device, backends=backends, mode=mode, batch=batch, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, seqlens=seqlens, dtype=dtype, regime=regime, attend_current=attend_current,
        varlen=varlen,
    )
    _print_notes(sweeps)
    sofar = _Progress("check", json_path, _previous_rows("check", json_path, resume, sweeps))

    def run(s: Sweep, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return run_check(s.backends, s.cases, s.regimes, s.device, modes=s.modes, fa2=fa2, seed=seed,
                         progress=progress, done_rows=done, on_row=sofar)

    interrupted = _run_sweeps(run, sweeps, sofar, check_table)
    rows = sofar.rows
    typer.echo(check_table(rows))
    _implementations(rows)
    for note in dict.fromkeys(r["notes"] for r in rows if r.get("notes")):
        typer.echo(f"note: {note}")
    _write_outputs(rows, "check", json_path)
    if interrupted:
        raise _interrupted(sofar)
    failed = [r for r in rows if row_failed(r)]
    ran = [r for r in rows if r.get("status") != "unsupported"]
    if not ran:
        raise _fail_usage("nothing ran: every backend is unsupported for every case (see the table)")
    typer.echo(f"{len(ran)} rows checked, {len(failed)} failed")
    raise typer.Exit(1 if failed else 0)


@app.command("bench")
def bench_command(
    backends: BENCH.backends = None,
    mode: BENCH.mode = None,
    batch: BENCH.batch = None,
    heads: BENCH.heads = None,
    kv_heads: BENCH.kv_heads = None,
    head_dim: BENCH.head_dim = None,
    seqlens: BENCH.seqlens = None,
    dtype: BENCH.dtype = None,
    regime: BENCH.regime = None,
    attend_current: BENCH.attend_current = None,
    varlen: BENCH.varlen = None,
    device: BENCH.device = None,
    sweep: BENCH.sweep = None,
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="Backend whose latency the speedup column divides by. Default: fa2 when it can run.")] = None,
    json_path: JsonOpt = None,
    resume: ResumeOpt = False,
    csv_path: CsvOpt = None,
    cuda_graph: Annotated[str, typer.Option(
        "--cuda-graph", help="GPU timing from a CUDA graph: off, on, or auto (only launch-bound shapes).")] = "off",
    seed: SeedOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Benchmark latency, TFLOP/s, peak memory and speedup. Failing rows are marked; exit 0
    (130 when interrupted: the finished rows are kept in --json)."""
    from sbbench.core.registry import get_backend
    from sbbench.harness.bench import run_bench

    graph = {"off": False, "on": True, "auto": "auto"}.get(cuda_graph)
    if graph is None:
        raise _fail_usage(f"--cuda-graph: expected off, on or auto, got {cuda_graph!r}")
    sweeps = _sweeps(
        "bench", sweep, device, backends=backends, mode=mode, batch=batch, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, seqlens=seqlens, dtype=dtype, regime=regime, attend_current=attend_current,
        varlen=varlen, baseline=baseline,
    )
    _print_notes(sweeps)
    sofar = _Progress("bench", json_path, _previous_rows("bench", json_path, resume, sweeps))

    def run(s: Sweep, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
        base = s.baseline
        if base is None:
            reason = get_backend("fa2").unavailable_reason()
            if reason is None and s.device.startswith("cuda"):
                base = "fa2"
            else:
                why = reason or f"it runs on the GPU, this sweep on {s.device}"
                typer.echo(f"note: no --baseline given and fa2 cannot be the baseline here ({why}): "
                           "the speedup column stays empty")
        return run_bench(s.backends, s.cases, s.modes, s.regimes, s.device, base, progress,
                         cuda_graph=graph, seed=seed, done_rows=done, on_row=sofar)

    interrupted = _run_sweeps(run, sweeps, sofar, bench_table)
    rows = sofar.rows
    typer.echo(bench_table(rows))
    _implementations(rows)
    timers = dict.fromkeys(r["timer"] for r in rows if r.get("timer"))
    for timer in timers:
        typer.echo(f"timer: {timer}")
    _write_outputs(rows, "bench", json_path, csv_path)
    if interrupted:
        raise _interrupted(sofar)
    bad = sum(r.get("status") in ("error", "oom") for r in rows)
    typer.echo(f"{len(rows)} rows, {bad} failed" + (" (marked above)" if bad else ""))
