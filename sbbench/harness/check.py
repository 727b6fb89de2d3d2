"""Numerics check against a float64 oracle with FlashAttention-2's error budget
(docs/design.md section 4).

For one backend, case and regime: draw fresh random inputs; run the backend with its outputs
poisoned; compare o, rem and the gradients dq, dk, dv (for random upstream gradients do, drem)
with ``reference`` run in float64 on the same inputs, upcast. Per tensor x:

    err_max     = max |x - x_ref64|
    err_rel_fro = ||x - x_ref64||_F / ||x_ref64||_F
    err_pt      = max |x_pt - x_ref64|, x_pt from ``reference`` run in the backend's own dtype
    budget      = 2 * err_pt + atol_floor                     (FlashAttention-2's rule)
    passed      = every element finite and err_max <= budget

Beside each row, the FlashAttention-2 anchor: fa2's relative Frobenius error against float64
softmax attention on the same q, k, v (and the same do), so a reader sees how far from the
softmax kernel's own precision a stick-breaking kernel is (design goal: within 2x).

Softmax comparators (``fa2``) are checked the same way against float64 softmax attention.

Poisoning: every backend call runs with ``torch.use_deterministic_algorithms(True,
warn_only=True)`` and ``torch.utils.deterministic.fill_uninitialized_memory``, under which every
``torch.empty`` (and so every output buffer a backend or its Triton launcher allocates) comes
back filled with NaN. An element the kernel never writes then stays NaN and fails the row. A
backend that gets its memory some other way is still caught by the comparison with the oracle:
inputs are random and never zero, so an unwritten element differs from the oracle's value.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence

import torch

from sbbench.core.problem import AttnProblem
from sbbench.core.registry import Backend, get_backend
from sbbench.core.results import CheckRow, device_name, match_key
from sbbench.harness.cases import MODES, Case
from sbbench.harness.inputs import REGIMES, make_inputs
from sbbench.harness.runner import (
    bind,
    failure,
    identity_row,
    problem_of,
    progress_bar,
    release_memory,
    resolve_backend,
    resolve_device,
)
from sbbench.kernels.reference import dense_naive
from sbbench.kernels.varlen import expand_kv_heads, run_per_sequence

TENSORS = ("o", "rem", "dq", "dk", "dv")
GRAD_TENSORS = ("dq", "dk", "dv")

# atol_floor, in units of the largest |x_ref64| of the tensor checked. FlashAttention-2's rule
# 2 * err_pt alone fails a correct kernel whenever the low-precision reference happens to be
# almost exact for a tensor (err_pt ~ 0: rem near 1, or a tensor with few distinct values),
# because the kernel's own final rounding to its dtype can still cost half a unit in the last
# place at the tensor's largest magnitude. So the floor is one such unit (the dtype's machine
# epsilon times max |x_ref64|): rounding alone always fits, and it is no larger than the
# difference a single wrong element in the largest entries would make.
# float64 is special: there err_pt is 0 (the low-precision reference is the oracle), so the floor
# is the whole budget. 2^-33 relative (~1e-10) allows summation-order differences, which grow
# like T * 2^-52 (~4e-12 at T = 16k), while a float32 computation posing as float64 (~1e-7)
# still fails.
ATOL_FLOOR_REL = {
    torch.float16: torch.finfo(torch.float16).eps,  # 2^-10
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,  # 2^-7
    torch.float32: torch.finfo(torch.float32).eps,  # 2^-23
    torch.float64: 2.0**-33,
}


def atol_floor(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The absolute floor of the budget for a tensor of ``dtype`` whose oracle is ``reference``."""
    if dtype not in ATOL_FLOOR_REL:
        raise ValueError(f"dtype: no error budget for {dtype}")
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return ATOL_FLOOR_REL[dtype] * scale


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Every ``torch.empty`` inside returns NaN-filled memory (see the module docstring)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            # warn_only: ops without a deterministic variant still run (we want NaN-filled
            # buffers, not determinism) and their warnings are noise here.
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# --------------------------------------------------------------------------------------------
# oracles


