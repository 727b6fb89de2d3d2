"""``sb_attn``: the one interface every stick-breaking backend serves."""

from __future__ import annotations

from typing import Any, Mapping

import torch

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
