"""The one backend registry.

Every implementation of the operator (and every comparator that is not stick-breaking) is a
:class:`Backend` registered here with :func:`register_backend`. A backend declares what it
supports and, when it does not, says why; it names its tunable launch parameters (its config
space) and its default config; one that decodes from a KV cache also gives its ``decode``
entry point and that entry point's own config space. The CLI, the harness and the tuner reach
implementations only through this module, so a new backend is one new decorated function.

A user's own implementation plugs in by import path (``"mypkg.module:function"``) wherever a
backend name is accepted; see :func:`get_backend`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import torch

from sbbench.core.errors import ArgumentError
from sbbench.core.problem import AttnProblem

Pass = Literal["fwd", "bwd", "decode"]


class BackendFn(Protocol):
    """How every backend is called: like ``sb_attn`` with ``inv_temp`` already resolved."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inv_temp: float,
        attend_current: bool,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class DecodeFn(Protocol):
    """How a backend decodes from a KV cache: like ``sb_attn_with_kvcache`` with ``inv_temp``
    resolved and any new k/v already appended. Query t of sequence b sits at position
    ``cache_seqlens[b] + t``."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        inv_temp: float,
        attend_current: bool,
        *,
        config: Mapping[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Rule:
    """What makes a parameter's value valid: a test, and its wording, which completes
    "config: <name> must be ..." in the error raised when the test fails."""

    holds: Callable[[Any], bool]
    text: str


@dataclass(frozen=True)
class Param:
    """One tunable launch parameter: its name, the values the tuner tries (``choices``), the pass
    it governs, and optionally its default value and the rule any value must meet (a value
    outside ``choices`` may still be valid: the choices are what is worth trying, not all that
    runs)."""

    name: str
    choices: tuple[Any, ...]
    pass_: Pass = "fwd"
    default: Any = None
    rule: Rule | None = None

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` naming the parameter when ``value`` breaks its rule."""
        if self.rule is not None and not self.rule.holds(value):
            raise ArgumentError("config", f"{self.name} must be {self.rule.text}, got {value!r}")


