"""``sbbench tune`` (resumable Optuna studies of a backend's launch parameters) and
``sbbench export`` (their best configs as the files ``sb_attn`` reads).

Bad input is a one-line message naming the flag, exit 2. An interrupted ``tune`` (Ctrl-C,
SIGTERM) keeps every finished trial, prints what it has, and exits 130; running it again resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from tabulate import tabulate

from sbbench.cli.app import app, flag_message
from sbbench.cli.sweep_opts import (
    AttendCurrentOpt,
    BatchOpt,
    DtypeOpt,
    HeadDimOpt,
    HeadsOpt,
    KvHeadsOpt,
    SeqlensOpt,
    SweepFileOpt,
)
from sbbench.harness.sweep import sweeps_from_flags

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage", help="Optuna RDB URL of the studies. Default: sqlite:///$XDG_CACHE_HOME/sbbench/tune.db "
    "(~/.cache/sbbench/tune.db). A postgresql://user:pass@host/db URL lets tuners on several machines "
    "share the same studies (each runs `sbbench tune` with the same flags).", show_default=False)]


# The flag of each TuneSettings field a TuneError can name.
FLAGS = {
    "backend": "--backend", "passes": "--pass", "n_trials": "--trials", "time_budget_s": "--minutes",
    "sampler": "--sampler", "storage": "--storage", "devices": "--devices", "trial_timeout": "--trial-timeout",
    "check_seqlen": "--check-seqlen", "startup_trials": "--startup-trials", "space": "--space",
    "compile_workers": "--compile-workers", "prune_factor": "--prune-factor", "new_tokens": "--new-tokens",
    "cases": "--batch/--heads/--kv-heads/--head-dim/--seqlens",
    "regime": "--regime", "plugins": "--import",
    # sweep fields (the shape flags map to themselves)
    "backends": "--backend", "out_dir": "--out", "min_speedup": "--min-speedup",
}


def _usage(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _tune_error(exc: Exception) -> typer.Exit:
    return _usage(flag_message(exc, FLAGS))


def _parse_devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        devices = [int(t) for t in items]
    except ValueError:
        raise _usage(f"--devices: expected comma-separated GPU indices such as 0,1,2,3, got {text!r}") from None
    if not devices:
        raise _usage(f"--devices: expected comma-separated GPU indices such as 0,1,2,3, got {text!r}")
    return devices


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt_config(params: dict[str, Any] | None) -> str:
    if not params:
        return "-"
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


class _Progress:
    """A rich progress bar per study on a terminal; one line per trial otherwise (logs)."""

    def __init__(self, enabled: bool | None) -> None:
        from sbbench.autotune.tuner import Reporter

        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.on_row: Any = None
        self.bar: Any = None
        self.task: Any = None
        outer = self

        class _R(Reporter):
            def message(self, text: str) -> None:
                outer._echo(text)

            def start_study(self, plan: Any, planned: int, resumed: int, budget_s: float | None) -> None:
                outer._start(plan, planned, resumed, budget_s)

            def trial_done(self, plan: Any, trial: Any, best_ms: float | None, row: Any) -> None:
                outer._trial(plan, trial, best_ms)
                if outer.on_row is not None:
                    outer.on_row(row)

            def end_study(self, summary: Any) -> None:
                outer._end(summary)

        self.reporter = _R()

    def _echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            typer.echo(text)

    def _start(self, plan: Any, planned: int, resumed: int, budget_s: float | None) -> None:
        head = f"{plan.key.label()} [{plan.sampler}]: study {plan.study_name}"
        head += f", resuming after {resumed} trial(s)" if resumed else ", new"
        if budget_s is not None:
            head += f", {budget_s:.0f} s of the budget"
        if plan.warm_start:
            head += f", {len(plan.warm_start)} warm-start config(s)"
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._stop_bar()
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[best]}"), transient=True)
            self.bar.start()
            self._echo(head)
            self.task = self.bar.add_task(f"{plan.key.label()} [{plan.sampler}]", total=max(planned, 1), best="")
        else:
            self._echo(head)

    def _trial(self, plan: Any, trial: Any, best_ms: float | None) -> None:
        from sbbench.autotune.summary import describe_trial

        if self.bar is not None:
            self.bar.update(self.task, advance=1, best=f"best {_fmt_ms(best_ms)} ms")
            if trial.user_attrs.get("status") not in ("ok", None):
                self._echo(f"  {describe_trial(trial)}")
        else:
            self._echo(f"  {describe_trial(trial)}")

    def _end(self, summary: Any) -> None:
        self._stop_bar()

    def _stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _config_change(best: dict[str, Any] | None, default: dict[str, Any]) -> str:
    # Only what differs from the default: the default config is in its own column.
    if not best:
        return "-"
    changed = {k: v for k, v in best.items() if default.get(k) != v}
    return _fmt_config(changed) if changed else "(the default)"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def summary_table(summaries: list[Any]) -> str:
    """The per-key table of a tune run: what each study found and what its time bought."""
    rows = []
    for s in summaries:
        speed = f"{s.speedup:.2f}x" if s.speedup else "-"
        default_ms = _fmt_ms(s.default_latency_ms)
        if s.default_status not in (None, "ok"):
            default_ms = f"{default_ms} ({s.default_status})"
        best = _config_change(s.best_params, s.default_params)
        if s.best_source and s.best_source not in ("default", s.sampler):
            best += f" (from {s.best_source.rsplit('/', 2)[-2]})" if "/" in s.best_source else f" (from {s.best_source})"
        rows.append([
            s.key.label(), s.sampler, best, default_ms, _fmt_ms(s.best_latency_ms), speed,
            f"{_fmt_s(s.used_s)}/{_fmt_s(s.budget_s)}", _fmt_s(s.prepare_s), f"{s.trials_this_run}/{s.trials_total}",
            "-" if s.trials_per_minute is None else f"{s.trials_per_minute:.1f}", _fmt_s(s.median_trial_s),
            _fmt_s(s.seconds_to_near_best), f"{s.pruned}/{s.failed}/{s.infeasible}/{s.unchecked}",
            f"{s.untried}/{s.space_size}",
        ])
    return tabulate(rows, headers=["key", "sampler", "best config (changes from default)", "default ms", "best ms",
                                   "speedup", "s used/given", "set-up s", "trials run/total", "trials/min", "median trial s",
                                   "s to within 2%", "pruned/failed/infeasible/unchecked", "untried/space"],
                    disable_numparse=True)


def comparison_table(comparisons: list[Any]) -> str:
    rows = []
    for c in comparisons:
        grid = f"{_fmt_ms(c.grid_best_ms)} ({c.grid_trials}/{c.grid_cells} cells{'' if c.grid_complete else ', partial'})"
        if c.tpe_trials_needed is None:
            reach = f"not yet ({c.tpe_trials_total} trials)"
            secs = "-"
        else:
            reach = f"{c.tpe_trials_needed} trials (trial {c.tpe_hit_trial}: {_fmt_ms(c.tpe_hit_ms)} ms)"
            secs = f"{c.tpe_seconds_needed:.1f}"
        share = "-" if c.time_fraction is None else f"{c.time_fraction:.2f}"
        rows.append([c.key.label(), grid, f"{c.grid_seconds:.1f}", reach, secs, share])
    return tabulate(rows, headers=["key", "grid best ms", "grid s", "TPE to within 2% of grid", "TPE s",
                                   "TPE s / grid s"], disable_numparse=True)


def _comparison_record(c: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(c)
    data["key"] = c.key.to_attrs()
    data["time_fraction"] = c.time_fraction
    return data


def _write_json(path: Path, rows: list[dict[str, Any]], studies: list[dict[str, Any]] | None = None,
                comparisons: list[dict[str, Any]] | None = None) -> None:
    from sbbench.core.results import write_rows

    meta: dict[str, Any] = {"command": "tune"}
    if studies is not None:
        meta["studies"] = studies
    if comparisons is not None:
        meta["comparisons"] = comparisons
    try:
        write_rows(path, rows, **meta)
    except OSError as exc:
        raise _usage(f"--json: cannot write {path} ({exc.strerror or exc})") from None


@app.command("tune")
def tune_command(
    backend: Annotated[Optional[str], typer.Option(
        "--backend", help="Backend(s) to tune, comma-separated (default: triton and chunked on a GPU, chunked "
        "on the CPU).", show_default=False)] = None,
    pass_: Annotated[str, typer.Option("--pass", help="Which pass's parameters to tune: fwd, bwd, both (fwd and "
        "bwd) or decode (sb_attn_with_kvcache's, keyed by batch and cache-length bucket; --seqlens are cache "
        "lengths); or a comma-separated list such as fwd,bwd,decode.")] = "both",
    trials: Annotated[Optional[int], typer.Option(
        "--trials", help="New trials per study in this run (default: 30 for tpe; the whole space for grid).",
        show_default=False)] = None,
    minutes: Annotated[Optional[float], typer.Option(
        "--minutes", help="Wall-clock time for the whole run, shared by its studies in proportion to each "
        "pass's share of a training step (backward 2.5, forward 1), backward studies first; time a study "
        "leaves unused passes to the next. Running trials finish first.", show_default=False)] = None,
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="The same budget as --minutes, in seconds.", show_default=False)] = None,
    warm_start: Annotated[bool, typer.Option(
        "--warm-start/--no-warm-start", help="Start each new study from the default config, the same key's "
        "configs tuned on other GPUs of this architecture (their config files on the search path), and for "
        "fp16 and bf16 the same key's configs in the other of the two, on this GPU and those.")] = True,
    compile_workers: Annotated[Optional[int], typer.Option(
        "--compile-workers", help="Processes compiling upcoming configs while the GPU times the current one "
        "(default: the host's cores less two, at most 8; 0 on the CPU).", show_default=False)] = None,
    prune_factor: Annotated[float, typer.Option(
        "--prune-factor", help="Cut a trial after its first timed run when that run is this many times "
        "slower than the study's best so far.")] = 2.0,
    storage: StorageOpt = None,
    sampler: Annotated[str, typer.Option(
        "--sampler", help="tpe (multivariate TPE, default config first) or grid (every config once, for "
        "comparison; a separate study).")] = "tpe",
    devices: Annotated[Optional[str], typer.Option(
        "--devices", help="GPU indices, e.g. 0,1,2,3: one worker per GPU, all on the same studies "
        "(default: GPU 0, or the CPU without a GPU).", show_default=False)] = None,
    json_path: Annotated[Optional[Path], typer.Option(
        "--json", help="Write one results row per trial of the studies run (command=tune).", show_default=False)] = None,
    batch: BatchOpt = None,
    heads: HeadsOpt = None,
    kv_heads: KvHeadsOpt = None,
    head_dim: HeadDimOpt = None,
    seqlens: SeqlensOpt = None,
    dtype: DtypeOpt = None,
    regime: Annotated[Optional[str], typer.Option(
        "--regime", help="Input regime the trials are timed on: dense (default: nothing skipped, the worst "
        "case), randn, mixed or peaked. Numerics are checked on mixed too.",
        show_default=False)] = None,
    attend_current: AttendCurrentOpt = None,
    sweep: SweepFileOpt = None,
    trial_timeout: Annotated[float, typer.Option(
        "--trial-timeout", help="Seconds one trial may take (compile, timing, check) before its worker is "
        "killed and the trial failed.")] = 300.0,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Check each trial against the numerics budget; a config outside it is "
        "infeasible.")] = True,
    check_seqlen: Annotated[int, typer.Option(
        "--check-seqlen", help="Longest sequence the numerics check runs at (its float64 oracle is O(T^2)).")] = 1024,
    seed: Annotated[int, typer.Option("--seed", help="Sampler seed (offset by each study's trial count).")] = 0,
    startup_trials: Annotated[int, typer.Option(
        "--startup-trials", help="TPE: random (untried) configs before the model and the local moves "
        "take over; a small space gets fewer (a tenth of its configs, at least 2).")] = 10,
    space: Annotated[Optional[list[str]], typer.Option(
        "--space", help="Restrict a parameter to some of its choices, NAME=V1,V2 (repeatable); the default "
        "value always stays in. A restricted space is a study of its own: use the same --space for the "
        "TPE and the grid run you want to compare.", show_default=False)] = None,
    imports: Annotated[Optional[list[str]], typer.Option(
        "--import", help="Import MODULE (or call MODULE:FUNCTION) first, in the tuner and every worker: "
        "how a tunable backend of your own registers itself. Repeatable.", show_default=False)] = None,
    new_tokens: Annotated[int, typer.Option(
        "--new-tokens", help="--pass decode: new queries per sequence (Tq) of the decode cases tuned.")] = 1,
    progress: Annotated[Optional[bool], typer.Option(
        "--progress/--no-progress", help="Progress bar (default: on a terminal); otherwise one line per trial.",
        show_default=False)] = None,
) -> None:
    """Tune launch parameters: one resumable Optuna study per config key (device, backend, pass,
    dtype, head dim, GQA group, attend_current, seqlen bucket; decode adds the batch bucket).

    Each trial runs in a worker process (a crash or hang fails only that trial), is timed with
    the harness, and is checked against the numerics budget. Killing the run loses no finished
    trial; running the same command again resumes without repeating any config.
    """
    from sbbench.autotune.store import default_storage_url
    from sbbench.autotune.tuner import TuneError, TuneInterrupted, TuneSettings, run_tuning

    # TuneSettings checks the passes: an unknown one goes through as it is and is refused there.
    passes = ("fwd", "bwd") if pass_ == "both" else tuple(p.strip() for p in pass_.split(",") if p.strip())
    if minutes is not None and timeout is not None:
        raise _usage("--minutes/--timeout: give the budget once")
    if minutes is not None and not minutes > 0:
        raise _usage(f"--minutes: expected a positive number, got {minutes}")
    if timeout is not None and not timeout > 0:
        raise _usage(f"--timeout: expected a positive number of seconds, got {timeout}")
    budget_s = minutes * 60.0 if minutes is not None else timeout
    device_list = _parse_devices(devices)
    space_map: dict[str, list[str]] = {}
    for item in space or []:
        name, sep, values = item.partition("=")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not choices:
            raise _usage(f"--space: expected NAME=V1,V2,..., got {item!r}")
        space_map.setdefault(name.strip(), []).extend(choices)
    plugins = list(imports or [])
    try:
        from sbbench.autotune.worker import import_plugins

        import_plugins(plugins)
    except ValueError as exc:
        raise _tune_error(exc) from None

    import torch

    device = "cuda" if (device_list or torch.cuda.is_available()) else "cpu"
    try:
        sweeps = sweeps_from_flags(
            "tune", sweep_file=sweep, device=device, backends=backend, batch=batch, heads=heads, kv_heads=kv_heads,
            head_dim=head_dim, seqlens=seqlens, dtype=dtype, regime=regime if regime is not None else "dense",
            attend_current=attend_current,
        )
    except (ValueError, TypeError) as exc:
        raise _tune_error(exc) from None
    for note in dict.fromkeys(n for s in sweeps for n in s.notes):
        typer.echo(f"note: {note}")

    jobs: list[tuple[str, str, list[Any]]] = []
    for s in sweeps:
        if len(s.regimes) != 1:
            raise _usage(f"--regime: tune times one regime per study, got {', '.join(s.regimes)}")
        for name in s.backends:
            jobs.append((name, s.regimes[0], list(s.cases)))

    reporter = _Progress(progress)
    summaries: list[Any] = []
    comparisons: list[Any] = []
    rows: list[dict[str, Any]] = []
    interrupted = False
    finished: list[dict[str, Any]] = []  # every trial of the studies run, earlier runs' too
    if json_path is not None:
        def save(row: Any) -> None:
            # Each finished trial lands in the file at once: a stopped run keeps what it measured.
            rows.append(dict(row))
            _write_json(json_path, rows)

        reporter.on_row = save
    typer.echo(f"storage: {storage or default_storage_url()}")
    job_budget = None if budget_s is None else budget_s / len(jobs)
    for name, regime_name, cases in jobs:
        settings = TuneSettings(
            backend=name, cases=cases, passes=passes, regime=regime_name, sampler=sampler, n_trials=trials,
            time_budget_s=job_budget, storage=storage, devices=device_list, trial_timeout=trial_timeout, check=check,
            check_seqlen=check_seqlen, seed=seed, plugins=plugins, space=space_map,
            startup_trials=startup_trials, warm_start=warm_start, compile_workers=compile_workers,
            prune_factor=prune_factor, new_tokens=new_tokens,
        )
        try:
            result = run_tuning(settings, reporter.reporter)
        except TuneInterrupted as stop:
            result = stop.result
            interrupted = True
        except TuneError as exc:
            reporter._stop_bar()
            raise _tune_error(exc) from None
        finally:
            reporter._stop_bar()
        if result.workers:
            info = result.workers[0]
            where = ", ".join(str(w.get("gpu")) for w in result.workers) if result.workers[0].get("gpu") is not None else "cpu"
            typer.echo(f"{name}: device {info.get('device')} ({where}), torch {info.get('torch_version')}, "
                       f"triton {info.get('triton_version')}")
        summaries += result.summaries
        comparisons += result.comparisons
        finished.extend(result.rows)
        if interrupted:
            break

    if summaries:
        typer.echo(summary_table(summaries))
    if comparisons:
        typer.echo("")
        typer.echo("TPE against the exhaustive grid (same key, separate studies; time = sum of trial durations):")
        typer.echo(comparison_table(comparisons))
    if json_path is not None:
        _write_json(json_path, finished, [s.to_record() for s in summaries],
                    [_comparison_record(c) for c in comparisons])
        typer.echo(f"wrote {len(finished)} rows to {json_path}")
    if interrupted:
        typer.echo("interrupted: finished trials are saved; run the same command again to resume", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command("export")
def export_command(
    storage: StorageOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Config directory to write <device>/<backend>.json into. Default: the first "
        "$SBBENCH_CONFIG_DIR entry, else ~/.cache/sbbench/configs.", show_default=False)] = None,
    backend: Annotated[Optional[str], typer.Option(
        "--backend", help="Export only this backend's studies.", show_default=False)] = None,
    min_speedup: Annotated[Optional[float], typer.Option(
        "--min-speedup", help="Keep the default config of a key unless the best one is at least this "
        "much faster in its study (latency medians vary by about 1% between runs). Default: 1.02.",
        show_default=False)] = None,
) -> None:
    """Write the best feasible config of every tuned key as config files (one per device and
    backend) that the backends then use through sbbench.core.config_loader."""
    from sbbench.autotune.export import DEFAULT_MIN_SPEEDUP, export_configs
    from sbbench.autotune.store import default_export_dir
    from sbbench.core.config_loader import ENV_VAR

    if min_speedup is None:
        min_speedup = DEFAULT_MIN_SPEEDUP
    out_dir = out if out is not None else default_export_dir()
    if out_dir.exists() and not out_dir.is_dir():
        raise _usage(f"--out: {out_dir} is a file, not a directory")
    try:
        result = export_configs(storage, out_dir, backend, min_speedup)
    except ValueError as exc:
        raise _tune_error(exc) from None
    for note in result.notes:
        typer.echo(f"note: {note}")
    if not result.files:
        raise _usage(f"--storage: nothing to export from {storage or 'the default storage'}")
    rows = []
    for e in result.entries:
        k = e.entry["key"]
        speed = e.entry.get("speedup_over_default")
        rows.append([e.device, e.backend, k["pass"], k["dtype"], k["head_dim"], k["gqa_group"], k["attend_current"],
                     k.get("batch_bucket", "-"), k["seqlen_bucket"], _fmt_config(e.entry["config"]), _fmt_ms(e.entry["latency_ms"]),
                     _fmt_ms(e.entry.get("default_latency_ms")), f"{speed:.2f}x" if speed else "-"])
    typer.echo(tabulate(rows, headers=["device", "backend", "pass", "dtype", "D", "group", "attend_current",
                                       "batch bucket", "bucket", "config", "ms", "default ms", "speedup"], disable_numparse=True))
    for path in result.files:
        typer.echo(f"wrote {path}")
    if not result.on_search_path:
        typer.echo(f"note: {out_dir} is not on the config search path; set {ENV_VAR}={out_dir} so that sb_attn "
                   "uses these configs")

