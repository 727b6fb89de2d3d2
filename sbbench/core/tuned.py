"""Filling ``config=None`` from tuned config files: the glue between a problem and the loader.

Values read from a file are checked against the backend's config space (each parameter one of
its ``Param`` choices) and by the backend's own validator where it has one; an entry that fails
is skipped with a warning naming the file, so a bad file never surfaces as an error blaming
the caller's ``config`` argument. The loader's warnings are :class:`ConfigWarning`\\ s, shown as
their one-line message without the source line that raised them.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Mapping

import torch

from sbbench.core import config_loader
from sbbench.core.config_loader import ConfigWarning
from sbbench.core.problem import AttnProblem

# Per backend name: the validator its hook was given and the device types where it is tuned.
_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], None]] = {}
_DECODE_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], None]] = {}
_TUNED_DEVICES: dict[str, tuple[str, ...] | None] = {}


def _format_warning(message, category, filename, lineno, line=None, _format=warnings.formatwarning):
    # The message says all a user needs (what is missing or skipped, and which file); the line
    # of sbbench that raised it says nothing to them.
    if isinstance(category, type) and issubclass(category, ConfigWarning):
        return f"{message}\n"
    return _format(message, category, filename, lineno, line)


if getattr(warnings.formatwarning, "__name__", "") != _format_warning.__name__:
    warnings.formatwarning = _format_warning


def config_key(problem: AttnProblem, pass_: str) -> dict[str, Any]:
    """The key of docs/design.md section 7 for one pass of ``problem`` (``decode``: of a
    ``DecodeProblem``, see :func:`decode_cache_length`)."""
    key = {
        "pass": pass_,
        "dtype": str(problem.dtype).removeprefix("torch."),
        "head_dim": problem.head_dim,
        "gqa_group": problem.gqa_group,
        "attend_current": problem.attend_current,
        "seqlen_bucket": config_loader.seqlen_bucket(problem.seqlen),
    }
    if pass_ == "decode":
        key["seqlen_bucket"] = config_loader.seqlen_bucket(decode_cache_length(problem))
        key["batch_bucket"] = config_loader.batch_bucket(problem.batch)
    return key


def decode_cache_length(problem: Any) -> int:
    """The cache length a decode call is keyed by: the most tokens its cache can hold ahead of
    the call's queries, i.e. S_max less the slots the new queries take (their own keys when
    appended; otherwise the keys the last query reads past the cache length). Taken from the
    cache's shape rather than from ``cache_seqlens``, which lives on the device: reading it
    would synchronise every decode step, and the capacity a caller allocates is the length its
    decode is meant to reach. For the tuner's cases (a cache of exactly the slots needed) it
    is the case's cache length."""
    extra = problem.new_tokens if problem.appends else problem.new_tokens - 1 + int(problem.attend_current)
    return max(1, problem.cache_capacity - extra)


def tuned_config_hook(
    backend: str,
    param_passes: Mapping[str, str],
    *,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    tuned_devices: tuple[str, ...] | None = None,
) -> Callable[[AttnProblem], dict[str, Any]]:
    """A ``Backend.tuned_config`` hook: the forward parameters from the fwd entry, the backward
    parameters from the bwd entry, each by nearest key; empty when nothing was tuned.

    ``validate(config)`` raises ``ValueError`` for a config the backend cannot launch (checks
    across parameters that the config space's choices cannot express). ``tuned_devices``: the
    device types where tuning applies (default: all); elsewhere a missing file is not worth a
    warning (a kernel run in an interpreter has nothing to tune).
    """
    if validate is not None:
        _VALIDATORS[backend] = validate
    _TUNED_DEVICES[backend] = tuple(tuned_devices) if tuned_devices is not None else None

    def lookup(problem: AttnProblem) -> dict[str, Any]:
        found = _lookup(
            backend,
            problem.device_type,
            tuple(sorted(config_key(problem, "fwd").items())),
            problem.seqlen,
            tuple(sorted(param_passes.items())),
        )
        return dict(found)

    return lookup


