"""Where does the forward's time go? One GPU call: a stripped-down copy of the forward kernel
(dense, causal, no skipping) built with parts of the per-tile transform swapped out or removed,
timed beside FlashAttention-2 (SDPA flash) and the production `triton` backend on the same inputs.

Variants that remove work (no softplus, no scan) compute a different function: they only bound
what each part costs. Variants that replace work (polynomial log2, polynomial exp2, a hoisted
scan matrix, a float32 running stick) are compared with the baseline's output so that a faster
variant that is also wrong shows up. Prints a table last; writes $OUT/fwd_ablation.json and the
PTX of two builds for instruction counts.

Usage: python scripts/gpu_fwd_ablation.py
"""

from __future__ import annotations

import json
import math
import os

import torch
import triton
import triton.language as tl

from sbbench.kernels.triton_sb.kernels import _softplus2 as production_softplus2

OUT = os.environ.get("OUT", "/tmp")

# Polynomial exp2 (variant EXPW=1): 2^f on [-0.5, 0.5], degree 4, max relative error 2.7e-6.


@triton.jit
def _softplus2(z2, SP: tl.constexpr):
    if SP == 0:  # what the kernel did before: tl.log2 (a libdevice routine, not MUFU lg2)
        return tl.maximum(z2, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(z2)))
    elif SP == 1:  # the production kernel's degree-6 polynomial (its fp16 arithmetic)
        sp2, _ = production_softplus2(z2, False, 2)
        return sp2
    elif SP == 3:  # its degree-5 polynomial (bf16)
        sp2, _ = production_softplus2(z2, False, 1)
        return sp2
    else:
        return tl.maximum(z2, 0.0)


@triton.jit
def _exp2(x, EXPW: tl.constexpr):
    if EXPW == 0:
        return tl.exp2(x)
    else:
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0  # 1.5 * 2^23: rounds x to the nearest integer in t's low bits
        n = t - 12582912.0
        f = x - n
        p = 0.0095605105 * f + 0.05591704
        p = p * f + 0.24024981
        p = p * f + 0.69312197
        p = p * f + 0.99999917
        bits = p.to(tl.int32, bitcast=True) + ((t.to(tl.int32, bitcast=True) - 0x4B400000) << 23)
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _transform(acc, carry, z, v, start_n, offs_m, offs_n, scale2, tri,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, SP: tl.constexpr, SCAN: tl.constexpr,
               EXPW: tl.constexpr, C64: tl.constexpr, HOIST: tl.constexpr):
    """Everything after the logits z = q k^T (unscaled) of one block."""
    z2 = z * scale2
    sp2 = _softplus2(z2, SP)
    if MASKED:
        valid = (start_n + offs_n)[None, :] < offs_m[:, None]
        sp2 = tl.where(valid, sp2, 0.0)
    logbeta = z2 - sp2
    if SCAN == 0:
        suffix = tl.cumsum(sp2, axis=1, reverse=True) - sp2
    elif SCAN == 4:
        suffix = sp2 * 0.5
    else:
        if HOIST:
            t = tri
        else:
            idx = tl.arange(0, BLOCK_N)
            t = (idx[:, None] > idx[None, :]).to(tl.float16)
        if SCAN == 1:
            x = tl.minimum(tl.maximum(sp2, -30000.0), 30000.0)
        else:
            x = tl.minimum(sp2, 30000.0)
        suffix = tl.dot(x.to(tl.float16), t)
    if C64:
        c = carry.to(tl.float32)
    else:
        c = carry
    w = _exp2(logbeta - suffix - c[:, None], EXPW)
    if MASKED:
        w = tl.where(valid, w, 0.0)
    acc = tl.dot(w.to(v.dtype), v, acc)
    if C64:
        carry = carry + tl.sum(sp2, 1).to(tl.float64)
    else:
        carry = carry + tl.sum(sp2, 1)
    return acc, carry


@triton.jit
def _block(acc, carry, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, scale2, stride_t, tri,
           MASKED: tl.constexpr, BLOCK_N: tl.constexpr, SP: tl.constexpr, SCAN: tl.constexpr,
           EXPW: tl.constexpr, C64: tl.constexpr, HOIST: tl.constexpr):
    k = tl.load(k_ptrs + start_n * stride_t)
    v = tl.load(v_ptrs + start_n * stride_t)
    z = tl.dot(q, tl.trans(k))
    return _transform(acc, carry, z, v, start_n, offs_m, offs_n, scale2, tri, MASKED, BLOCK_N, SP,
                      SCAN, EXPW, C64, HOIST)


