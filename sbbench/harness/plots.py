"""The report's figures: benchmark panels against sequence length, and tuner histories.

Rules every figure follows, so that figures read alike side by side:

* a backend has one colour in every figure (:func:`backend_color`, a fixed table, with a stable
  hash for backends it does not name);
* a panel whose values span more than :data:`LOG_SPAN` (max / min) gets a log y axis, so a backend
  100x slower than another is not flattened onto zero;
* a measurement that failed (``oom``, ``error``) is not dropped: it is an ``x`` in the backend's
  colour on the bottom edge of each panel, at its sequence length, labelled with its status;
* titles name the shape (B, H, D) the figure holds.

Figures are drawn with matplotlib's object API on an Agg canvas: no pyplot, no global state.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# A value range wider than this (max / min) gets a log axis.
LOG_SPAN = 10.0

BACKEND_COLORS = {
    "fa2": "tab:green",
    "triton": "tab:red",
    "chunked": "tab:blue",
    "compiled": "tab:orange",
    "reference": "tab:purple",
    "upstream": "tab:brown",
}
# For backends not in the table (a user's module:function): the colours the table leaves free.
_SPARE_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray", "darkblue", "darkgoldenrod")


def backend_color(name: str) -> str:
    """The colour of backend ``name`` in every figure."""
    if name in BACKEND_COLORS:
        return BACKEND_COLORS[name]
    # crc32, not hash(): the same name gets the same colour in every process.
    return _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)]


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def log2_x(ax: Any, xs: Iterable[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    xs = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(xs, [str(x) for x in xs], rotation=45 if len(xs) > 5 else 0)
    ax.set_xlabel("sequence length")
    ax.grid(True, alpha=0.3)


def wide_range(values: Iterable[float]) -> bool:
    """Whether positive ``values`` span more than :data:`LOG_SPAN`."""
    positive = [v for v in values if _num(v) and v > 0]
    return bool(positive) and max(positive) > LOG_SPAN * min(positive)


def log_y(ax: Any) -> None:
    """A log y axis with plain numbers (0.01, 1, 300) as tick labels, not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    # Up to three decades, 1-2-5 ticks; more, one per decade.
    subs = (1.0, 2.0, 5.0) if high / max(low, 1e-300) < 1000 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _mark_failures(ax: Any, failed: Sequence[Mapping[str, Any]], labels: set[str]) -> None:
    """Each failed row as an ``x`` on the panel's bottom edge at its sequence length; adds the
    legend labels it used to ``labels``."""
    from matplotlib.transforms import blended_transform_factory

    edge = blended_transform_factory(ax.transData, ax.transAxes)
    for r in failed:
        status = str(r.get("status") or "failed")
        color = backend_color(str(r.get("backend")))
        legend = f"{r.get('backend')} {status.upper()}"
        ax.plot([r["seqlen"]], [0.0], marker="x", ms=9, mew=2.2, ls="none", color=color, transform=edge,
                clip_on=False, zorder=5, label=legend)
        labels.add(legend)
        ax.annotate(status.upper(), (r["seqlen"], 0.0), xycoords=edge, xytext=(0, 7), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color=color, fontweight="bold")


def _tflops_error(r: Mapping[str, Any]) -> tuple[float, float]:
    """The latency spread as TFLOP/s below and above the median (the fast q20 is the high end)."""
    lo = r["tflops"] - r["tflops"] * r["latency_ms"] / r["latency_q80_ms"] if (
        _num(r.get("latency_q80_ms")) and r["latency_q80_ms"] > 0) else 0.0
    hi = r["tflops"] * r["latency_ms"] / r["latency_q20_ms"] - r["tflops"] if (
        _num(r.get("latency_q20_ms")) and r["latency_q20_ms"] > 0) else 0.0
    return max(lo, 0.0), max(hi, 0.0)


