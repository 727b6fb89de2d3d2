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
    z: torch.Tensor, attend_current: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights A (..., T, T) and the leftover stick rem (..., T) from logits z (..., T, T).

    log A_ij = logsigmoid(z_ij) - sum_{j < l < i} softplus(z_il), over the causal keys of row i.
    """
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


@register_backend(
    "reference",
    description="naive O(T^2) formula in PyTorch; any float dtype; the float64 oracle",
    auto_priority=30,
)
def reference(q, k, v, inv_temp, attend_current, *, cu_seqlens=None, max_seqlen=None, config=None):
    if cu_seqlens is not None:
        return run_per_sequence(dense_naive, q, k, v, inv_temp, attend_current, cu_seqlens)
    return dense_naive(q, k, v, inv_temp, attend_current)
