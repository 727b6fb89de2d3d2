"""``compiled``: the eager O(T^2) formula (``reference.dense_naive``) under ``torch.compile``.

Inductor fuses the elementwise stick-breaking transform around the two matmuls, so this is the
"what does the compiler buy you" baseline; it still materialises T x T scores (no O(T) memory).
Runs wherever inductor does: CUDA, or the CPU with a C++ compiler.

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

from sbbench.core.problem import AttnProblem
from sbbench.core.registry import register_backend
from sbbench.kernels.reference import dense_naive
from sbbench.kernels.varlen import run_per_sequence

_CacheKey = tuple[bool, torch.dtype, str, bool]
_COMPILED: dict[_CacheKey, Callable] = {}
_LOCK = threading.Lock()


def _fresh_function(fn: types.FunctionType) -> types.FunctionType:
    # Dynamo keeps its cache of compiled graphs (and counts recompiles) per code object, so a
    # copy with its own code object gets its own cache and its own recompile budget.
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compiled_fn(attend_current: bool, dtype: torch.dtype, device_type: str, needs_grad: bool) -> Callable:
    """The cached ``torch.compile``d ``dense_naive`` for one guard combination."""
    key = (attend_current, dtype, device_type, needs_grad)
    fn = _COMPILED.get(key)
    if fn is None:
        with _LOCK:
            fn = _COMPILED.get(key)
            if fn is None:
                fn = torch.compile(_fresh_function(dense_naive), dynamic=True)
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
        fn = dense_naive
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
