"""``sb_attn`` and ``sb_attn_with_kvcache``: the interfaces every stick-breaking backend serves."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from sbbench.core.decode_problem import validate_decode
from sbbench.core.problem import validate
from sbbench.core.registry import backend_names, get_backend, select_auto


def sb_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float | None = None,
    attend_current: bool = False,
    *,
    backend: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stick-breaking attention (arXiv 2410.17980), causal.

    For query i and key j < i (j <= i with ``attend_current``), with ``z_ij = inv_temp <q_i, k_j>``
    and ``beta = sigmoid(z)``::

        A_ij = beta_ij * prod_{j < l < i} (1 - beta_il)      o_i = sum_j A_ij v_j
        rem_i = prod_j (1 - beta_ij)                          (the stick left over)

    Args:
        q: (B, H, T, D), or (total, H, D) packed with ``cu_seqlens``. Any strides.
        k, v: (B, H_kv, T, D) or (total, H_kv, D); ``H % H_kv == 0`` (GQA/MQA: query head h
            reads kv head ``h // (H // H_kv)``).
        inv_temp: logit scale, default ``1/sqrt(D)``.
        attend_current: whether key i is among query i's keys.
        backend: a registered name (``sbbench list``), ``"auto"`` (the fastest that supports the
            input here; never fails for lack of a GPU), or a user's ``"module:function"``.
        cu_seqlens: int32 (N+1,) cumulative sequence starts, FlashAttention's varlen convention.
        max_seqlen: the longest sequence, required with ``cu_seqlens``.
        config: launch parameters overriding the tuned or default config of the backend.

    Returns:
        ``(o, rem)``: o shaped like q, rem (B, H, T) or (total, H), both in q's dtype. ``rem`` is
        never added to o: callers decide what the leftover stick attends to.

    Raises:
        ValueError/TypeError naming the argument for bad input; TypeError naming the plug-in
        when a ``"module:function"`` backend returns anything but such a pair.
    """
    problem = validate(q, k, v, inv_temp, attend_current, cu_seqlens, max_seqlen)
    chosen = select_auto(problem) if backend == "auto" else get_backend(backend)
    if chosen.kind != "stickbreaking":
        raise ValueError(
            f"backend: {chosen.name!r} is a {chosen.kind} comparator, not stick-breaking attention; "
            "the harness runs it beside sb_attn backends"
        )
    reason = chosen.unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend: {chosen.name!r} cannot run this input: {reason}")
    resolved = chosen.resolve_config(problem, config) if (chosen.config_space or config) else None
    out = chosen.fn(
        q,
        k,
        v,
        problem.inv_temp,
        attend_current,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        config=resolved,
    )
    if chosen.name not in backend_names():
        # A user's "module:function" is held to the contract the built-in backends are tested on,
        # so a wrong result fails here, naming the plug-in, not somewhere in the caller.
        check_plugin_result(chosen.name, out, q)
    return out


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"a {type(x).__name__}"


def check_plugin_result(name: str, out: Any, q: torch.Tensor) -> None:
    """Raise a ``TypeError`` naming plug-in ``name`` unless ``out`` is ``(o, rem)``: two tensors,
    o shaped like ``q`` and rem like ``q`` without its last dim, both in q's dtype and on its device."""
    expected = {"o": tuple(q.shape), "rem": tuple(q.shape[:-1])}
    dtype = str(q.dtype).removeprefix("torch.")
    contract = (f"expected (o, rem): o of shape {expected['o']} and rem of shape {expected['rem']}, both {dtype} "
                f"on {q.device}")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"{len(out)} values" if isinstance(out, (tuple, list)) else _describe(out)
        raise TypeError(f"backend: plug-in {name!r} returned {got}; {contract}")
    for label, x in zip(("o", "rem"), out):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"backend: plug-in {name!r} returned {_describe(x)} as {label}; {contract}")
        if tuple(x.shape) != expected[label] or x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"backend: plug-in {name!r} returned {_describe(x)} as {label}; {contract}")


def sb_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    inv_temp: float | None = None,
    attend_current: bool = False,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    backend: str = "auto",
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stick-breaking attention of a few new queries over a KV cache (decoding).

    Query t of sequence b sits at position ``cache_seqlens[b] + t`` and attends causally to the
    cache: keys before it (itself too with ``attend_current``). The result is exactly those rows
    of ``sb_attn`` on the whole sequence.

    Args:
        q: (B, H, Tq, D), Tq >= 1 new queries per sequence. Any strides.
        k_cache, v_cache: (B, H_kv, S_max, D), ``H % H_kv == 0`` (GQA as in ``sb_attn``). Any
            strides (last dim contiguous is fastest).
        cache_seqlens: int32 (B,), the tokens already in each sequence's cache.
        inv_temp: logit scale, default ``1/sqrt(D)``.
        attend_current: whether a query attends to its own key.
        k, v: optional (B, H_kv, Tq, D) new keys and values, written in place into the caches at
            positions ``cache_seqlens[b] .. cache_seqlens[b] + Tq - 1`` before the queries attend
            (FlashAttention's ``flash_attn_with_kvcache`` convention). ``cache_seqlens`` is not
            advanced: the caller adds Tq for the next step.
        backend: a registered backend with a decode entry point (``sbbench list``) or ``"auto"``.
        config: decode launch parameters over the backend's default.

    Returns:
        ``(o, rem)``: o (B, H, Tq, D) and rem (B, H, Tq), in q's dtype. Not differentiable
        through the Triton kernel (inference only); ``reference`` keeps autograd.

    Every argument is checked before the cache is written, so a bad call leaves it untouched.
    """
    problem = validate_decode(q, k_cache, v_cache, cache_seqlens, inv_temp, attend_current, k, v)
    chosen = select_auto(problem, decode=True) if backend == "auto" else get_backend(backend)
    if chosen.kind != "stickbreaking":
        raise ValueError(f"backend: {chosen.name!r} is a {chosen.kind} comparator, not stick-breaking attention")
    reason = chosen.decode_unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"backend: {chosen.name!r} cannot decode this input: {reason}")
    resolved = chosen.resolve_decode_config(problem, config) if (chosen.decode_config_space or config) else None
    if k is not None:
        append_to_cache(k_cache, v_cache, cache_seqlens, k, v)
    return chosen.decode(q, k_cache, v_cache, cache_seqlens, problem.inv_temp, attend_current, config=resolved)


def append_to_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Write k, v (B, H_kv, Tq, D) into the caches at ``cache_seqlens[b] + t``, in place.

    One indexed write per cache, whatever the strides, with no host synchronisation (so it can
    be captured in a CUDA graph). Arguments are trusted: ``sb_attn_with_kvcache`` checked them.
    """
    batch, _, new_tokens, _ = k.shape
    positions = cache_seqlens.long()[:, None] + torch.arange(new_tokens, device=k.device)  # (B, Tq)
    rows = torch.arange(batch, device=k.device)[:, None]
    # Advanced indices on dims 0 and 2 around a slice: the indexed view is (B, Tq, H_kv, D).
    k_cache[rows, :, positions] = k.transpose(1, 2)
    v_cache[rows, :, positions] = v.transpose(1, 2)
