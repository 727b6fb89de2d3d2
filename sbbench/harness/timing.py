"""Timing and peak memory of one callable (docs/design.md section 6).

GPU: ``triton.testing.do_bench``, which flushes the L2 cache before every run and times each run
with CUDA events after its own warm-up; optionally ``triton.testing.do_bench_cudagraph``, which
replays the runs from one CUDA graph so that host launch overhead does not count (for small,
launch-bound shapes; it does not flush L2). CPU: repeated ``time.perf_counter`` around each call,
with warm caches; rows say so in their ``timer`` column. Every timing is the median with the 20%
and 80% quantiles as its spread.

A run may need fresh state that must not be timed (a backward needs a forward graph, and not
every backend's backward can be replayed with ``retain_graph``: torch.compile's donates its
buffers). For that, ``setup`` is called before every run, outside the timed region, and its
result handed to the run. Triton's helpers cannot leave part of a call untimed, so on the GPU
such runs are timed by a loop of our own that does what ``do_bench`` does (warm-up, L2 flush,
one pair of CUDA events per run), with the setup enqueued before the start event.

Peak memory (GPU only): ``torch.cuda.max_memory_allocated`` during one run, above what was
allocated just before it (the inputs, and for a backward the forward's saved tensors).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch

# Below this median (ms) a GPU call is dominated by launch overhead, and cuda_graph="auto"
# re-times it from a CUDA graph.
LAUNCH_BOUND_MS = 0.1
DO_BENCH_LABEL = "triton.testing.do_bench (L2 flushed per run)"
SETUP_LABEL = "CUDA events per run, L2 flushed, untimed setup (a fresh forward) before each run"
# A cap on runs per timing, for calls so short that rep_ms would ask for tens of thousands.
MAX_RUNS = 2000


@dataclass(frozen=True)
class Timing:
    """Median and spread of one callable's latency, and how it was measured."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    runs: int
    timer: str


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("sorted_values: need at least one value")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: expected a quantile in [0, 1], got {q}")
    point = q * (len(sorted_values) - 1)
    lo, hi = math.floor(point), math.ceil(point)
    return sorted_values[lo] + (point - lo) * (sorted_values[hi] - sorted_values[lo])


