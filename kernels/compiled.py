"""``compiled``: the eager O(T^2) formula (``reference.dense_naive``) under ``torch.compile``.

Inductor fuses the elementwise stick-breaking transform around the two matmuls, so this is the
"what does the compiler buy you" baseline; it still materialises T x T scores (no O(T) memory).
Runs wherever inductor does: CUDA, or the CPU with a C++ compiler. On the CPU the formula is the
reference's with one change of arrangement, not of math: the sum over the keys between j and i is
an exclusive reverse cumsum (see ``stick_breaking_weights_exclusive`` for why). On CUDA it is the
reference's own arrangement, which is within budget there and faster (``formula_for``).

Recompiles stay bounded: shapes are compiled dynamic (one graph serves every T, B, H, D, apart from
the size-1 specialisations), and each combination of the things dynamo must guard on anyway
(attend_current, dtype, device, whether autograd records) gets its own compiled copy of the
function, so a dozen variants never exhaust dynamo's per-function recompile limit and fall back to
eager without telling anyone.
"""

from __future__ import annotations

import functools
import threading
import types
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from sbbench.core.problem import AttnProblem
from sbbench.core.registry import register_backend
from sbbench.kernels.reference import causal_keep, dense_naive
from sbbench.kernels.varlen import run_per_sequence


def stick_breaking_weights_exclusive(
    z: torch.Tensor, attend_current: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.stick_breaking_weights`` with the sum over keys j < l < i taken as the
    inclusive reverse cumsum shifted by one key, not as the inclusive one minus key j's own term;
    and rem read off the inclusive sum at key 0 instead of a separate sum.

    Why (on the CPU, float16/bfloat16 dq and dk on ``mixed`` inputs would otherwise be far over
    budget): the backward of "inclusive minus own term" is cumsum(g) - g, g = dA * A. Inductor
    runs the cumsum as an aten call on g rounded to the input dtype, but recomputes the subtracted
    g in float32 inside the fused kernel around it. Behind a key with A ~ 1 (a beacon) the two
    nearly cancel, and what is left is g's rounding (half an ulp of |g| ~ 1) instead of the true
    sum of the farther keys (orders of magnitude smaller); eager subtracts the same rounded g and
    cancels exactly. The shift has no subtraction to get wrong, in any dtype, and the forward never
    rounds a sum that includes key j's own -softplus(z_j) before taking it off, which also makes
    o more accurate on ``mixed``. rem from the cumsum keeps float32 rem within budget at long T:
    the CPU's cumsum accumulates float32 in float64, where a row summed one key at a time in
    float32 would not.
    """
    keep = causal_keep(z.shape[-1], attend_current, z.device)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    log_beta = F.logsigmoid(z)
    log_one_minus_beta = torch.where(keep, F.logsigmoid(-z), zero)
    # inclusive[..., j] = sum over keys l >= j; the sum over l > j is it shifted left by one key.
    inclusive = torch.flip(torch.cumsum(torch.flip(log_one_minus_beta, (-1,)), -1), (-1,))
    suffix = F.pad(inclusive[..., 1:], (0, 1))
    weights = torch.where(keep, torch.exp(log_beta + suffix), zero)
    rem = torch.exp(inclusive[..., 0])
    return weights, rem


def dense_formula_exclusive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: float, attend_current: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.dense_naive`` with ``stick_breaking_weights_exclusive``."""
    return dense_naive(q, k, v, inv_temp, attend_current, stick_breaking_weights_exclusive)


def formula_for(device_type: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The arrangement compiled for a device type.

    The CPU needs the exclusive cumsum (its backward's cancellation is in inductor's C++ code).
    On CUDA inductor scans in float32 in its own Triton kernel, and the reference's arrangement
    is within budget there. The exclusive form's pad of the cumsum's output would cost a
    materialised T x T pass there (more time and peak memory for the same accuracy), and shifting
    the cumsum's input instead is slower still.
    """
    return dense_formula_exclusive if device_type == "cpu" else dense_naive


_CacheKey = tuple[bool, torch.dtype, str, bool]
_COMPILED: dict[_CacheKey, Callable] = {}
_LOCK = threading.Lock()


def _fresh_function(fn: types.FunctionType) -> types.FunctionType:
    # Dynamo keeps its cache of compiled graphs (and counts recompiles) per code object, so a
    # copy with its own code object gets its own cache and its own recompile budget.
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_fn(attend_current: bool, dtype: torch.dtype, device_type: str, needs_grad: bool) -> Callable:
    """The cached ``torch.compile``d ``formula_for(device_type)`` for one guard combination."""
    key = (attend_current, dtype, device_type, needs_grad)
    fn = _COMPILED.get(key)
    if fn is None:
        with _LOCK:
            fn = _COMPILED.get(key)
            if fn is None:
                fn = torch.compile(_fresh_function(formula_for(device_type)), dynamic=True)
                _COMPILED[key] = fn
    return fn


@torch.compiler.assume_constant_result
def _cpu_compiler_missing() -> str | None:
    # A constant to dynamo: inductor's compiler probe cannot be traced by a caller's torch.compile.
    return _probe_cpu_compiler()


@functools.lru_cache(maxsize=None)
def _probe_cpu_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own InvalidCxxCompiler; any failure means no
        return f"torch.compile on the CPU needs a C++ compiler (inductor): {exc!r}"
    return None


def _supports(problem: AttnProblem) -> str | None:
    if problem.device_type == "cpu":
        return _cpu_compiler_missing()
    return None


@register_backend(
    "compiled",
    description="the eager O(T^2) formula under torch.compile (inductor); T x T memory",
    auto_priority=20,
    devices=("cpu", "cuda"),
    extra_check=_supports,
)
def compiled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float,
    attend_current: bool,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        # Already inside a caller's torch.compile: the formula joins the caller's graph.
        fn = formula_for(q.device.type)
    else:
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        fn = compiled_fn(bool(attend_current), q.dtype, q.device.type, needs_grad)

    def dense(qs, ks, vs, temp, current):
        # Dynamo guards on stride patterns, so transposed or packed-varlen views would each
        # compile again; an O(T * D) copy is nothing beside the O(T^2) work it feeds.
        return fn(qs.contiguous(), ks.contiguous(), vs.contiguous(), temp, current)

    if cu_seqlens is not None:
        return run_per_sequence(dense, q, k, v, inv_temp, attend_current, cu_seqlens)
    return dense(q, k, v, inv_temp, attend_current)
