"""``chunked``: stick-breaking attention in pure PyTorch, blockwise over queries and keys.

For each query chunk the forward walks key chunks from the diagonal leftwards (the nearest key
breaks the stick first), carrying each row's running log-stick ``sum softplus(z)`` over the keys
already visited, and accumulates ``o`` in float32 (float64 for float64 input). Its own
``torch.autograd.Function`` saves only q, k, v and a per-row float64 log-rem, and the backward
recomputes every block, so the extra memory is O(T * chunk), never T x T.

Backward, in natural-log units, for query i and its keys l (z = inv_temp <q_i, k_l>,
sp = softplus(z), beta = sigmoid(z), A_il = exp(z_il - sum_{l' >= l} sp_il'),
rem_i = exp(-sum_l sp_il))::

    g_il   = A_il <do_i, v_l>
    P_il   = sum_{j <= l} g_ij                 (keys further from the query)
    dz_il  = g_il - beta_il (P_il + drem_i rem_i)
    dv_l = sum_i A_il do_i    dq_i = inv_temp sum_l dz_il k_l    dk_l = inv_temp sum_i dz_il q_i

The backward walks each row's key chunks from the LEFT, so P is a plain running sum. (Walking
from the diagonal gives P as <do, o> minus a suffix, which cancels catastrophically once the
stick is used up, far beyond float32's budget.) The log-stick right of a chunk
is the forward's total minus the running sum from the left, both in float64 per row, so that
difference is exact; inside a chunk the weights use the chunk's own sums, as the forward does.

Inside a block the keys are taken nearest-first (k and v are flipped once along the sequence),
so sums over "keys nearer the query" are plain ``cumsum``s along the last axis; the matmuls
that sum over keys (A v, dZ k) take the block back in sequence order, far keys first (see
``_far_first``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sbbench.core.registry import Param, register_backend
from sbbench.core.tuned import decode_tuned_config_hook, tuned_config_hook
from sbbench.kernels.varlen import run_per_sequence

BLOCK_CHOICES = (16, 32, 64, 128, 256, 512)
CONFIG_SPACE = (
    Param("fwd_block_q", BLOCK_CHOICES, "fwd"),
    Param("fwd_block_k", BLOCK_CHOICES, "fwd"),
    Param("bwd_block_q", BLOCK_CHOICES, "bwd"),
    Param("bwd_block_k", BLOCK_CHOICES, "bwd"),
)
# Every block costs ~20 PyTorch ops whatever its size, so a block must be large enough that
# dispatch (several us per op on CPU, a kernel launch on GPU) is small beside its own work, and
# small enough that its few temporaries (B * H * block_q * block_k floats each) stay near cache on
# CPU and the diagonal block's masked half wastes little. On CPU the time is flat from 128 to 512
# and grows below that (per-op overhead); 128 x 256 sits in the flat part with the smaller
# temporaries. On GPU the same block gives B * H * 32k scores per launch, enough work per kernel
# to hide launch latency at benchmark batch * heads (a tuned config overrides it per device).
DEFAULT_CONFIG = {"fwd_block_q": 128, "fwd_block_k": 256, "bwd_block_q": 128, "bwd_block_k": 256}
_PARAM_PASSES = {p.name: p.pass_ for p in CONFIG_SPACE}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 logits lose the small differences the running log-stick is made of.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softplus(z: torch.Tensor) -> torch.Tensor:
    # Above the threshold softplus(z) is z; exp(-threshold) must be below the dtype's epsilon
    # times z for that to be exact, which 20 is for float32 but not float64.
    return F.softplus(z, beta=1.0, threshold=20.0 if z.dtype == torch.float32 else 40.0)


def _visible(qs: int, n: int, ke: int, w: int, shift: int, device: torch.device) -> torch.Tensor | None:
    """Mask (n, w) of the keys each row of query chunk [qs, qs+n) may read in the nearest-first
    key block ending at ke (column c is key ke-1-c), or None when every row reads every key."""
    # Key j is visible to query i iff j <= i - shift; the first row is the most restrictive.
    if ke - 1 <= qs - shift:
        return None
    rows = torch.arange(qs, qs + n, device=device)[:, None]
    keys = torch.arange(ke - 1, ke - 1 - w, -1, device=device)[None, :]
    return keys <= rows - shift


def _key_chunk(
    qc: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, group: int, qs: int, n: int, ke: int,
    block_k: int, shift: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The nearest-first key chunk ending at ke (at most block_k keys) seen by the query chunk
    [qs, qs+n), as the forward computes it and the backward recomputes it: (v chunk, logits z,
    softplus with the invisible keys zeroed, log-share, visibility mask or None).

    The log-share of key l is log A_l plus the log-stick right of the chunk:
    logsigmoid(z_l) - sum of sp over the chunk's keys nearer than l. It is not computed as
    z_l - (inclusive cumsum of sp): when one key takes nearly the whole stick (|z| reaches ~30
    on ``peaked`` input) that difference cancels and loses ~ulp(z) of log A on the key with the
    largest weight, which brings float32 ``o`` close to its budget.

    qc holds the chunk's queries as (b, hkv, group * n, d); kf and vf are k and v flipped
    along the sequence."""
    b, hkv, t = kf.shape[:3]
    ks = max(0, ke - block_k)
    kb, vb = kf[:, :, t - ke : t - ks], vf[:, :, t - ke : t - ks]
    z = torch.matmul(qc, kb.transpose(-1, -2)).view(b, hkv, group, n, ke - ks)
    sp = _softplus(z)
    mask = _visible(qs, n, ke, ke - ks, shift, qc.device)
    if mask is not None:
        sp = sp.masked_fill(~mask, 0.0)
    nearer = F.pad(sp[..., :-1].cumsum(-1), (1, 0))  # exclusive: keys before l in this order
    log_share = F.logsigmoid(z) - nearer
    if mask is not None:
        log_share = log_share.masked_fill(~mask, float("-inf"))
    return vb, z, sp, log_share, mask


