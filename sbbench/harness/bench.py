"""Benchmark: latency, TFLOP/s, peak memory and speedup of backends over cases
(docs/design.md sections 5 and 6).

:func:`measure` times one backend on one case, mode and regime and returns one result row; it
never raises for a failing backend (an exception or OOM marks that row, status ``error`` or
``oom``), so a sweep goes on. The tuner times its trials through it. :func:`run_bench` runs a
whole sweep, measuring the baseline beside every case and filling ``speedup``.

Modes: ``fwd`` times the forward; ``bwd`` times the backward alone (each timed backward runs
on a fresh forward made before it, outside the timed region); ``fwdbwd`` times both.
FLOPs are counted as for causal FlashAttention whatever a backend skipped (Case.flops), so
TFLOP/s compares across backends and a speedup is a ratio of times.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch

from sbbench.core.registry import Backend
from sbbench.core.results import BenchRow, device_name, match_key, shape_label
from sbbench.harness.cases import MODES, Case
from sbbench.harness.inputs import REGIMES, make_inputs
from sbbench.harness.runner import (
    BoundCall,
    bind,
    differentiable,
    failure,
    grad_outputs_for,
    identity_row,
    problem_of,
    progress_bar,
    release_memory,
    resolve_backend,
    resolve_device,
)
from sbbench.harness.timing import peak_memory_mib, time_fn, time_once


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


def _check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {regime!r}")


def _timed_op(call: BoundCall, mode: str) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
    """The run whose latency is the mode's, and the untimed setup each run needs (or None).

    ``bwd`` times the backward alone: every run gets a fresh forward from the setup, outside the
    timed region. (Replaying one graph with ``retain_graph`` would be cheaper, but not every
    backward allows it: torch.compile's donates its saved buffers.)
    """
    if mode == "fwd":
        return call, None
    inputs = list(call.inputs)
    first = differentiable(call())
    if not first:
        raise RuntimeError(f"backend {call.backend.name!r} returned outputs that do not require grad")
    # Upstream gradients are drawn once, so every run differentiates the same function.
    grads = grad_outputs_for(first)
    del first

    def forward() -> list[torch.Tensor]:
        return differentiable(call())

    def backward(outs: list[torch.Tensor]) -> Any:
        # autograd.grad returns the gradients instead of accumulating into .grad: nothing piles
        # up between runs.
        return torch.autograd.grad(outs, inputs, grads, allow_unused=True)

    if mode == "bwd":
        return backward, forward
    return (lambda: backward(forward())), None


def measure(
    backend: Backend | str,
    case: Case,
    mode: str,
    regime: str,
    *,
    device: str | torch.device | None = None,
    config: Mapping[str, Any] | None = None,
    inputs: dict | None = None,
    baseline: str | None = None,
    cuda_graph: bool | Literal["auto"] = False,
    seed: int | None = None,
    prune_above_ms: float | None = None,
) -> BenchRow:
    """Time ``backend`` on ``case`` in ``mode`` and ``regime``; one result row.

    Args:
        backend: a registered name, ``"module:function"``, or a :class:`Backend`.
        case: the shape and kind of input.
        mode: ``fwd``, ``bwd`` (backward only) or ``fwdbwd``.
        regime: the input regime (``dense``, ``randn``, ``mixed``, ``peaked``).
        device: ``cpu``/``cuda``; default the GPU when there is one.
        config: launch parameters over the backend's tuned or default config.
        inputs: inputs from ``make_inputs(case, regime, ...)`` to reuse (the tuner times every
            trial on the same data); drawn fresh (from ``seed``) when None.
        baseline: the comparator this row will be compared with (its ``comparator`` column).
        cuda_graph: GPU only: time from a CUDA graph (True), or only when launch-bound ("auto").
        seed: seed for fresh inputs.
        prune_above_ms: when the first run after the warm-up takes longer, stop there: the row
            has status ``pruned`` and that run's time as its latency (the tuner cuts configs
            that cannot win this way).

    Returns:
        A row (``sbbench.core.results`` schema) with latency_ms (median), latency_q20_ms,
        latency_q80_ms, tflops, peak_mem_mib (None on CPU), skipped_fraction, implementation,
        the resolved config, timer, and status ``ok``, ``pruned``, ``error``, ``oom`` or ``unsupported``
        (the reason or the exception in ``error``).

    Raises:
        ValueError/TypeError only for bad arguments (unknown backend, mode or regime, a config
        key the backend does not have, inputs that do not match ``case``), never because the
        backend failed.
    """
    backend = resolve_backend(backend)
    _check_mode(mode)
    _check_regime(regime)
    if not isinstance(case, Case):
        raise TypeError(f"case: expected a Case, got {type(case).__name__}")
    dev = resolve_device(device)
    row = identity_row(BenchRow, "bench", backend, case, regime, dev, mode=mode, comparator=baseline, seed=seed)

    if inputs is None:
        try:
            inputs = make_inputs(case, regime, device=dev, seed=seed)
        except Exception as exc:  # an input too large for the device is that row's result
            row["status"], row["error"] = failure(exc)
            release_memory(dev)
            return row
    problem = problem_of(inputs, case)
    row["total_tokens"] = problem.total_tokens
    reason = backend.unsupported_reason(problem)
    if reason is None and mode != "fwd" and not backend.differentiable:
        reason = "not differentiable: has no backward"
    if reason is not None:
        row.update(status="unsupported", error=reason)
        return row

    call, resolved = bind(backend, inputs, problem, config, requires_grad=mode != "fwd")
    row["config"] = resolved
    op = setup = None
    try:
        op, setup = _timed_op(call, mode)
        # Warm-up: compiles kernels, and a failing backend fails here, before any timing.
        op(*(() if setup is None else (setup(),)))
        first_ms = None if prune_above_ms is None else time_once(op, dev, setup)
        if first_ms is not None and first_ms > prune_above_ms:
            row.update(status="pruned", latency_ms=first_ms, runs=1, timer="one run after the warm-up",
                       error=f"first timed run {first_ms:.4g} ms > {prune_above_ms:.4g} ms: not timed further")
        else:
            row["peak_mem_mib"] = peak_memory_mib(op, dev, setup)
            timing = time_fn(op, dev, setup=setup, cuda_graph=cuda_graph)
            flops = case.flops(mode, inputs.get("lengths"))
            row.update(
                status="ok",
                latency_ms=timing.median_ms,
                latency_q20_ms=timing.q20_ms,
                latency_q80_ms=timing.q80_ms,
                tflops=flops / (timing.median_ms * 1e-3) / 1e12,
                timer=timing.timer,
                runs=timing.runs,
            )
    except Exception as exc:
        row["status"], row["error"] = failure(exc)
        row["peak_mem_mib"] = None
    finally:
        del op, setup
        fault = release_memory(dev)
    if fault is not None and row["status"] == "ok":
        row.update(status="error", error=f"CUDA fault after the run: {fault}")

    if row["status"] == "ok" and backend.skipped_fraction is not None:
        try:
            with torch.no_grad():
                row["skipped_fraction"] = float(
                    backend.skipped_fraction(
                        call.q, call.k, call.v, call.inv_temp, call.attend_current,
                        cu_seqlens=call.cu_seqlens, max_seqlen=call.max_seqlen, config=call.config,
                    )
                )
        except Exception as exc:  # the timing stands; only the diagnostic is missing
            row["notes"] = f"skipped_fraction failed: {failure(exc)[1]}"
    return row


def run_once(
    backend: Backend | str,
    case: Case,
    mode: str,
    inputs: dict,
    *,
    device: str | torch.device | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Run ``mode`` of ``backend`` once on ``inputs`` (from ``make_inputs``), untimed; failures
    raise. What the tuner's compile workers call to build a config's kernels ahead of timing."""
    backend = resolve_backend(backend)
    _check_mode(mode)
    dev = resolve_device(device)
    problem = problem_of(inputs, case)
    call, _ = bind(backend, inputs, problem, config, requires_grad=mode != "fwd")
    op, setup = _timed_op(call, mode)
    op(*(() if setup is None else (setup(),)))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# Rows with equal values here measured the same thing on the same inputs.
