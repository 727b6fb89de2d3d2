"""Comparators registered beside the stick-breaking backends.

``fa2``: FlashAttention-2, causal softmax attention. The ``flash_attn`` package when it imports,
otherwise PyTorch SDPA pinned to its FLASH_ATTENTION backend (on Hopper SDPA would otherwise
prefer cuDNN, which is not FlashAttention-2). Its ``implementation`` says which one ran. It is
the speed baseline and the numerics anchor; it is checked against float64 softmax attention.

``cudnn``: causal softmax attention on cuDNN's fused kernels, through SDPA pinned to
CUDNN_ATTENTION. Benchmarked beside ``fa2`` (speedups stay over ``fa2``), as the vendor's own
softmax on the same GPU; checked against float64 softmax attention like ``fa2``.

``upstream``: the authors' published stick-breaking kernel (the ``stickbreaking_attention``
package) when it is installed. It returns ``(o, rem)`` like ``sb_attn``.

All call into code that is not ours, so they only translate layouts and arguments; none is
ever picked by ``backend="auto"``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from sbbench.core.problem import AttnProblem
from sbbench.core.registry import register_backend

# ---------------------------------------------------------------------------------------------
# fa2
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _flash_attn() -> ModuleType | None:
    """The ``flash_attn`` package (2.x), or None when it does not import on this machine."""
    try:
        module = importlib.import_module("flash_attn")
        # Both entry points must exist: a broken or partial install counts as absent, and the
        # SDPA fallback runs instead.
        module.flash_attn_func, module.flash_attn_varlen_func  # noqa: B018
    except Exception:  # ImportError, or an OSError from a wheel built for another CUDA
        return None
    return module


def _cuda_reason(what: str) -> str | None:
    """Why ``what`` (a softmax kernel for compute capability 8.0 and newer) cannot run here."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch sees none)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{what} needs compute capability 8.0 or newer; this GPU is sm_{major}{minor}"
    return None


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: float, backend: Any) -> torch.Tensor:
    """Causal softmax attention through torch SDPA, pinned to one of its backends (an input it
    does not take raises instead of silently running another backend)."""
    from torch.nn.attention import sdpa_kernel

    extra = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=inv_temp, **extra)


def _fa2_availability() -> str | None:
    reason = _cuda_reason("FlashAttention-2")
    if reason:
        return reason
    if _flash_attn() is None:
        probe = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if probe is not None and not probe():
            return "no flash_attn package, and this torch was built without SDPA FLASH_ATTENTION"
    return None


def _sdpa_flash_impl() -> str | None:
    """The name of a non-default implementation plugged into SDPA's FLASH_ATTENTION slot (newer
    torch lets FA3/FA4 take it over), or None when it is the built-in FlashAttention-2."""
    current = getattr(torch.nn.attention, "current_flash_attention_impl", None)
    if current is None:
        return None
    try:
        return current() or None
    except Exception:
        return None


def _fa2_implementation() -> str:
    module = _flash_attn()
    if module is not None:
        return f"flash_attn {getattr(module, '__version__', '(unknown version)')}"
    plugged = _sdpa_flash_impl()
    if plugged:
        # Said plainly: then the comparator is not FlashAttention-2 at all.
        return f"torch {torch.__version__} SDPA FLASH_ATTENTION ({plugged}, not FlashAttention-2)"
    return f"torch {torch.__version__} SDPA FLASH_ATTENTION (FlashAttention-2)"


FA2_VARLEN_REASON = "packed varlen needs the flash_attn package (SDPA's FLASH_ATTENTION has no varlen entry point)"


def _fa2_extra_check(problem: AttnProblem) -> str | None:
    if problem.varlen and _flash_attn() is None:
        return FA2_VARLEN_REASON
    return None


# What the GPU softmax comparators share: fp16/bf16 on CUDA, head dims up to 256.
_GPU_SOFTMAX = dict(kind="softmax", devices=("cuda",), dtypes=(torch.float16, torch.bfloat16), max_head_dim=256)


