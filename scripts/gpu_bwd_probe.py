"""Backward-kernel probe for one GPU call: per-kernel CUDA time (torch profiler) of pairs of
dQ and dK/dV launch configs per head dim, beside FlashAttention-2 (SDPA flash) in the same run,
in the `dense` regime at T=8192; then the default config's peak memory at T=16384, D=64, H=24.
Prints a table last and writes $OUT/bwd_probe.json. For choosing defaults; the figures of record
come from `sbbench bench`.

Each variant runs one forward+backward; its dQ and dK/dV times are read separately, so one run
measures one dQ variant and one dK/dV variant.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_probe import bench, kernel_split, peak_mem, results, sdpa_flash, time_fa2  # noqa: E402

from sbbench.kernels.triton_sb import DEFAULT_CONFIG, triton_sb_attn  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")

# Per head dim, (name, config over the default): dQ tile / dK/dV tile pairs, measured together
# (the dK/dV key tile must be a multiple of the dQ key tile). Rounds 1 and 2 are in
# reports/NVIDIA_H100_80GB_HBM3/bwd_probe_r1.json and bwd_probe_r2.json (their pair lists with
# them): dQ 64x32 3 stages, dK/dV 128x64 8 warps at D=128 and 64x64 4 warps at D=64.
def _pair(dq: str, dkdv: str) -> dict:
    """'64x32w4s3' (optionally 'r168': a register cap) -> the dQ / dK/dV launch fields."""
    out = {}
    for prefix, spec in (("bwd_", dq), ("bwd_dkdv_", dkdv)):
        spec, _, cap = spec.partition("r")
        m, rest = spec.split("x")
        n, rest = rest.split("w")
        w, s = rest.split("s")
        out.update({f"{prefix}BLOCK_M": int(m), f"{prefix}BLOCK_N": int(n), f"{prefix}num_warps": int(w),
                    f"{prefix}num_stages": int(s)})
        if cap:
            out[f"{prefix}maxnreg"] = int(cap)
    return out


# Round 3 (after the exp2 sigmoid, the compare-free dK/dV loop and the fence-free dQ kernel):
# the tuned pairs, 2-stage dK/dV, and dQ register caps that fit a third (r168) or fourth (r128)
# 4-warp program per SM (capping the dK/dV kernel spills 1-2 KB per thread: sass.py).
# PROBE_PAIRS=N keeps the first N pairs per head dim (`gpu_session.sh ab`).
PAIRS = {
    128: [("64x32w4s3", "128x64w8s1"), ("64x32w4s3r168", "128x64w8s1"), ("64x32w4s3", "128x64w8s2")],
    64: [("64x32w4s3", "64x64w4s1"), ("64x32w4s3r168", "64x64w4s1"), ("64x32w4s3r128", "64x64w4s1"),
         ("64x64w4s3r168", "64x64w4s1"), ("64x32w4s3r168", "64x64w4s2")],
}
if os.environ.get("PROBE_PAIRS"):
    PAIRS = {D: pairs[: int(os.environ["PROBE_PAIRS"])] for D, pairs in PAIRS.items()}
# PROBE_PAIR_SPECS="64:64x32w4s3r168/64x64w4s2,128:64x32w4s3/128x64w8s1" replaces the lists (a
# head dim it leaves out is not timed).
if os.environ.get("PROBE_PAIR_SPECS"):
    PAIRS = {}
    for item in os.environ["PROBE_PAIR_SPECS"].split(","):
        head_dim, _, pair = item.partition(":")
        dq, _, dkdv = pair.partition("/")
        PAIRS.setdefault(int(head_dim), []).append((dq, dkdv))
VARIANTS = {D: [(f"dq{dq} | dkdv{dkdv}", _pair(dq, dkdv)) for dq, dkdv in pairs] for D, pairs in PAIRS.items()}
OUT_NAME = os.environ.get("PROBE_NAME", "bwd_probe")


def main() -> None:
    t0 = time.time()
    table = []
    for B, H, D in ((4, 12, 128), (4, 24, 64)):
        if D not in VARIANTS:
            continue
        T = 8192
        flops = 4 * B * H * T * T * D / 2
        fa = time_fa2(B, H, T, D)
        results[f"fa2_D{D}"] = fa
        fa_fwd_ms = flops / fa["fwd"] / 1e9
        fa_fb_ms = 3.5 * flops / fa["fwdbwd"] / 1e9
        table.append((f"D{D} fa2", fa_fwd_ms, fa_fb_ms - fa_fwd_ms, 0.0, fa_fb_ms, 1.0, 1.0))
        for name, cfg in VARIANTS[D]:
            try:
                ms = kernel_split(B, H, T, D, cfg)
            except Exception as exc:  # a variant that fails is a row, not the end of the probe
                table.append((f"D{D} {name}", 0, 0, 0, 0, 0, 0))
                results.setdefault("errors", []).append((D, name, repr(exc)[:300]))
                continue
            fwd = sum(v for k, v in ms.items() if k.startswith("fwd"))
            dq = sum(v for k, v in ms.items() if "dq" in k)
            dkdv = sum(v for k, v in ms.items() if "dkdv" in k)
            total = sum(ms.values())
            results.setdefault("variants", []).append({"D": D, "name": name, "config": cfg, "kernel_ms": ms})
            table.append((f"D{D} {name}", fwd, dq, dkdv, total, fa_fwd_ms / fwd, fa_fb_ms / total))
            print(table[-1], flush=True)
    print("timings done %.0fs" % (time.time() - t0), flush=True)

    B, H, T, D = 4, 24, 16384, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    m_fa = peak_mem(lambda: sdpa_flash(q, k, v).backward(do), (q, k, v))
    mem = [("fa2", m_fa)]

    def sb_fb():
        o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(D), False, config=DEFAULT_CONFIG)
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

    q.grad = k.grad = v.grad = None  # FA2's gradients would otherwise be accumulated into, not allocated
    try:
        m, ms = peak_mem(sb_fb, (q, k, v)), bench(sb_fb)
    except Exception as exc:
        m, ms = float("nan"), float("nan")
        results.setdefault("errors", []).append(("mem", "default", repr(exc)[:300]))
    mem.append(("default", m, ms))
    results["mem16k_d64"] = mem
    with open(os.path.join(OUT, OUT_NAME + ".json"), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print("total %.0fs" % (time.time() - t0))
    print(f"{'variant':34} {'fwd ms':>7} {'dQ ms':>7} {'dKdV ms':>8} {'f+b ms':>8} {'fwd/fa2':>8} {'f+b/fa2':>8}")
    for row in table:
        print(f"{row[0]:34} {row[1]:7.3f} {row[2]:7.3f} {row[3]:8.3f} {row[4]:8.3f} {row[5]:8.3f} {row[6]:8.3f}")
    for row in mem:
        print("mem16k D64", *row, f"{row[1] / m_fa:.3f}x fa2")
    for err in results.get("errors", []):
        print("error", err)


if __name__ == "__main__":
    main()