def softmax_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: float, attend_current: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal softmax attention on (B, H, T, D), computed in the inputs' dtype (the diagonal is
    always attended: ``attend_current`` does not apply to softmax). The second output is a
    placeholder so that ``run_per_sequence`` can pack it; callers drop it."""
    k, v = expand_kv_heads(q, k, v)
    scores = inv_temp * torch.matmul(q, k.transpose(-1, -2))
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    o = torch.matmul(weights, v)
    return o, o.new_zeros(o.shape[:-1])


def _oracle(kind: str, q, k, v, inv_temp, attend_current, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor | None]:
    dense = dense_naive if kind == "stickbreaking" else softmax_dense
    if cu_seqlens is not None:
        o, rem = run_per_sequence(dense, q, k, v, inv_temp, attend_current, cu_seqlens)
    else:
        o, rem = dense(q, k, v, inv_temp, attend_current)
    return o, (rem if kind == "stickbreaking" else None)


def _run(
    fn, inputs: Sequence[torch.Tensor], upstream: Sequence[torch.Tensor | None], with_grads: bool
) -> dict[str, torch.Tensor | None]:
    """Forward (and backward for ``upstream`` gradients): the tensors by name, detached."""
    o, rem = fn(*inputs)
    found: dict[str, torch.Tensor | None] = {"o": o, "rem": rem}
    if with_grads:
        pairs = [(x, g) for x, g in zip((o, rem), upstream) if x is not None and g is not None and x.requires_grad]
        if not pairs:
            raise RuntimeError("outputs do not require grad: the backend has no backward")
        grads = torch.autograd.grad([x for x, _ in pairs], list(inputs), [g for _, g in pairs], allow_unused=True)
        found.update(zip(GRAD_TENSORS, grads))
    return {name: (x.detach() if x is not None else None) for name, x in found.items()}


def _references(oracles: MutableMapping[Any, Any] | None, key: tuple, oracle: Callable[[torch.dtype], Any],
                dtype: torch.dtype) -> tuple[Any, Any]:
    """(float64 oracle, reference in ``dtype``), from ``oracles`` when it holds ``key``."""
    if oracles is not None and key in oracles:
        return oracles[key]
    ref64 = oracle(torch.float64)
    found = (ref64, ref64 if dtype == torch.float64 else oracle(dtype))
    if oracles is not None:
        oracles[key] = found
    return found


def _upcast(xs: Iterable[torch.Tensor], dtype: torch.dtype, grad: bool) -> list[torch.Tensor]:
    return [x.detach().to(dtype).requires_grad_(grad) for x in xs]


# --------------------------------------------------------------------------------------------
# metrics


def _errors(x: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float, int]:
    """(max abs error, relative Frobenius error, count of non-finite elements)."""
    diff = x.detach().to(torch.float64) - ref64
    nonfinite = int((~torch.isfinite(x)).sum())
    err_max = float(diff.abs().max()) if diff.numel() else 0.0
    ref_norm = float(torch.linalg.vector_norm(ref64))
    diff_norm = float(torch.linalg.vector_norm(diff))
    err_rel = diff_norm / ref_norm if ref_norm > 0 else diff_norm
    if nonfinite:
        err_max = err_rel = math.nan
    return err_max, err_rel, nonfinite


def skip_bound(name: str, config: Mapping[str, Any] | None, v: torch.Tensor | None) -> float:
    """What block skipping may change in tensor ``name``: a backend that stops walking left once
    every row's stick is below ``2**skip_log2`` leaves rem off by at most that much, and o by at
    most that times max|v| (the dropped keys' whole share). 0 for a config without skipping and
    for the gradients, which the budget covers alone."""
    threshold = (config or {}).get("skip_log2")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or name not in ("o", "rem"):
        return 0.0
    scale = 1.0 if name == "rem" or v is None else float(v.detach().abs().max().double())
    return 2.0 ** threshold * scale


def budget_metrics(x: torch.Tensor, ref64: torch.Tensor, low: torch.Tensor, dtype: torch.dtype,
                   skipped: float = 0.0) -> dict[str, Any]:
    """Errors of ``x`` against the float64 oracle ``ref64`` and FlashAttention-2's budget, with
    ``low`` the reference computed in ``dtype``: err_max, err_rel_fro, nonfinite, err_pt,
    atol_floor, skip_bound, budget = 2 err_pt + atol_floor + skip_bound, and passed (finite and
    err_max <= budget). ``skipped`` is the tensor's :func:`skip_bound`: where every row's stick
    is nearly used up (a query at the end of a long cache) the FlashAttention-2 terms shrink with
    rem itself, below what skipping is allowed to move."""
    err_max, err_rel, nonfinite = _errors(x, ref64)
    err_pt = _errors(low, ref64)[0]
    floor = atol_floor(dtype, ref64)
    budget = 2.0 * err_pt + floor + skipped
    return {
        "err_max": err_max, "err_rel_fro": err_rel, "nonfinite": nonfinite, "err_pt": err_pt, "atol_floor": floor,
        "skip_bound": skipped, "budget": budget, "passed": nonfinite == 0 and err_max <= budget,
    }


def _fa2_anchor(
    problem: AttnProblem, call_inputs: Mapping[str, Any], upstream_o: torch.Tensor, with_grads: bool,
    device: torch.device,
) -> tuple[dict[str, float], str | None]:
    """fa2's relative Frobenius error per tensor (o, dq, dk, dv) against float64 softmax on the
    same inputs and upstream gradient; or ({}, why not)."""
    try:
        fa2 = get_backend("fa2")
    except ValueError as exc:
        return {}, f"fa2 anchor: {exc}"
    reason = fa2.unsupported_reason(problem)
    if reason is not None:
        return {}, f"fa2 anchor unavailable: {reason}"
    cu = call_inputs.get("cu_seqlens")
    try:
        call, _ = bind(fa2, call_inputs, problem, None, requires_grad=with_grads)
        got = _run(lambda *xs: call(), call.inputs, (upstream_o, None), with_grads)
        ref = _run(
            lambda q, k, v: _oracle("softmax", q, k, v, problem.inv_temp, problem.attend_current, cu),
            _upcast(call.inputs, torch.float64, with_grads), (upstream_o.to(torch.float64), None), with_grads,
        )
        anchor = {name: _errors(got[name], ref[name])[1] for name in ("o",) + (GRAD_TENSORS if with_grads else ())}
        return anchor, None
    except Exception as exc:
        return {}, f"fa2 anchor failed: {failure(exc)[1]}"
    finally:
        release_memory(device)


# --------------------------------------------------------------------------------------------
# check


def check_case(
    backend: Backend | str,
    case: Case,
    regime: str,
    *,
    device: str | torch.device | None = None,
    config: Mapping[str, Any] | None = None,
    fa2: bool = True,
    seed: int | None = None,
    grads: bool = True,
    oracles: MutableMapping[Any, Any] | None = None,
) -> list[dict[str, Any]]:
    """Check one backend on fresh random inputs of ``case`` in ``regime``: one row per tensor.

    Args:
        backend: a registered name, ``"module:function"``, or a :class:`Backend`.
        case, regime: the input.
        device: ``cpu``/``cuda``; default the GPU when there is one.
        config: launch parameters over the backend's tuned or default config.
        fa2: also measure the FlashAttention-2 anchor (``fa2_rel_err``) on the same inputs.
        seed: seed of the inputs (a fresh random one when None; recorded in the rows, so a
            failure can be replayed).
        grads: also check dq, dk, dv (the backend must be differentiable).
        oracles: a dict the caller keeps between calls; with a fixed ``seed`` the references
            (float64 and the case's dtype) of one (case, regime, seed) are computed once and
            reused, since they depend on the inputs alone. The tuner checks many configs of one
            study this way.

    Returns:
        Rows with ``tensor`` in o, rem (stick-breaking only), dq, dk, dv, and err_max,
        err_rel_fro, err_pt, budget, atol_floor, nonfinite, passed, fa2_rel_err, status
        (``ok``; ``error``/``oom`` when the backend raised, then ``passed`` is False; or one row
        with status ``unsupported`` and ``passed`` None when the backend cannot run the case).
        Never raises because the backend failed.
    """
    backend = resolve_backend(backend)
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {regime!r}")
    if not isinstance(case, Case):
        raise TypeError(f"case: expected a Case, got {type(case).__name__}")
    dev = resolve_device(device)
    seed = random.getrandbits(62) if seed is None else int(seed)
    with_grads = grads and backend.differentiable
    names = (("o", "rem") if backend.kind == "stickbreaking" else ("o",)) + (GRAD_TENSORS if with_grads else ())

    def row(tensor: str | None, **fields: Any) -> CheckRow:
        mode = "fwd" if tensor in ("o", "rem", None) else "bwd"
        return identity_row(CheckRow, "check", backend, case, regime, dev, mode=mode, tensor=tensor, seed=seed,
                            **fields)

    try:
        inputs = make_inputs(case, regime, device=dev, seed=seed)
    except Exception as exc:
        status, message = failure(exc)
        return [row(None, status=status, error=f"making inputs: {message}", passed=False)]
    problem = problem_of(inputs, case)
    reason = backend.unsupported_reason(problem)
    if reason is not None:
        return [row(None, status="unsupported", error=reason)]

    gen = torch.Generator(device=dev)
    gen.manual_seed(seed ^ 0x5EED)
    # Upstream gradients drawn in the backend's dtype, so the backend, the low-precision
    # reference and the float64 oracle all see exactly the same values.
    rem_shape = inputs["q"].shape[:-1]
    do = torch.randn(inputs["q"].shape, generator=gen, device=dev).to(case.torch_dtype)
    drem = torch.randn(rem_shape, generator=gen, device=dev).to(case.torch_dtype)
    upstream = (do, drem if backend.kind == "stickbreaking" else None)
    cu = inputs.get("cu_seqlens")

    def oracle(dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        return _run(
            lambda q, k, v: _oracle(backend.kind, q, k, v, problem.inv_temp, problem.attend_current, cu),
            _upcast((inputs["q"], inputs["k"], inputs["v"]), dtype, with_grads),
            tuple(g.to(dtype) if g is not None else None for g in upstream), with_grads,
        )

    # The backend first, while memory is emptiest; then the references.
    call, resolved = bind(backend, inputs, problem, config, requires_grad=with_grads)
    try:
        with poisoned_outputs():
            got = _run(lambda *xs: call(), call.inputs, upstream, with_grads)
    except Exception as exc:
        status, message = failure(exc)
        release_memory(dev)
        return [row(name, config=resolved, status=status, error=message, passed=False) for name in names]

    try:
        ref64, pt = _references(oracles, (backend.kind, case, regime, seed, str(dev), with_grads), oracle,
                                case.torch_dtype)
    except Exception as exc:  # the oracle itself ran out of memory: the case is too large to check
        status, message = failure(exc)
        release_memory(dev)
        return [row(name, config=resolved, status=status, error=f"reference: {message}", passed=None) for name in names]

    anchor, note = ({}, None) if not fa2 else _fa2_anchor(problem, inputs, do, with_grads, dev)

    rows = []
    for name in names:
        x, ref = got.get(name), ref64[name]
        fields: dict[str, Any] = {"config": resolved, "comparator": "fa2" if anchor else None, "notes": note}
        fields["fa2_rel_err"] = anchor.get("o" if name == "rem" else name)
        if x is None:
            rows.append(row(name, **fields, status="error", error=f"backend returned no {name}", passed=False))
            continue
        contract = _contract_violation(name, x, ref, case.torch_dtype)
        if contract is not None:
            rows.append(row(name, **fields, status="error", passed=False, error=contract))
            continue
        metrics = budget_metrics(x, ref, pt[name], case.torch_dtype, skip_bound(name, resolved, inputs["v"]))
        err_max, err_rel, err_pt = metrics["err_max"], metrics["err_rel_fro"], metrics["err_pt"]
        floor, budget, nonfinite, passed = metrics["atol_floor"], metrics["budget"], metrics["nonfinite"], metrics["passed"]
        if not math.isfinite(err_pt):
            # The low-precision reference itself overflowed: there is no budget to judge by.
            passed = None
            fields["notes"] = "; ".join(filter(None, [note, f"reference in {case.dtype} is not finite: no budget"]))
        fa2_err = fields["fa2_rel_err"]
        rows.append(
            row(
                name, **fields, status="ok", passed=passed,
                err_max=err_max, err_rel_fro=err_rel, err_pt=err_pt, atol_floor=floor, budget=budget,
                nonfinite=nonfinite,
                fa2_ratio=(err_rel / fa2_err) if fa2_err and not math.isnan(err_rel) else None,
                error=None if passed is not False else _why(name, err_max, budget, nonfinite),
            )
        )
    fault = release_memory(dev)
    if fault is not None:  # an asynchronous CUDA fault: nothing this run computed can be trusted
        for r in rows:
            r.update(status="error", passed=False, error=f"CUDA fault after the run: {fault}")
    return rows


def _contract_violation(name: str, x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str | None:
    """How an output breaks sb_attn's contract (shape; o and rem in q's dtype), or None."""
    if x.shape != ref.shape:
        return f"{name}: shape {tuple(x.shape)}, expected {tuple(ref.shape)}"
    if name in ("o", "rem") and x.dtype != dtype:
        return f"{name}: dtype {str(x.dtype).removeprefix('torch.')}, expected q's {str(dtype).removeprefix('torch.')}"
    return None


def _why(name: str, err_max: float, budget: float, nonfinite: int) -> str:
    if nonfinite:
        return f"{name}: {nonfinite} NaN/Inf element(s) (unwritten outputs show as NaN)"
    return f"{name}: err_max {err_max:.3g} over budget {budget:.3g}"


def run_check(
    backends: Sequence[Backend | str],
    cases: Iterable[Case],
    regimes: Sequence[str],
    device: str | torch.device | None = None,
    *,
    modes: Sequence[str] = ("fwd", "bwd"),
    fa2: bool = True,
    seed: int | None = None,
    progress: bool = True,
    done_rows: Iterable[Mapping[str, Any]] = (),
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`check_case` for every backend, case and regime. ``modes`` decides whether the
    gradients are checked (any of ``bwd``/``fwdbwd``) or only o and rem (``fwd`` alone).

    ``done_rows`` are rows of an earlier, interrupted run: a (backend, case, regime) with any row
    among them (matched on :func:`~sbbench.core.results.match_key`, less the mode, which a check
    row takes from its tensor) is not checked again. The returned list starts with them.
    ``on_row`` is called with that list (the same object, growing) after every finished check.
    """
    chosen = [resolve_backend(b) for b in backends]
    if not chosen:
        raise ValueError("backends: no backend to check")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    for regime in regimes:
        if regime not in REGIMES:
            raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {regime!r}")
    grads = any(m in ("bwd", "fwdbwd") for m in modes)
    cases = list(cases)
    dev = resolve_device(device)
    rows = [dict(r) for r in done_rows]
    done = {match_key(r, ignore=("mode",)) for r in rows}
    device_column = device_name(dev)
    units = [
        (case, regime, backend) for case in cases for regime in regimes for backend in chosen
        if match_key({"device": device_column, "backend": backend.name, **case.columns(), "regime": regime},
                     ignore=("mode",)) not in done
    ]

    bar = progress_bar(progress)
    made = 0
    with bar:
        task = bar.add_task("check", total=len(units))
        for case, regime, backend in units:
            bar.update(task, description=f"check {backend.name} T{case.seqlen} {case.dtype} {regime}")
            case_seed = None if seed is None else seed + made
            found = check_case(backend, case, regime, device=dev, fa2=fa2, seed=case_seed, grads=grads)
            made += len(found)
            rows.extend(found)
            if on_row is not None:
                on_row(rows)
            bar.advance(task)
    return rows


def row_failed(row: Mapping[str, Any]) -> bool:
    """Whether a check row counts as a failure (unsupported rows do not)."""
    return row.get("passed") is False or row.get("status") in ("error", "oom")