def decode_tuned_config_hook(
    backend: str,
    *,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    tuned_devices: tuple[str, ...] | None = None,
) -> Callable[[AttnProblem], dict[str, Any]]:
    """A ``Backend.decode_tuned_config`` hook: the decode entry of the nearest key (same pass,
    dtype, head dim, GQA group and attend_current, then the nearest batch bucket, then the
    nearest cache-length bucket); empty when nothing was tuned. ``validate`` and
    ``tuned_devices`` as for :func:`tuned_config_hook`, for the decode config."""
    if validate is not None:
        _DECODE_VALIDATORS[backend] = validate
    _TUNED_DEVICES[backend] = tuple(tuned_devices) if tuned_devices is not None else None

    def lookup(problem: AttnProblem) -> dict[str, Any]:
        return dict(_decode_lookup(backend, problem.device_type, tuple(sorted(config_key(problem, "decode").items()))))

    return lookup


def file_config_problem(backend_name: str, config: Mapping[str, Any], pass_: str = "fwd") -> str | None:
    """Why ``backend_name`` cannot run ``config`` read from a file, or None: every parameter
    must be in the backend's config space (``decode``: its decode space) and one of its choices
    (type included: 64.0 is not 64), and the backend's validator must accept it."""
    from sbbench.core.registry import get_backend

    backend = get_backend(backend_name)
    space = backend.decode_config_space if pass_ == "decode" else backend.config_space
    choices = {p.name: p.choices for p in space}
    for name, value in config.items():
        if name not in choices:
            return f"{backend_name} has no parameter {name!r} (its parameters: {', '.join(choices)})"
        if not any(value == c and type(value) is type(c) for c in choices[name]):
            return f"{name}={value!r} is not one of {backend_name}'s choices {list(choices[name])}"
    validate = (_DECODE_VALIDATORS if pass_ == "decode" else _VALIDATORS).get(backend_name)
    if validate is not None:
        try:
            validate(config)
        except (TypeError, ValueError) as exc:
            return str(exc).removeprefix("config: ")
    return None


@torch.compiler.assume_constant_result
def _lookup(
    backend: str,
    device_type: str,
    key_items: tuple,
    seqlen: int,
    param_passes_items: tuple,
) -> tuple:
    # Reads files: under torch.compile it runs once at trace time and its result is a constant,
    # so a compiled caller keeps one graph. Cached: sb_attn calls it on every call.
    return _lookup_cached(backend, device_type, key_items, seqlen, param_passes_items)


def _device_lookup(backend: str, device_type: str, key: Mapping[str, Any], seqlen: int,
                   batch: int | None = None) -> dict[str, Any] | None:
    """``config_loader.lookup_config`` for this process's device of ``device_type``."""
    from sbbench.core.results import device_name, environment

    device = torch.device("cuda") if device_type == "cuda" else torch.device("cpu")
    env = environment(device)
    tuned_devices = _TUNED_DEVICES.get(backend)
    return config_loader.lookup_config(
        device_name(device),
        backend,
        pass_=key["pass"],
        dtype=key["dtype"],
        head_dim=key["head_dim"],
        gqa_group=key["gqa_group"],
        attend_current=key["attend_current"],
        seqlen=seqlen,
        batch=batch,
        triton_version=env["triton_version"],
        compute_capability=env["compute_capability"],
        validate=functools.partial(file_config_problem, backend, pass_=key["pass"]),
        warn_default=tuned_devices is None or device_type in tuned_devices,
    )


@functools.lru_cache(maxsize=4096)
def _lookup_cached(backend, device_type, key_items, seqlen, param_passes_items) -> tuple:
    key = dict(key_items)
    param_passes = dict(param_passes_items)
    merged: dict[str, Any] = {}
    for pass_ in ("fwd", "bwd"):
        found = _device_lookup(backend, device_type, {**key, "pass": pass_}, seqlen)
        if found:
            merged.update({k: v for k, v in found.items() if param_passes.get(k) == pass_})
    return tuple(sorted(merged.items()))


@torch.compiler.assume_constant_result
def _decode_lookup(backend: str, device_type: str, key_items: tuple) -> tuple:
    # As _lookup: a constant under torch.compile, and cached (called on every decode step).
    return _decode_lookup_cached(backend, device_type, key_items)


@functools.lru_cache(maxsize=4096)
def _decode_lookup_cached(backend, device_type, key_items) -> tuple:
    key = dict(key_items)
    found = _device_lookup(backend, device_type, key, key["seqlen_bucket"], key["batch_bucket"])
    return tuple(sorted((found or {}).items()))


def clear_cache() -> None:
    """Forget cached lookups (after ``sbbench export`` wrote new files in this process)."""
    _lookup_cached.cache_clear()
    _decode_lookup_cached.cache_clear()
