"""Decoding from a KV cache in Triton: a split-KV kernel and the ordered merge of its splits.

Each program takes one (sequence, kv head, row tile) and one split of that sequence's keys. Its
rows are the query rows of all the query heads that read the kv head (GQA: a group of H/H_kv
heads times Tq queries), so each kv head's keys and values are read once for the whole group.
Inside its split a program walks key blocks from the nearest leftwards with a fresh stick, as the
training kernel walks a tile (``kernels._fwd_block``, reused as is: a query at position p of the
sequence is the training kernel's row p), and leaves per row a partial output o_s (float32) and
its log2-stick ``sum softplus2`` over the keys it visited. The merge kernel then combines the
splits nearest first::

    o = o_near + rem_near * o_far          log2 1/rem = log2 1/rem_near + log2 1/rem_far

With one split the split kernel writes o and rem itself and no merge runs.

Why the group's rows go through ``tl.dot`` padded to 16 rows (BLOCK_M >= 16): decode is bound by
reading K and V, and the products are free beside that on the tensor cores even when 3/4 of the
rows are padding (4 rows of a GQA group at Tq = 1). The alternative, broadcast-multiply-reduce on
the CUDA cores, holds a rows x keys x D product in registers (4 x 64 x 128 floats over 128
threads: 256 registers each) or walks D in slices with shuffles per slice; both cost more
instructions per byte read than the padded dot, and Triton pipelines the dot's operand loads
(cp.async / TMA) across ``num_stages`` blocks, which is what keeps enough bytes in flight.

Block skipping (docs/design.md sections 3 and 9), in two ways that keep the result deterministic:

- Within a split: once every row's own stick is below 2^skip_log2, the split stops walking left
  (checked after ``skip_check_keys`` keys, one block more in odd splits, then after twice as
  many more, and so on, ``skip_checks`` times, each stretch a flat loop that Triton
  software-pipelines).
- Across splits: at the same checks a split publishes the smallest log2-stick of its rows so far
  and uses what the nearer splits of its sequence had published when the stretch began (read
  then, so the read overlaps the stretch). Those are lower bounds of the nearer splits' totals,
  so once their sum passes -skip_log2 + 1, the merge is certain to drop this split (it drops a
  split once the stick of the nearer ones is below 2^skip_log2 for a row), and the split stops.
  Which splits stop early depends on timing; the splits the merge keeps never stopped for that
  reason, so the output does not. This needs a launch of more than one wave of programs (the
  nearer splits end before the farther ones start): in one wave every split starts together and
  its first check comes before any nearer split has published, so a one-wave launch skips
  within splits only, and saves zeroing the board and reading it.

The dropped weights stay in the stick: o and rem are off by at most 2^skip_log2 (times max |v|).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch
import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sbbench.kernels.triton_sb.kernels import NATIVE_ASM, _fwd_block, _scan_matrix, _zero_stick
from sbbench.kernels.triton_sb.op import LOG2E, _block_d, _kernel_flags, _last_dim_contiguous
from sbbench.kernels.triton_sb.params import SKIP_OFF

# Order of the launch parameters in the int list the custom op takes.
DECODE_FIELDS = (
    "num_splits", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "skip_log2", "skip_check_keys", "skip_checks",
)
# The merge reads splits x rows x D floats, a few percent of the cache's bytes: its programs
# hold one (splits, rows, D) tile of at most MERGE_TILE floats (64 registers a thread with 4
# warps) and at most MERGE_ROWS rows.
MERGE_ROWS = 16
MERGE_TILE = 8192
# Splits beyond this read so few keys each that the merge costs more than they gain.
MAX_SPLITS = 64
# Programs per SM that auto splitting aims to keep resident: a 64-key tile of bf16 K and V with
# 3 stages takes ~100 KB of shared memory, so two fit on an SM of 228 KB.
PROGRAMS_PER_SM = 2
# Auto splitting gives each split at least this many key blocks, so that a split's pipeline
# fill and its share of the merge stay small beside its reads.
MIN_BLOCKS_PER_SPLIT = 4
# A CPU (the interpreter) has no SMs; auto splitting then plans for this many so that the CPU
# tests run the split and merge path by default.
INTERPRETER_SMS = 4


@triton.jit
def _nearer_published(PUBLISHED, pub_row, split, num_splits, SPLITS_P2: tl.constexpr):
    """What the splits nearer than ``split`` have published, one entry per split (0 for the
    others); their sum is a lower bound of the stick they use up. Volatile: other programs write
    it while this one runs. Summed where it is used, so that a read issued before a stretch of
    blocks is waited on only after it."""
    offs = tl.arange(0, SPLITS_P2)
    return tl.load(PUBLISHED + pub_row + offs, mask=(offs > split) & (offs < num_splits), other=0.0, volatile=True)


@triton.jit
def _launch_merge_early():
    if NATIVE_ASM:
        gdc_launch_dependents()


@triton.jit
def _wait_for_splits():
    """The merge is launched as a programmatic dependent of the split kernel: it may start
    before the splits end, and this waits until they have, with their writes visible."""
    if NATIVE_ASM:
        gdc_wait()


@triton.jit
def sb_decode_split_kernel(
    Q, K, V, SEQLENS, O, REM, O_PART, LR_PART, PUBLISHED, SKIPPED,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_rb, stride_rh, stride_rt,
    batch, num_heads, num_kv_heads, group, new_tokens, row_tiles, num_splits,
    HEAD_DIM: tl.constexpr, scale2, skip_threshold,
    ATTEND_CURRENT: tl.constexpr, SPLIT: tl.constexpr, SKIP: tl.constexpr, SKIP_CHECK_BLOCKS: tl.constexpr,
    SKIP_LEVELS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SCAN: tl.constexpr, PRECISION: tl.constexpr, ACCURATE: tl.constexpr,
    PUBLISH: tl.constexpr,
):
    tile = tl.program_id(0)
    # Axis 1 counts from the nearest split, so the nearest splits of every tile start first.
    split = num_splits - 1 - tl.program_id(1)
    if SPLIT:
        # Lets the merge launch into SMs this grid leaves free; it waits for this grid to end.
        _launch_merge_early()
    b = tile // (num_kv_heads * row_tiles)
    hk = (tile // row_tiles) % num_kv_heads
    mt = tile % row_tiles
    cached = tl.load(SEQLENS + b)
    # Keys [0, context) are read by the last query; each split takes a run of whole blocks.
    context = cached + new_tokens - 1 + ATTEND_CURRENT
    n_blocks = tl.cdiv(context, BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_lo = split * per_split
    blk_hi = tl.minimum(blk_lo + per_split, n_blocks)

    # Row r of the tile is query t of head hk * group + g, with r = g * Tq + t.
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * new_tokens
    g = rows // new_tokens
    t = rows - g * new_tokens
    head = hk * group + g
    position = cached + t  # the query's position: the training kernel's row index
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None] & d_ok, other=0.0,
    )
    k_ptrs = K + b64 * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    tri_suffix = _scan_matrix(BLOCK_N, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    carry = _zero_stick(BLOCK_M, ACCURATE)

    # Blocks from (cached + ATTEND_CURRENT) // BLOCK_N on hold keys that some row must not see
    # (a later query's own position) or that lie past the context: those need the masks.
    first_masked = (cached + ATTEND_CURRENT) // BLOCK_N
    n_masked = tl.maximum(blk_hi - tl.maximum(blk_lo, first_masked), 0)
    for i in range(0, n_masked):
        acc, carry = _fwd_block(
            acc, carry, q, k_ptrs, v_ptrs, (blk_hi - 1 - i) * BLOCK_N, position, offs_n, offs_d, context,
            HEAD_DIM, scale2, stride_kt, stride_vt, tri_suffix, True, ATTEND_CURRENT, BLOCK_N, BLOCK_D, SCAN,
            PRECISION, ACCURATE, False,
        )
    blk = blk_hi - 1 - n_masked  # the next block to visit, walking left

    if SKIP:
        pub_row = tile * num_splits
        live = context >= 0
        # Odd splits check one block later than even ones: in one wave of programs (B=1) every
        # check drains a pipeline, and staggered, half the programs keep the memory busy while
        # the other half refill.
        first_check = SKIP_CHECK_BLOCKS + split % 2
        if PUBLISH:
            # Read a stretch ahead of the check that uses it, so that the read overlaps the
            # stretch's loads: a published stick only grows, so the earlier value is still a
            # lower bound of the nearer splits' totals.
            seen = _nearer_published(PUBLISHED, pub_row, split, num_splits, SPLITS_P2)
        for level in tl.static_range(SKIP_LEVELS + 1):
            if level < SKIP_LEVELS:
                lo = tl.maximum(blk - (first_check << level) + 1, blk_lo)
            else:
                lo = blk_lo
            trips = tl.where(live, blk - lo + 1, 0)
            for i in range(0, trips):
                acc, carry = _fwd_block(
                    acc, carry, q, k_ptrs, v_ptrs, (blk - i) * BLOCK_N, position, offs_n, offs_d, context,
                    HEAD_DIM, scale2, stride_kt, stride_vt, tri_suffix, False, ATTEND_CURRENT, BLOCK_N,
                    BLOCK_D, SCAN, PRECISION, ACCURATE, False,
                )
            blk = tl.where(live, lo - 1, blk)
            if level < SKIP_LEVELS:
                own = tl.min(tl.where(row_ok, carry.to(tl.float32), float("inf")), 0)
                live = live & (own <= skip_threshold)
                if PUBLISH:
                    # The margin of one (a factor 2) keeps rounding from letting the merge keep a
                    # split this drops.
                    live = live & (tl.sum(seen, 0) <= skip_threshold + 1.0)
                    tl.store(PUBLISHED + pub_row + split, own)
                    seen = _nearer_published(PUBLISHED, pub_row, split, num_splits, SPLITS_P2)
    else:
        for i in range(0, blk - blk_lo + 1):
            acc, carry = _fwd_block(
                acc, carry, q, k_ptrs, v_ptrs, (blk - i) * BLOCK_N, position, offs_n, offs_d, context,
                HEAD_DIM, scale2, stride_kt, stride_vt, tri_suffix, False, ATTEND_CURRENT, BLOCK_N,
                BLOCK_D, SCAN, PRECISION, ACCURATE, False,
            )
        blk = blk_lo - 1
    # Keys of this split left unread (whole blocks: the masked ones are always read).
    tl.store(SKIPPED + tile * num_splits + split, tl.maximum(blk + 1 - blk_lo, 0) * BLOCK_N)

    out_mask = row_ok[:, None] & d_ok
    if SPLIT:
        part = ((split * batch + b64) * num_heads + head) * new_tokens + t
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(LR_PART + part, carry, mask=row_ok)
    else:
        tl.store(
            O + b64 * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
            acc.to(O.dtype.element_ty), mask=out_mask,
        )
        tl.store(
            REM + b64 * stride_rb + head * stride_rh + t * stride_rt,
            tl.exp2(-carry.to(tl.float32)).to(REM.dtype.element_ty), mask=row_ok,
        )


@triton.jit
def sb_decode_merge_kernel(
    O_PART, LR_PART, O, REM,
    stride_ob, stride_oh, stride_ot,
    stride_rb, stride_rh, stride_rt,
    total_rows, num_heads, new_tokens, num_splits,
    HEAD_DIM: tl.constexpr, skip_threshold,
    SKIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_P2: tl.constexpr,
    ACCURATE: tl.constexpr,
):
    """Splits merged nearest first, per row of the (B, H, Tq) row space, all splits of a row at
    once: split s is weighted by the stick the splits nearer than it left, a suffix sum of the
    log2-sticks. A loop over splits would wait on each split's loads in turn (its mask depends
    on the stick so far), one memory round trip per split. A row drops a split once the stick of
    the nearer ones is below 2^skip_log2, exactly where the split kernel may have stopped it.
    A dropped split's partial output is not loaded: it need not be finite (a split beyond a
    used-up stick can leave NaN there, and 0 * NaN would reach o), so that load waits on the
    sticks' load, a second memory round trip."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < total_rows
    _wait_for_splits()
    b = rows // (num_heads * new_tokens)
    head = (rows // new_tokens) % num_heads
    t = rows % new_tokens
    offs_d = tl.arange(0, BLOCK_D)
    splits = tl.arange(0, SPLITS_P2)
    part = splits[:, None].to(tl.int64) * total_rows + rows[None, :]  # (splits, rows)
    written = (splits[:, None] < num_splits) & row_ok[None, :]
    lr = tl.load(LR_PART + part, mask=written, other=0.0)
    if not ACCURATE:
        lr = lr.to(tl.float32)
    # Split num_splits - 1 is the nearest: what the nearer splits left is a reverse suffix sum.
    nearer = tl.cumsum(lr, axis=0, reverse=True) - lr
    use = written & (nearer <= skip_threshold) if SKIP else written
    weight = tl.where(use, tl.exp2(-nearer.to(tl.float32)), 0.0)
    o_mask = use[:, :, None] & (offs_d[None, None, :] < HEAD_DIM)
    o = tl.load(O_PART + part[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=o_mask, other=0.0)
    acc = tl.sum(weight[:, :, None] * o, axis=0)
    stick = tl.sum(tl.where(use, lr, 0.0), axis=0)
    b64 = b.to(tl.int64)
    tl.store(
        O + b64[:, None] * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :],
        acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
    )
    tl.store(
        REM + b64 * stride_rb + head * stride_rh + t * stride_rt,
        tl.exp2(-stick.to(tl.float32)).to(REM.dtype.element_ty), mask=row_ok,
    )


def merge_rows(splits_p2: int, block_d: int) -> int:
    """Rows per merge program: its (splits, rows, D) float32 tile stays within
    ``MERGE_TILE`` elements (registers), and at most ``MERGE_ROWS`` rows."""
    return max(1, min(MERGE_ROWS, MERGE_TILE // (splits_p2 * block_d)))


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


def decode_config_to_list(config: Mapping[str, Any]) -> list[int]:
    values = []
    for name in DECODE_FIELDS:
        value = config[name]
        if name == "skip_log2" and value is None:
            value = SKIP_OFF
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config: {name} must be an int, got {value!r}")
        values.append(int(value))
    return values


def _check_decode_launch(f: Mapping[str, int]) -> None:
    for name in ("BLOCK_M", "BLOCK_N"):
        if f[name] < 16 or f[name] & (f[name] - 1):
            raise ValueError(f"config: {name} must be a power of two >= 16 (tl.dot tiles), got {f[name]}")
    if not 0 <= f["num_splits"] <= MAX_SPLITS:
        raise ValueError(f"config: num_splits must be 0 (auto) or 1..{MAX_SPLITS}, got {f['num_splits']}")
    if f["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"config: num_warps must be 1, 2, 4, 8 or 16, got {f['num_warps']}")
    if f["num_stages"] < 1:
        raise ValueError(f"config: num_stages must be at least 1, got {f['num_stages']}")
    if f["skip_check_keys"] < 1:
        raise ValueError(f"config: skip_check_keys must be positive, got {f['skip_check_keys']}")
    if not 0 <= f["skip_checks"] <= 8:
        raise ValueError(f"config: skip_checks must be 0..8, got {f['skip_checks']}")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else INTERPRETER_SMS


def auto_splits(tiles: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Splits per (sequence, kv head, row tile) that fill one wave of resident programs
    (``PROGRAMS_PER_SM`` per SM), each split keeping at least ``MIN_BLOCKS_PER_SPLIT`` blocks of
    the cache's capacity. Without a host sync the kernel cannot know the longest context, so the
    capacity (S_max) stands in for it; each sequence still divides its own keys evenly. The
    count is then lowered to the number of splits that get blocks: 33 splits of 512 blocks take
    16 each and leave the 33rd empty, a program that reads nothing and a merge tile padded from
    32 splits to 64."""
    blocks = triton.cdiv(capacity, block_n)
    most = max(1, min(MAX_SPLITS, blocks // MIN_BLOCKS_PER_SPLIT))
    splits = max(1, min(most, _sms(device) * PROGRAMS_PER_SM // max(tiles, 1)))
    return triton.cdiv(blocks, triton.cdiv(blocks, splits))


def decode_plan(q: torch.Tensor, k_cache: torch.Tensor, f: Mapping[str, int]) -> dict[str, int]:
    """Row tile, number of row tiles, programs per split and splits of one launch."""
    batch, heads, new_tokens, _ = q.shape
    kv_heads = k_cache.shape[1]
    rows = heads // kv_heads * new_tokens
    block_m = min(f["BLOCK_M"], max(16, triton.next_power_of_2(rows)))
    row_tiles = triton.cdiv(rows, block_m)
    tiles = batch * kv_heads * row_tiles
    splits = f["num_splits"] or auto_splits(tiles, k_cache.shape[2], f["BLOCK_N"], q.device)
    return {"BLOCK_M": block_m, "row_tiles": row_tiles, "tiles": tiles, "num_splits": splits}


@torch.library.custom_op("sbbench::triton_sb_decode", mutates_args=())
def triton_sb_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    inv_temp: float, attend_current: bool, cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, rem, keys left unread per (tile, split)) of one decode call."""
    f = dict(zip(DECODE_FIELDS, cfg))
    _check_decode_launch(f)
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    batch, heads, new_tokens, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    plan = decode_plan(q, k_cache, f)
    splits, tiles = plan["num_splits"], plan["tiles"]
    skip = f["skip_log2"] > SKIP_OFF
    threshold = float(-f["skip_log2"]) if skip else 0.0
    split = splits > 1
    publish = skip and split and tiles * splits > _sms(q.device) * PROGRAMS_PER_SM
    flags = _kernel_flags(q.dtype, "dot")
    accurate = flags["ACCURATE"]
    stick_dtype = torch.float64 if accurate else torch.float32

    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rem = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)
    skipped = torch.empty((tiles, splits), dtype=torch.int32, device=q.device)
    if split:
        o_part = torch.empty((splits, batch, heads, new_tokens, head_dim), dtype=torch.float32, device=q.device)
        lr_part = torch.empty((splits, batch, heads, new_tokens), dtype=stick_dtype, device=q.device)
        # Read before it is written by programs that start before the nearer splits publish.
        published = torch.zeros((tiles, splits), dtype=torch.float32, device=q.device) if publish else skipped
    else:
        o_part, lr_part, published = o, rem, skipped  # unused: the kernel writes o and rem itself
    sb_decode_split_kernel[(tiles, splits)](
        q, k_cache, v_cache, cache_seqlens, o, rem, o_part, lr_part, published, skipped,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        rem.stride(0), rem.stride(1), rem.stride(2),
        batch, heads, kv_heads, heads // kv_heads, new_tokens, plan["row_tiles"], splits,
        head_dim, inv_temp * LOG2E, threshold,
        ATTEND_CURRENT=int(attend_current), SPLIT=split, SKIP=skip,
        SKIP_CHECK_BLOCKS=max(1, f["skip_check_keys"] // f["BLOCK_N"]), SKIP_LEVELS=f["skip_checks"] if skip else 0,
        SPLITS_P2=triton.next_power_of_2(splits), BLOCK_M=plan["BLOCK_M"], BLOCK_N=f["BLOCK_N"],
        BLOCK_D=_block_d(head_dim), **flags, num_warps=f["num_warps"], num_stages=f["num_stages"],
        PUBLISH=publish,
    )
    if split:
        total_rows = batch * heads * new_tokens
        splits_p2, block_d = triton.next_power_of_2(splits), _block_d(head_dim)
        block_r = merge_rows(splits_p2, block_d)
        sb_decode_merge_kernel[(triton.cdiv(total_rows, block_r),)](
            o_part, lr_part, o, rem,
            o.stride(0), o.stride(1), o.stride(2),
            rem.stride(0), rem.stride(1), rem.stride(2),
            total_rows, heads, new_tokens, splits, head_dim, threshold,
            SKIP=skip, BLOCK_R=block_r, BLOCK_D=block_d, SPLITS_P2=splits_p2, ACCURATE=accurate, num_warps=4,
            launch_pdl=q.device.type == "cuda",
        )
    return o, rem, skipped


@triton_sb_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, inv_temp, attend_current, cfg):
    f = dict(zip(DECODE_FIELDS, cfg))
    plan = decode_plan(q, k_cache, f)
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape[:-1]),
        q.new_empty((plan["tiles"], plan["num_splits"]), dtype=torch.int32),
    )


def skipped_fraction_of(skipped: torch.Tensor, cache_seqlens: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                        attend_current: bool) -> float:
    """Fraction of the keys (over every sequence, kv head and row tile) the split kernel left
    unread, from its per-(tile, split) counts."""
    new_tokens = q.shape[2]
    per_sequence = (cache_seqlens.long() + new_tokens - 1 + int(attend_current)).sum()
    tiles_per_sequence = skipped.shape[0] // q.shape[0]
    total = float(per_sequence) * tiles_per_sequence
    return float(skipped.long().sum()) / total if total > 0 else 0.0
