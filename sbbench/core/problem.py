"""Input validation: turns ``sb_attn``'s arguments into an :class:`AttnProblem` or raises.

Every bad input raises ``ValueError``/``TypeError`` naming the argument and what was expected,
before any backend runs, so no backend needs its own checks for shapes, dtypes or devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnProblem:
    """The shape of one call, as backends and the tuner's config keys see it."""

    batch: int  # number of sequences (N for packed varlen)
    heads: int
    kv_heads: int
    seqlen: int  # T, or max_seqlen for packed varlen
    head_dim: int
    dtype: torch.dtype
    device_type: str
    attend_current: bool
    inv_temp: float
    varlen: bool = False
    total_tokens: int | None = None  # packed varlen only

    @property
    def gqa_group(self) -> int:
        return self.heads // self.kv_heads


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_like_q(q: object, attend_current: object, **others: object) -> tuple[torch.Tensor, ...]:
    """q and ``others`` (by argument name) checked as floating-point tensors of q's dtype on q's
    device, and ``attend_current`` as a bool; returns q and the others in order."""
    q = _check_tensor("q", q)
    checked = [q]
    for name, x in others.items():
        x = _check_tensor(name, x)
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} does not match q's dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: on device {x.device}, but q is on {q.device}")
        checked.append(x)
    if not isinstance(attend_current, bool):
        raise TypeError(f"attend_current: expected a bool, got {type(attend_current).__name__}")
    return tuple(checked)


def resolve_inv_temp(inv_temp: float | None, head_dim: int) -> float:
    """``inv_temp`` checked, or its default ``1/sqrt(head_dim)``."""
    if inv_temp is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(inv_temp, bool) or not isinstance(inv_temp, (int, float)):
        raise TypeError(f"inv_temp: expected a float or None, got {type(inv_temp).__name__}")
    if not math.isfinite(inv_temp):
        raise ValueError(f"inv_temp: expected a finite number, got {inv_temp}")
    return float(inv_temp)


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float | None,
    attend_current: bool,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
) -> AttnProblem:
    """Check the arguments of ``sb_attn`` and describe the call."""
    q, k, v = check_like_q(q, attend_current, k=k, v=v)

    varlen = cu_seqlens is not None
    expected_ndim = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, H, T, D)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != expected_ndim:
            hint = "" if varlen else " (pass cu_seqlens for packed (total, H, D) input)"
            raise ValueError(f"{name}: expected {expected_ndim} dims {layout}, got shape {tuple(x.shape)}{hint}")
    if k.shape != v.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} does not match k's shape {tuple(k.shape)}")

    head_axis = 1
    seq_axis = 0 if varlen else 2
    heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k: head dim {k.shape[-1]} does not match q's head dim {head_dim}")
    if head_dim < 1:
        raise ValueError("q: head dim must be at least 1")
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(
            f"k: {kv_heads} k/v heads do not divide q's {heads} heads (GQA needs H % H_kv == 0)"
        )
    if k.shape[seq_axis] != q.shape[seq_axis]:
        what = "total tokens" if varlen else "sequence length"
        raise ValueError(f"k: {what} {k.shape[seq_axis]} does not match q's {q.shape[seq_axis]}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: batch {k.shape[0]} does not match q's batch {q.shape[0]}")

    inv_temp = resolve_inv_temp(inv_temp, head_dim)

    if varlen:
        batch, seqlen, total = _check_cu_seqlens(cu_seqlens, max_seqlen, q)
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only meaningful with cu_seqlens (packed varlen input)")
        batch, seqlen, total = q.shape[0], q.shape[2], None
        if seqlen < 1:
            raise ValueError("q: sequence length must be at least 1")
    return AttnProblem(
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        seqlen=seqlen,
        head_dim=head_dim,
        dtype=q.dtype,
        device_type=q.device.type,
        attend_current=attend_current,
        inv_temp=float(inv_temp),
        varlen=varlen,
        total_tokens=total,
    )


def _check_cu_seqlens(cu: object, max_seqlen: int | None, q: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"cu_seqlens: expected dtype torch.int32, got {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected shape (N+1,) with N >= 1, got {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"cu_seqlens: on device {cu.device}, but q is on {q.device}")
    if max_seqlen is None:
        raise ValueError("max_seqlen: required with cu_seqlens (the longest sequence's length)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen: expected an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen: expected a positive int, got {max_seqlen}")
    total = q.shape[0]
    # Value checks read the tensor on the host; under torch.compile they would break the graph,
    # so traced calls trust cu_seqlens (it is checked on every eager call).
    if not _is_compiling():
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"cu_seqlens: must start at 0, starts at {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError("cu_seqlens: must be non-decreasing")
        if values[-1] != total:
            raise ValueError(f"cu_seqlens: ends at {values[-1]}, but q holds {total} tokens")
        if max(lengths) > max_seqlen:
            raise ValueError(f"max_seqlen: {max_seqlen} is less than the longest sequence ({max(lengths)})")
    return cu.shape[0] - 1, max_seqlen, total
