"""``sbbench check`` and ``sbbench bench``: the harness on the command line.

Both take the shared sweep flags (sbbench.harness.sweep) or a sweep file, print a table, and
can write the rows as JSON (and CSV for bench). ``check`` exits 1 when any row fails its budget
or errors; ``bench`` marks failing rows and exits 0 unless its input is unusable. Bad input
(unknown backend, bad flag value, unreadable sweep file) is a one-line message and exit 2.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, Optional

import typer
from tabulate import tabulate

from sbbench.cli.app import app
from sbbench.core.results import to_frame, write_rows
from sbbench.harness.sweep import (
    AttendCurrentOpt,
    BackendsOpt,
    BatchOpt,
    DeviceOpt,
    DtypeOpt,
    HeadDimOpt,
    HeadsOpt,
    KvHeadsOpt,
    ModeOpt,
    RegimeOpt,
    SeqlensOpt,
    Sweep,
    SweepFileOpt,
    VarlenOpt,
    sweeps_from_flags,
)

JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the rows to this JSON results file.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Write the rows to this CSV file.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed the random inputs (default: fresh every run).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")]

EXIT_USAGE = 2


def _fail_usage(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _sweeps(command: str, sweep_file: Path | None, device: str | None, **flags: Any) -> list[Sweep]:
    try:
        return sweeps_from_flags(command, sweep_file=sweep_file, device=device, **flags)
    except (ValueError, TypeError) as exc:
        raise _fail_usage(str(exc)) from None


def _print_notes(sweeps: Iterable[Sweep]) -> None:
    for note in dict.fromkeys(n for s in sweeps for n in s.notes):
        typer.echo(f"note: {note}")


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, spec)
    return str(value)


def _shape(row: Mapping[str, Any]) -> str:
    kv = f"/{row['kv_heads']}" if row["kv_heads"] != row["heads"] else ""
    flags = (" varlen" if row.get("varlen") else "") + (" cur" if row.get("attend_current") else "")
    return f"{row['batch']}x{row['heads']}{kv}x{row['seqlen']}x{row['head_dim']}{flags}"


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
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = csv_path.with_name(csv_path.name + f".tmp{os.getpid()}")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, csv_path)  # atomic, like the JSON results
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
    headers = ["backend", "BxHxTxD", "dtype", "regime", "tensor", "err_max", "err_rel_fro", "err_pt",
               "budget", "fa2_rel_err", "result"]
    body = [
        [r["backend"], _shape(r), r["dtype"], r["regime"], r.get("tensor") or "", _fmt(r.get("err_max")),
         _fmt(r.get("err_rel_fro")), _fmt(r.get("err_pt")), _fmt(r.get("budget")), _fmt(r.get("fa2_rel_err")),
         _status(r)]
        for r in rows
    ]
    return tabulate(body, headers=headers, disable_numparse=True)


def bench_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table of bench rows."""
    headers = ["backend", "BxHxTxD", "dtype", "mode", "regime", "ms", "q20-q80 ms", "TFLOP/s", "peak MiB",
               "speedup", "skipped", "result"]
    body = []
    for r in rows:
        spread = f"{_fmt(r.get('latency_q20_ms'))}-{_fmt(r.get('latency_q80_ms'))}" if r.get("latency_ms") else ""
        body.append([
            r["backend"], _shape(r), r["dtype"], r["mode"], r["regime"], _fmt(r.get("latency_ms"), ".4g"), spread,
            _fmt(r.get("tflops"), ".3g"), _fmt(r.get("peak_mem_mib"), ".1f"), _fmt(r.get("speedup"), ".2f"),
            _fmt(r.get("skipped_fraction"), ".2f"), _status(r),
        ])
    return tabulate(body, headers=headers, disable_numparse=True)


