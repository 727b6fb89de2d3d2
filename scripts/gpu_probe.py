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

    # 2. timing variants at T=8192, D=128, dense
    fwd_variants = [
        {"skip_checks": 1}, {"skip_checks": 2}, {"skip_checks": 3}, {"skip_checks": 5}, {"skip_log2": None},
        {"skip_checks": 1, "fwd_num_stages": 3}, {"skip_checks": 1, "fwd_num_stages": 1}, {"skip_checks": 1, "fwd_BLOCK_N": 32},
    ]
    bwd_variants = [
        {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 64}, {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 32},
        {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_BLOCK_M": 32},
        {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_BLOCK_M": 32, "bwd_dkdv_num_warps": 8},
        {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 128, "bwd_dkdv_BLOCK_M": 32, "bwd_dkdv_num_warps": 8},
        {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 64, "bwd_dkdv_BLOCK_M": 16},
        {"bwd_BLOCK_N": 32, "bwd_BLOCK_M": 128, "bwd_num_warps": 8, "bwd_dkdv_BLOCK_N": 64},
        {"bwd_BLOCK_N": 16, "bwd_dkdv_BLOCK_N": 32},
    ]
    B, H, T, D = 4, 12, 8192, 128
    fa = time_fa2(B, H, T, D)
    results["fa2_8192"] = fa
    table = [("fa2", "-", fa["fwd"], fa["fwdbwd"], "")]
    results["fwd_variants"] = []
    for cfg in fwd_variants:
        r = time_case(B, H, T, D, "dense", cfg, modes=("fwd",))
        results["fwd_variants"].append((cfg, r))
        table.append(("fwd", json.dumps(cfg), r.get("fwd", 0), 0, r.get("error", "")))
        print(table[-1], flush=True)
    results["bwd_variants"] = []
    for cfg in bwd_variants:
        r = time_case(B, H, T, D, "dense", cfg, modes=("fwdbwd",))
        results["bwd_variants"].append((cfg, r))
        table.append(("bwd", json.dumps(cfg), 0, r.get("fwdbwd", 0), r.get("error", "")))
        print(table[-1], flush=True)
    # randn (skipping) at 16384 default config
    r = time_case(B, H, 16384, D, "randn", {})
    fa16 = time_fa2(B, H, 16384, D)
    results["randn_16384"] = r
    results["fa2_16384"] = fa16
    table.append(("randn16k", "{}", r.get("fwd", 0), r.get("fwdbwd", 0), f"skipped={r.get('skipped')}"))
    table.append(("fa2 16k", "", fa16["fwd"], fa16["fwdbwd"], ""))
    # memory at 16384
    q, k, v = (torch.randn(B, H, 16384, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)

    def sb_fb():
        o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(D), False, config=DEFAULT_CONFIG)
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

    q.grad = k.grad = v.grad = None
    m_sb = peak_mem(sb_fb, (q, k, v))
    q.grad = k.grad = v.grad = None
    m_fa = peak_mem(lambda: sdpa_flash(q, k, v).backward(do), (q, k, v))
    results["mem16k_mib"] = {"triton": m_sb, "fa2": m_fa}
    table.append(("mem16k MiB", "", m_sb, m_fa, "triton vs fa2"))
    # compile check
    try:
        f = torch.compile(lambda a, b, c: triton_sb_attn(a, b, c, 0.1, False, config=DEFAULT_CONFIG)[0].sum(), fullgraph=True)
        qq = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        f(qq, qq, qq).backward()
        results["compile_fullgraph"] = "ok"
    except Exception as exc:
        results["compile_fullgraph"] = repr(exc)[:300]
    with open(os.path.join(OUT, "probe.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print("\ncompile:", results["compile_fullgraph"], " total %.0fs" % (time.time() - t0))
    print(f"{'what':10} {'config':70} {'fwd TF/s':>9} {'f+b TF/s':>9}")
    for what, cfg, f1, f2, note in table:
        print(f"{what:10} {cfg:70} {f1:9.1f} {f2:9.1f} {note}")


if __name__ == "__main__":
    main()
