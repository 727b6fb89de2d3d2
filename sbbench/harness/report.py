"""The report a person reads: markdown tables and PNG plots from results files of one device.

``write_report`` reads bench, check and tune rows (the schema of :mod:`sbbench.core.results`)
and writes into one folder (``reports/<device>/report/`` by default, beside the device's own README):

* ``README.md``: header (device, versions, commit, the commands and files that produced the rows),
  a speed summary per mode, regime and backend, then per (mode, regime, head dim, dtype) group a
  table and one figure with TFLOP/s, speedup over FlashAttention-2 (``fa2``) and peak memory
  against sequence length; failed bench rows; the numerics checks (pass/fail, error against
  budget, the fa2 error beside); and the tuner's studies (best latency against trial).
* ``bench_*.png`` and ``tune_*.png``: the figures the markdown embeds, drawn by
  :mod:`sbbench.harness.plots` (fixed backend colours, log axes over wide ranges, failed rows marked).

Rows it cannot place are refused with :class:`ReportInputError` before anything is written: rows
that name no device (a report covers one device), or files with no bench, check or tune rows at
all. Rows of other commands beside those are named in the report and left out.

Everything is rendered into a staging folder inside the output folder first, so a failure while
plotting leaves the previous report untouched; the files are then renamed into place one by one
(each rename atomic), figures before the markdown that references them, and figures of an earlier
report that the new one no longer has are removed. Other files in the folder (the committed
``bench.json`` baseline the gate reads) are left alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from sbbench.core.config_loader import device_file_stem
from sbbench.core.errors import ArgumentError
from sbbench.core.results import SHAPE_FLAGS, ResultsFileError, read_rows, shape_label
from sbbench.harness import plots as plots_mod

MARKDOWN_NAME = "README.md"
# Figures this module owns in the output folder: only these are ever replaced or removed there.
OWNED_PLOT = re.compile(r"^(bench|tune)_[A-Za-z0-9._-]+\.png$")
MAX_TUNE_PLOTS = 40
KNOWN_COMMANDS = ("bench", "check", "tune")
# Bench statuses of a row that ran and failed (drawn as failures; "unsupported" never ran).
FAILED_STATUSES = ("oom", "error", "failed")

_MODE_ORDER = {"fwd": 0, "bwd": 1, "fwdbwd": 2}
_REGIME_ORDER = {"dense": 0, "randn": 1, "mixed": 2, "peaked": 3}
_SHAPE_COLUMNS = ("batch", "heads", "kv_heads", "attend_current", "varlen")
_TRIAL_COLUMNS = ("trial", "trial_number", "number", "trial_index")
_STUDY_COLUMNS = ("study", "sampler", "backend", "pass", "mode", "dtype", "head_dim", "seqlen", "batch", "heads", "kv_heads",
                  "attend_current", "varlen", "regime")


class ReportInputError(ValueError):
    """Input the report cannot use (missing or broken file, mixed devices, a bad ``out`` folder)."""


class ReportOutError(ReportInputError, ArgumentError):
    """The output folder ``out`` cannot be used."""


@dataclass
class WrittenReport:
    out: Path
    markdown: Path
    plots: list[Path] = field(default_factory=list)
    # Rows of commands the report has no section for, by command: named in the report, left out.
    left_out: dict[str, int] = field(default_factory=dict)


@dataclass
class _Source:
    path: str
    rows: int
    commands: dict[str, int]
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# small helpers


def _num(value: Any) -> bool:
    """A real, finite number (JSON null and NaN are 'no value')."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _num(value):
        # Large values in full (a thousands separator reads better than 1.64e+03 MiB).
        return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"
    return str(value)