@register_backend(
    "fa2",
    description="FlashAttention-2 causal softmax (flash_attn package, else torch SDPA FLASH_ATTENTION)",
    **_GPU_SOFTMAX,
    availability=_fa2_availability,
    extra_check=_fa2_extra_check,
    implementation=_fa2_implementation,
)
def fa2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float,
    attend_current: bool,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, None]:
    """Causal softmax attention; returns ``(o, None)`` (softmax leaves no stick).

    ``attend_current`` does not apply: causal softmax always includes the diagonal.
    """
    module = _flash_attn()
    if cu_seqlens is not None:
        if module is None:
            raise ValueError(f"cu_seqlens: fa2 {FA2_VARLEN_REASON}")
        # Packed (total, H, D) is flash_attn's own varlen layout; GQA is native.
        o = module.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=inv_temp, causal=True
        )
        return o, None
    if module is not None:
        # flash_attn wants (B, T, H, D): a transposed view, no copy (it needs only the last dim
        # contiguous). The result is transposed back, again a view.
        o = module.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=inv_temp, causal=True
        )
        return o.transpose(1, 2), None
    from torch.nn.attention import SDPBackend

    return _sdpa_causal(q, k, v, inv_temp, SDPBackend.FLASH_ATTENTION), None


# ---------------------------------------------------------------------------------------------
# cudnn
# ---------------------------------------------------------------------------------------------


def _cudnn_availability() -> str | None:
    reason = _cuda_reason("cuDNN attention")
    if reason:
        return reason
    if not torch.backends.cudnn.is_available():
        return "this torch was built without cuDNN"
    return None


def _cudnn_implementation() -> str:
    return f"torch {torch.__version__} SDPA CUDNN_ATTENTION (cuDNN {torch.backends.cudnn.version()})"


@register_backend(
    "cudnn",
    description="cuDNN causal softmax (torch SDPA pinned to CUDNN_ATTENTION)",
    **_GPU_SOFTMAX,
    # SDPA's dense entry point has no cu_seqlens.
    varlen=False,
    availability=_cudnn_availability,
    implementation=_cudnn_implementation,
)
def cudnn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float,
    attend_current: bool,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, None]:
    """Causal softmax attention on cuDNN's fused kernels; returns ``(o, None)``. Timed beside
    ``fa2`` to show how far FlashAttention-2, the speedup baseline, is from the vendor's own
    softmax kernels on the same GPU. ``attend_current`` does not apply."""
    from torch.nn.attention import SDPBackend

    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: cudnn takes no packed varlen input (SDPA has no varlen entry point)")
    return _sdpa_causal(q, k, v, inv_temp, SDPBackend.CUDNN_ATTENTION), None


# ---------------------------------------------------------------------------------------------
# upstream
# ---------------------------------------------------------------------------------------------

UPSTREAM_PACKAGE = "stickbreaking_attention"


def _upstream_installed() -> bool:
    try:
        return importlib.util.find_spec(UPSTREAM_PACKAGE) is not None
    except (ImportError, ValueError):
        return False


def _upstream_availability() -> str | None:
    if not _upstream_installed():
        return f"package {UPSTREAM_PACKAGE} not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch sees none)"
    return None


@functools.lru_cache(maxsize=None)
def _upstream_entry_points() -> tuple[Any, Any]:
    # The published forward reads module-level globals inside its kernels, which Triton 3.6
    # rejects unless this is set; it is read when a kernel is compiled, so setting it before the
    # first call is enough. setdefault: a user's explicit setting wins.
    os.environ.setdefault("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "1")
    # The package's public entry points, as its README and __init__ export them:
    # sb_attn(q, k, v, inv_temp, zero_start, attend_current) on (B, H, T, D), and
    # sb_attn_varlen(q, k, v, cu_seqlens, max_seqlens, inv_temp, zero_start, attend_current)
    # on (H, total, D).
    package = importlib.import_module(UPSTREAM_PACKAGE)
    return package.sb_attn, package.sb_attn_varlen


def _upstream_implementation() -> str:
    try:
        from importlib.metadata import version

        return f"{UPSTREAM_PACKAGE} {version(UPSTREAM_PACKAGE)}"
    except Exception:
        return UPSTREAM_PACKAGE


@register_backend(
    "upstream",
    description="the authors' published Triton kernel (stickbreaking_attention package)",
    devices=("cuda",),
    # The package is tested in bfloat16 only, and its kernels index k/v by query head: no GQA.
    dtypes=(torch.bfloat16,),
    max_head_dim=128,
    gqa=False,
    availability=_upstream_availability,
    implementation=_upstream_implementation,
)
def upstream(
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
    dense, varlen = _upstream_entry_points()
    if cu_seqlens is None:
        return dense(q, k, v, inv_temp=inv_temp, attend_current=attend_current)
    # Its varlen layout is (H, total, D) and its cu_seqlens has our leading 0 (zero_start=True
    # drops it); the kernels take strides, so transposed views go in without a copy.
    o, rem = varlen(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        cu_seqlens,
        max_seqlen,
        inv_temp=inv_temp,
        zero_start=True,
        attend_current=attend_current,
    )
    return o.transpose(0, 1), rem.transpose(0, 1)
