"""Kernel-development probe for one GPU call: correctness of the Triton backend in bf16 against the
float64 oracle, then forward and forward+backward timings of launch-config variants beside
FlashAttention-2 (PyTorch SDPA pinned to FLASH_ATTENTION), in the `dense` regime. Prints a short
table last and writes everything to $OUT/probe.json. Not the benchmark of record: that is
`sbbench bench`; this is for choosing what to tune."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import triton

from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.reference import reference
from sbbench.kernels.triton_sb import DEFAULT_CONFIG, _skipped_fraction, triton_sb_attn

OUT = os.environ.get("OUT", "/tmp")
results: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def check(case: Case, regime: str, config=None):
    x = make_inputs(case, regime, device="cuda", requires_grad=True)
    q, k, v = x["q"], x["k"], x["v"]
    it = 1 / math.sqrt(case.head_dim)
    o, rem = triton_sb_attn(q, k, v, it, case.attend_current, config={**DEFAULT_CONFIG, **(config or {})})
    do, drem = torch.randn_like(o), torch.randn_like(rem)
    g = torch.autograd.grad((o * do).sum() + (rem * drem).sum(), (q, k, v))
    out = {}
    for prec, name in ((torch.float64, "ref64"), (q.dtype, "refpt")):
        qd, kd, vd = (t.detach().to(prec).requires_grad_(True) for t in (q, k, v))
        o2, rem2 = reference(qd, kd, vd, it, case.attend_current)
        g2 = torch.autograd.grad((o2 * do.to(prec)).sum() + (rem2 * drem.to(prec)).sum(), (qd, kd, vd))
        out[name] = (o2.detach(), rem2.detach(), *g2)
        del qd, kd, vd, o2, rem2, g2
    row = {}
    for i, tname in enumerate(("o", "rem", "dq", "dk", "dv")):
        mine = (o, rem, *g)[i].double()
        ref = out["ref64"][i].double()
        pt = out["refpt"][i].double()
        err = (mine - ref).abs().max().item()
        err_pt = (pt - ref).abs().max().item()
        row[tname] = (err, err_pt, bool(torch.isfinite(mine).all()))
    return row


def bench(fn, grad=False):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_case(B, H, T, D, regime, cfg, modes=("fwd", "fwdbwd")):
    case = Case(B, H, H, T, D, "bfloat16")
    x = make_inputs(case, regime, device="cuda", requires_grad=True)
    q, k, v = x["q"], x["k"], x["v"]
    it = 1 / math.sqrt(D)
    res = {}
    flops = 4 * B * H * T * T * D / 2
    config = {**DEFAULT_CONFIG, **cfg}
    try:
        if "fwd" in modes:
            ms = bench(lambda: triton_sb_attn(q, k, v, it, False, config=config))
            res["fwd"] = flops / ms / 1e9
        if "fwdbwd" in modes:
            do = torch.randn_like(q)

            def fb():
                o, rem = triton_sb_attn(q, k, v, it, False, config=config)
                torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

            ms = bench(fb)
            res["fwdbwd"] = 3.5 * flops / ms / 1e9
        res["skipped"] = _skipped_fraction(q, k, v, it, False, config=config)
    except Exception as exc:  # a config that fails is a row, not the end of the probe
        res["error"] = repr(exc)[:200]
    q.grad = k.grad = v.grad = None
    return res


def time_fa2(B, H, T, D):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flops = 4 * B * H * T * T * D / 2
    fwd = flops / bench(lambda: sdpa_flash(q, k, v)) / 1e9
    do = torch.randn_like(q)
    fb = 3.5 * flops / bench(lambda: sdpa_flash(q, k, v).backward(do)) / 1e9
    return {"fwd": fwd, "fwdbwd": fb}


def peak_mem(fn, base_tensors):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def kernel_split(B, H, T, D, cfg=None):
    """CUDA time per kernel (ms) of one fwd+bwd, default config, from the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    case = Case(B, H, H, T, D, "bfloat16")
    x = make_inputs(case, "dense", device="cuda", requires_grad=True)
    q, k, v = x["q"], x["k"], x["v"]
    do = torch.randn_like(q)

    def step():
        o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(D), False, config={**DEFAULT_CONFIG, **(cfg or {})})
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    return {ev.key.replace("sb_", "").replace("_kernel", ""): round(ev.device_time_total / 3e3, 3)
            for ev in prof.key_averages() if ev.device_type.name == "CUDA" and "sb_" in ev.key}