def summarize_times(times_ms: list[float], timer: str) -> Timing:
    """The median and 20th/80th percentiles of ``times_ms``, measured by ``timer``."""
    values = sorted(times_ms)
    return Timing(quantile(values, 0.5), quantile(values, 0.2), quantile(values, 0.8), len(values), timer)


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cuda_graph: bool | Literal["auto"] = False,
) -> Timing:
    """Time ``fn`` on the current CUDA device with Triton's benchmarking helpers.

    ``cuda_graph=True`` times from a CUDA graph; ``"auto"`` does so only when the plain median is
    below ``LAUNCH_BOUND_MS``. A function that cannot be captured (it synchronises with the host,
    say) falls back to the plain timing, and the timer label says why.
    """
    from triton.testing import do_bench, do_bench_cudagraph

    if cuda_graph not in (True, False, "auto"):
        raise ValueError(f"cuda_graph: expected True, False or 'auto', got {cuda_graph!r}")
    plain = None
    if cuda_graph is not True:  # False, or "auto", which needs the plain timing to decide
        plain = summarize_times(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"), DO_BENCH_LABEL)
        if cuda_graph is False or plain.median_ms >= LAUNCH_BOUND_MS:
            return plain
    try:
        times = do_bench_cudagraph(fn, rep=max(rep_ms / 5, 20.0), return_mode="all")
        return summarize_times(times, "triton.testing.do_bench_cudagraph (one CUDA graph, L2 not flushed)")
    except Exception as exc:  # capture refused: a host sync, or an op graphs do not allow
        torch.cuda.synchronize()
        message = str(exc).splitlines()[0] if str(exc) else ""
        if plain is None:
            plain = summarize_times(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"), DO_BENCH_LABEL)
        why = f"{type(exc).__name__}: {message}"[:120]
        return replace(plain, timer=f"{DO_BENCH_LABEL}; CUDA graph capture failed ({why})")


def time_cuda_with_setup(
    fn: Callable[[Any], object],
    setup: Callable[[], Any],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    l2_flush: Literal["write", "read"] = "write",
) -> Timing:
    """Time ``fn(setup())`` on the current CUDA device, ``setup`` untimed.

    Mirrors ``triton.testing.do_bench``: estimate from a few runs, warm up for ``warmup_ms``,
    then ``rep_ms`` worth of runs, each after an L2 flush, each between its own CUDA events.
    ``setup`` is enqueued before the flush and the start event, so it never counts.

    ``l2_flush``: "write" zeroes a 256 MB buffer, as ``do_bench`` does; it leaves L2 full of
    dirty lines, whose write-back the timed run pays for as it evicts them (about 14 µs on a
    60 MB L2 at HBM speed: nothing beside a training step's milliseconds, a quarter of a
    short decode call). "read" sums the buffer instead, leaving L2 full of clean lines, as a
    model's previous kernels mostly do (they read weights).
    """
    if l2_flush not in ("write", "read"):
        raise ValueError(f"l2_flush: expected 'write' or 'read', got {l2_flush!r}")
    from triton import runtime

    driver = runtime.driver.active
    device = driver.get_device_interface()
    cache = driver.get_empty_cache_for_benchmark()
    flush = (lambda: driver.clear_cache(cache)) if l2_flush == "write" else cache.sum

    def timed_run() -> tuple[Any, Any]:
        state = setup()
        flush()
        start, end = device.Event(enable_timing=True), device.Event(enable_timing=True)
        start.record()
        fn(state)
        end.record()
        return start, end

    probe = [timed_run() for _ in range(3)]
    device.synchronize()
    estimate_ms = max(quantile(sorted(s.elapsed_time(e) for s, e in probe), 0.5), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn(setup())
    events = [timed_run() for _ in range(min(MAX_RUNS, max(1, int(rep_ms / estimate_ms))))]
    device.synchronize()
    return summarize_times([s.elapsed_time(e) for s, e in events], SETUP_LABEL)


def time_cpu(
    fn: Callable[..., object],
    *,
    setup: Callable[[], Any] | None = None,
    budget_s: float = 0.25,
    min_runs: int = 3,
    max_runs: int = 200,
) -> Timing:
    """Time ``fn`` (or ``fn(setup())``, setup untimed) on the CPU: at least ``min_runs`` runs,
    more while ``budget_s`` of wall time (setups included) lasts.

    The caller has already run ``fn`` once (compilation, first-touch allocation), so every timed
    run has warm caches; nothing here flushes them, and the label says so.
    """
    if min_runs < 1 or max_runs < min_runs:
        raise ValueError(f"min_runs/max_runs: need 1 <= min_runs <= max_runs, got {min_runs}, {max_runs}")
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < deadline):
        args = () if setup is None else (setup(),)
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    label = f"CPU time.perf_counter, {torch.get_num_threads()} thread(s), warm caches"
    return summarize_times(times, label + (", untimed setup (a fresh forward) before each run" if setup else ""))


def time_fn(
    fn: Callable[..., object],
    device: torch.device | str,
    *,
    setup: Callable[[], Any] | None = None,
    cuda_graph: bool | Literal["auto"] = False,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_budget_s: float = 0.25,
) -> Timing:
    """Time ``fn`` on ``device`` (CUDA: do_bench; CPU: perf_counter). With ``setup``, each run is
    ``fn(setup())`` and only ``fn`` is timed (no CUDA graph then: the setup must run between)."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            if setup is not None:
                return time_cuda_with_setup(fn, setup, warmup_ms=warmup_ms, rep_ms=rep_ms)
            return time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=cuda_graph)
    if device.type == "cpu":
        return time_cpu(fn, setup=setup, budget_s=cpu_budget_s)
    raise ValueError(f"device: timing supports cuda and cpu, not {device.type}")


def time_once(fn: Callable[..., object], device: torch.device | str, setup: Callable[[], Any] | None = None) -> float:
    """Milliseconds of one run of ``fn`` (``fn(setup())``, setup untimed), after it has been
    warmed up: enough to tell a config that is several times slower than another."""
    device = torch.device(device)
    args = () if setup is None else (setup(),)
    if device.type == "cuda":
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
    start_s = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start_s) * 1e3


def peak_memory_mib(
    fn: Callable[..., object], device: torch.device | str, setup: Callable[[], Any] | None = None
) -> float | None:
    """Peak memory (MiB) that one run of ``fn`` (``fn(setup())``) allocates above what exists when
    it starts (setup's results included); None on the CPU (no allocator statistics there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    args = () if setup is None else (setup(),)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
