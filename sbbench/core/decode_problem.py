"""Input validation for ``sb_attn_with_kvcache``: its arguments to a :class:`DecodeProblem`, or a
``ValueError``/``TypeError`` naming the argument, before any backend runs or the cache is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sbbench.core.problem import AttnProblem, _check_tensor, _is_compiling, check_like_q, resolve_inv_temp


@dataclass(frozen=True)
class DecodeProblem(AttnProblem):
    """One decode call. ``seqlen`` is the longest context a query reads (its own position
    included): what the tuned-config key buckets. ``heads``/``kv_heads``/``head_dim`` are q's
    and the cache's, as for :class:`AttnProblem`."""

    new_tokens: int = 1  # Tq: queries per sequence
    cache_capacity: int = 0  # S_max: slots per sequence in k_cache/v_cache
    appends: bool = False  # k, v given: written into the cache before attending


def _is_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def validate_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    inv_temp: float | None,
    attend_current: bool,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
) -> DecodeProblem:
    """Check the arguments of ``sb_attn_with_kvcache`` and describe the call.

    The check that every sequence's queries fit in the cache reads ``cache_seqlens`` on the host
    (one synchronisation); while torch.compile traces or a CUDA graph is captured it is skipped,
    and the caller is trusted.
    """
    q, k_cache, v_cache = check_like_q(q, attend_current, k_cache=k_cache, v_cache=v_cache)
    if q.ndim != 4:
        raise ValueError(f"q: expected 4 dims (B, H, Tq, D), got shape {tuple(q.shape)}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H_kv, S_max, D), got shape {tuple(x.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} does not match k_cache's {tuple(k_cache.shape)}")
    batch, heads, new_tokens, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != batch:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} does not match q's batch {batch}")
    if k_cache.shape[-1] != head_dim:
        raise ValueError(f"k_cache: head dim {k_cache.shape[-1]} does not match q's head dim {head_dim}")
    if head_dim < 1 or batch < 1:
        raise ValueError(f"q: batch and head dim must be at least 1, got shape {tuple(q.shape)}")
    if new_tokens < 1:
        raise ValueError("q: needs at least one new query per sequence (Tq >= 1)")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"k_cache: {kv_heads} k/v heads do not divide q's {heads} heads (GQA needs H % H_kv == 0)"
        )

    appends = _check_new_kv(k, v, k_cache, (batch, kv_heads, new_tokens, head_dim))
    _check_cache_seqlens(cache_seqlens, batch, q.device)
    inv_temp = resolve_inv_temp(inv_temp, head_dim)

    # Slots the queries need: with an append, their own positions; without, the keys the last
    # query reads (itself too with attend_current).
    extra = new_tokens if appends else new_tokens - 1 + int(attend_current)
    longest = capacity
    if not (_is_compiling() or _is_capturing()):
        lengths = cache_seqlens.tolist()
        for b, n in enumerate(lengths):
            if n < 0:
                raise ValueError(f"cache_seqlens: sequence {b} has a negative length {n}")
            if n + extra > capacity:
                what = f"{new_tokens} new token(s) appended" if appends else f"{new_tokens} queries reading the cache"
                raise ValueError(
                    f"cache_seqlens: sequence {b} holds {n} tokens, and with {what} it needs {n + extra} "
                    f"cache slots, but k_cache has {capacity} (S_max)"
                )
        longest = max(lengths) + new_tokens
    # AttnProblem's fields in order: batch, heads, kv_heads, seqlen, head_dim, dtype, device
    # type, attend_current, inv_temp.
    return DecodeProblem(
        batch, heads, kv_heads, longest, head_dim, q.dtype, q.device.type, attend_current, inv_temp,
        new_tokens=new_tokens, cache_capacity=capacity, appends=appends,
    )


def _check_new_kv(
    k: torch.Tensor | None, v: torch.Tensor | None, cache: torch.Tensor, shape: tuple[int, ...]
) -> bool:
    """Whether new k, v are given (both, or neither), after checking them against the cache."""
    if (k is None) != (v is None):
        missing, given = ("v", "k") if v is None else ("k", "v")
        raise ValueError(f"{missing}: required with {given} (the new keys and values are appended together)")
    if k is None:
        return False
    for name, x in (("k", k), ("v", v)):
        x = _check_tensor(name, x)
        if x.dtype != cache.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} does not match the cache's dtype {cache.dtype}")
        if x.device != cache.device:
            raise ValueError(f"{name}: on device {x.device}, but the cache is on {cache.device}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape (B, H_kv, Tq, D) = {shape}, got {tuple(x.shape)}")
    return True


def _check_cache_seqlens(cache_seqlens: object, batch: int, device: torch.device) -> None:
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 tensor of shape (B,), got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected dtype torch.int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected shape (B,) = ({batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: on device {cache_seqlens.device}, but q is on {device}")