def main():
    t0 = time.time()
    # 1. correctness, bf16, all regimes
    checks = {}
    for regime in ("dense", "randn", "mixed", "peaked"):
        for T, D, ac in ((1000, 128, False), (2048, 64, True)):
            checks[f"{regime} T={T} D={D} ac={ac}"] = check(Case(1, 2, 2, T, D, "bfloat16", ac), regime)
    results["checks"] = checks
    print("checks done %.0fs" % (time.time() - t0), flush=True)
    for name, row in checks.items():
        print(name, " ".join(f"{t}:{e:.1e}/{p:.1e}{'' if fin else ' NaN!'}" for t, (e, p, fin) in row.items()))
    sys.stdout.flush()

    # 2. launch-config variants at T=8192, dense, D=128 (H=12) and D=64 (H=24)
    fwd_variants = [
        {}, {"fwd_BLOCK_N": 32}, {"fwd_BLOCK_N": 32, "fwd_num_stages": 3}, {"fwd_num_stages": 3},
        {"fwd_BLOCK_M": 128, "fwd_num_warps": 8}, {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 32, "fwd_num_warps": 8},
    ]
    bwd_variants = [
        {}, {"bwd_BLOCK_N": 64}, {"bwd_BLOCK_M": 128, "bwd_num_warps": 8},
        {"bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_num_warps": 8},
        {"bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_BLOCK_M": 64, "bwd_dkdv_num_warps": 8},
        {"bwd_dkdv_BLOCK_M": 64}, {"bwd_dkdv_num_stages": 2},
    ]
    table = []
    for B, H, D in ((4, 12, 128), (4, 24, 64)):
        T = 8192
        fa = time_fa2(B, H, T, D)
        results[f"fa2_D{D}"] = fa
        table.append((f"fa2 D{D}", "-", fa["fwd"], fa["fwdbwd"], ""))
        for cfg in fwd_variants:
            r = time_case(B, H, T, D, "dense", cfg, modes=("fwd",))
            results.setdefault("fwd_variants", []).append((D, cfg, r))
            table.append((f"fwd D{D}", json.dumps(cfg), r.get("fwd", 0), r.get("fwd", 0) / fa["fwd"], r.get("error", "")))
            print(table[-1], flush=True)
        for cfg in bwd_variants:
            r = time_case(B, H, T, D, "dense", cfg, modes=("fwdbwd",))
            results.setdefault("bwd_variants", []).append((D, cfg, r))
            table.append((f"f+b D{D}", json.dumps(cfg), r.get("fwdbwd", 0), r.get("fwdbwd", 0) / fa["fwdbwd"], r.get("error", "")))
            print(table[-1], flush=True)
        results.setdefault("kernel_ms", {})[D] = kernel_split(B, H, T, D)
        table.append((f"ms D{D}", json.dumps(results["kernel_ms"][D]), 0, 0, "per kernel, default config"))
    # 3. peak memory at T=16384, D=64 H=24, for the dK/dV key tiles
    B, H, T, D = 4, 24, 16384, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    q.grad = k.grad = v.grad = None
    m_fa = peak_mem(lambda: sdpa_flash(q, k, v).backward(do), (q, k, v))
    table.append(("mem16k D64", "fa2", m_fa, 1.0, "MiB"))
    for cfg in ({}, {"bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_num_warps": 8}):
        def sb_fb():
            o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(D), False, config={**DEFAULT_CONFIG, **cfg})
            torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

        q.grad = k.grad = v.grad = None
        m_sb = peak_mem(sb_fb, (q, k, v))
        results.setdefault("mem16k_d64_mib", []).append((cfg, m_sb, m_fa))
        table.append(("mem16k D64", json.dumps(cfg), m_sb, m_sb / m_fa, "MiB"))
    with open(os.path.join(OUT, "probe.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print("total %.0fs" % (time.time() - t0))
    print(f"{'what':11} {'config':78} {'TF/s|MiB':>9} {'vs fa2':>7}")
    for what, cfg, f1, f2, note in table:
        print(f"{what:11} {cfg:78} {f1:9.1f} {f2:7.3f} {note}")


if __name__ == "__main__":
    main()
