"""Filling ``config=None`` from tuned config files: the glue between a problem and the loader."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import torch

from sbbench.core import config_loader
from sbbench.core.problem import AttnProblem


def config_key(problem: AttnProblem, pass_: str) -> dict[str, Any]:
    """The key of design.md section 7 for one pass of ``problem``."""
    return {
        "pass": pass_,
        "dtype": str(problem.dtype).removeprefix("torch."),
        "head_dim": problem.head_dim,
        "gqa_group": problem.gqa_group,
        "attend_current": problem.attend_current,
        "seqlen_bucket": config_loader.seqlen_bucket(problem.seqlen),
    }


def tuned_config_hook(backend: str, param_passes: Mapping[str, str]) -> Callable[[AttnProblem], dict[str, Any]]:
    """A ``Backend.tuned_config`` hook: the forward parameters from the fwd entry, the backward
    parameters from the bwd entry, each by nearest key; empty when nothing was tuned."""

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


@functools.lru_cache(maxsize=4096)
def _lookup_cached(backend, device_type, key_items, seqlen, param_passes_items) -> tuple:
    from sbbench.core.results import device_name, environment

    device = torch.device("cuda") if device_type == "cuda" else torch.device("cpu")
    name = device_name(device)
    triton_version = environment(device)["triton_version"]
    key = dict(key_items)
    param_passes = dict(param_passes_items)
    merged: dict[str, Any] = {}
    for pass_ in ("fwd", "bwd"):
        found = config_loader.lookup_config(
            name,
            backend,
            pass_=pass_,
            dtype=key["dtype"],
            head_dim=key["head_dim"],
            gqa_group=key["gqa_group"],
            attend_current=key["attend_current"],
            seqlen=seqlen,
            triton_version=triton_version,
        )
        if found:
            merged.update({k: v for k, v in found.items() if param_passes.get(k) == pass_})
    return tuple(sorted(merged.items()))


def clear_cache() -> None:
    """Forget cached lookups (after ``sbbench export`` wrote new files in this process)."""
    _lookup_cached.cache_clear()
