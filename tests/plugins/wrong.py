"""Backends that are wrong on purpose, called like ``sb_attn``: the checker must catch each."""

from __future__ import annotations

import torch

from sbbench.kernels.reference import stick_breaking_weights
from sbbench.kernels.varlen import expand_kv_heads


def drop_last_key(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """Stick-breaking attention that silently ignores the nearest key of every row (the key just
    left of the query, or the query itself with attend_current): a subtle off-by-one."""
    if cu_seqlens is not None:
        raise NotImplementedError("dense input only")
    k, v = expand_kv_heads(q, k, v)
    z = inv_temp * torch.matmul(q, k.transpose(-1, -2))
    weights, rem = stick_breaking_weights(z, attend_current)
    t = z.shape[-1]
    nearest = torch.arange(t, device=z.device) - (0 if attend_current else 1)
    rows = torch.arange(t, device=z.device)
    keep = torch.ones(t, t, dtype=torch.bool, device=z.device)
    keep[rows[nearest >= 0], nearest[nearest >= 0]] = False
    weights = weights * keep
    return torch.matmul(weights, v), rem


def raises(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """A backend that fails outright: its rows must be marked, and the sweep must go on."""
    raise RuntimeError("this backend always fails")


def unwritten_tail(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """Right everywhere except the last query of each sequence, which it never writes (an output
    allocated with torch.empty and a launch grid one row short)."""
    from sbbench.kernels.reference import dense_naive

    o_ref, rem = dense_naive(q, k, v, inv_temp, attend_current)
    o = torch.empty_like(o_ref)
    o[..., :-1, :] = o_ref[..., :-1, :]
    return o, rem


def out_of_memory(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """A backend whose allocation fails: its row must say ``oom``, not crash the sweep."""
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")


class _SlowForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        import time

        time.sleep(SLOW_FORWARD_S)
        return q * 1.0, q[..., 0] * 0.0

    @staticmethod
    def backward(ctx, do, drem):
        return do, None, None


SLOW_FORWARD_S = 0.05


def slow_forward(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """Not attention: a forward that sleeps SLOW_FORWARD_S and an instant backward, so a test can
    tell whether the forward is inside a timed region."""
    return _SlowForward.apply(q, k, v)


def float64_outputs(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """Right values in the wrong dtype: sb_attn returns o and rem in q's dtype."""
    from sbbench.kernels.reference import dense_naive

    return dense_naive(q.double(), k.double(), v.double(), inv_temp, attend_current)


def only_o(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """Returns o alone, not the pair (o, rem)."""
    from sbbench.kernels.reference import dense_naive

    return dense_naive(q, k, v, inv_temp, attend_current)[0]


def transposed_o(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """o in (B, T, H, D) instead of q's (B, H, T, D)."""
    from sbbench.kernels.reference import dense_naive

    o, rem = dense_naive(q, k, v, inv_temp, attend_current)
    return o.transpose(1, 2).contiguous(), rem


def rem_with_head_dim(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """rem with a trailing dim of 1 left on."""
    from sbbench.kernels.reference import dense_naive

    o, rem = dense_naive(q, k, v, inv_temp, attend_current)
    return o, rem[..., None]


def rem_not_a_tensor(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """rem as a Python list."""
    from sbbench.kernels.reference import dense_naive

    o, rem = dense_naive(q, k, v, inv_temp, attend_current)
    return o, rem.tolist()


def three_outputs(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """(o, rem) plus an extra tensor."""
    from sbbench.kernels.reference import dense_naive

    o, rem = dense_naive(q, k, v, inv_temp, attend_current)
    return o, rem, rem


def on_meta_device(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
    """Right shapes and dtype, on the wrong device."""
    return torch.empty(q.shape, dtype=q.dtype, device="meta"), torch.empty(q.shape[:-1], dtype=q.dtype, device="meta")