@dataclass(frozen=True)
class Backend:
    """An implementation and what it supports.

    ``kind`` is ``"stickbreaking"`` for implementations of the operator and ``"softmax"`` for
    comparators (FlashAttention-2): the harness checks the former against the stick-breaking
    oracle and the latter against float64 softmax attention.
    """

    name: str
    fn: BackendFn
    description: str
    kind: Literal["stickbreaking", "softmax"] = "stickbreaking"
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    min_head_dim: int = 1
    max_head_dim: int | None = None
    varlen: bool = True
    gqa: bool = True
    differentiable: bool = True
    # Lower is preferred by backend="auto" among the backends that support an input, on the
    # devices in auto_devices (default: all of ``devices``).
    auto_priority: int | None = None
    auto_devices: tuple[str, ...] | None = None
    config_space: tuple[Param, ...] = ()
    default_config: Mapping[str, Any] = field(default_factory=dict)
    # Returns why the backend cannot run on this machine at all (no GPU, package missing).
    availability: Callable[[], str | None] = lambda: None
    # Extra, backend-specific support test for one input; returns the reason or None.
    extra_check: Callable[[AttnProblem], str | None] | None = None
    # Optional hook filling config=None from tuned files; defaults to default_config.
    tuned_config: Callable[[AttnProblem], Mapping[str, Any]] | None = None
    # Names what actually ran (e.g. which FlashAttention-2), for result rows.
    implementation: Callable[[], str] | None = None
    # Backends that skip key blocks report the fraction they skipped: called like ``fn`` (same
    # arguments), it runs the forward once and returns skipped / causal key blocks.
    skipped_fraction: Callable[..., float] | None = None
    # Why a full launch config cannot run or cannot be fast for ``problem`` on a device with
    # ``limits`` (shared memory per block, multiprocessors, ...; empty when unknown), judged
    # before anything is built; None when it is worth launching. The tuner never launches a
    # config this rejects.
    launch_filter: Callable[[AttnProblem, Mapping[str, Any], Mapping[str, Any]], str | None] | None = None
    # Decoding from a KV cache (``sb_attn_with_kvcache``): the entry point (None: the backend
    # has none), its own launch parameters (Params with pass_ "decode") and their defaults, and
    # like ``skipped_fraction``, a probe called like ``decode`` returning the fraction of the
    # cache's keys it did not read.
    decode: DecodeFn | None = None
    decode_config_space: tuple[Param, ...] = ()
    decode_default_config: Mapping[str, Any] = field(default_factory=dict)
    decode_skipped_fraction: Callable[..., float] | None = None
    # Like ``launch_filter``, for a full decode launch config and a ``DecodeProblem``.
    decode_launch_filter: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], str | None] | None = None
    # Optional hook filling decode configs from tuned files (keys: batch, cache-length bucket;
    # see sbbench.core.tuned.decode_tuned_config_hook).
    decode_tuned_config: Callable[[AttnProblem], Mapping[str, Any]] | None = None

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine, or None when it can."""
        try:
            return self.availability()
        except Exception as exc:  # an availability probe must never crash `sbbench list`
            return f"availability check failed: {exc!r}"

    def unsupported_reason(self, problem: AttnProblem) -> str | None:
        """Why this backend cannot run ``problem``, or None when it can."""
        reason = self.unavailable_reason()
        if reason:
            return reason
        if problem.device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {problem.device_type}"
        if problem.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"supports dtypes {names}, not {str(problem.dtype).removeprefix('torch.')}"
        if problem.head_dim < self.min_head_dim or (
            self.max_head_dim is not None and problem.head_dim > self.max_head_dim
        ):
            hi = self.max_head_dim if self.max_head_dim is not None else "any"
            return f"supports head dims {self.min_head_dim}..{hi}, not {problem.head_dim}"
        if problem.varlen and not self.varlen:
            return "does not support packed variable-length input (cu_seqlens)"
        if problem.kv_heads != problem.heads and not self.gqa:
            return "does not support GQA/MQA (fewer k/v heads than q heads)"
        if self.extra_check is not None:
            return self.extra_check(problem)
        return None

    def decode_unsupported_reason(self, problem: AttnProblem) -> str | None:
        """Why this backend cannot decode ``problem`` (a ``DecodeProblem``), or None when it can."""
        if self.decode is None:
            return "has no KV-cache decode entry point"
        return self.unsupported_reason(problem)

    def params(self, pass_: Pass | None = None) -> tuple[Param, ...]:
        """The config space, or the part of it that governs one pass (``decode``: the decode
        entry point's own space)."""
        if pass_ == "decode":
            return self.decode_config_space
        return tuple(p for p in self.config_space if pass_ is None or p.pass_ == pass_)

    def resolve_config(
        self, problem: AttnProblem | None, config: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Default config, overlaid with the tuned config for ``problem``, then with ``config``.

        Unknown keys in ``config`` raise ``ValueError`` naming the argument.
        """
        known = {p.name for p in self.config_space} | set(self.default_config)
        self._check_config_keys(config, known)
        merged = dict(self.default_config)
        if problem is not None and self.tuned_config is not None and (config is None or set(config) != known):
            merged.update(self.tuned_config(problem))
        if config is not None:
            merged.update(config)
        return merged

    def resolve_decode_config(
        self, problem: AttnProblem | None, config: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Decode default config, overlaid with the tuned one for ``problem``, then ``config``
        (unknown keys: ``ValueError`` naming the argument)."""
        known = {p.name for p in self.decode_config_space} | set(self.decode_default_config)
        self._check_config_keys(config, known)
        merged = dict(self.decode_default_config)
        if problem is not None and self.decode_tuned_config is not None and (config is None or set(config) != known):
            merged.update(self.decode_tuned_config(problem))
        return {**merged, **(config or {})}

    def _check_config_keys(self, config: Mapping[str, Any] | None, known: set[str]) -> None:
        if config is None:
            return
        if not isinstance(config, Mapping):
            raise TypeError(f"config: expected a dict of launch parameters, got {type(config).__name__}")
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"config: backend {self.name!r} has no parameter(s) {unknown}; "
                f"its parameters are {sorted(known)}"
            )


_REGISTRY: dict[str, Backend] = {}
_BUILTINS_LOADED = False


def register_backend(name: str, **spec: Any) -> Callable[[BackendFn], BackendFn]:
    """Decorator registering ``fn`` as backend ``name``; ``spec`` fills :class:`Backend`."""

    def decorate(fn: BackendFn) -> BackendFn:
        if name in _REGISTRY:
            raise ValueError(f"backend {name!r} is registered twice")
        _REGISTRY[name] = Backend(name=name, fn=fn, **spec)
        return fn

    return decorate


def _load_builtins() -> None:
    # Importing the kernels package registers the built-in backends. Done lazily so that
    # `import sbbench` stays cheap and kernels can import the core without a cycle. No lock:
    # Python's import lock already serialises the import, and a lock would break
    # torch.compile(fullgraph=True) when a process's first sb_attn call is being traced.
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        importlib.import_module("sbbench.kernels")
        _BUILTINS_LOADED = True


def backend_names() -> list[str]:
    """Names of all registered backends, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def all_backends() -> list[Backend]:
    _load_builtins()
    return list(_REGISTRY.values())


def _plugin_backend(path: str) -> Backend:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ArgumentError("backend", f"{path!r} is neither a registered backend nor 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArgumentError("backend", f"cannot import module {module_name!r} for {path!r}: {exc}") from exc
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ArgumentError("backend", f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise TypeError(f"backend: {path!r} is not callable")
    # A user's function is trusted to take whatever it is given; it is checked by the harness
    # like any built-in backend. It takes no launch parameters.
    return Backend(name=path, fn=_wrap_plugin(fn), description=f"user backend {path}")


def _wrap_plugin(fn: Callable[..., Any]) -> BackendFn:
    def call(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
        extra: dict[str, Any] = {}
        if cu_seqlens is not None:
            extra.update(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if config:
            extra["config"] = config
        return fn(q, k, v, inv_temp, attend_current, **extra)

    return call


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``, or a user backend given as ``"module:function"``."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name or 'module:function', got {type(name).__name__}")
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _plugin_backend(name)
    raise ArgumentError("backend", f"unknown backend {name!r}; registered: {', '.join(_REGISTRY)}")


def parse_backend_list(spec: str | Sequence[str]) -> list[Backend]:
    """``"chunked,mypkg.mod:fn"`` (or a list of names) to backends, in the order given."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise ArgumentError("backends", "no backend named")
    return [get_backend(n) for n in names]


def select_auto(problem: AttnProblem, *, decode: bool = False) -> Backend:
    """The preferred backend that supports ``problem`` (with ``decode``: that decodes it from a
    KV cache); never fails for lack of a GPU."""
    candidates = [b for b in all_backends() if b.auto_priority is not None and b.kind == "stickbreaking"]
    reasons = []
    for backend in sorted(candidates, key=lambda b: b.auto_priority):
        if backend.auto_devices is not None and problem.device_type not in backend.auto_devices:
            continue
        reason = backend.decode_unsupported_reason(problem) if decode else backend.unsupported_reason(problem)
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise ArgumentError("backend", "no backend supports this input (" + "; ".join(reasons) + ")")