def _flip_seq(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    # One contiguous copy, nearest-first order for every block: block [ks, ke) of the original
    # is rows [T-ke, T-ks) of the flipped copy, so blocks are plain slices.
    return torch.flip(x.to(acc), (-2,))


def _far_first(x: torch.Tensor) -> torch.Tensor:
    """A nearest-first block (keys along the last axis) in sequence order, for the matmuls that
    sum over keys (o = A v, dq = dZ k). Nearest-first, the few large weights come first and every
    later product is rounded against a partial sum of their size, which in float32 puts o over
    FlashAttention-2's 2x budget. Summing far-first adds the small terms to small partial sums,
    as the reference does."""
    return torch.flip(x, (-1,))


def _check_blocks(config: Mapping[str, Any], names: tuple[str, str]) -> tuple[int, int]:
    out = []
    for name in names:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config: {name} must be a positive int, got {value!r}")
        out.append(value)
    return out[0], out[1]


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: float, attend_current: bool,
    block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, H, T, D) in the accumulator dtype and log-rem (B, H, T) in float64."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    acc = _acc_dtype(q.dtype)
    shift = 0 if attend_current else 1
    # GQA without repeating k/v: query heads of one kv head become extra rows of one matmul.
    qg = q.unflatten(1, (hkv, group))
    kf, vf = _flip_seq(k, acc), _flip_seq(v, acc)
    vn = v.to(acc)
    o = torch.empty((b, h, t, d), dtype=acc, device=q.device)
    log_rem = torch.empty((b, h, t), dtype=torch.float64, device=q.device)
    og, lg = o.view(b, hkv, group, t, d), log_rem.view(b, hkv, group, t)
    for qs in range(0, t, block_q):
        qe = min(qs + block_q, t)
        n = qe - qs
        qc = (qg[:, :, :, qs:qe].to(acc) * inv_temp).reshape(b, hkv, group * n, d)
        oc = torch.zeros((b, hkv, group * n, d), dtype=acc, device=q.device)
        # Log-stick right of the chunk, in float64: the backward differences against it (see
        # the module docstring) and the forward reads it rounded once per chunk.
        total = torch.zeros((b, hkv, group, n, 1), dtype=torch.float64, device=q.device)
        for ke in range(qe - shift, 0, -block_k):
            _, z, sp, log_share, _ = _key_chunk(qc, kf, vf, group, qs, n, ke, block_k, shift)
            w = z.shape[-1]
            a = torch.exp(log_share - total.to(acc))
            total = total + sp.sum(-1, keepdim=True, dtype=torch.float64)
            oc.add_(torch.matmul(_far_first(a).view(b, hkv, group * n, w), vn[:, :, ke - w : ke]))
        og[:, :, :, qs:qe] = oc.view(b, hkv, group, n, d)
        lg[:, :, :, qs:qe] = -total[..., 0]
    return o, log_rem


