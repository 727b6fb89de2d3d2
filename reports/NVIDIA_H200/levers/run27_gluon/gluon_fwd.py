"""Lever run 27: the stick-breaking forward written in Gluon for Hopper (experimental).

Same arithmetic as ``kernels.sb_fwd_kernel`` (base-2 logits, polynomial softplus, the in-tile
suffix sum as a product with a 0/1 matrix on the tensor cores), for dense causal bf16/fp16
inputs whose T is a multiple of the tiles, no block skipping. What differs is what Triton's
pipeliner decides for us:

* K/V tiles arrive by TMA into a ring of STAGES buffers, each with an mbarrier; a buffer is
  refilled once the wgmma that read it has completed (``warpgroup_mma_wait``), so no CTA-wide
  ``bar.sync`` is needed per key tile.
* OVERLAP: the next tile's Q K^T is issued before this tile's second half of the transform, so
  the tensor cores work while the warps compute exponentials (FlashAttention-3's intra-warpgroup
  overlap), at the price of a second logits tile in registers.
* OVERLAP=2 (run 31): two tiles per loop iteration, each one's Q K^T, scan and P V running while
  the warps transform the other; nothing in flight across the loop's back edge.
* WS: one producer warp issues the loads and consumers release buffers through mbarriers
  (warp specialisation).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634


@gluon.jit
def _sat_fp16(x):
    return gl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x],
                                     dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _softplus2(z2, SCAN: gl.constexpr):
    e = gl.exp2(-gl.abs(z2))
    if SCAN == 1:
        p = 0.059650947 * e - 0.22711698
        p = p * e + 0.44189614
        p = p * e - 0.71698644
        p = p * e + 1.4426131
    else:
        p = 0.019929474 * e - 0.094360754
        p = p * e + 0.21363747
        p = p * e - 0.33821434
        p = p * e + 0.4774568
        p = p * e - 0.7211405
        p = p * e + 1.4426929
    return gl.maximum(z2, 0.0) + e * p


@gluon.jit
def _issue_scan(sp2, tri_smem, zero_s, sp_layout: gl.constexpr, SCAN: gl.constexpr):
    hi = _sat_fp16(sp2)
    s = warpgroup_mma(gl.convert_layout(hi, sp_layout), tri_smem, zero_s, use_acc=False, is_async=True)
    if SCAN == 2:
        lo = _sat_fp16(sp2 - hi.to(gl.float32))
        s = warpgroup_mma(gl.convert_layout(lo, sp_layout), tri_smem, s, is_async=True)
    return s


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, ready, t, n_top, kv_row0, n_tiles,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, pred=True):
    """Issue the TMA loads of walk step t (key block n_top - t) into its ring slot, if t is a
    step of the walk and ``pred``."""
    # Predicated rather than branched: a branch while a wgmma is in flight makes ptxas
    # serialise every wgmma of the kernel.
    live = (t < n_tiles) & pred
    slot = t % STAGES
    bar = ready.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=live)
    row = kv_row0 + (n_top - t) * BLOCK_N
    tma.async_copy_global_to_shared(k_desc, [row, 0], bar, k_smem.index(slot), pred=live)
    tma.async_copy_global_to_shared(v_desc, [row, 0], bar, v_smem.index(slot), pred=live)


@gluon.jit
def _step(t, acc, carry, z_pending, q_smem, k_smem, v_smem, ready, empty, tri_smem, k_desc, v_desc,
          n_top, kv_row0, n_tiles, start_m, scale2,
          s_layout: gl.constexpr, sp_layout: gl.constexpr, p_layout: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SCAN: gl.constexpr,
          MASKED: gl.constexpr, OVERLAP: gl.constexpr, LOADER: gl.constexpr):
    """One key tile of the walk. No wgmma is in flight on entry or exit: each step waits for its
    P V before it returns (ptxas serialises every wgmma of a kernel whose accumulator stays in
    flight across the loop's back edge). With OVERLAP, z_pending is Q K_t^T, computed while the
    previous step finished."""
    slot = t % STAGES
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if OVERLAP:
        z = z_pending
    else:
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        z = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        z = warpgroup_mma_wait(0, deps=(z,))
    z2 = z * scale2
    if MASKED:
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        keys = (n_top - t) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        z2 = gl.where(keys[None, :] < offs_m[:, None], z2, -1000.0)
    sp2 = _softplus2(z2, SCAN)
    suffix = _issue_scan(sp2, tri_smem, zero_s, sp_layout, SCAN)
    if OVERLAP:
        nxt = t + 1
        nslot = nxt % STAGES
        if nxt < n_tiles:
            mbarrier.wait(ready.index(nslot), (nxt // STAGES) & 1)
        # Issued even past the last tile (on a stale slot, result unused) so that every step
        # enters with the same group in flight.
        z_pending = warpgroup_mma(q_smem, k_smem.index(nslot).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
        row_total = gl.sum(sp2, axis=1)
        suffix = warpgroup_mma_wait(1, deps=(suffix,))
    else:
        row_total = gl.sum(sp2, axis=1)
        suffix = warpgroup_mma_wait(0, deps=(suffix,))
    w = gl.exp2(z2 - sp2 - suffix - carry[:, None])
    carry = carry + row_total
    p = gl.convert_layout(w.to(v_smem.dtype), p_layout)
    acc = warpgroup_mma(p, v_smem.index(slot), acc, is_async=True)
    if OVERLAP:
        acc, z_pending = warpgroup_mma_wait(0, deps=(acc, z_pending))
    else:
        acc = warpgroup_mma_wait(0, deps=(acc,))
    # Tile t's buffers are read: hand the slot to the producer warp, or refill it ourselves.
    if LOADER:
        mbarrier.arrive(empty.index(slot), count=1)
    else:
        _load_kv(k_desc, v_desc, k_smem, v_smem, ready, t + STAGES, n_top, kv_row0, n_tiles, BLOCK_N, STAGES)
    return acc, carry, z_pending


@gluon.jit
def _transform_first(z, scale2, tri_smem, zero_s, sp_layout: gl.constexpr, SCAN: gl.constexpr):
    """The first half of a tile's transform, up to its scan (issued, not waited for)."""
    z2 = z * scale2
    sp2 = _softplus2(z2, SCAN)
    return z2, sp2, _issue_scan(sp2, tri_smem, zero_s, sp_layout, SCAN)


@gluon.jit
def _pair(t, acc, carry, q_smem, k_smem, v_smem, ready, tri_smem, k_desc, v_desc, n_top, kv_row0, n_tiles,
          scale2, s_layout: gl.constexpr, sp_layout: gl.constexpr, p_layout: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SCAN: gl.constexpr):
    """Unmasked tiles t and t + 1, each one's matrix products running while the warps transform
    the other (FlashAttention-3's overlap within a warpgroup, over two tiles). wgmma groups
    retire oldest first, so each wait names how many newer groups stay in flight: a scan is
    SCAN groups (fp16 inputs: a high and a low part). Nothing is in flight on entry or exit: a
    wgmma in flight across the loop's back edge makes ptxas serialise every wgmma."""
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    a_slot = t % STAGES
    b_slot = (t + 1) % STAGES
    mbarrier.wait(ready.index(a_slot), (t // STAGES) & 1)
    za = warpgroup_mma(q_smem, k_smem.index(a_slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.wait(ready.index(b_slot), ((t + 1) // STAGES) & 1)
    zb = warpgroup_mma(q_smem, k_smem.index(b_slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    za = warpgroup_mma_wait(1, deps=(za,))                       # [Q K_b]
    z2a, sp2a, sa = _transform_first(za, scale2, tri_smem, zero_s, sp_layout, SCAN)
    zb = warpgroup_mma_wait(SCAN, deps=(zb,))                    # [scan_a]
    z2b, sp2b, sb = _transform_first(zb, scale2, tri_smem, zero_s, sp_layout, SCAN)
    row_a = gl.sum(sp2a, axis=1)
    row_b = gl.sum(sp2b, axis=1)
    sa = warpgroup_mma_wait(SCAN, deps=(sa,))                    # [scan_b]
    wa = gl.exp2(z2a - sp2a - sa - carry[:, None])
    carry = carry + row_a
    acc = warpgroup_mma(gl.convert_layout(wa.to(v_smem.dtype), p_layout), v_smem.index(a_slot), acc,
                        is_async=True)
    sb = warpgroup_mma_wait(1, deps=(sb,))                       # [P_a V_a]
    wb = gl.exp2(z2b - sp2b - sb - carry[:, None])
    carry = carry + row_b
    acc = warpgroup_mma(gl.convert_layout(wb.to(v_smem.dtype), p_layout), v_smem.index(b_slot), acc,
                        is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    _load_kv(k_desc, v_desc, k_smem, v_smem, ready, t + STAGES, n_top, kv_row0, n_tiles, BLOCK_N, STAGES)
    _load_kv(k_desc, v_desc, k_smem, v_smem, ready, t + 1 + STAGES, n_top, kv_row0, n_tiles, BLOCK_N, STAGES)
    return acc, carry


@gluon.jit
def _walk_pairs(acc, carry, q_smem, k_smem, v_smem, ready, tri_smem, k_desc, v_desc, n_top, kv_row0,
                n_masked, n_tiles, start_m, scale2,
                s_layout: gl.constexpr, sp_layout: gl.constexpr, p_layout: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SCAN: gl.constexpr):
    """The masked tiles, and one more if the rest is odd, one step at a time; the rest two at a
    time (``_pair``)."""
    empty = ready  # unused without the producer warp
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    t0 = n_masked + (n_tiles - n_masked) % 2
    for t in range(0, n_masked):
        acc, carry, _ = _step(t, acc, carry, zero_s, q_smem, k_smem, v_smem, ready, empty, tri_smem, k_desc,
                              v_desc, n_top, kv_row0, n_tiles, start_m, scale2, s_layout, sp_layout, p_layout,
                              BLOCK_M, BLOCK_N, STAGES, SCAN, True, 0, False)
    for t in range(n_masked, t0):
        acc, carry, _ = _step(t, acc, carry, zero_s, q_smem, k_smem, v_smem, ready, empty, tri_smem, k_desc,
                              v_desc, n_top, kv_row0, n_tiles, start_m, scale2, s_layout, sp_layout, p_layout,
                              BLOCK_M, BLOCK_N, STAGES, SCAN, False, 0, False)
    for t in range(t0, n_tiles, 2):
        acc, carry = _pair(t, acc, carry, q_smem, k_smem, v_smem, ready, tri_smem, k_desc, v_desc, n_top, kv_row0,
                           n_tiles, scale2, s_layout, sp_layout, p_layout, BLOCK_M, BLOCK_N, STAGES, SCAN)
    return acc, carry


@gluon.jit
def _consumer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, ready, empty, q_bar, tri_smem, O, LOGREM,
              q_row0, kv_row0, start_m, n_top, n_masked, n_tiles, scale2, stat_row0,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              SCAN: gl.constexpr, OVERLAP: gl.constexpr, LOADER: gl.constexpr, num_warps: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    sp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    carry = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    z_pending = zero_s
    if OVERLAP == 2:
        acc, carry = _walk_pairs(acc, carry, q_smem, k_smem, v_smem, ready, tri_smem, k_desc, v_desc, n_top,
                                 kv_row0, n_masked, n_tiles, start_m, scale2, s_layout, sp_layout, p_layout,
                                 BLOCK_M, BLOCK_N, STAGES, SCAN)
        n_masked = 0
        n_tiles = 0
    elif OVERLAP:
        mbarrier.wait(ready.index(0), 0)
        z_pending = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        z_pending = warpgroup_mma_wait(0, deps=(z_pending,))
    for t in range(0, n_masked):
        acc, carry, z_pending = _step(t, acc, carry, z_pending, q_smem, k_smem, v_smem, ready, empty, tri_smem, k_desc,
                                      v_desc, n_top, kv_row0, n_tiles, start_m, scale2, s_layout, sp_layout,
                                      p_layout, BLOCK_M, BLOCK_N, STAGES, SCAN, True, OVERLAP, LOADER)
    for t in range(n_masked, n_tiles):
        acc, carry, z_pending = _step(t, acc, carry, z_pending, q_smem, k_smem, v_smem, ready, empty, tri_smem, k_desc,
                                      v_desc, n_top, kv_row0, n_tiles, start_m, scale2, s_layout, sp_layout,
                                      p_layout, BLOCK_M, BLOCK_N, STAGES, SCAN, False, OVERLAP, LOADER)

    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    rows = (q_row0 + offs_m).to(gl.int64)
    gl.store(O + rows[:, None] * HEAD_DIM + offs_d[None, :], acc.to(O.dtype.element_ty))
    offs_r = stat_row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(LOGREM + offs_r, carry)


@gluon.jit
def _producer(k_desc, v_desc, k_smem, v_smem, ready, empty, kv_row0, n_top, n_tiles,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    for t in range(0, n_tiles):
        slot = t % STAGES
        mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
        _load_kv(k_desc, v_desc, k_smem, v_smem, ready, t, n_top, kv_row0, n_tiles, BLOCK_N, STAGES)


@gluon.jit
def sb_fwd_gluon_kernel(q_desc, k_desc, v_desc, O, LOGREM, T, num_heads, group, scale2,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, SCAN: gl.constexpr, OVERLAP: gl.constexpr, WS: gl.constexpr,
                        num_warps: gl.constexpr):
    n_q_tiles = T // BLOCK_M
    pid_m = n_q_tiles - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    start_m = pid_m * BLOCK_M
    q_row0 = bh * T + start_m
    kv_row0 = (b * (num_heads // group) + h // group) * T
    # Keys 0 .. start_m + BLOCK_M - 2 (a row never attends to itself); walk from the right.
    n_top = (start_m + BLOCK_M - 2) // BLOCK_N
    n_tiles = n_top + 1
    n_masked = n_top - (start_m // BLOCK_N - 1)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    mbarrier.init(q_bar, count=1)
    if WS:
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
    else:
        # Never read without the producer warp. Not a buffer of its own: Gluon's allocator counts
        # barriers that are only initialised as dead and lays later buffers over them, which a
        # late-landing init can then overwrite (the scan matrix, here).
        empty = ready

    tri_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_N], gl.float16)
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    i_idx = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blocked))
    j_idx = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, blocked))
    tri = (i_idx[:, None] > j_idx[None, :]).to(gl.float16)
    tri_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_N, BLOCK_N], tri_layout, tri)
    fence_async_shared()
    gl.thread_barrier()

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row0, 0], q_bar, q_smem)
    stat_row0 = h * (gl.num_programs(1) // num_heads) * T + b * T + start_m
    if WS:
        gl.warp_specialize([
            (_consumer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, ready, empty, q_bar, tri_smem, O, LOGREM,
                         q_row0, kv_row0, start_m, n_top, n_masked, n_tiles, scale2, stat_row0,
                         HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, SCAN, OVERLAP, True, num_warps)),
            (_producer, (k_desc, v_desc, k_smem, v_smem, ready, empty, kv_row0, n_top, n_tiles, BLOCK_N, STAGES)),
        ], [1], [24])
    else:
        for i in gl.static_range(STAGES):
            _load_kv(k_desc, v_desc, k_smem, v_smem, ready, i, n_top, kv_row0, n_tiles, BLOCK_N, STAGES)
        _consumer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, ready, empty, q_bar, tri_smem, O, LOGREM,
                  q_row0, kv_row0, start_m, n_top, n_masked, n_tiles, scale2, stat_row0,
                  HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, SCAN, OVERLAP, False, num_warps)


def descriptors(q, k, v, block_m, block_n):
    """Host TMA descriptors of (B, H, T, D) contiguous tensors seen as (B*H*T, D) rows."""
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    d = q.shape[-1]
    out = []
    for x, rows in ((q, block_m), (k, block_n), (v, block_n)):
        flat = x.reshape(-1, d)
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], dt)
        out.append(TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, d], layout))
    return out


def sb_fwd_gluon(q, k, v, *, block_m=64, block_n=64, stages=3, overlap=False, ws=False, num_warps=4,
                 maxnreg=None):
    """(o, logrem (heads, B*T) float32) for dense causal (B, H, T, D) inputs, attend_current False."""
    bsz, heads, t, d = q.shape
    if t % block_m or t % block_n:
        raise ValueError(f"q: T={t} must be a multiple of block_m and block_n")
    q, k, v = (x.contiguous() for x in (q, k, v))
    o = torch.empty_like(q)
    logrem = torch.empty((heads, bsz * t), dtype=torch.float32, device=q.device)
    q_desc, k_desc, v_desc = descriptors(q, k, v, block_m, block_n)
    scan = 1 if q.dtype == torch.bfloat16 else 2
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    sb_fwd_gluon_kernel[(t // block_m, bsz * heads)](
        q_desc, k_desc, v_desc, o, logrem, t, heads, heads // k.shape[1], LOG2E / d ** 0.5,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SCAN=scan, OVERLAP=overlap, WS=ws,
        num_warps=num_warps, **extra)
    return o, logrem
