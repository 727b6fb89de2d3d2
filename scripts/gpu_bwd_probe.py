"""Backward-kernel probe (one GPU, a few minutes): the CUDA time of each kernel of one
forward+backward (torch profiler) for pairs of dQ / dK/dV launch configs, beside
FlashAttention-2 (SDPA pinned to FLASH_ATTENTION) on the same shapes, `dense` regime, T=8192;
then the default config's peak memory at T=16384, D=64, H=24 beside FA2's.

It times the kernels separately so that one run compares dQ and dK/dV variants at once; use it to
choose defaults or a tuning space after a kernel change. The figures of record come from
`sbbench bench`. Writes DIR/<name>.json and prints a table last.

    python scripts/gpu_bwd_probe.py --out DIR
    python scripts/gpu_bwd_probe.py --pairs 64:64x32w4s3r168/64x64w4s2,128:64x32w4s3/128x64w8s1

A tile spec is MxNwWsS[rR]: BLOCK_M x BLOCK_N, W warps, S stages, optional register cap R.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import triton

from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.triton_sb import DEFAULT_CONFIG, triton_sb_attn

# (dQ spec, dK/dV spec) per head dim: the shipped tuned pairs first, then register caps that fit
# a third (r168) or fourth (r128) 4-warp program per SM, and 2-stage dK/dV. The dK/dV key tile
# must be a multiple of the dQ key tile.
DEFAULT_PAIRS = {
    128: [("64x32w4s3", "128x64w8s1"), ("64x32w4s3r168", "128x64w8s1"), ("64x32w4s3", "128x64w8s2")],
    64: [("64x32w4s3", "64x64w4s1"), ("64x32w4s3r168", "64x64w4s1"), ("64x32w4s3r128", "64x64w4s1"),
         ("64x64w4s3r168", "64x64w4s1"), ("64x32w4s3r168", "64x64w4s2")],
}
SHAPES = ((4, 12, 128), (4, 24, 64))  # (batch, heads, head dim) timed at T=8192


def launch_fields(dq_spec: str, dkdv_spec: str) -> dict:
    """'64x32w4s3' (optionally 'r168': a register cap) -> the dQ / dK/dV launch fields."""
    out = {}
    for prefix, spec in (("bwd_", dq_spec), ("bwd_dkdv_", dkdv_spec)):
        tile, _, cap = spec.partition("r")
        try:
            m, rest = tile.split("x")
            n, rest = rest.split("w")
            warps, stages = rest.split("s")
            out.update({f"{prefix}BLOCK_M": int(m), f"{prefix}BLOCK_N": int(n),
                        f"{prefix}num_warps": int(warps), f"{prefix}num_stages": int(stages)})
            if cap:
                out[f"{prefix}maxnreg"] = int(cap)
        except ValueError as exc:
            raise ValueError(f"--pairs: {spec!r} is not a tile spec like 64x32w4s3 or 64x32w4s3r168") from exc
    return out


def parse_pairs(text: str) -> dict[int, list[tuple[str, str]]]:
    """'64:DQ/DKDV,128:DQ/DKDV' -> {head_dim: [(dq, dkdv), ...]}; head dims left out are not timed."""
    pairs: dict[int, list[tuple[str, str]]] = {}
    for item in text.split(","):
        head_dim, _, pair = item.partition(":")
        dq, _, dkdv = pair.partition("/")
        if not head_dim.isdigit() or not dq or not dkdv:
            raise ValueError(f"--pairs: {item!r} is not HEAD_DIM:DQ_SPEC/DKDV_SPEC")
        pairs.setdefault(int(head_dim), []).append((dq, dkdv))
    return pairs


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def fa2_ms(batch: int, heads: int, seqlen: int, head_dim: int) -> tuple[float, float]:
    """FA2's forward and forward+backward medians (ms) on random bf16 inputs."""
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    return median_ms(lambda: sdpa_flash(q, k, v)), median_ms(lambda: sdpa_flash(q, k, v).backward(do))


def kernel_ms(batch: int, heads: int, seqlen: int, head_dim: int, config: dict) -> dict[str, float]:
    """CUDA time (ms) per Triton kernel of one forward+backward, averaged over three runs."""
    from torch.profiler import ProfilerActivity, profile

    x = make_inputs(Case(batch, heads, heads, seqlen, head_dim, "bfloat16"), "dense", device="cuda",
                    requires_grad=True)
    q, k, v = x["q"], x["k"], x["v"]
    do = torch.randn_like(q)

    def step():
        o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(head_dim), False, config={**DEFAULT_CONFIG, **config})
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

    step()  # compile outside the profiled runs
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    return {ev.key.replace("sb_", "").replace("_kernel", ""): round(ev.device_time_total / 3e3, 3)
            for ev in prof.key_averages() if ev.device_type.name == "CUDA" and "sb_" in ev.key}