def _backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_rem: torch.Tensor,
    do: torch.Tensor, drem: torch.Tensor, inv_temp: float, attend_current: bool,
    block_q: int, block_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    hkv = k.shape[1]
    group = h // hkv
    acc = _acc_dtype(q.dtype)
    shift = 0 if attend_current else 1
    qg, dog = q.unflatten(1, (hkv, group)), do.unflatten(1, (hkv, group))
    lg, drg = log_rem.view(b, hkv, group, t), drem.unflatten(1, (hkv, group))
    kf, vf = _flip_seq(k, acc), _flip_seq(v, acc)
    kn = k.to(acc)
    # Sequential accumulation into full-precision buffers: deterministic, unlike atomics.
    dkf = torch.zeros((b, hkv, t, d), dtype=acc, device=q.device)
    dvf = torch.zeros((b, hkv, t, d), dtype=acc, device=q.device)
    dq = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    dqg = dq.view(b, hkv, group, t, d)
    for qs in range(0, t, block_q):
        qe = min(qs + block_q, t)
        n = qe - qs
        qc = (qg[:, :, :, qs:qe].to(acc) * inv_temp).reshape(b, hkv, group * n, d)
        doc = dog[:, :, :, qs:qe].to(acc).reshape(b, hkv, group * n, d)
        total = (-lg[:, :, :, qs:qe])[..., None]  # float64 sum of sp over the row's keys
        drem_rem = drg[:, :, :, qs:qe].to(acc)[..., None] * torch.exp(-total).to(acc)
        dqc = torch.zeros((b, hkv, group * n, d), dtype=acc, device=q.device)
        left = torch.zeros_like(total)  # float64 sum of sp over the chunks already walked
        carry_p = torch.zeros((b, hkv, group, n, 1), dtype=acc, device=q.device)
        # The forward's chunks, walked from the left.
        for ke in reversed(range(qe - shift, 0, -block_k)):
            vb, z, sp, log_share, mask = _key_chunk(qc, kf, vf, group, qs, n, ke, block_k, shift)
            w = z.shape[-1]
            left = left + sp.sum(-1, keepdim=True, dtype=torch.float64)
            right = (total - left).to(acc)  # log-stick right of this chunk
            a = torch.exp(log_share - right)
            g = a * torch.matmul(doc, vb.transpose(-1, -2)).view(b, hkv, group, n, w)
            # P of the keys further than l (larger index, nearest-first order), exclusive of l.
            p_excl = carry_p + torch.flip(F.pad(torch.flip(g, (-1,)).cumsum(-1)[..., :-1], (1, 0)), (-1,))
            # g - beta (P_excl + g + drem rem), regrouped so nothing cancels where beta ~ 1.
            dz = g * torch.sigmoid(-z) - torch.sigmoid(z) * (p_excl + drem_rem)
            if mask is not None:
                dz = dz.masked_fill(~mask, 0.0)
            carry_p = carry_p + g.sum(-1, keepdim=True)
            dz2 = dz.view(b, hkv, group * n, w)
            dqc.add_(torch.matmul(_far_first(dz2), kn[:, :, ke - w : ke]))
            # Rows of all query heads of a kv head are summed by the same matmul (GQA).
            dkf[:, :, t - ke : t - ke + w].add_(torch.matmul(dz2.transpose(-1, -2), qc))
            dvf[:, :, t - ke : t - ke + w].add_(torch.matmul(a.view(b, hkv, group * n, w).transpose(-1, -2), doc))
        dqg[:, :, :, qs:qe] = (dqc * inv_temp).view(b, hkv, group, n, d)
    # qc carried inv_temp already, so dk needs no further scaling.
    dk = torch.flip(dkf, (-2,)).to(k.dtype)
    dv = torch.flip(dvf, (-2,)).to(v.dtype)
    return dq, dk, dv


class _ChunkedSB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, inv_temp, attend_current, fwd_bq, fwd_bk, bwd_bq, bwd_bk):
        o_acc, log_rem = _forward(q, k, v, inv_temp, attend_current, fwd_bq, fwd_bk)
        o = o_acc.to(q.dtype)
        rem = torch.exp(log_rem).to(q.dtype)
        ctx.save_for_backward(q, k, v, log_rem)
        ctx.args = (inv_temp, attend_current, bwd_bq, bwd_bk)
        return o, rem

    @staticmethod
    @once_differentiable
    def backward(ctx, do, drem):
        q, k, v, log_rem = ctx.saved_tensors
        inv_temp, attend_current, bq, bk = ctx.args
        if drem is None:
            drem = torch.zeros(log_rem.shape, dtype=q.dtype, device=q.device)
        dq, dk, dv = _backward(q, k, v, log_rem, do, drem, inv_temp, attend_current, bq, bk)
        return dq, dk, dv, None, None, None, None, None, None