def _sci(value: Any) -> str:
    return f"{value:.2e}" if _num(value) else "-"


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _md_table(rows: list[list[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    # Pipes inside cells would split markdown columns.
    clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return tabulate(clean, headers=list(headers), tablefmt="github", disable_numparse=True)


def _order(value: Any, table: Mapping[str, int]) -> tuple:
    return (table.get(value, len(table)), str(value))




def _joined(rows: Iterable[Mapping[str, Any]], column: str) -> str:
    values = sorted({str(r[column]) for r in rows if r.get(column) is not None})
    return ", ".join(values) if values else "-"


# ---------------------------------------------------------------------------------------------
# input


def load_results(paths: Sequence[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[_Source]]:
    """All rows of the given results files, and what each file held."""
    if not paths:
        raise ReportInputError("RESULTS: give at least one results JSON file")
    rows: list[dict[str, Any]] = []
    sources = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise ReportInputError(f"RESULTS: {path} is a folder; expected a results JSON file")
        try:
            file_rows = read_rows(path)
        except ResultsFileError as exc:
            raise ReportInputError(f"RESULTS: {exc}") from exc
        # The file's own metadata (write_rows(..., **meta)), e.g. the command line that made it.
        payload = json.loads(path.read_text())
        meta = {k: v for k, v in payload.items() if k not in ("schema_version", "rows")}
        placeless = sum(r.get("device") is None for r in file_rows)
        if placeless:
            raise ReportInputError(
                f"RESULTS: {path}: {placeless} of its {len(file_rows)} rows name no device, so the report cannot "
                "place them (a report covers one device); pass results files written by sbbench check, bench or tune"
            )
        commands: dict[str, int] = {}
        for r in file_rows:
            commands[str(r.get("command"))] = commands.get(str(r.get("command")), 0) + 1
        sources.append(_Source(str(path), len(file_rows), commands, meta))
        rows += file_rows
    if not rows:
        raise ReportInputError("RESULTS: the files hold no rows; nothing to report")
    if not any(r.get("command") in KNOWN_COMMANDS for r in rows):
        found = ", ".join(sorted({str(r.get("command")) for r in rows}))
        raise ReportInputError(
            f"RESULTS: no {', '.join(KNOWN_COMMANDS)} rows in these files (their rows' command: {found}); "
            "nothing to report"
        )
    return rows, sources


def _device(rows: list[dict[str, Any]]) -> str:
    devices = sorted({str(r["device"]) for r in rows if r.get("device") is not None})
    if len(devices) > 1:
        raise ReportInputError(
            f"RESULTS: rows from several devices ({'; '.join(devices)}); a report covers one device, "
            "so pass the files of one device at a time"
        )
    return devices[0]


# ---------------------------------------------------------------------------------------------
# bench


def _ok_bench(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("command") == "bench" and r.get("status") == "ok" and _num(r.get("latency_ms"))]


def _fa2_key(row: Mapping[str, Any]) -> tuple:
    # fa2 is softmax attention: attend_current means nothing to it, so it is not part of the match.
    return tuple(row.get(c) for c in ("mode", "regime", "dtype", "head_dim", "batch", "heads", "kv_heads", "seqlen", "varlen"))


def _speedups(ok: list[dict[str, Any]]) -> dict[int, float]:
    """Speedup over fa2 per row (by id): the row's own ``speedup`` column when its comparator was
    fa2 (``bench --baseline`` may name another backend), else computed from the fastest fa2 row of
    the same input in these results."""
    fa2: dict[tuple, float] = {}
    for r in ok:
        if r.get("backend") == "fa2":
            k = _fa2_key(r)
            fa2[k] = min(fa2.get(k, math.inf), r["latency_ms"])
    out = {}
    for r in ok:
        if r.get("backend") == "fa2":
            continue
        if _num(r.get("speedup")) and r.get("comparator") in ("fa2", None):
            out[id(r)] = float(r["speedup"])
        elif _fa2_key(r) in fa2:
            out[id(r)] = fa2[_fa2_key(r)] / r["latency_ms"]
    return out


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _group_shape(row: Mapping[str, Any], head_dim: Any, varying: Sequence[str]) -> str:
    """``B=4 H=12 D=128`` (plus Hkv, varlen, attend_current where they apply) for a figure's
    title; columns in ``varying`` differ between its lines, so they are named in the legend instead."""
    columns = [c for c in ("batch", "heads", "kv_heads") if c not in varying] + ["head_dim"]
    return shape_label({**row, "head_dim": head_dim}, columns, [f for f in SHAPE_FLAGS if f not in varying])


def _bench_section(rows: list[dict[str, Any]], staging: Path) -> tuple[list[str], list[str]]:
    bench = [r for r in rows if r.get("command") == "bench"]
    if not bench:
        return [], []
    ok = _ok_bench(rows)
    speedup = _speedups(ok)
    md = ["## Benchmarks", ""]
    plots: list[str] = []
    md += [
        "FLOPs are counted as for causal FlashAttention (forward 4·B·H·T²·D/2, backward 2.5x, "
        "forward+backward 3.5x) whatever was skipped, so TFLOP/s compares across backends. "
        "Latency is the median with its 20th-80th percentile spread; speedup is fa2's latency over "
        "the backend's on the same input; peak memory is above the inputs' own bytes.",
        "",
    ]

    # Summary: one line per mode, regime and backend.
    summary: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        summary.setdefault((r.get("mode"), r.get("regime"), str(r.get("backend"))), []).append(r)
    table = []
    for (mode, regime, backend), rs in sorted(summary.items(), key=lambda kv: (_order(kv[0][0], _MODE_ORDER), _order(kv[0][1], _REGIME_ORDER), kv[0][2])):
        tfl = [r["tflops"] for r in rs if _num(r.get("tflops"))]
        sps = [speedup[id(r)] for r in rs if id(r) in speedup]
        table.append([mode, regime, backend, len(rs), _fmt(max(tfl)) if tfl else "-",
                      _fmt(sorted(tfl)[len(tfl) // 2]) if tfl else "-",
                      _fmt(_geomean(sps)) if sps else ("1 (reference)" if backend == "fa2" else "-")])
    if table:
        md += ["### Summary", "",
               _md_table(table, ["mode", "regime", "backend", "rows", "best TFLOP/s", "median TFLOP/s",
                                 "speedup over fa2 (geomean)"]), ""]

    def group_of(r: Mapping[str, Any]) -> tuple:
        return r.get("mode"), r.get("regime"), r.get("head_dim"), r.get("dtype")

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault(group_of(r), []).append(r)
    # Rows that ran and failed are drawn in their group's figure; unsupported ones were never meant to run.
    broken: dict[tuple, list[dict[str, Any]]] = {}
    for r in bench:
        if r.get("status") in FAILED_STATUSES and group_of(r) in groups:
            broken.setdefault(group_of(r), []).append(r)
    ordered = sorted(groups.items(), key=lambda kv: (_order(kv[0][0], _MODE_ORDER), _order(kv[0][1], _REGIME_ORDER),
                                                      kv[0][2] if _num(kv[0][2]) else -1, str(kv[0][3])))
    for (mode, regime, head_dim, dtype), rs in ordered:
        failed_here = broken.get((mode, regime, head_dim, dtype), [])
        # Shape columns that vary inside the group go into the line labels, so no two lines merge;
        # those that do not go into the title.
        varying = [c for c in _SHAPE_COLUMNS if len({r.get(c) for r in rs + failed_here}) > 1]
        title = f"{mode}, {regime} inputs, {_group_shape(rs[0], head_dim, varying)}, {dtype}"

        def label_of(r: Mapping[str, Any]) -> str:
            return " ".join([str(r.get("backend"))] + [f"{c}={r.get(c)}" for c in varying])

        series: dict[str, dict[Any, dict[str, Any]]] = {}
        for r in rs:
            label = label_of(r)
            best = series.setdefault(label, {})
            seen = best.get(r.get("seqlen"))
            if seen is None or r["latency_ms"] < seen["latency_ms"]:
                best[r.get("seqlen")] = r
        lines = {label: [pts[s] for s in sorted(pts, key=lambda s: s if _num(s) else -1)] for label, pts in sorted(series.items())}
        name = f"bench_{_slug(mode, regime, f'd{head_dim}', dtype)}.png"
        failed_lines: dict[str, list[dict[str, Any]]] = {}
        for r in failed_here:
            # A length where the same line has an ok row (another config) is not a failure of the line.
            if r.get("seqlen") not in series.get(label_of(r), {}):
                failed_lines.setdefault(label_of(r), []).append(r)
        plots_mod.bench_figure(lines, failed_lines, speedup, title, staging / name)
        plots.append(name)
        table = []
        for label, pts in lines.items():
            for r in pts:
                spread = (f" [{_fmt(r['latency_q20_ms'], 4)}-{_fmt(r['latency_q80_ms'], 4)}]"
                          if _num(r.get("latency_q20_ms")) and _num(r.get("latency_q80_ms")) else "")
                table.append([r.get("seqlen"), label, shape_label(r, ("batch", "heads", "kv_heads")),
                              _fmt(r["latency_ms"], 4) + spread, _fmt(r.get("tflops")),
                              _fmt(speedup.get(id(r))) if r.get("backend") != "fa2" else "1",
                              _fmt(r.get("peak_mem_mib")),
                              f"{r['skipped_fraction']:.0%}" if _num(r.get("skipped_fraction")) else "-"])
        table.sort(key=lambda t: (t[0] if _num(t[0]) else -1, t[1]))
        md += [f"### {title}", "", f"![TFLOP/s, speedup over fa2 and peak memory: {title}]({name})", "",
               _md_table(table, ["T", "backend", "shape", "latency ms [q20-q80]", "TFLOP/s", "speedup over fa2",
                                 "peak MiB", "blocks skipped"]), ""]

    ok_ids = {id(r) for r in ok}
    failed = [r for r in bench if id(r) not in ok_ids]
    if failed:
        table = [[r.get("backend"), r.get("mode"), r.get("regime"), r.get("dtype"), shape_label(r), r.get("status"),
                  (str(r.get("error") or "").splitlines() or [""])[0][:160]] for r in failed]
        md += ["### Bench rows that did not run", "", f"{len(failed)} row(s) failed or were skipped.", "",
               "<details><summary>rows</summary>", "",
               _md_table(table, ["backend", "mode", "regime", "dtype", "shape", "status", "error"]), "", "</details>", ""]
    return md, plots


# ---------------------------------------------------------------------------------------------
# check


def _check_section(rows: list[dict[str, Any]]) -> list[str]:
    checks = [r for r in rows if r.get("command") == "check"]
    if not checks:
        return []

    def outcome(r: Mapping[str, Any]) -> str:
        if r.get("status") not in (None, "ok"):
            return "error"
        return "pass" if r.get("passed") is True else "fail"

    def ratio(r: Mapping[str, Any]) -> float | None:
        if _num(r.get("err_max")) and _num(r.get("budget")) and r["budget"] > 0:
            return r["err_max"] / r["budget"]
        return None

    counts = {k: sum(outcome(r) == k for r in checks) for k in ("pass", "fail", "error")}
    md = ["## Numerics checks", "",
          "Each output (o, rem) and gradient (dq, dk, dv) against the reference in float64: "
          "`err` = max |x - x_ref64| must stay within the budget `2 * err_pt + atol_floor`, where "
          "`err_pt` is the reference's own error in the backend's dtype (FlashAttention-2's rule). "
          "`fa2 rel err` is FlashAttention-2's relative error against float64 softmax attention on "
          "the same inputs: the goal is a relative error within 2x of it.", "",
          f"**{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors** "
          f"out of {len(checks)} checks.", ""]

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in checks:
        groups.setdefault((str(r.get("backend")), str(r.get("dtype")), str(r.get("tensor"))), []).append(r)
    table = []
    for (backend, dtype, tensor), rs in sorted(groups.items()):
        n_pass = sum(outcome(r) == "pass" for r in rs)
        rated = [r for r in rs if ratio(r) is not None]
        worst = max(rated, key=ratio) if rated else None
        rel = [r["err_rel_fro"] for r in rs if _num(r.get("err_rel_fro"))]
        fa2 = [r["fa2_rel_err"] for r in rs if _num(r.get("fa2_rel_err"))]
        verdict = "PASS" if n_pass == len(rs) else "FAIL"
        vs_fa2 = _fmt(max(rel) / max(fa2)) + "x" if rel and fa2 and max(fa2) > 0 else "-"
        table.append([backend, dtype, tensor, f"{verdict} {n_pass}/{len(rs)}",
                      _sci(worst["err_max"]) if worst else "-", _sci(worst["budget"]) if worst else "-",
                      _fmt(ratio(worst)) if worst else "-", _sci(max(rel)) if rel else "-",
                      _sci(max(fa2)) if fa2 else "-", vs_fa2])
    md += ["### Summary", "",
           "Worst case per backend, dtype and tensor: the largest error relative to its budget.", "",
           _md_table(table, ["backend", "dtype", "tensor", "result", "worst err", "its budget", "err / budget",
                             "max rel err", "fa2 rel err", "rel err / fa2"]), ""]

    def detail(rs: list[dict[str, Any]]) -> list[list[Any]]:
        return [[r.get("backend"), r.get("dtype"), shape_label(r), r.get("mode"), r.get("regime"), r.get("tensor"),
                 outcome(r), _sci(r.get("err_max")), _sci(r.get("budget")), _sci(r.get("err_rel_fro")),
                 _sci(r.get("fa2_rel_err")), (str(r.get("error") or "").splitlines() or [""])[0][:120]] for r in rs]

    headers = ["backend", "dtype", "shape", "mode", "regime", "tensor", "result", "err", "budget", "rel err",
               "fa2 rel err", "error"]
    bad = [r for r in checks if outcome(r) != "pass"]
    if bad:
        md += ["### Failed checks", "", _md_table(detail(bad), headers), ""]
    md += ["<details><summary>All checks</summary>", "", _md_table(detail(checks), headers), "", "</details>", ""]
    return md


# ---------------------------------------------------------------------------------------------
# tune


def _trials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tune rows as trials: one row per trial, or a row whose ``history`` list holds the trials."""
    out = []
    for r in rows:
        history = r.get("history")
        if isinstance(history, list):
            for i, h in enumerate(history):
                entry = dict(h) if isinstance(h, Mapping) else {"latency_ms": h}
                out.append({**r, "history": None, "trial": i, **entry})
        else:
            out.append(r)
    return out


def _trial_outcome(r: Mapping[str, Any]) -> tuple[str, float | None]:
    """``("ok", ms)``, ``("infeasible", ms)`` for a trial that ran but broke the numerics budget
    (``passed`` false: it cannot be the best config), ``("pruned", ms)`` for one cut after a single
    timed run (``ms`` that run), or ``("failed", None)``."""
    status = str(r.get("status") or "ok").lower()
    latency = next((float(r[c]) for c in ("latency_ms", "value") if _num(r.get(c)) and r[c] > 0), None)
    if latency is None:
        return "failed", None
    if status == "pruned":
        return "pruned", latency
    if r.get("passed") is False or status == "infeasible":
        return "infeasible", latency
    if status not in ("ok", "complete"):
        return "failed", None
    return "ok", latency


def _study_label(named: Mapping[str, Any]) -> str:
    parts = [named.get("backend"), named.get("sampler")]
    # The tuner writes the pass both as "pass" and as "mode"; name it once.
    parts += [named.get("pass")] + ([named.get("mode")] if named.get("mode") != named.get("pass") else [])
    parts += [named.get("regime"), named.get("dtype")]
    label = " ".join(str(p) for p in parts if p is not None)
    return f"{label} {shape_label(named)}".strip()


def _tune_section(rows: list[dict[str, Any]], staging: Path) -> tuple[list[str], list[str]]:
    tune = _trials([r for r in rows if r.get("command") == "tune"])
    if not tune:
        return [], []
    columns = [c for c in _STUDY_COLUMNS if any(r.get(c) is not None for r in tune)]
    studies: dict[tuple, list[dict[str, Any]]] = {}
    for r in tune:
        studies.setdefault(tuple(r.get(c) for c in columns), []).append(r)
    md = ["## Tuning", "",
          "Each study's trials in order: grey dots are trials, the blue line the best latency found so "
          "far among trials within the numerics budget, orange triangles trials over the budget, hollow "
          "circles trials cut after one timed run (that run's time), red crosses failed trials, the "
          "dashed line the backend's default config.", ""]
    plots: list[str] = []
    table = []
    figures = []
    for key, rs in sorted(studies.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        named = dict(zip(columns, key))
        label = _study_label(named)
        index_col = next((c for c in _TRIAL_COLUMNS if any(_num(r.get(c)) for r in rs)), None)
        if index_col:
            rs = sorted((r for r in rs if _num(r.get(index_col))), key=lambda r: r[index_col])
            xs = [r[index_col] for r in rs]
        else:
            xs = list(range(len(rs)))
        trials = [(x, *_trial_outcome(r)) for x, r in zip(xs, rs)]
        defaults = [r["default_latency_ms"] for r in rs if _num(r.get("default_latency_ms"))]
        if not defaults:
            defaults = [y for (_, kind, y), r in zip(trials, rs) if r.get("is_default") and kind == "ok"]
        default = defaults[0] if defaults else None
        ok = [(x, y, r) for (x, kind, y), r in zip(trials, rs) if kind == "ok"]
        best = min(ok, key=lambda t: t[1]) if ok else None
        speed = _fmt(default / best[1]) + "x" if best and default else "-"
        config = best[2].get("config") if best else None
        config_text = json.dumps(config, sort_keys=True, default=str) if isinstance(config, (dict, list)) else _fmt(config)
        n_failed = sum(kind == "failed" for _, kind, _ in trials)
        n_over = sum(kind == "infeasible" for _, kind, _ in trials)
        n_pruned = sum(kind == "pruned" for _, kind, _ in trials)
        table.append([label, len(trials), n_pruned, n_failed, n_over, _fmt(default), _fmt(best[1]) if best else "-",
                      best[0] if best else "-", speed, config_text])
        figures.append((label, trials, default))
    md += [_md_table(table, ["study", "trials", "pruned", "failed", "over budget", "default ms", "best ms", "best trial",
                             "speedup over default", "best config"]), ""]
    for i, (label, trials, default) in enumerate(figures[:MAX_TUNE_PLOTS]):
        name = f"tune_{i:02d}_{_slug(label)[:80]}.png"
        plots_mod.tune_figure(trials, default, label, staging / name)
        plots.append(name)
        md += [f"![best latency against trial: {label}]({name})", ""]
    if len(figures) > MAX_TUNE_PLOTS:
        md += [f"({len(figures) - MAX_TUNE_PLOTS} more studies are in the table but not plotted.)", ""]
    return md, plots


# ---------------------------------------------------------------------------------------------
# header and the whole report


def _header(rows: list[dict[str, Any]], sources: list[_Source], device: str) -> list[str]:
    comparators = {name: [r for r in rows if r.get("backend") == name] for name in ("fa2", "cudnn")}
    info = [
        ["device", device],
        ["torch", _joined(rows, "torch_version")],
        ["triton", _joined(rows, "triton_version")],
        ["sbbench", _joined(rows, "sbbench_version")],
        ["git commit", _joined(rows, "git_commit")],
    ]
    for name, ran in comparators.items():
        if ran:
            info.append([f"{name} ran as", _joined(ran, "implementation")])
    info.append(["generated", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")])
    files = []
    for s in sources:
        meta = "; ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v, default=str)}" for k, v in s.meta.items())
        commands = ", ".join(f"{c} ({n})" for c, n in sorted(s.commands.items()))
        files.append([f"`{s.path}`", s.rows, commands, meta[:300] or "-"])
    return [f"# sbbench report: {device}", "", _md_table(info, ["", ""]), "",
            "Made by `sbbench report` from these results files (rows per command):", "",
            _md_table(files, ["file", "rows", "commands", "recorded with the file"]), ""]


def render_report(rows: list[dict[str, Any]], sources: list[_Source], device: str, staging: Path) -> tuple[str, list[str]]:
    """Markdown text, and the figure file names it references (already saved into ``staging``)."""
    md = _header(rows, sources, device)
    bench_md, bench_plots = _bench_section(rows, staging)
    check_md = _check_section(rows)
    tune_md, tune_plots = _tune_section(rows, staging)
    md += bench_md + check_md + tune_md
    other = sorted({str(r.get("command")) for r in rows} - set(KNOWN_COMMANDS))
    if other:
        md += [f"Rows of other commands ({', '.join(other)}) are not part of this report.", ""]
    if not (bench_md or check_md or tune_md):
        md += ["No bench, check or tune rows in these files.", ""]
    return "\n".join(md).rstrip() + "\n", bench_plots + tune_plots


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ReportOutError("out", f"{out} is a file; expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportOutError("out", f"cannot create {out} ({exc.strerror or exc})") from exc
    if not os.access(out, os.W_OK):
        raise ReportOutError("out", f"{out} is not writable")


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> WrittenReport:
    """Read the results files and write the report folder (see the module docstring)."""
    rows, sources = load_results(paths)
    device = _device(rows)
    out = Path(out) if out is not None else Path("reports") / device_file_stem(device) / "report"
    _prepare_out(out)
    staging = Path(tempfile.mkdtemp(prefix=".report.tmp", dir=out))
    try:
        markdown, plots = render_report(rows, sources, device, staging)
        (staging / MARKDOWN_NAME).write_text(markdown)
        # Figures first, the markdown last: a reader never sees a README pointing at a missing plot.
        for name in plots:
            os.replace(staging / name, out / name)
        os.replace(staging / MARKDOWN_NAME, out / MARKDOWN_NAME)
        for stale in out.iterdir():
            if OWNED_PLOT.match(stale.name) and stale.name not in plots:
                stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    left_out: dict[str, int] = {}
    for r in rows:
        if r.get("command") not in KNOWN_COMMANDS:
            left_out[str(r.get("command"))] = left_out.get(str(r.get("command")), 0) + 1
    return WrittenReport(out=out, markdown=out / MARKDOWN_NAME, plots=[out / p for p in plots], left_out=left_out)
