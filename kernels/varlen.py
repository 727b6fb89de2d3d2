"""Shared plumbing for the PyTorch backends: GQA head expansion and packed varlen by sequence."""

from __future__ import annotations

from typing import Callable

import torch

DenseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor]]


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v with each kv head repeated for the query heads that read it (h -> h // group)."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def run_per_sequence(
    dense: DenseFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float,
    attend_current: bool,
    cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (total, H, D) input: run ``dense`` on each sequence alone, so none attends across
    a boundary, and pack the results back. Differentiable through autograd."""
    bounds = cu_seqlens.tolist()
    outs, rems = [], []
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        # (T_i, H, D) -> (1, H, T_i, D) is a view: no copy.
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o, rem = dense(qs, ks, vs, inv_temp, attend_current)
        outs.append(o[0].transpose(0, 1))
        rems.append(rem[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape), q.new_ones(q.shape[:2])
    return torch.cat(outs, 0), torch.cat(rems, 0)