_SPEEDUP_KEY = (
    "device", "batch", "heads", "kv_heads", "seqlen", "head_dim", "dtype", "attend_current", "varlen",
    "mode", "regime",
)


def add_speedups(rows: list[dict[str, Any]], baseline: str) -> None:
    """Fill ``speedup`` = baseline latency / row latency, per (shape, mode, regime), in place.

    Only rows measured against ``baseline`` (their ``comparator``) are filled, so rows of another
    sweep with another baseline in the same list keep their own speedups.
    """
    def key(row: Mapping[str, Any]) -> tuple:
        return tuple(row.get(c) for c in _SPEEDUP_KEY)

    reference = {key(r): r["latency_ms"] for r in rows if r.get("backend") == baseline and r.get("status") == "ok"}
    for row in rows:
        if row.get("comparator") not in (baseline, None):
            continue
        base = reference.get(key(row))
        if base is not None and row.get("status") == "ok" and row.get("latency_ms"):
            row["speedup"] = base / row["latency_ms"]


def run_bench(
    backends: Sequence[Backend | str],
    cases: Iterable[Case],
    modes: Sequence[str],
    regimes: Sequence[str],
    device: str | torch.device | None = None,
    baseline: Backend | str | None = None,
    progress: bool = True,
    *,
    cuda_graph: bool | Literal["auto"] = False,
    seed: int | None = None,
    done_rows: Iterable[Mapping[str, Any]] = (),
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every backend on every case, mode and regime; rows with ``speedup`` filled.

    The baseline is measured too (first, beside the others on the very same inputs) even when
    it is not among ``backends``. Inputs are drawn once per (case, regime) and shared by every
    backend and mode. A rich progress bar goes to stderr unless ``progress`` is False.

    ``done_rows`` are rows already measured (a resumed sweep): a measurement whose
    :func:`~sbbench.core.results.match_key` is among theirs is not run again. The returned list
    starts with them, and speedups are computed over old and new rows together. ``on_row`` is
    called with that list (the same object, growing) after every finished row, speedups filled,
    so a caller can save it; an interrupted sweep then loses only the row in progress.
    """
    chosen = [resolve_backend(b) for b in backends]
    if not chosen:
        raise ValueError("backends: no backend to benchmark")
    for mode in modes:
        _check_mode(mode)
    for regime in regimes:
        _check_regime(regime)
    base = resolve_backend(baseline) if baseline is not None else None
    order = ([base] if base is not None else []) + [b for b in chosen if base is None or b.name != base.name]
    cases = list(cases)
    dev = resolve_device(device)
    comparator = base.name if base is not None else None
    rows = [dict(r) for r in done_rows]
    done = {match_key(r) for r in rows}
    device_column = device_name(dev)

    def todo(case: Case, regime: str) -> list[tuple[str, Backend]]:
        return [
            (mode, backend) for mode in modes for backend in order
            if match_key({"device": device_column, "backend": backend.name, **case.columns(), "mode": mode,
                          "regime": regime}) not in done
        ]

    units = [(case, regime, todo(case, regime)) for case in cases for regime in regimes]
    bar = progress_bar(progress)
    with bar:
        task = bar.add_task("bench", total=sum(len(runs) for _, _, runs in units))
        for case, regime, runs in units:
            if not runs:
                continue
            try:
                inputs = make_inputs(case, regime, device=dev, seed=seed)
            except Exception:  # each row records the failure when it tries again itself
                inputs = None
                release_memory(dev)
            for mode, backend in runs:
                bar.update(task, description=f"{backend.name} {shape_label(case.columns())} {case.dtype} {mode} {regime}")
                rows.append(
                    measure(
                        backend, case, mode, regime, device=dev, inputs=inputs,
                        baseline=comparator, cuda_graph=cuda_graph, seed=seed,
                    )
                )
                if base is not None:
                    add_speedups(rows, base.name)
                if on_row is not None:
                    on_row(rows)
                bar.advance(task)
            del inputs
            release_memory(dev)
    if base is not None:
        add_speedups(rows, base.name)
    return rows



