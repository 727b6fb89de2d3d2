"""Filling ``config=None`` from tuned config files: the glue between a problem and the loader."""

from __future__ import annotations

from typing import Any, Callable, Mapping

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
        from sbbench.core.results import device_name, environment

        import torch

        device = torch.device("cuda") if problem.device_type == "cuda" else torch.device("cpu")
        name = device_name(device)
        triton_version = environment(device)["triton_version"]
        merged: dict[str, Any] = {}
        for pass_ in ("fwd", "bwd"):
            key = config_key(problem, pass_)
            found = config_loader.lookup_config(
                name,
                backend,
                pass_=pass_,
                dtype=key["dtype"],
                head_dim=key["head_dim"],
                gqa_group=key["gqa_group"],
                attend_current=key["attend_current"],
                seqlen=problem.seqlen,
                triton_version=triton_version,
            )
            if found:
                merged.update({k: v for k, v in found.items() if param_passes.get(k) == pass_})
        return merged

    return lookup