def chunked_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: float,
    attend_current: bool,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, H, T, D) input, any strides; k, v (B, H_kv, T, D). Returns (o, rem)."""
    merged = dict(DEFAULT_CONFIG)
    if config:
        merged.update(config)
    fwd_bq, fwd_bk = _check_blocks(merged, ("fwd_block_q", "fwd_block_k"))
    bwd_bq, bwd_bk = _check_blocks(merged, ("bwd_block_q", "bwd_block_k"))
    return _ChunkedSB.apply(q, k, v, float(inv_temp), bool(attend_current), fwd_bq, fwd_bk, bwd_bq, bwd_bk)


# Decode (sb_attn_with_kvcache): the cache of each sequence in ``num_splits`` contiguous splits,
# each computed with a fresh stick and merged nearest first. One split is the plain formula; more
# splits is how the GPU kernels spread one sequence over many programs, and this path is their
# executable specification on the CPU (it is fastest with one split there).
DECODE_CONFIG_SPACE = (Param("num_splits", (1, 2, 4, 8, 16, 32), "decode"),)
DECODE_DEFAULT_CONFIG = {"num_splits": 4}


def split_bounds(keys: int, num_splits: int) -> list[tuple[int, int]]:
    """[lo, hi) of each non-empty split of ``keys`` keys into ``num_splits`` near-equal parts,
    farthest first."""
    cuts = [keys * i // num_splits for i in range(num_splits + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def _split_partial(
    qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split with a fresh stick: (o_split, log rem_split) for rows qs (already scaled by
    inv_temp) over keys k, v (sequence order) where ``keep`` (rows, keys) says what each row sees."""
    z = torch.matmul(qs, k.transpose(-1, -2))
    sp = _softplus(z).masked_fill(~keep, 0.0)
    # Sum of sp over the split's keys nearer than each key (exclusive suffix sum).
    nearer = torch.flip(F.pad(torch.flip(sp, (-1,))[..., :-1].cumsum(-1), (1, 0)), (-1,))
    weights = torch.exp(F.logsigmoid(z) - nearer).masked_fill(~keep, 0.0)
    return torch.matmul(weights, v), -sp.sum(-1, keepdim=True, dtype=torch.float64)


def split_kv_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    inv_temp: float, attend_current: bool, *, config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode in PyTorch: per sequence, its keys in ``num_splits`` splits, merged
    nearest first as ``o = o_near + rem_near * o_far``, ``log rem = log rem_near + log rem_far``
    (the log-stick in float64). Accumulates in float32 (float64 for float64 input)."""
    from sbbench.kernels.reference import decode_keep

    num_splits = (config or DECODE_DEFAULT_CONFIG).get("num_splits", DECODE_DEFAULT_CONFIG["num_splits"])
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"config: num_splits must be a positive int, got {num_splits!r}")
    batch, heads, new_tokens, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    acc = _acc_dtype(q.dtype)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rem = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    for b, cached in enumerate(cache_seqlens.tolist()):
        keys = cached + new_tokens - 1 + int(attend_current)
        qs = (q[b].to(acc) * inv_temp).reshape(kv_heads, group * new_tokens, head_dim)
        keep = decode_keep(cached, new_tokens, keys, attend_current, q.device).repeat(group, 1)
        o_acc = torch.zeros(qs.shape, dtype=acc, device=q.device)
        log_rem = torch.zeros((kv_heads, group * new_tokens, 1), dtype=torch.float64, device=q.device)
        for lo, hi in reversed(split_bounds(keys, num_splits)):
            kb, vb = k_cache[b, :, lo:hi].to(acc), v_cache[b, :, lo:hi].to(acc)
            o_split, log_rem_split = _split_partial(qs, kb, vb, keep[:, lo:hi])
            o_acc += torch.exp(log_rem).to(acc) * o_split
            log_rem += log_rem_split
        o[b] = o_acc.reshape(heads, new_tokens, head_dim).to(q.dtype)
        rem[b] = torch.exp(log_rem).reshape(heads, new_tokens).to(q.dtype)
    return o, rem


@register_backend(
    "chunked",
    description="pure PyTorch, blockwise over queries and keys, recomputing backward; O(T) extra memory",
    auto_priority=10,
    config_space=CONFIG_SPACE,
    default_config=DEFAULT_CONFIG,
    tuned_config=tuned_config_hook("chunked", _PARAM_PASSES),
    decode=split_kv_decode,
    decode_config_space=DECODE_CONFIG_SPACE,
    decode_default_config=DECODE_DEFAULT_CONFIG,
    decode_tuned_config=decode_tuned_config_hook("chunked"),
)
def chunked(
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
    def dense(qs, ks, vs, temp, current):
        return chunked_dense(qs, ks, vs, temp, current, config)

    if cu_seqlens is not None:
        return run_per_sequence(dense, q, k, v, inv_temp, attend_current, cu_seqlens)
    return dense(q, k, v, inv_temp, attend_current)
