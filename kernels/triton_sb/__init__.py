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
from sbbench.core.tuned import tuned_config_hook

CONFIG_SPACE = (
    Param("fwd_BLOCK_M", (16, 32, 64, 128, 256), "fwd"),
    Param("fwd_BLOCK_N", (16, 32, 64, 128), "fwd"),
    Param("fwd_num_warps", (2, 4, 8), "fwd"),
    Param("fwd_num_stages", (1, 2, 3, 4), "fwd"),
    # The tuner may raise the threshold as far as the numerics budget allows (design.md s. 3).
    Param("skip_log2", (-40, -30, -24, -20, -16, -12), "fwd"),
    # Keys walked before the first skip check (each later check waits twice as long): a check
    # ends a software-pipelined loop, so rarer checks cost less when nothing can be skipped and
    # stop later when the stick runs out.
    Param("skip_check_keys", (128, 256, 512, 1024, 2048, 4096), "fwd"),
    # How many skip checks before walking the rest without one: each check closes a pipelined
    # loop and opens another, which costs even when nothing can be skipped.
    Param("skip_checks", (1, 2, 3, 5), "fwd"),
    Param("scan", ("dot", "cumsum"), "fwd"),
    # Backward: the dQ kernel's tiles, then the dK/dV kernel's. The dK/dV key tile also sets
    # how often the dQ kernel stores the boundary sums passed between them (T^2/(2 N) floats
    # each), so it must be a multiple of the dQ key tile.
    Param("bwd_BLOCK_M", (16, 32, 64, 128), "bwd"),
    Param("bwd_BLOCK_N", (16, 32, 64, 128), "bwd"),
    Param("bwd_num_warps", (2, 4, 8), "bwd"),
    Param("bwd_num_stages", (1, 2, 3), "bwd"),
    Param("bwd_dkdv_BLOCK_M", (16, 32, 64, 128), "bwd"),
    Param("bwd_dkdv_BLOCK_N", (32, 64, 128), "bwd"),
    Param("bwd_dkdv_num_warps", (2, 4, 8), "bwd"),
    Param("bwd_dkdv_num_stages", (1, 2, 3), "bwd"),
    # Register caps (0: none): the values where one more 4-warp program fits on an SM.
    Param("bwd_maxnreg", (0, 168, 128), "bwd"),
    Param("bwd_dkdv_maxnreg", (0, 168, 128), "bwd"),
)
# Defaults from H100 probes (scripts/gpu_probe.py, bf16, B=4 H=12 T=8192 D=128, dense):
# a 32-key forward tile with 3 stages (scripts/gpu_fwd_ablation.py: 0.97x FlashAttention-2 at
# D=128 and 0.75x at D=64, vs 0.88x / 0.64x with 64 keys and 2 stages; at D=64 the 64-key tile
# needs ~200 registers per thread, two programs per SM, the 32-key one 127, four);
# skip_log2 = -30 moves float32 outputs of O(1) by under a tenth of an ulp; one skip check costs
# nothing measurable (219 vs 220 TFLOP/s with skipping off) while each further one costs ~10%;
# a dK/dV key tile of 64 keeps the boundary sums at T^2/128 floats (peak memory ~FA2's);
# the dQ kernel's 64x32 tile with 3 stages: 4.68 ms vs 5.40 with 2 at D=128, 7.16 vs 8.53 at
# D=64 (H=24), T=8192 (scripts/gpu_bwd_probe.py, reports/NVIDIA_H100_80GB_HBM3/bwd_ab_r3b_1_new.json;
# rounds 1-2 before the fence-free dQ kernel: bwd_probe_r1/r2.json). No register caps by default:
# at D=64 a cap of 168 takes the dQ kernel from 7.12 to 6.72 ms, at D=128 from 4.61 to 8.60
# (bwd_probe_r3.json), so the cap goes in the tuned configs.
# The dK/dV tile stays 32x64 with 4 warps: the best ones on an H100 (128x64 8 warps at D=128,
# 64x64 4 warps at D=64) differ by head dim and go in the tuned configs.
# The dK/dV kernel runs 1 software-pipelining stage by default: on triton 3.6 / H100 its 2-stage
# build returned wrong dK (dv right) at D=128 twice, with a 16-row tile and GQA, and on packed
# varlen fp16 with a 32-row tile (scripts/gpu_dk_bisect.py); 1 stage was right in every case.
# The tuner may still choose 2 stages: its numerics constraint rejects a config that is wrong.
DEFAULT_CONFIG = {
    "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32, "fwd_num_warps": 4, "fwd_num_stages": 3,
    "skip_log2": -30, "skip_check_keys": 256, "skip_checks": 1, "scan": "dot",
    "bwd_BLOCK_M": 64, "bwd_BLOCK_N": 32, "bwd_num_warps": 4, "bwd_num_stages": 3,
    "bwd_dkdv_BLOCK_M": 32, "bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_num_warps": 4, "bwd_dkdv_num_stages": 1,
    "bwd_maxnreg": 0, "bwd_dkdv_maxnreg": 0,
}


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
    from sbbench.kernels.triton_sb.op import config_to_list

    return config_to_list({**DEFAULT_CONFIG, **(config or {})})


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
    tuned_config=tuned_config_hook("triton", {p.name: p.pass_ for p in CONFIG_SPACE}),
    skipped_fraction=_skipped_fraction,
    decode=triton_sb_decode,
    decode_config_space=DECODE_CONFIG_SPACE,
    decode_default_config=DECODE_DEFAULT_CONFIG,
    decode_skipped_fraction=_decode_skipped_fraction,
)(triton_sb_attn)