@triton.jit
def abl_fwd(Q, K, V, O, T, scale2,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
            SCAN: tl.constexpr, EXPW: tl.constexpr, C64: tl.constexpr, HOIST: tl.constexpr,
            LOOK: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    base = bh * T * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    k_ptrs = K + base + offs_n[:, None] * D + offs_d[None, :]
    v_ptrs = V + base + offs_n[:, None] * D + offs_d[None, :]
    idx = tl.arange(0, BLOCK_N)
    tri = (idx[:, None] > idx[None, :]).to(tl.float16)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if C64:
        carry = tl.zeros([BLOCK_M], dtype=tl.float64)
    else:
        carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    start_m = pid_m * BLOCK_M
    last_key = start_m + BLOCK_M - 2
    n_top = (last_key + BLOCK_N) // BLOCK_N - 1
    n_unmasked_top = start_m // BLOCK_N - 1
    for t in range(0, n_top - n_unmasked_top):
        acc, carry = _block(acc, carry, q, k_ptrs, v_ptrs, (n_top - t) * BLOCK_N, offs_m, offs_n,
                            scale2, D, tri, True, BLOCK_N, SP, SCAN, EXPW, C64, HOIST)
    if LOOK:
        # The next block's logits are issued before this block's transform, so the tensor
        # cores work while the transform runs (one wasted product at the end).
        z_next = tl.dot(q, tl.trans(tl.load(k_ptrs + tl.maximum(n_unmasked_top, 0) * BLOCK_N * D)))
        for t in range(0, n_unmasked_top + 1):
            n = n_unmasked_top - t
            z = z_next
            v = tl.load(v_ptrs + n * BLOCK_N * D)
            z_next = tl.dot(q, tl.trans(tl.load(k_ptrs + tl.maximum(n - 1, 0) * BLOCK_N * D)))
            acc, carry = _transform(acc, carry, z, v, n * BLOCK_N, offs_m, offs_n, scale2, tri, False,
                                    BLOCK_N, SP, SCAN, EXPW, C64, HOIST)
    else:
        for t in range(0, n_unmasked_top + 1):
            acc, carry = _block(acc, carry, q, k_ptrs, v_ptrs, (n_unmasked_top - t) * BLOCK_N, offs_m,
                                offs_n, scale2, D, tri, False, BLOCK_N, SP, SCAN, EXPW, C64, HOIST)
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty))


