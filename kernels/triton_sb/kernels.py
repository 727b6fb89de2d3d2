"""Triton kernels for stick-breaking attention: forward, and a two-kernel deterministic backward.

README.md beside this file derives every formula; in short: all logit arithmetic is in base 2
(``z2 = z * log2(e)``) so the special-function unit's ex2/lg2 are used directly. For one query row
i and its keys j (nearest first)::

    sp2_j  = softplus2(z2_j) = max(z2, 0) + log2(1 + 2^-|z2|)        (-log2(1 - beta_j))
    S_j    = sum_{l >= j} sp2_l                                        (inclusive suffix sum)
    A_j    = 2^(z2_j - S_j)        o = sum_j A_j v_j        rem = 2^-(sum_j sp2_j)

The forward walks key blocks from the diagonal leftwards; ``carry`` holds the suffix sum of the
blocks already visited (the running log-stick). Within a block the suffix sum is a product with a
0/1 triangular matrix on the tensor cores (``SCAN=1``: one fp16 product, for bf16 inputs;
``SCAN=2``: the value split into fp16 high and low parts, two products, for fp16 inputs) or
``tl.cumsum`` (``SCAN=0``, always for float32 inputs, whose budget fp16's exponent range cannot
meet). This scan is what makes stick-breaking costlier than softmax, and the matrix product is
the cheapest scan Triton offers.

Backward (natural-log units; z = inv_temp <q, k>). With g_il = A_il <do_i, v_l>,
beta = sigmoid(z) and P_il = sum_{j <= l} g_ij (keys at or further from the query than l):

    dz_il = g_il - beta_il (P_il + drem_i rem_i)
    dq_i = inv_temp sum_l dz_il k_l,  dk_l = inv_temp sum_i dz_il q_i,  dv_l = sum_i A_il do_i

The query-major dQ kernel walks each row's keys from the left, so P is a plain running sum, and
stores per (row, dK/dV key block) of the causal blocks the two values a block cannot compute
alone: P left of it and the log-stick right of it. The key-major dK/dV kernel then recomputes each
block from those. Each output element is written by one program: no atomics on floats, so the
backward is deterministic.

Block skipping: once every row of a query tile has ``carry > -skip_log2`` (rem < 2^skip_log2),
the forward stops walking left. It checks after ``skip_check_keys`` keys, then after twice as many
more, four times, ... (``skip_checks`` checks), then walks the rest. It records, per row, the
first key it visited; the backward masks every key left of it, so both passes compute the same
function.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# Logit (base 2) given to masked entries: 2^-1000 is 0 in float32, so a masked entry's softplus,
# weight, sigmoid and gradient all come out exactly 0 from the unmasked arithmetic: one select on
# the logits instead of one on each of those.
MASKED_LOGIT2: tl.constexpr = tl.constexpr(-1000.0)


# PTX inline assembly where Triton's portable lowering costs extra instructions per score. The
# interpreter (TRITON_INTERPRET=1: the CPU tests) cannot run assembly, and a ROCm build of torch
# compiles for AMD GPUs, which take no PTX: both use the portable form, which computes the same
# values to within an ulp. The GPU tests cover the assembly.
NATIVE_ASM: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None)


# How a kernel reads the tiles it walks (its TMA constexpr). Descriptors made on the device
# describe one head's rows each, which packed sequences need (a sequence's end must read as
# zeros), but take 128 bytes of global scratch per descriptor and program and a global write and
# fence to build. Descriptors made on the host describe a whole dense (B, H, T, D) tensor, one per
# launch and no scratch: what the forward uses for dense inputs, so that inference holds no more
# memory than its outputs, and the backward kernels as their config says (op.descriptor_kind).
POINTER_LOADS: tl.constexpr = tl.constexpr(0)
DEVICE_DESCRIPTORS: tl.constexpr = tl.constexpr(1)
HOST_DESCRIPTORS: tl.constexpr = tl.constexpr(2)


@triton.jit
def _rcp_1_to_2(x):
    """1 / x for x in [1, 2]. Triton's ``/`` is PTX div.full, which guards the divisor's range
    (a compare, a select, a predicated scale and a multiply around the reciprocal: 5 instructions
    per score in the backward); on [1, 2] rcp.approx alone is within 1 ulp."""
    if NATIVE_ASM:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return 1.0 / x


@triton.jit
def _to_fp16_saturated(x, NONNEG: tl.constexpr):
    """x (float32) in fp16, values beyond fp16's range saturated instead of inf: an inf would
    turn the scan's product with the 0/1 matrix into NaN (inf * 0). Natively one
    cvt.satfinite for two values, instead of one clamp per value (two unless NONNEG, x >= 0)
    before the conversion."""
    if NATIVE_ASM:
        return tl.inline_asm_elementwise(
            "cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.float16, is_pure=True, pack=2
        )
    elif NONNEG:
        return tl.minimum(x, 65504.0).to(tl.float16)
    else:
        return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _softplus2(z2, ACCURATE: tl.constexpr, SCAN: tl.constexpr):
    """(log2(1 + 2^z2), 2^-|z2|). ACCURATE (float32 inputs) computes log2(1 + e) for small
    e = 2^-|z2| as log2(u) * e / (u - 1) with u = 1 + e (Goldberg's log1p), since 1 + e drops
    most of e's bits: at z = -8 plain log2(1 + e) is off by 3e-4 relative, which float32's budget
    cannot absorb. Otherwise log2(1 + e) = e * p(e), p a polynomial fitted to log2(1 + e) / e on
    [0, 1] for relative error (exact in the limit e -> 0): degree 6 (1.5e-6) for fp16 inputs,
    degree 4 (5.7e-5, a seventieth of a bf16 ulp) for bf16 ones (SCAN == 1, their one-part scan).
    ``tl.log2`` is not the special-function unit's lg2 but a libdevice routine of a few dozen
    instructions, which would dominate the per-score cost; each degree of the polynomial is one
    more FMA per score, hence the lowest degree each dtype's budget allows. Returns e too: the
    backward forms sigmoid(z) and 1 - sigmoid(z) from it."""
    e = tl.exp2(-tl.abs(z2))
    if ACCURATE:
        u = 1.0 + e
        lp = tl.where(u == 1.0, e * 1.4426950408889634, tl.log2(u) * (e / (u - 1.0)))
    elif SCAN == 1:
        p = 0.059650947 * e - 0.22711698
        p = p * e + 0.44189614
        p = p * e - 0.71698644
        p = p * e + 1.4426131
        lp = e * p
    else:
        p = 0.019929474 * e - 0.094360754
        p = p * e + 0.21363747
        p = p * e - 0.33821434
        p = p * e + 0.4774568
        p = p * e - 0.7211405
        p = p * e + 1.4426929
        lp = e * p
    return tl.maximum(z2, 0.0) + lp, e


@triton.jit
def _row_sum(x, ACCURATE: tl.constexpr):
    """Row sums for the running log-stick: float64 when ACCURATE (float32 inputs), so the
    forward's total and the backward's running sum agree whatever their key tiles (their
    difference is the stick right of a key); float32 otherwise, where that difference needs only
    bf16/fp16 accuracy and float64 conversions per tile would cost the forward time."""
    if ACCURATE:
        return tl.sum(x.to(tl.float64), 1)
    else:
        return tl.sum(x, 1)


@triton.jit
def _zero_stick(BLOCK_M: tl.constexpr, ACCURATE: tl.constexpr):
    if ACCURATE:
        return tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        return tl.zeros([BLOCK_M], dtype=tl.float32)


@triton.jit
def _scan_matrix(BLOCK_N: tl.constexpr, REVERSE: tl.constexpr):
    """The 0/1 matrix whose product with a row vector is its exclusive suffix (REVERSE) or prefix
    sum. Built once per program, outside the key loop, and passed to ``_scan_excl``."""
    idx = tl.arange(0, BLOCK_N)
    if REVERSE:
        return (idx[:, None] > idx[None, :]).to(tl.float16)
    else:
        return (idx[:, None] < idx[None, :]).to(tl.float16)


@triton.jit
def _scan_excl(x, tri, SCAN: tl.constexpr, REVERSE: tl.constexpr, NONNEG: tl.constexpr):
    """Exclusive running sum of x (fp32, [BLOCK_M, BLOCK_N]) along its key axis: of the entries
    right of each one when REVERSE (suffix), else of those left of it (prefix); ``tri`` is
    ``_scan_matrix(BLOCK_N, REVERSE)``. Exclusive, so an entry's own value never passes through
    the fp16 rounding of the matrix-product scan: a key with a saturated sigmoid (beta ~ 1) would
    otherwise lose its gradient to that rounding. NONNEG: x >= 0."""
    if SCAN == 0:
        return tl.cumsum(x, axis=1, reverse=REVERSE) - x
    else:
        return _scan_product(x, tri, None, SCAN, NONNEG)


@triton.jit
def _scan_excl_onto(base, x, tri, SCAN: tl.constexpr, REVERSE: tl.constexpr, NONNEG: tl.constexpr):
    """base + ``_scan_excl(x, ...)``, base a [BLOCK_M, BLOCK_N] float32 array. The matrix-product
    scan starts its accumulator at base, so the tensor cores do the addition: one ALU op per score
    fewer. Their float32 accumulation keeps fewer low bits than an FADD (it aligns the addends to
    the largest), far below fp16's and bf16's rounding; float32 inputs never come here."""
    if SCAN == 0:
        return base + _scan_excl(x, tri, SCAN, REVERSE, NONNEG)
    else:
        return _scan_product(x, tri, base, SCAN, NONNEG)


@triton.jit
def _scan_product(x, tri, acc, SCAN: tl.constexpr, NONNEG: tl.constexpr):
    """acc (None: zeros) + x @ tri, x in one (SCAN=1) or two (SCAN=2) fp16 parts. Values beyond
    fp16's range arise only where the weights are 0 anyway; they are saturated so that none
    becomes inf (inf * 0 = NaN in the product)."""
    hi = _to_fp16_saturated(x, NONNEG)
    s = tl.dot(hi, tri, acc)
    if SCAN == 2:
        lo = _to_fp16_saturated(x - hi.to(tl.float32), False)
        s = tl.dot(lo, tri, s)
    return s


@triton.jit
def _seq_bounds(CU_SEQLENS, pid_b, T_dense, IS_VARLEN: tl.constexpr):
    """(first row of this sequence in the packed row space, its length)."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + pid_b)
        seqlen = tl.load(CU_SEQLENS + pid_b + 1) - start
    else:
        start = pid_b * T_dense
        seqlen = T_dense
    return start, seqlen


@triton.jit
def _work_order(num_pairs, sched_pairs):
    """(rank, sequence-head pair, ranks per pair) of this program; rank 0 is the pair's program
    with the most work. The grid is one axis of n_ranks x num_pairs programs, which the GPU starts in index
    order: chunk by chunk of ``sched_pairs`` pairs, and within a chunk every pair's rank 0, then
    every pair's rank 1, and so on. The longest programs start first and the last to start are
    the shortest. Pair by pair instead, the last pairs' longest programs would start near the end
    and run on alone, a causal tail on a mostly idle GPU (longer for a backward launch of few
    heads). A chunk holds a few pairs, not all of them, so that the K/V they walk stay in L2
    while it runs."""
    n_ranks = tl.num_programs(0) // num_pairs
    pid = tl.program_id(0)
    chunk = pid // (n_ranks * sched_pairs)
    within = pid - chunk * (n_ranks * sched_pairs)
    width = tl.minimum(sched_pairs, num_pairs - chunk * sched_pairs)
    rank = within // width
    return rank, chunk * sched_pairs + within - rank * width, n_ranks


@triton.jit
def _query_tile(
    CU_SEQLENS, T_dense, num_heads, group, num_pairs, sched_pairs, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """(sequence, head, kv head, first packed row, length, first row of the tile) of a query-major
    program. The heaviest query tiles (furthest from the sequence start) are launched first."""
    rank, pid_bh, n_ranks = _work_order(num_pairs, sched_pairs)
    pid_m = n_ranks - 1 - rank
    pid_b = pid_bh // num_heads
    pid_h = pid_bh % num_heads
    row0, seqlen = _seq_bounds(CU_SEQLENS, pid_b, T_dense, IS_VARLEN)
    return pid_b, pid_h, pid_h // group, row0, seqlen, pid_m * BLOCK_M


@triton.jit
def _diagonal_blocks(start_m, seqlen, ATTEND_CURRENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(block holding the tile's last visible key, last block every row of the tile sees whole):
    the blocks between them need the causal mask. -1 for none."""
    last_key = tl.minimum(start_m + BLOCK_M, seqlen) - 1 - (1 - ATTEND_CURRENT)
    # last_key >= -1; the shift keeps the division non-negative, as // truncates toward zero on
    # the GPU.
    n_top = (last_key + BLOCK_N) // BLOCK_N - 1
    return n_top, (start_m + ATTEND_CURRENT) // BLOCK_N - 1


@triton.jit
def _head_base(PTR, row0, pid_b, head, stride_b, stride_h, stride_t, IS_VARLEN: tl.constexpr):
    """Pointer to (sequence pid_b, head, first token) of a (B, H, T, ...) or packed (total, H, ...)
    tensor: packed sequences start at their first row, dense ones at their batch offset."""
    if IS_VARLEN:
        return PTR + row0.to(tl.int64) * stride_t + head * stride_h
    else:
        return PTR + pid_b.to(tl.int64) * stride_b + head * stride_h


@triton.jit
def _state_base(CU_STATES, pid_b, IS_VARLEN: tl.constexpr):
    """First boundary-state slot of sequence pid_b (dense: all sequences have the same count)."""
    if IS_VARLEN:
        return tl.load(CU_STATES + pid_b)
    else:
        return pid_b.to(tl.int64) * tl.load(CU_STATES + 1)


# The boundary states of a sequence are compact and causal: row r has one for each key block it
# can see, 0 .. r // BLOCK_N. Both layouts are additive, the state of (row, block) at
# _state_row_part(row) + _state_block_part(block), so a kernel adds the part it holds fixed once
# and the other per tile:
#   by row (BY_BLOCK false): row r's blocks adjacent, from BLOCK_N q(q + 1)/2 + (r mod BLOCK_N)(q + 1),
#       q = r // BLOCK_N; cheap to address from a fixed row, but a query tile's rows lie q + 1
#       floats apart, one memory sector each;
#   by block: block b's rows b BLOCK_N .. seqlen - 1 adjacent, from b seqlen - BLOCK_N b(b + 1)/2
#       (the seqlen - c BLOCK_N states of each block c < b, less the b BLOCK_N rows block b lacks),
#       so a query tile's rows are whole cache lines.


@triton.jit
def _state_row_part(row, BLOCK_N: tl.constexpr, BY_BLOCK: tl.constexpr):
    if BY_BLOCK:
        return row
    else:
        qb = row // BLOCK_N
        return BLOCK_N * (qb * (qb + 1) // 2) + (row % BLOCK_N) * (qb + 1)


@triton.jit
def _state_block_part(block, seqlen, BLOCK_N: tl.constexpr, BY_BLOCK: tl.constexpr):
    if BY_BLOCK:
        return block * seqlen - BLOCK_N * (block * (block + 1) // 2)
    else:
        return block


@triton.jit
def _rows_descriptor(base, seqlen, stride_t, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tensor descriptor of one head's [seqlen, HEAD_DIM] rows read BLOCK rows at a time; what
    lies past either bound loads as zeros."""
    return tl.make_tensor_descriptor(base, shape=[seqlen, HEAD_DIM], strides=[stride_t, 1],
                                     block_shape=[BLOCK, BLOCK_D])


@triton.jit
def _walked_head(X, row0, pid_b, head, stride_b, stride_h, stride_t, seqlen, HEAD_DIM: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, TMA: tl.constexpr):
    """What a kernel reads one head's tiles of ROWS rows of X from: with HOST_DESCRIPTORS (X is
    then a descriptor of the dense tensor) the descriptor, sequence and head, as
    ``_described_tile`` takes them; with DEVICE_DESCRIPTORS a descriptor of the head's
    [seqlen, HEAD_DIM] rows; else a pointer to the head's first row."""
    if TMA == HOST_DESCRIPTORS:
        return (X, pid_b, head)
    else:
        base = _head_base(X, row0, pid_b, head, stride_b, stride_h, stride_t, IS_VARLEN)
        if TMA:
            return _rows_descriptor(base, seqlen, stride_t, HEAD_DIM, ROWS, BLOCK_D)
        else:
            return base


@triton.jit
def _kv_sources(K, V, row0, pid_b, pid_hk, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, seqlen,
                offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                IS_VARLEN: tl.constexpr, TMA: tl.constexpr):
    """What ``_kv_block`` loads a query tile's key and value blocks from: ``_walked_head``'s
    source for K and V, or with pointer loads the pointer tile of the first block."""
    k_src = _walked_head(K, row0, pid_b, pid_hk, stride_kb, stride_kh, stride_kt, seqlen, HEAD_DIM, BLOCK_N, BLOCK_D,
                         IS_VARLEN, TMA)
    v_src = _walked_head(V, row0, pid_b, pid_hk, stride_vb, stride_vh, stride_vt, seqlen, HEAD_DIM, BLOCK_N, BLOCK_D,
                         IS_VARLEN, TMA)
    if TMA:
        return k_src, v_src
    else:
        return (k_src + offs_n[:, None] * stride_kt + offs_d[None, :],
                v_src + offs_n[:, None] * stride_vt + offs_d[None, :])


@triton.jit
def _described_tile(src, row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """The [ROWS, BLOCK_D] tile at ``row`` of one head's rows through a tensor descriptor: ``src``
    is (descriptor of the (B, H, T, D) tensor, sequence, head) with HOST_DESCRIPTORS, else a
    descriptor of the head's rows. What lies past the sequence or the head dim reads as zeros."""
    if TMA == HOST_DESCRIPTORS:
        desc, seq, head = src
        return desc.load([seq, head, row, 0]).reshape(ROWS, BLOCK_D)
    else:
        return src.load([row, 0])


@triton.jit
def _kv_block(k_src, v_src, start_n, keys, offs_d, seqlen, stride_kt, stride_vt, HEAD_DIM: tl.constexpr,
              BOUNDED: tl.constexpr, TMA: tl.constexpr):
    """The K and V block at key ``start_n`` from what ``_kv_sources`` gave. Pointer loads mask the
    head dim, and the sequence end only where a block can reach it (BOUNDED)."""
    if TMA:
        k = _described_tile(k_src, start_n, keys.shape[0], offs_d.shape[0], TMA)
        v = _described_tile(v_src, start_n, keys.shape[0], offs_d.shape[0], TMA)
    else:
        if BOUNDED:
            kv_mask = (keys[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        else:
            kv_mask = offs_d[None, :] < HEAD_DIM
        k = tl.load(k_src + start_n * stride_kt, mask=kv_mask, other=0.0)
        v = tl.load(v_src + start_n * stride_vt, mask=kv_mask, other=0.0)
    return k, v


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(
    acc, carry, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, offs_d, seqlen, HEAD_DIM: tl.constexpr, scale2,
    stride_kt, stride_vt, tri_suffix,
    MASKED: tl.constexpr, ATTEND_CURRENT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SCAN: tl.constexpr, PRECISION: tl.constexpr, ACCURATE: tl.constexpr,
    TMA: tl.constexpr,
):
    """One key block of the forward walk; ``k_ptrs``/``v_ptrs`` are what ``_kv_block`` reads."""
    keys = start_n + offs_n
    k, v = _kv_block(k_ptrs, v_ptrs, start_n, keys, offs_d, seqlen, stride_kt, stride_vt, HEAD_DIM, MASKED, TMA)
    z2 = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
    if MASKED:
        if ATTEND_CURRENT:
            valid = keys[None, :] <= offs_m[:, None]
        else:
            valid = keys[None, :] < offs_m[:, None]
        z2 = tl.where(valid, z2, MASKED_LOGIT2)
    sp2, _ = _softplus2(z2, ACCURATE, SCAN)
    # log2 A = log2 beta - (sticks broken by the keys right of it) = z2 - sp2 - suffix - carry.
    # The row offset is subtracted here rather than folded into the scan's accumulator, as the
    # backward does: in this loop the fold saves no instruction and runs slower.
    suffix = _scan_excl(sp2, tri_suffix, SCAN, True, True)
    weights = tl.exp2(z2 - sp2 - suffix - carry.to(tl.float32)[:, None])
    acc = tl.dot(weights.to(v.dtype), v, acc, input_precision=PRECISION)
    # Running log-stick (float64 for float32 inputs): the backward rebuilds it from the left as
    # total - prefix, which needs the total as exact as that prefix.
    carry = carry + _row_sum(sp2, ACCURATE)
    return acc, carry


@triton.jit
def sb_fwd_kernel(
    Q, K, V, O, REM, LOGREM, STOP, CU_SEQLENS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_rb, stride_rh, stride_rt,
    T_dense, total_rows, num_heads, group, num_pairs, sched_pairs, HEAD_DIM: tl.constexpr, scale2, skip_threshold,
    ATTEND_CURRENT: tl.constexpr, IS_VARLEN: tl.constexpr, SKIP: tl.constexpr,
    SKIP_CHECK_TILES: tl.constexpr, SKIP_LEVELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SCAN: tl.constexpr, PRECISION: tl.constexpr, ACCURATE: tl.constexpr,
    TMA: tl.constexpr, STATS: tl.constexpr,
):
    """With TMA == HOST_DESCRIPTORS, K and V are tensor descriptors of the dense (B, H_kv, T, D)
    tensors, else pointers. With STATS, it also stores each row's log-stick (LOGREM) and first
    visited key (STOP), which the backward and the skipped fraction read; inference skips them."""
    pid_b, pid_h, pid_hk, row0, seqlen, start_m = _query_tile(
        CU_SEQLENS, T_dense, num_heads, group, num_pairs, sched_pairs, BLOCK_M, IS_VARLEN
    )
    if start_m >= seqlen:
        return
    q_base = _head_base(Q, row0, pid_b, pid_h, stride_qb, stride_qh, stride_qt, IS_VARLEN)
    o_base = _head_base(O, row0, pid_b, pid_h, stride_ob, stride_oh, stride_ot, IS_VARLEN)
    r_base = _head_base(REM, row0, pid_b, pid_h, stride_rb, stride_rh, stride_rt, IS_VARLEN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0,
    )
    k_ptrs, v_ptrs = _kv_sources(K, V, row0, pid_b, pid_hk, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                                 stride_vt, seqlen, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, IS_VARLEN, TMA)

    tri_suffix = _scan_matrix(BLOCK_N, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    carry = _zero_stick(BLOCK_M, ACCURATE)

    # Key blocks n whose keys are all visible to every row of the tile need no causal mask.
    n_top, n_unmasked_top = _diagonal_blocks(start_m, seqlen, ATTEND_CURRENT, BLOCK_M, BLOCK_N)
    for t in range(0, n_top - n_unmasked_top):
        acc, carry = _fwd_block(
            acc, carry, q, k_ptrs, v_ptrs, (n_top - t) * BLOCK_N, offs_m, offs_n, offs_d, seqlen,
            HEAD_DIM, scale2, stride_kt, stride_vt, tri_suffix, True, ATTEND_CURRENT, BLOCK_N, BLOCK_D, SCAN,
            PRECISION, ACCURATE, TMA,
        )

    n_hi = n_unmasked_top
    if SKIP:
        # Check the stick after SKIP_CHECK_TILES blocks, then after twice as many more, and so
        # on for SKIP_LEVELS checks, then walk the rest. Each stretch is a flat loop of its own
        # (unrolled at compile time, never nested in a dynamic loop), so every one is
        # software-pipelined; its trip count drops to 0 once the stick is used up.
        live = tl.min(tl.where(row_ok, carry.to(tl.float32), float("inf")), 0) <= skip_threshold
        for level in tl.static_range(SKIP_LEVELS + 1):
            if level < SKIP_LEVELS:
                n_lo = tl.maximum(n_hi - (SKIP_CHECK_TILES << level) + 1, 0)
            else:
                n_lo = 0
            trips = tl.where(live, n_hi - n_lo + 1, 0)
            for t in range(0, trips):
                acc, carry = _fwd_block(
                    acc, carry, q, k_ptrs, v_ptrs, (n_hi - t) * BLOCK_N, offs_m, offs_n, offs_d,
                    seqlen, HEAD_DIM, scale2, stride_kt, stride_vt, tri_suffix, False, ATTEND_CURRENT,
                    BLOCK_N, BLOCK_D, SCAN, PRECISION, ACCURATE, TMA,
                )
            n_hi = tl.where(live, n_lo - 1, n_hi)
            live = live & (tl.min(tl.where(row_ok, carry.to(tl.float32), float("inf")), 0) <= skip_threshold)
    else:
        for t in range(0, n_hi + 1):
            acc, carry = _fwd_block(
                acc, carry, q, k_ptrs, v_ptrs, (n_hi - t) * BLOCK_N, offs_m, offs_n, offs_d,
                seqlen, HEAD_DIM, scale2, stride_kt, stride_vt, tri_suffix, False, ATTEND_CURRENT, BLOCK_N,
                BLOCK_D, SCAN, PRECISION, ACCURATE, TMA,
            )
        n_hi = -1
    first_key = (n_hi + 1) * BLOCK_N

    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(r_base + offs_m * stride_rt, tl.exp2(-carry.to(tl.float32)).to(REM.dtype.element_ty), mask=row_ok)
    if STATS:
        aux = pid_h.to(tl.int64) * total_rows + row0 + offs_m
        tl.store(LOGREM + aux, carry, mask=row_ok)
        tl.store(STOP + aux, tl.zeros([BLOCK_M], dtype=tl.int32) + first_key, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward, part 1: dQ, query-major, walking each row's keys from the left
# ---------------------------------------------------------------------------------------------
#
# With R_il = 2^-(sum of sp2 right of l) and P_il = sum_{j <= l} g_ij (keys further from the query):
#
#     dz_il = g_il - beta_il (P_il + drem_i rem_i)
#
# P is accumulated from the left, so no term is a difference of large sums (walking from the
# diagonal would give P as <do, o> - suffix, which cancels catastrophically once the stick is
# used up). The weights need the log-stick right of each block, r_right = total - (sum from the
# left up to the block's right edge): formed per row in float64 for float32 inputs, so it is
# exact to float32 of its own size (in float32 for fp16/bf16 ones, whose weights need less), and
# the weights inside the block then use the block's own suffix sums, as the forward does.


@triton.jit
def _bwd_block_logits(
    q, k, keys, offs_m, stop, scale2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr, PRECISION: tl.constexpr,
    ACCURATE: tl.constexpr, SCAN: tl.constexpr,
):
    """Logits of one block: (z2, softplus2, 2^-|z2|, row sums of softplus2). MASKED: entries
    left of a row's first key (``stop``), and right of its diagonal when CAUSAL, are set to
    MASKED_LOGIT2. Blocks every row sees whole skip that compare and select (two to four
    instructions per score)."""
    z2 = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
    if MASKED:
        valid = keys[None, :] >= stop[:, None]
        if CAUSAL:
            if ATTEND_CURRENT:
                valid = valid & (keys[None, :] <= offs_m[:, None])
            else:
                valid = valid & (keys[None, :] < offs_m[:, None])
        z2 = tl.where(valid, z2, MASKED_LOGIT2)
    sp2, e = _softplus2(z2, ACCURATE, SCAN)
    return z2, sp2, e, _row_sum(sp2, ACCURATE)


@triton.jit
def _bwd_block_weights(
    sp2, log2_beta, r_right, do, v, tri_suffix,
    SCAN: tl.constexpr, PRECISION: tl.constexpr, ACCURATE: tl.constexpr,
):
    """(A, g = A <do, v>) of one block, given per row the sum of sp2 right of it (``r_right``).
    Masked entries (z2 = MASKED_LOGIT2, so log2_beta ~ -1000) come out as A = g = 0 from the
    arithmetic itself."""
    if ACCURATE:
        suffix = _scan_excl(sp2, tri_suffix, SCAN, True, True)
        weights = tl.exp2(log2_beta - suffix - r_right[:, None])
    else:
        weights = tl.exp2(-_scan_excl_onto(r_right[:, None] - log2_beta, sp2, tri_suffix, SCAN, True, True))
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return weights, weights * dp


@triton.jit
def _bwd_block_dz(
    z2, e, log2_beta, g, carry_p, drem_rem, tri_prefix, SCAN: tl.constexpr, ACCURATE: tl.constexpr,
):
    """Logit gradients of one block, given per row P left of it (``carry_p``); 0 where masked.
    A separate step from the weights so that the dK/dV kernel can issue its dV product, and
    free the weights' registers, before the prefix scan (the weights are dead by then)."""
    if ACCURATE:
        p_excl = _scan_excl(g, tri_prefix, SCAN, False, False) + carry_p[:, None]
        # float32 inputs: sigmoid(z) and 1 - sigmoid(z) from e = 2^-|z2| and one reciprocal:
        # 1/(1+e) is the larger of the two, e/(1+e) the smaller, each to a few ulps even where
        # the other rounds to 1; and g - beta (P_incl + drem rem), with P_incl = P_excl + g,
        # regrouped so that no term cancels. float32's budget needs both.
        big = _rcp_1_to_2(1.0 + e)
        small = e * big
        beta = tl.where(z2 >= 0, big, small)
        one_minus_beta = tl.where(z2 >= 0, small, big)
        dz = g * one_minus_beta - beta * (p_excl + drem_rem[:, None])
    else:
        # fp16/bf16 inputs: dz = g - beta (P_incl + drem rem), the running sum formed on the
        # tensor cores on top of its row offsets, and beta = 2^(z2 - sp2) the one
        # special-function op beyond the weights. Where beta ~ 1 and P_excl + drem rem ~ 0 this
        # cancels (g - beta g) to within a float32 ulp of g, 2^-24 |g|: far below the 2^-8 (bf16)
        # or 2^-11 (fp16) relative rounding dz gets on its way into the dK and dQ products. The
        # cancellation-free form, g (1 - beta) - beta (P_excl + drem rem), costs another
        # special-function op (1 - beta = 2^-sp2), an ALU op, and 32 live registers at a 64x64
        # tile, which the dK/dV kernel cannot spare without spilling.
        p_incl = _scan_excl_onto(g + (carry_p + drem_rem)[:, None], g, tri_prefix, SCAN, False, False)
        dz = g - tl.exp2(log2_beta) * p_incl
    return dz


@triton.jit
def _dq_block(
    dq, carry_f, carry_p, q, do, k_ptrs, v_ptrs, stride_kt, stride_vt, n, offs_n, offs_d, offs_m, seqlen, stop,
    total, drem_rem, scale2, row_ok, row_slots, STATE_R, STATE_P, row_hi, last_row, n_top, tri_suffix, tri_prefix,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    BLOCK_N: tl.constexpr, STATE_N: tl.constexpr, STATES_BY_BLOCK: tl.constexpr, SCAN: tl.constexpr,
    PRECISION: tl.constexpr, ACCURATE: tl.constexpr, TMA: tl.constexpr,
):
    """Key block n of the dQ walk. MASKED: some rows start right of the block's first key (their
    ``stop``); CAUSAL: the block reaches the diagonal (and maybe the sequence end). K and V come
    as ``_kv_sources`` gives them."""
    keys = n * BLOCK_N + offs_n
    k, v = _kv_block(k_ptrs, v_ptrs, n * BLOCK_N, keys, offs_d, seqlen, stride_kt, stride_vt, HEAD_DIM, CAUSAL, TMA)
    ns = (n * BLOCK_N) // STATE_N
    has_slot = row_ok & (ns <= offs_m // STATE_N)
    block_part = _state_block_part(ns, seqlen, STATE_N, STATES_BY_BLOCK)
    # P left of a state block is stored at the block's left edge ...
    tl.store(STATE_P + block_part + row_slots, carry_p, mask=has_slot & ((n * BLOCK_N) % STATE_N == 0))
    z2, sp2, e, sp_sum = _bwd_block_logits(
        q, k, keys, offs_m, stop, scale2, MASKED, CAUSAL, ATTEND_CURRENT, PRECISION, ACCURATE, SCAN
    )
    carry_f += sp_sum
    r_right = (total - carry_f).to(tl.float32)
    log2_beta = z2 - sp2
    _, g = _bwd_block_weights(sp2, log2_beta, r_right, do, v, tri_suffix, SCAN, PRECISION, ACCURATE)
    dz = _bwd_block_dz(z2, e, log2_beta, g, carry_p, drem_rem, tri_prefix, SCAN, ACCURATE)
    dq = tl.dot(dz.to(k.dtype), k, dq, input_precision=PRECISION)
    carry_p += tl.sum(g, 1)
    # ... and the stick right of it at its right edge (or where the walk ends).
    at_right_edge = (((n + 1) * BLOCK_N) % STATE_N == 0) | (n == n_top)
    tl.store(STATE_R + block_part + row_slots, r_right, mask=has_slot & at_right_edge)
    # max is order-independent: the result is deterministic whatever the arrival order. Relaxed:
    # only the dK/dV kernel, a launch later, reads it; the default (acq_rel) puts a GPU-wide
    # memory fence before the atomic, in every iteration.
    tl.atomic_max(row_hi + ns, last_row, sem="relaxed")
    return dq, carry_f, carry_p


@triton.jit
def sb_bwd_dq_kernel(
    Q, K, V, DO, DREM, LOGREM, STOP, CU_SEQLENS, CU_STATES,
    DQ, DREM_REM, STATE_R, STATE_P, ROW_HI, MAX_STOP,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_drb, stride_drh, stride_drt,
    stride_dqb, stride_dqh, stride_dqt,
    T_dense, total_rows, state_total, num_heads, group, num_pairs, sched_pairs, HEAD_DIM: tl.constexpr, scale2,
    inv_temp, num_key_blocks, ATTEND_CURRENT: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, STATE_N: tl.constexpr, STATES_BY_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    SCAN: tl.constexpr, PRECISION: tl.constexpr, ACCURATE: tl.constexpr, TMA: tl.constexpr,
):
    # Boundary sums are stored every STATE_N keys (the dK/dV kernel's key tile, a multiple of
    # BLOCK_N): their memory is T^2 / (2 STATE_N) floats, whatever tile suits this kernel.
    pid_b, pid_h, pid_hk, row0, seqlen, start_m = _query_tile(
        CU_SEQLENS, T_dense, num_heads, group, num_pairs, sched_pairs, BLOCK_M, IS_VARLEN
    )
    if start_m >= seqlen:
        return
    q_base = _head_base(Q, row0, pid_b, pid_h, stride_qb, stride_qh, stride_qt, IS_VARLEN)
    do_base = _head_base(DO, row0, pid_b, pid_h, stride_dob, stride_doh, stride_dot, IS_VARLEN)
    dr_base = _head_base(DREM, row0, pid_b, pid_h, stride_drb, stride_drh, stride_drt, IS_VARLEN)
    dq_base = _head_base(DQ, row0, pid_b, pid_h, stride_dqb, stride_dqh, stride_dqt, IS_VARLEN)
    state_base = _state_base(CU_STATES, pid_b, IS_VARLEN)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    md_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=md_mask, other=0.0)
    drem = tl.load(dr_base + offs_m * stride_drt, mask=row_ok, other=0.0).to(tl.float32)
    aux = pid_h.to(tl.int64) * total_rows + row0 + offs_m
    # Sum of sp2 over the visited keys, as the forward summed it (float64 for float32 inputs).
    total = tl.load(LOGREM + aux, mask=row_ok, other=0.0)
    stop = tl.load(STOP + aux, mask=row_ok, other=2147483647)
    drem_rem = drem * tl.exp2(-total.to(tl.float32))
    tl.store(DREM_REM + aux, drem_rem, mask=row_ok)

    # This head's boundary states of this sequence, and each row's part of their offsets.
    row_slots = pid_h.to(tl.int64) * state_total + state_base + _state_row_part(offs_m, STATE_N, STATES_BY_BLOCK)

    n_top, n_unmasked_top = _diagonal_blocks(start_m, seqlen, ATTEND_CURRENT, BLOCK_M, BLOCK_N)
    # Start at a state-block edge (a row's first key need not be one: the forward's key tile
    # may be finer than STATE_N) so the boundary sums of every block a row reaches get stored;
    # keys left of a row's first key are masked out.
    n_bottom = (tl.min(tl.where(row_ok, stop, 2147483647), 0) // STATE_N) * (STATE_N // BLOCK_N)

    k_ptrs, v_ptrs = _kv_sources(K, V, row0, pid_b, pid_hk, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                                 stride_vt, seqlen, offs_n, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D, IS_VARLEN, TMA)
    tri_suffix = _scan_matrix(BLOCK_N, True)
    tri_prefix = _scan_matrix(BLOCK_N, False)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    carry_f = _zero_stick(BLOCK_M, ACCURATE)  # sp2 summed over blocks left of n
    carry_p = tl.zeros([BLOCK_M], dtype=tl.float32)  # g summed over blocks left of n
    pid_bhk = pid_b * (num_heads // group) + pid_hk
    row_hi = ROW_HI + pid_bhk.to(tl.int64) * num_key_blocks
    # The dK/dV kernel drops the first-key compare on key blocks right of every row's first key.
    tile_max_stop = tl.max(tl.where(row_ok, stop, 0), 0)
    tl.atomic_max(MAX_STOP + pid_bhk, tile_max_stop, sem="relaxed")
    last_row = tl.minimum(start_m + BLOCK_M, seqlen) - 1
    # Left of the diagonal, blocks that start left of some row's first key mask those keys;
    # from the first block right of every row's first key on (all of them, unless the forward
    # skipped), nothing is masked.
    n_whole = tl.minimum(tl.cdiv(tile_max_stop, BLOCK_N), n_unmasked_top + 1)
    for n in range(n_bottom, n_whole):
        dq, carry_f, carry_p = _dq_block(
            dq, carry_f, carry_p, q, do, k_ptrs, v_ptrs, stride_kt, stride_vt, n, offs_n, offs_d, offs_m, seqlen,
            stop, total, drem_rem, scale2, row_ok, row_slots, STATE_R, STATE_P, row_hi, last_row, n_top,
            tri_suffix, tri_prefix, True, False, HEAD_DIM, ATTEND_CURRENT, BLOCK_N, STATE_N, STATES_BY_BLOCK, SCAN,
            PRECISION, ACCURATE, TMA,
        )
    for n in range(tl.maximum(n_bottom, n_whole), n_unmasked_top + 1):
        dq, carry_f, carry_p = _dq_block(
            dq, carry_f, carry_p, q, do, k_ptrs, v_ptrs, stride_kt, stride_vt, n, offs_n, offs_d, offs_m, seqlen,
            stop, total, drem_rem, scale2, row_ok, row_slots, STATE_R, STATE_P, row_hi, last_row, n_top,
            tri_suffix, tri_prefix, False, False, HEAD_DIM, ATTEND_CURRENT, BLOCK_N, STATE_N, STATES_BY_BLOCK, SCAN,
            PRECISION, ACCURATE, TMA,
        )
    for n in range(tl.maximum(n_bottom, n_unmasked_top + 1), n_top + 1):
        dq, carry_f, carry_p = _dq_block(
            dq, carry_f, carry_p, q, do, k_ptrs, v_ptrs, stride_kt, stride_vt, n, offs_n, offs_d, offs_m, seqlen,
            stop, total, drem_rem, scale2, row_ok, row_slots, STATE_R, STATE_P, row_hi, last_row, n_top,
            tri_suffix, tri_prefix, True, True, HEAD_DIM, ATTEND_CURRENT, BLOCK_N, STATE_N, STATES_BY_BLOCK, SCAN,
            PRECISION, ACCURATE, TMA,
        )
    dq = dq * inv_temp
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)


# ---------------------------------------------------------------------------------------------
# Backward, part 2: dK and dV, key-major, each block recomputed from its stored boundary sums
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, m, q_head, do_head, aux_head, slot_head, pid_n, start_n, seqlen, offs_mm, offs_n, offs_d,
    stride_qt, stride_dot, STOP, DREM_REM, STATE_R, STATE_P, scale2, tri_suffix, tri_prefix,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STATES_BY_BLOCK: tl.constexpr, SCAN: tl.constexpr,
    PRECISION: tl.constexpr, ACCURATE: tl.constexpr, TMA: tl.constexpr,
):
    """dK and dV of the key block from query tile m of one head. MASKED: some row may start
    right of the block's first key (its ``stop``), or CAUSAL: the tile reaches the diagonal.
    ``q_head`` and ``do_head`` are ``_walked_head``'s sources."""
    offs_m = m * BLOCK_M + offs_mm
    row_ok = offs_m < seqlen
    if TMA:
        q = _described_tile(q_head, m * BLOCK_M, BLOCK_M, offs_d.shape[0], TMA)
        do = _described_tile(do_head, m * BLOCK_M, BLOCK_M, offs_d.shape[0], TMA)
    else:
        md_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_head + offs_m[:, None] * stride_qt + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_head + offs_m[:, None] * stride_dot + offs_d[None, :], mask=md_mask, other=0.0)
    drem_rem = tl.load(DREM_REM + aux_head + offs_m, mask=row_ok, other=0.0)
    if MASKED:
        stop = tl.load(STOP + aux_head + offs_m, mask=row_ok, other=2147483647)
        # Rows before this key block, or whose walk stopped right of it, read nothing: the dQ
        # kernel wrote no boundary sums for them, and uninitialised sums would reach the
        # arithmetic (masked entries are zeroed by it, not selected away).
        seen = row_ok & (offs_m // BLOCK_N >= pid_n) & (stop < start_n + BLOCK_N)
        stop = tl.where(seen, stop, 2147483647)
    else:
        # Every row of the tile walked the whole block: the boundary sums load with the tiles,
        # not one load latency after ``stop``. (Rows past the sequence end load zeros and
        # contribute nothing: their do and drem are zero.)
        seen = row_ok
        stop = offs_m  # unread: no first-key compare without MASKED
    slot = (slot_head + _state_row_part(offs_m, BLOCK_N, STATES_BY_BLOCK)
            + _state_block_part(pid_n, seqlen, BLOCK_N, STATES_BY_BLOCK))
    r_right = tl.load(STATE_R + slot, mask=seen, other=0.0)
    carry_p = tl.load(STATE_P + slot, mask=seen, other=0.0)
    z2, sp2, e, _ = _bwd_block_logits(
        q, k, offs_n, offs_m, stop, scale2, MASKED, CAUSAL, ATTEND_CURRENT, PRECISION, ACCURATE, SCAN
    )
    log2_beta = z2 - sp2
    weights, g = _bwd_block_weights(sp2, log2_beta, r_right, do, v, tri_suffix, SCAN, PRECISION, ACCURATE)
    dv = tl.dot(tl.trans(weights.to(do.dtype)), do, dv, input_precision=PRECISION)
    dz = _bwd_block_dz(z2, e, log2_beta, g, carry_p, drem_rem, tri_prefix, SCAN, ACCURATE)
    dk = tl.dot(tl.trans(dz.to(q.dtype)), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def sb_bwd_dkdv_kernel(
    Q, K, V, DO, STOP, CU_SEQLENS, CU_STATES, DREM_REM, STATE_R, STATE_P, ROW_HI, MAX_STOP,
    DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    T_dense, total_rows, state_total, num_kv_heads, group, num_pairs, sched_pairs, HEAD_DIM: tl.constexpr, scale2,
    inv_temp, num_key_blocks,
    ATTEND_CURRENT: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, STATES_BY_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, SCAN: tl.constexpr,
    PRECISION: tl.constexpr, ACCURATE: tl.constexpr, TMA: tl.constexpr,
):
    # Key block 0 sees every query tile: the most work, launched first.
    pid_n, pid_bhk, _ = _work_order(num_pairs, sched_pairs)
    pid_b = pid_bhk // num_kv_heads
    pid_hk = pid_bhk % num_kv_heads
    row0, seqlen = _seq_bounds(CU_SEQLENS, pid_b, T_dense, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return
    k_base = _head_base(K, row0, pid_b, pid_hk, stride_kb, stride_kh, stride_kt, IS_VARLEN)
    v_base = _head_base(V, row0, pid_b, pid_hk, stride_vb, stride_vh, stride_vt, IS_VARLEN)
    dk_base = _head_base(DK, row0, pid_b, pid_hk, stride_dkb, stride_dkh, stride_dkt, IS_VARLEN)
    dv_base = _head_base(DV, row0, pid_b, pid_hk, stride_dvb, stride_dvh, stride_dvt, IS_VARLEN)
    state_base = _state_base(CU_STATES, pid_b, IS_VARLEN)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_mm = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    nd_mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=nd_mask, other=0.0)
    tri_suffix = _scan_matrix(BLOCK_N, True)
    tri_prefix = _scan_matrix(BLOCK_N, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query tiles that can see this key block: from the one holding its first key (or the next
    # row, without attend_current) to the one holding the last row whose walk reached it.
    m_first = (start_n + 1 - ATTEND_CURRENT) // BLOCK_M
    last_row = tl.load(ROW_HI + pid_bhk.to(tl.int64) * num_key_blocks + pid_n)
    m_last = tl.where(last_row < 0, -1, last_row // BLOCK_M)
    # Tiles on the diagonal need the causal mask. Below it only rows whose walk started inside
    # or right of the block's first key (skipping) mask keys, which a compare on ``stop``
    # covers; the dQ kernel recorded the largest such start, and a block right of it (every
    # block, when nothing was skipped) goes without the compare and select.
    m_below = tl.cdiv(start_n + BLOCK_N - ATTEND_CURRENT, BLOCK_M)
    m_from = tl.maximum(m_first, m_below)
    m_masked_end = tl.where(start_n < tl.load(MAX_STOP + pid_bhk), m_last + 1, m_from)
    # With TMA, a block no query tile reached (block skipping stopped every walk right of it)
    # visits no head: its tile loops would all be empty, but device-made descriptors would still
    # be built, a global write and a fence each, in what is most programs when most keys are
    # skipped. The pointer loads keep the plain loop: with the skip, their T=4096 backward
    # measured 3-4% slower on the H200 (reports/NVIDIA_H200/README.md, Hopper levers).
    if TMA:
        heads_visited = tl.where(m_last >= m_first, group, 0)
    else:
        heads_visited = group
    for hg in range(0, heads_visited):
        pid_h = pid_hk * group + hg
        q_head = _walked_head(Q, row0, pid_b, pid_h, stride_qb, stride_qh, stride_qt, seqlen, HEAD_DIM, BLOCK_M,
                              BLOCK_D, IS_VARLEN, TMA)
        do_head = _walked_head(DO, row0, pid_b, pid_h, stride_dob, stride_doh, stride_dot, seqlen, HEAD_DIM, BLOCK_M,
                               BLOCK_D, IS_VARLEN, TMA)
        aux_head = pid_h.to(tl.int64) * total_rows + row0
        slot_head = pid_h.to(tl.int64) * state_total + state_base
        for m in range(m_first, tl.minimum(m_below, m_last + 1)):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, m, q_head, do_head, aux_head, slot_head, pid_n, start_n, seqlen, offs_mm, offs_n,
                offs_d, stride_qt, stride_dot, STOP, DREM_REM, STATE_R, STATE_P, scale2, tri_suffix, tri_prefix,
                True, True, HEAD_DIM, ATTEND_CURRENT, BLOCK_M, BLOCK_N, STATES_BY_BLOCK, SCAN, PRECISION, ACCURATE,
                TMA,
            )
        for m in range(m_from, m_masked_end):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, m, q_head, do_head, aux_head, slot_head, pid_n, start_n, seqlen, offs_mm, offs_n,
                offs_d, stride_qt, stride_dot, STOP, DREM_REM, STATE_R, STATE_P, scale2, tri_suffix, tri_prefix,
                True, False, HEAD_DIM, ATTEND_CURRENT, BLOCK_M, BLOCK_N, STATES_BY_BLOCK, SCAN, PRECISION, ACCURATE,
                TMA,
            )
        for m in range(m_masked_end, m_last + 1):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, m, q_head, do_head, aux_head, slot_head, pid_n, start_n, seqlen, offs_mm, offs_n,
                offs_d, stride_qt, stride_dot, STOP, DREM_REM, STATE_R, STATE_P, scale2, tri_suffix, tri_prefix,
                False, False, HEAD_DIM, ATTEND_CURRENT, BLOCK_M, BLOCK_N, STATES_BY_BLOCK, SCAN, PRECISION, ACCURATE,
                TMA,
            )
    dk = dk * inv_temp
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)
