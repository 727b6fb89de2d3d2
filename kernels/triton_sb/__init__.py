"""``triton``: the flash-style Triton kernel (forward and deterministic backward, block skipping,
GQA without repeating k/v, packed varlen, any batch/head/sequence strides).

On a GPU it is the fastest backend and ``backend="auto"``'s choice. On a CPU it runs under the
Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which is how CI tests
it; the interpreter's bf16 ``tl.dot`` is wrong (triton issue 11584), so bf16 is GPU-only.
"""

from __future__ import annotations

import os

import torch

from sbbench.core.problem import AttnProblem
from sbbench.core.registry import register_backend
from sbbench.core.tuned import tuned_config_hook
from sbbench.kernels.triton_sb.limits import launch_filter
from sbbench.kernels.triton_sb.params import CONFIG_SPACE, DEFAULT_CONFIG, check_config, config_to_list


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _availability() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "package triton not installed"
    if torch.cuda.is_available() or _interpreting():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 before starting to run it in the CPU interpreter)"


def _extra_check(problem: AttnProblem) -> str | None:
    if problem.device_type == "cpu":
        if not _interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        if problem.dtype == torch.bfloat16:
            return "bf16 tl.dot is wrong in the Triton interpreter (triton issue 11584); use a GPU"
    return None


def _config_list(config) -> list[int]:
    # The custom ops take launch parameters as one int list (a schema torch.library accepts).
    return config_to_list(config or {})


def _check_config(config) -> None:
    """Raises ``ValueError`` for a config the kernels cannot launch (checks across parameters)."""
    check_config({**DEFAULT_CONFIG, **config})


def triton_sb_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float,
    attend_current: bool,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``triton`` backend: inputs already validated by ``sb_attn``."""
    from sbbench.kernels.triton_sb.op import triton_sb_fwd

    seqlen = max_seqlen if cu_seqlens is not None else q.shape[2]
    o, rem, _, _ = triton_sb_fwd(q, k, v, cu_seqlens, float(inv_temp), bool(attend_current), int(seqlen), _config_list(config))
    return o, rem


def _skipped_fraction(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None) -> float:
    from sbbench.kernels.triton_sb.op import skipped_fraction_of, triton_sb_fwd

    seqlen = max_seqlen if cu_seqlens is not None else q.shape[2]
    with torch.no_grad():
        _, _, _, stop = triton_sb_fwd(
            q, k, v, cu_seqlens, float(inv_temp), bool(attend_current), int(seqlen), _config_list(config)
        )
    return skipped_fraction_of(stop, cu_seqlens, 0 if cu_seqlens is not None else q.shape[2], attend_current)


register_backend(
    "triton",
    description="flash-style Triton kernel: fwd+bwd, block skipping, GQA, varlen",
    devices=("cuda", "cpu"),
    auto_devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    min_head_dim=16,
    max_head_dim=256,
    auto_priority=0,
    config_space=CONFIG_SPACE,
    default_config=DEFAULT_CONFIG,
    availability=_availability,
    extra_check=_extra_check,
    # Tuned on GPUs only: timings in the CPU interpreter say nothing about a GPU.
    tuned_config=tuned_config_hook("triton", {p.name: p.pass_ for p in CONFIG_SPACE},
                                   validate=_check_config, tuned_devices=("cuda",)),
    skipped_fraction=_skipped_fraction,
    launch_filter=launch_filter,
)(triton_sb_attn)