BASE = dict(SP=0, SCAN=1, EXPW=0, C64=1, HOIST=0, LOOK=0, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
CHEAP = dict(SP=1, SCAN=3, C64=1, HOIST=1)  # what the production kernel does now
LEAN = {**CHEAP, "SP": 3}  # measured first with the scale folded into the softplus too: no gain
VARIANTS = {
    "base": {},
    "cheap": CHEAP,
    "cheap_n32_s3": {**CHEAP, "BLOCK_N": 32, "num_stages": 3},
    "lean": LEAN,
    "lean_maxnreg168": {**LEAN, "maxnreg": 168},
    "lean_n32_s2": {**LEAN, "BLOCK_N": 32},
    "lean_n32_s3": {**LEAN, "BLOCK_N": 32, "num_stages": 3},
    "lean_n32_s4": {**LEAN, "BLOCK_N": 32, "num_stages": 4},
    "lean_m128_n32_w8_s3": {**LEAN, "BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    "lean_look": {**LEAN, "LOOK": 1},
    "lean_look_n32_s3": {**LEAN, "LOOK": 1, "BLOCK_N": 32, "num_stages": 3},
    "no_sp_no_scan": dict(SP=2, SCAN=4),
    "no_sp_no_scan_n32_s3": dict(SP=2, SCAN=4, BLOCK_N=32, num_stages=3),
}


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def profile_backward() -> list[dict]:
    """Per-kernel CUDA time of one production fwd+bwd, and its peak memory, for the default
    dK/dV key tile and for 128 (which halves the boundary sums passed between the two kernels)."""
    from torch.profiler import ProfilerActivity, profile

    from sbbench.harness.cases import Case
    from sbbench.harness.inputs import make_inputs
    from sbbench.kernels.triton_sb import triton_sb_attn

    rows = []
    for B, H, T, D in ((4, 12, 8192, 128), (4, 24, 8192, 64), (4, 24, 16384, 64)):
        x = make_inputs(Case(B, H, H, T, D, "bfloat16"), "dense", device="cuda", requires_grad=True)
        q, k, v = x["q"], x["k"], x["v"]
        do = torch.randn_like(q)
        for over in ({}, {"bwd_dkdv_BLOCK_N": 128}, {"bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_BLOCK_M": 64}):
            def step():
                o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(D), False, config=over)
                torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))
            try:
                step()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                times = {}
                for ev in prof.key_averages():
                    if ev.device_type.name == "CUDA" and ("sb_" in ev.key):
                        times[ev.key] = ev.device_time_total / 3 / 1e3
                rows.append(dict(B=B, H=H, T=T, D=D, config=str(over), peak_mib=peak, **{f"ms_{k}": round(t, 3) for k, t in times.items()}))
            except Exception as exc:
                rows.append(dict(B=B, H=H, T=T, D=D, config=str(over), error=f"{type(exc).__name__}: {exc}"[:300]))
            print(rows[-1], flush=True)
        del q, k, v, do, x
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    from sbbench.harness.cases import Case
    from sbbench.harness.inputs import make_inputs
    from sbbench.kernels.triton_sb import triton_sb_attn

    rows = []
    torch.manual_seed(0)
    for B, H, T, D in ((4, 12, 8192, 128), (4, 24, 8192, 64)):
        scale = 1 / math.sqrt(D)
        x = make_inputs(Case(B, H, H, T, D, "bfloat16"), "dense", device="cuda")
        q, k, v = (x[n].contiguous() for n in "qkv")
        flops = 4 * B * H * T * T * D / 2
        ms = triton.testing.do_bench(lambda: sdpa_flash(q, k, v), warmup=25, rep=100, return_mode="median")
        fa2 = flops / ms / 1e9
        rows.append(dict(D=D, variant="fa2(sdpa)", ms=ms, tflops=fa2, vs_fa2=1.0))
        ms = triton.testing.do_bench(lambda: triton_sb_attn(q, k, v, scale, False), warmup=25, rep=100, return_mode="median")
        rows.append(dict(D=D, variant="production", ms=ms, tflops=flops / ms / 1e9, vs_fa2=flops / ms / 1e9 / fa2))
        ref = None
        for name, over in VARIANTS.items():
            cfg = {**BASE, **over}
            o = torch.empty_like(q)
            grid = (T // cfg["BLOCK_M"], B * H)
            try:
                fn = lambda: abl_fwd[grid](q, k, v, o, T, scale * 1.4426950408889634, D=D, **cfg)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                diff = None
                if name == "base":
                    ref = o.float().clone()
                elif over.get("SP") != 2 and over.get("SCAN") != 4 and ref is not None:
                    diff = (o.float() - ref).abs().max().item()
                rows.append(dict(D=D, variant=name, ms=ms, tflops=flops / ms / 1e9, vs_fa2=flops / ms / 1e9 / fa2, max_diff_vs_base=diff))
            except Exception as exc:  # a variant that fails to build or run is a finding too
                rows.append(dict(D=D, variant=name, error=f"{type(exc).__name__}: {exc}"[:300]))
            print(rows[-1], flush=True)
        # PTX and TTGIR of two builds for instruction counts (ABLATION_ASM=1): the device tool
        # returns at most 8 files, and the JSON must be one of them.
        for name in (("cheap", "lean_look") if os.environ.get("ABLATION_ASM") == "1" else ()):
            cfg = {**BASE, **VARIANTS[name]}
            grid = (T // cfg["BLOCK_M"], B * H)
            h = abl_fwd[grid](q, k, v, torch.empty_like(q), T, scale * 1.4426950408889634, D=D, **cfg)
            for kind in ("ptx", "ttgir"):
                with open(os.path.join(OUT, f"abl_{name}_D{D}.{kind}"), "w") as f:
                    f.write(h.asm[kind])
        del q, k, v
        torch.cuda.empty_cache()
    # The backward's per-kernel profile (ABLATION_BACKWARD=1): a minute more of device time.
    bwd_rows = profile_backward() if os.environ.get("ABLATION_BACKWARD") == "1" else []
    with open(os.path.join(OUT, "fwd_ablation.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": rows, "backward": bwd_rows}, f, indent=1)
    from tabulate import tabulate

    print(tabulate(bwd_rows, headers="keys", floatfmt=".4g"))
    print(tabulate([{k: r.get(k) for k in ("D", "variant", "ms", "tflops", "vs_fa2", "max_diff_vs_base", "error")} for r in rows], headers="keys", floatfmt=".4g"))


if __name__ == "__main__":
    main()
