"""What check and bench share: resolving a backend and a device, binding a backend to one input,
the identity columns of a row, and turning a failure into a row's status instead of an exception."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from sbbench.core.problem import AttnProblem, validate
from sbbench.core.registry import Backend, get_backend
from sbbench.core.results import RowT, environment, new_row
from sbbench.harness.cases import Case

# How much of an exception's text a row keeps: enough to recognise it, not a whole traceback.
MAX_ERROR_CHARS = 500


def resolve_backend(backend: Backend | str) -> Backend:
    """A registered name, a ``"module:function"`` path, or a :class:`Backend` already."""
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` is the GPU when there is one, else the CPU; a named CUDA device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a device ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested, but torch sees no CUDA GPU on this machine")
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected cpu or cuda, got {resolved.type}")
    return resolved


def problem_of(inputs: Mapping[str, Any], case: Case) -> AttnProblem:
    """Validate inputs (from ``make_inputs``) as ``sb_attn`` would, with the default inv_temp."""
    return validate(
        inputs["q"], inputs["k"], inputs["v"], None, case.attend_current,
        inputs.get("cu_seqlens"), inputs.get("max_seqlen"),
    )


def implementation_of(backend: Backend) -> str:
    """What actually runs for ``backend`` (a comparator names its library), never raising."""
    if backend.implementation is None:
        return backend.name
    try:
        return backend.implementation()
    except Exception as exc:  # a probe of a foreign package must not end a sweep
        return f"{backend.name} (implementation probe failed: {type(exc).__name__})"


@dataclass
class BoundCall:
    """One backend bound to one input: calling it runs the forward and returns ``(o, rem)``."""

    backend: Backend
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    inv_temp: float
    attend_current: bool
    cu_seqlens: torch.Tensor | None
    max_seqlen: int | None
    config: Mapping[str, Any] | None

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.backend.fn(
            self.q, self.k, self.v, self.inv_temp, self.attend_current,
            cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen, config=self.config,
        )


def bind(
    backend: Backend,
    inputs: Mapping[str, Any],
    problem: AttnProblem,
    config: Mapping[str, Any] | None,
    *,
    requires_grad: bool,
    dtype: torch.dtype | None = None,
) -> tuple[BoundCall, dict[str, Any]]:
    """Bind ``backend`` to ``inputs`` and return it with its resolved config.

    q, k, v are detached views of the caller's tensors (no copy unless ``dtype`` asks for one),
    so one set of inputs serves every backend and mode. The config is resolved as ``sb_attn``
    resolves it: default, then tuned, then ``config``; a backend without launch parameters gets
    ``config=None`` like it would from ``sb_attn``.
    """
    resolved = backend.resolve_config(problem, config)
    tensors = []
    for name in ("q", "k", "v"):
        x = inputs[name].detach()
        if dtype is not None:
            x = x.to(dtype)
        tensors.append(x.requires_grad_(requires_grad))
    call = BoundCall(
        backend, *tensors, problem.inv_temp, problem.attend_current,
        inputs.get("cu_seqlens"), inputs.get("max_seqlen"),
        resolved if (backend.config_space or config) else None,
    )
    return call, resolved


def grad_outputs_for(outputs: list[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Random upstream gradients (N(0,1) in each output's dtype) for ``outputs``."""
    return [
        torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
        for x in outputs
    ]


def differentiable(outputs: tuple[torch.Tensor, torch.Tensor | None]) -> list[torch.Tensor]:
    """The outputs that carry a graph (rem may be None for softmax comparators)."""
    return [x for x in outputs if x is not None and x.requires_grad]


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    # The CPU allocator's wording differs from the CUDA one's.
    return "out of memory" in text or "can't allocate memory" in text


def failure(exc: BaseException) -> tuple[str, str]:
    """(status, message) for a row whose backend raised: ``"oom"`` or ``"error"``."""
    text = " ".join(str(exc).split())
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return ("oom" if is_oom(exc) else "error"), message[:MAX_ERROR_CHARS]


def release_memory(device: torch.device) -> str | None:
    """Free what a failed or finished row left behind, so the next row starts clean.

    Returns None, or the message of an asynchronous CUDA fault that the synchronisation surfaced
    (an illegal address in the last kernel): the caller marks its row rather than raising.
    """
    gc.collect()
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as exc:
        return failure(exc)[1]
    return None


def identity_row(
    row_type: type[RowT],
    command: str,
    backend: Backend,
    case: Case,
    regime: str,
    device: torch.device,
    **fields: Any,
) -> RowT:
    """A ``row_type`` row with the environment, backend, shape and regime filled and every metric
    empty."""
    return new_row(
        row_type,
        command=command,
        **environment(device),
        backend=backend.name,
        implementation=implementation_of(backend),
        **case.columns(),
        regime=regime,
        **fields,
    )


def progress_bar(enabled: bool):
    """A rich progress bar on stderr (stdout stays clean for tables); inert when not ``enabled``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not enabled,
    )
