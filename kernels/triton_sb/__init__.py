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
from sbbench.core.registry import Param, register_backend
from sbbench.core.tuned import decode_tuned_config_hook, tuned_config_hook
from sbbench.kernels.triton_sb.limits import decode_launch_filter, launch_filter
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
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    o, rem, _, _ = triton_sb_fwd(
        q, k, v, cu_seqlens, float(inv_temp), bool(attend_current), int(seqlen), _config_list(config), needs_grad
    )
    return o, rem


def _skipped_fraction(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None) -> float:
    from sbbench.kernels.triton_sb.op import skipped_fraction_of, triton_sb_fwd

    seqlen = max_seqlen if cu_seqlens is not None else q.shape[2]
    with torch.no_grad():
        _, _, _, stop = triton_sb_fwd(
            q, k, v, cu_seqlens, float(inv_temp), bool(attend_current), int(seqlen), _config_list(config)
        )
    return skipped_fraction_of(stop, cu_seqlens, 0 if cu_seqlens is not None else q.shape[2], attend_current)


# Decode (sb_attn_with_kvcache, kernels/triton_sb/decode.py): its own launch parameters.
DECODE_CONFIG_SPACE = (
    # Splits per (sequence, kv head, row tile); 0: enough to fill one wave of the GPU.
    Param("num_splits", (0, 1, 2, 4, 8, 16, 32, 64), "decode"),
    # Query rows per program (a GQA group times Tq, padded to at least 16 for tl.dot).
    Param("BLOCK_M", (16, 32, 64), "decode"),
    Param("BLOCK_N", (32, 64, 128), "decode"),
    Param("num_warps", (2, 4, 8), "decode"),
    Param("num_stages", (1, 2, 3, 4, 5), "decode"),
    Param("skip_log2", (-40, -30, -24, -20, -16, -12), "decode"),
    Param("skip_check_keys", (64, 128, 256, 512, 1024), "decode"),
    Param("skip_checks", (1, 2, 3), "decode"),
)
# A 64-key tile with 3 stages keeps ~100 KB of K and V in flight per program, two programs per
# SM: enough to cover HBM latency at decode's one-pass reads. One skip check, after 128 keys:
# random-like logits use up the stick within tens of keys, and every check ends a pipelined loop.
DECODE_DEFAULT_CONFIG = {
    "num_splits": 0, "BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3,
    "skip_log2": -30, "skip_check_keys": 128, "skip_checks": 1,
}


def _decode_config_list(config) -> list[int]:
    from sbbench.kernels.triton_sb.decode import decode_config_to_list

    return decode_config_to_list({**DECODE_DEFAULT_CONFIG, **(config or {})})


def triton_sb_decode(q, k_cache, v_cache, cache_seqlens, inv_temp, attend_current, *, config=None):
    """The ``triton`` backend's decode entry point: inputs already validated (and any new k/v
    appended) by ``sb_attn_with_kvcache``."""
    from sbbench.kernels.triton_sb.decode import triton_sb_decode as launch

    o, rem, _ = launch(q, k_cache, v_cache, cache_seqlens, float(inv_temp), bool(attend_current), _decode_config_list(config))
    return o, rem


def _decode_skipped_fraction(q, k_cache, v_cache, cache_seqlens, inv_temp, attend_current, *, config=None) -> float:
    from sbbench.kernels.triton_sb.decode import skipped_fraction_of, triton_sb_decode as launch

    with torch.no_grad():
        _, _, skipped = launch(q, k_cache, v_cache, cache_seqlens, float(inv_temp), bool(attend_current),
                               _decode_config_list(config))
    return skipped_fraction_of(skipped, cache_seqlens, q, k_cache, attend_current)


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
    decode=triton_sb_decode,
    decode_config_space=DECODE_CONFIG_SPACE,
    decode_default_config=DECODE_DEFAULT_CONFIG,
    decode_skipped_fraction=_decode_skipped_fraction,
    decode_launch_filter=decode_launch_filter,
    decode_tuned_config=decode_tuned_config_hook("triton", validate=_decode_config_list, tuned_devices=("cuda",)),
)(triton_sb_attn)