@app.command("check")
def check_command(
    backends: BackendsOpt = None,
    mode: ModeOpt = None,
    batch: BatchOpt = None,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    head_dim: HeadDimOpt = None,
    seqlens: SeqlensOpt = None,
    dtype: DtypeOpt = None,
    regime: RegimeOpt = None,
    attend_current: AttendCurrentOpt = None,
    varlen: VarlenOpt = None,
    device: DeviceOpt = None,
    sweep: SweepFileOpt = None,
    json_path: JsonOpt = None,
    seed: SeedOpt = None,
    fa2: Annotated[bool, typer.Option("--fa2/--no-fa2", help="Measure the FlashAttention-2 anchor beside each row.")] = True,
    progress: ProgressOpt = True,
) -> None:
    """Check numerics against the float64 oracle with FlashAttention-2's budget (2*err_pt + floor).

    Exits 1 when any row fails (over budget, NaN/Inf, or the backend raised), else 0.
    """
    from sbbench.harness.check import row_failed, run_check

    sweeps = _sweeps(
        "check", sweep, device, backends=backends, mode=mode, batch=batch, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, seqlens=seqlens, dtype=dtype, regime=regime, attend_current=attend_current,
        varlen=varlen,
    )
    _print_notes(sweeps)
    rows: list[dict[str, Any]] = []
    try:
        for s in sweeps:
            rows += run_check(s.backends, s.cases, s.regimes, s.device, modes=s.modes, fa2=fa2, seed=seed,
                              progress=progress)
    except (ValueError, TypeError) as exc:
        raise _fail_usage(str(exc)) from None
    typer.echo(check_table(rows))
    _implementations(rows)
    for note in dict.fromkeys(r["notes"] for r in rows if r.get("notes")):
        typer.echo(f"note: {note}")
    _write_outputs(rows, "check", json_path)
    failed = [r for r in rows if row_failed(r)]
    ran = [r for r in rows if r.get("status") != "unsupported"]
    if not ran:
        raise _fail_usage("nothing ran: every backend is unsupported for every case (see the table)")
    typer.echo(f"{len(ran)} rows checked, {len(failed)} failed")
    raise typer.Exit(1 if failed else 0)


@app.command("bench")
def bench_command(
    backends: BackendsOpt = None,
    mode: ModeOpt = None,
    batch: BatchOpt = None,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    head_dim: HeadDimOpt = None,
    seqlens: SeqlensOpt = None,
    dtype: DtypeOpt = None,
    regime: RegimeOpt = None,
    attend_current: AttendCurrentOpt = None,
    varlen: VarlenOpt = None,
    device: DeviceOpt = None,
    sweep: SweepFileOpt = None,
    baseline: Annotated[Optional[str], typer.Option(
        "--baseline", help="Backend whose latency the speedup column divides by. Default: fa2 when it can run.")] = None,
    json_path: JsonOpt = None,
    csv_path: CsvOpt = None,
    cuda_graph: Annotated[str, typer.Option(
        "--cuda-graph", help="GPU timing from a CUDA graph: off, on, or auto (only launch-bound shapes).")] = "off",
    seed: SeedOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Benchmark latency, TFLOP/s, peak memory and speedup. Failing rows are marked; exit 0."""
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
    rows: list[dict[str, Any]] = []
    try:
        for s in sweeps:
            base = s.baseline
            if base is None:
                reason = get_backend("fa2").unavailable_reason()
                if reason is None and s.device.startswith("cuda"):
                    base = "fa2"
                else:
                    why = reason or f"it runs on the GPU, this sweep on {s.device}"
                    typer.echo(f"note: no --baseline given and fa2 cannot be the baseline here ({why}): "
                               "the speedup column stays empty")
            rows += run_bench(s.backends, s.cases, s.modes, s.regimes, s.device, base, progress,
                              cuda_graph=graph, seed=seed)
    except (ValueError, TypeError) as exc:
        raise _fail_usage(str(exc)) from None
    typer.echo(bench_table(rows))
    _implementations(rows)
    timers = dict.fromkeys(r["timer"] for r in rows if r.get("timer"))
    for timer in timers:
        typer.echo(f"timer: {timer}")
    _write_outputs(rows, "bench", json_path, csv_path)
    bad = sum(r.get("status") in ("error", "oom") for r in rows)
    typer.echo(f"{len(rows)} rows, {bad} failed" + (" (marked above)" if bad else ""))
