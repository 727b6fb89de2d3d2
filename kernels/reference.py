"""``reference``: the naive O(T^2) formula in PyTorch, the oracle every backend is checked against.

It computes in its inputs' dtype (float64 for the oracle; the harness also runs it in a
backend's own low precision to get FlashAttention-2's ``err_pt``), materialises the T x T
weights, and is differentiable through plain autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sbbench.core.registry import register_backend
from sbbench.kernels.varlen import expand_kv_heads, run_per_sequence


def causal_keep(t: int, attend_current: bool, device: torch.device) -> torch.Tensor:
    """(T, T) bool: key j is visible to query i (j <= i with attend_current, else j < i)."""
    rows = torch.arange(t, device=device)
    return rows[None, :] <= rows[:, None] if attend_current else rows[None, :] < rows[:, None]


def stick_breaking_weights(
    z: torch.Tensor, attend_current: bool, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights A (..., T, T) and the leftover stick rem (..., T) from logits z (..., T, T).

    log A_ij = logsigmoid(z_ij) - sum_{j < l < i} softplus(z_il), over the causal keys of row i.
    ``keep`` (rows, keys), a prefix of the keys per row, replaces the square causal mask: decode
    rows sit at the end of their sequence (z is then (..., Tq, keys)).
    """
    if keep is None:
        keep = causal_keep(z.shape[-1], attend_current, z.device)
    log_beta = F.logsigmoid(z)
    log_one_minus_beta = torch.where(keep, F.logsigmoid(-z), torch.zeros((), dtype=z.dtype, device=z.device))
    # Sum over keys strictly right of j (nearer the query): reverse cumulative sum minus self.
    suffix = torch.flip(torch.cumsum(torch.flip(log_one_minus_beta, (-1,)), -1), (-1,)) - log_one_minus_beta
    weights = torch.where(keep, torch.exp(log_beta + suffix), torch.zeros((), dtype=z.dtype, device=z.device))
    rem = torch.exp(log_one_minus_beta.sum(-1))
    return weights, rem


def dense_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: float, attend_current: bool,
    transform: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]] = stick_breaking_weights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula on dense (B, H, T, D) input; GQA by repeating k/v heads. ``transform`` maps
    the logits to (weights, rem): ``compiled`` passes its own arrangement of the same math."""
    k, v = expand_kv_heads(q, k, v)
    z = inv_temp * torch.matmul(q, k.transpose(-1, -2))
    weights, rem = transform(z, attend_current)
    return torch.matmul(weights, v), rem


def decode_keep(
    cache_len: int, new_tokens: int, keys: int, attend_current: bool, device: torch.device
) -> torch.Tensor:
    """(Tq, keys) bool: key j is visible to query t of a sequence holding ``cache_len`` tokens
    before its Tq queries (j < cache_len + t, or <= with attend_current)."""
    limit = cache_len + torch.arange(new_tokens, device=device) + int(attend_current)
    return torch.arange(keys, device=device)[None, :] < limit[:, None]


def decode_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    inv_temp: float, attend_current: bool, *, config=None, compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula's rows for decode queries (q (B, H, Tq, D) at positions cache_seqlens[b] + t)
    over the cache: one sequence at a time, each upcast alone to ``compute_dtype`` (default q's),
    so the float64 oracle of a long cache never holds a float64 copy of the whole cache. GQA by
    folding a kv head's query heads into rows; o (B, H, Tq, D) and rem (B, H, Tq) in
    ``compute_dtype`` when given, else in q's dtype."""
    batch, heads, new_tokens, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    dtype = compute_dtype or q.dtype
    outs, rems = [], []
    for b, cached in enumerate(cache_seqlens.tolist()):
        keys = cached + new_tokens - 1 + int(attend_current)  # keys the last query reads
        qb = q[b].to(dtype).reshape(kv_heads, heads // kv_heads * new_tokens, head_dim)
        kb, vb = k_cache[b, :, :keys].to(dtype), v_cache[b, :, :keys].to(dtype)
        z = inv_temp * torch.matmul(qb, kb.transpose(-1, -2))
        keep = decode_keep(cached, new_tokens, keys, attend_current, q.device).repeat(heads // kv_heads, 1)
        weights, rem = stick_breaking_weights(z, attend_current, keep)
        outs.append(torch.matmul(weights, vb).reshape(heads, new_tokens, head_dim))
        rems.append(rem.reshape(heads, new_tokens))
    return torch.stack(outs).to(dtype), torch.stack(rems).to(dtype)


@register_backend(
    "reference",
    description="naive O(T^2) formula in PyTorch; any float dtype; the float64 oracle",
    auto_priority=30,
    decode=decode_rows,
)
def reference(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
    if cu_seqlens is not None:
        return run_per_sequence(dense_naive, q, k, v, inv_temp, attend_current, cu_seqlens)
    return dense_naive(q, k, v, inv_temp, attend_current)