def bench_figure(
    series: Mapping[str, list[dict[str, Any]]],
    failed: Mapping[str, list[dict[str, Any]]],
    speedup: Mapping[int, float],
    title: str,
    path: Path,
) -> None:
    """Three panels against sequence length: TFLOP/s (with the latency spread), speedup over fa2
    and peak memory; one line per label of ``series`` (ok rows), failures of ``failed`` marked."""
    fig = new_figure(17, 4.8)
    ax_tf, ax_sp, ax_mem = fig.subplots(1, 3)
    points = [r for rs in (*series.values(), *failed.values()) for r in rs if r.get("seqlen") is not None]
    values: dict[str, list[float]] = {"tf": [], "sp": [], "mem": []}
    for label, pts in series.items():
        color = backend_color(str(pts[0].get("backend"))) if pts else None
        pts = [r for r in pts if r.get("seqlen") is not None]
        tf = [r for r in pts if _num(r.get("tflops"))]
        if tf:
            errors = [_tflops_error(r) for r in tf]
            ax_tf.errorbar([r["seqlen"] for r in tf], [r["tflops"] for r in tf],
                           yerr=[[e[0] for e in errors], [e[1] for e in errors]], marker="o", ms=4, capsize=2,
                           label=label, color=color)
            values["tf"] += [r["tflops"] for r in tf]
        sp = [(r["seqlen"], speedup[id(r)]) for r in pts if id(r) in speedup]
        if sp:
            ax_sp.plot(*zip(*sp), marker="o", ms=4, label=label, color=color)
            values["sp"] += [v for _, v in sp]
        mem = [(r["seqlen"], r["peak_mem_mib"]) for r in pts if _num(r.get("peak_mem_mib")) and r["peak_mem_mib"] > 0]
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", ms=4, label=label, color=color)
            values["mem"] += [v for _, v in mem]
    if values["sp"]:
        ax_sp.axhline(1.0, color=backend_color("fa2"), ls="--", lw=1, label="fa2 = 1")
        values["sp"].append(1.0)
    broken = [r for rs in failed.values() for r in rs if r.get("seqlen") is not None]
    failure_labels: set[str] = set()
    for ax, key, ylabel, empty in (
        (ax_tf, "tf", "TFLOP/s (causal FA count)", "no TFLOP/s in these rows"),
        (ax_sp, "sp", "speedup over fa2 (x)", "no fa2 rows to compare with"),
        (ax_mem, "mem", "peak memory above inputs (MiB)", "no peak memory in these rows"),
    ):
        if points:
            log2_x(ax, [r["seqlen"] for r in points])
        if not values[key]:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="grey")
        elif wide_range(values[key]):
            log_y(ax)
            ax.set_ylabel(ylabel + ", log scale")
        else:
            ax.set_ylim(bottom=0)
        if ax.get_ylabel() == "":
            ax.set_ylabel(ylabel)
        _mark_failures(ax, broken, failure_labels)
    # One legend for the three panels, beside them, where it hides no line.
    legend: dict[str, Any] = {}
    for ax in (ax_tf, ax_sp, ax_mem):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        labels = sorted(legend, key=lambda label: label in failure_labels)  # lines first, then failures
        fig.legend([legend[label] for label in labels], labels, loc="outside right upper", fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def tune_figure(trials: list[tuple[Any, str, float | None]], default: float | None, title: str, path: Path) -> None:
    """Latency of each trial in order, the best so far, over-budget, cut and failed trials, the default."""
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    ok = [(x, y) for x, kind, y in trials if kind == "ok"]
    best, running = [], math.inf
    for x, y in ok:
        running = min(running, y)
        best.append((x, running))
    if ok:
        ax.scatter(*zip(*ok), s=12, color="tab:grey", alpha=0.6, label="trial")
        ax.step(*zip(*best), where="post", color="tab:blue", lw=2, label="best so far")
    pruned = [(x, y) for x, kind, y in trials if kind == "pruned"]
    if pruned:
        ax.scatter(*zip(*pruned), s=14, facecolors="none", edgecolors="tab:grey", label="cut after one run")
    infeasible = [(x, y) for x, kind, y in trials if kind == "infeasible"]
    if infeasible:
        ax.scatter(*zip(*infeasible), s=16, marker="^", color="tab:orange", label="over numerics budget")
    failed = [x for x, kind, _ in trials if kind == "failed"]
    timed = [y for _, kind, y in trials if y is not None]
    if failed and timed:
        # Failed trials have no latency: drawn along the top so their number and timing show.
        ax.scatter(failed, [max(timed)] * len(failed), marker="x", color="tab:red", s=18, label="failed")
    if default is not None:
        ax.axhline(default, color="black", ls="--", lw=1, label="default config")
    if wide_range(timed):  # bad configs can be 100x slower: keep the best ones readable
        log_y(ax)
    ax.set_xlabel("trial")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, alpha=0.3)
    if not timed:
        ax.text(0.5, 0.5, "no trial finished", ha="center", va="center", transform=ax.transAxes, color="grey")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100)