def peak_mib(fn) -> float:
    """Peak CUDA memory (MiB) that ``fn`` allocates above what exists before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def memory_at_16k(results: dict) -> list[tuple]:
    batch, heads, seqlen, head_dim = 4, 24, 16384, 64
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    rows = [("fa2", peak_mib(lambda: sdpa_flash(q, k, v).backward(do)))]

    def triton_fwdbwd():
        o, rem = triton_sb_attn(q, k, v, 1 / math.sqrt(head_dim), False, config=DEFAULT_CONFIG)
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

    q.grad = k.grad = v.grad = None  # otherwise FA2's gradients are accumulated into, not allocated
    try:
        rows.append(("triton default", peak_mib(triton_fwdbwd)))
    except Exception as exc:  # an out-of-memory default is a result, not the end of the probe
        results.setdefault("errors", []).append(("mem16k_d64", repr(exc)[:300]))
    results["mem16k_d64_mib"] = rows
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"), help="folder for the JSON")
    parser.add_argument("--name", default="bwd_probe", help="JSON file name, without .json")
    parser.add_argument("--pairs", help="HEAD_DIM:DQ_SPEC/DKDV_SPEC,... (default: the built-in list)")
    parser.add_argument("--max-pairs", type=int, help="time only the first N pairs per head dim")
    args = parser.parse_args(argv)
    pairs = parse_pairs(args.pairs) if args.pairs else DEFAULT_PAIRS
    if args.max_pairs:
        pairs = {d: p[: args.max_pairs] for d, p in pairs.items()}

    started = time.time()
    results: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
                     "torch": torch.__version__, "variants": []}
    table = []
    seqlen = 8192
    for batch, heads, head_dim in SHAPES:
        if head_dim not in pairs:
            continue
        fa_fwd, fa_fwdbwd = fa2_ms(batch, heads, seqlen, head_dim)
        results[f"fa2_D{head_dim}_ms"] = {"fwd": fa_fwd, "fwdbwd": fa_fwdbwd}
        table.append((f"D{head_dim} fa2", fa_fwd, fa_fwdbwd - fa_fwd, 0.0, fa_fwdbwd, 1.0, 1.0))
        for dq_spec, dkdv_spec in pairs[head_dim]:
            name = f"dq {dq_spec} | dkdv {dkdv_spec}"
            config = launch_fields(dq_spec, dkdv_spec)
            try:
                ms = kernel_ms(batch, heads, seqlen, head_dim, config)
            except Exception as exc:  # a variant that fails is a row, not the end of the probe
                results.setdefault("errors", []).append((head_dim, name, repr(exc)[:300]))
                continue
            fwd = sum(t for kernel, t in ms.items() if kernel.startswith("fwd"))
            dq = sum(t for kernel, t in ms.items() if "dq" in kernel)
            dkdv = sum(t for kernel, t in ms.items() if "dkdv" in kernel)
            total = sum(ms.values())
            results["variants"].append({"head_dim": head_dim, "name": name, "config": config, "kernel_ms": ms})
            table.append((f"D{head_dim} {name}", fwd, dq, dkdv, total, fa_fwd / fwd, fa_fwdbwd / total))
            print(table[-1], flush=True)
    memory = memory_at_16k(results)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.name + ".json")
    with open(path + ".tmp", "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    os.replace(path + ".tmp", path)
    print(f"wrote {path} in {time.time() - started:.0f} s")
    print(f"{'variant':40} {'fwd ms':>7} {'dQ ms':>7} {'dKdV ms':>8} {'f+b ms':>8} {'fa2/fwd':>8} {'fa2/f+b':>8}")
    for row in table:
        print(f"{row[0]:40} {row[1]:7.3f} {row[2]:7.3f} {row[3]:8.3f} {row[4]:8.3f} {row[5]:8.3f} {row[6]:8.3f}")
    for label, mib in memory:
        print(f"peak memory T=16384 D=64 H=24 fwd+bwd, {label}: {mib:.1f} MiB ({mib / memory[0][1]:.3f}x fa2)")
    for err in results.get("errors", []):
        print("error", err)


if __name__ == "__main__":
    main()
