"""Decode from a KV cache on one GPU: numerics, then latency / K/V bandwidth / speedup over
softmax decode, with a small grid of launch configs per shape. One call, a few minutes::

    python scripts/gpu_decode.py --out reports/NVIDIA_H200/decode

1. Checks (bf16, D=128, H=32, H_kv=8): the ``triton`` decode against the float64 oracle within
   the budget (2 err_pt + floor), Tq = 1 and 3, B in {1, 16, 64}, caches 4k..128k, uniform and
   ragged batches, dense and mixed regimes.
2. Bench (Tq = 1, dense regime: nothing can be skipped): B in {1, 16, 64} x cache {4k .. 128k};
   softmax decode on the same cache (SDPA flash and cuDNN, flash_attn_with_kvcache when
   installed); the config sb_attn_with_kvcache picks (the tuned file's entry for the shape, else
   the default) and a few others (splits, key tile, stages, warps); a randn
   regime row at a few shapes shows block skipping.

Writes decode_check.json and decode_bench.json (sbbench results schema) into --out, and prints
a table per shape last: the picked config's latency, bandwidth and speedups, and the grid's
best. A time budget (--budget-s) drops the rest of the config grid when reached, and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sbbench.core.registry import get_backend
from sbbench.core.results import write_rows
from sbbench.harness.decode import DecodeCase, add_decode_speedups, make_decode_inputs, measure_decode, \
    measure_softmax, run_decode_check

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = (1, 16, 64)
CACHES = (4096, 16384, 32768, 65536, 131072)
CHECKS = [  # (batch, cache, Tq, ragged, attend_current)
    (1, 131072, 1, False, False), (16, 32768, 1, False, True), (64, 4096, 1, False, False),
    (64, 16384, 1, True, False), (1, 32768, 3, False, True), (16, 4096, 3, True, False), (4, 65536, 3, True, True),
]
SKIP_SHAPES = ((1, 131072), (16, 32768), (64, 4096))


def config_grid(case: DecodeCase) -> list[dict | None]:
    """The default (None) and a few variations around it: splits x0.5 / x2 of the auto choice,
    another key tile, other stage and warp counts."""
    from sbbench.kernels.triton_sb import DECODE_DEFAULT_CONFIG
    from sbbench.kernels.triton_sb.decode import auto_splits

    tiles = case.batch * case.kv_heads
    auto = auto_splits(tiles, case.capacity, DECODE_DEFAULT_CONFIG["BLOCK_N"], torch.device("cuda"))
    grid: list[dict | None] = [None]
    for splits in sorted({max(1, auto // 2), min(64, auto * 2)} - {auto}):
        grid.append({"num_splits": splits})
    grid += [{"BLOCK_N": 128, "num_stages": 2}, {"BLOCK_N": 32, "num_stages": 4}, {"num_stages": 4},
             {"num_warps": 8}, {"num_stages": 2, "num_warps": 2}]
    return grid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON rows")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop adding grid configs after this")
    parser.add_argument("--peak-tbps", type=float, default=4.3, help="the device's copy bandwidth (TB/s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.monotonic()
    dev = torch.device("cuda")
    backend = get_backend("triton")

    check_cases = [DecodeCase(b, HEADS, KV_HEADS, n, HEAD_DIM, t, "bfloat16", ac, ragged)
                   for b, n, t, ragged, ac in CHECKS]
    check_rows = run_decode_check([backend], check_cases, ["dense", "mixed"], dev, seed=args.seed)
    write_rows(args.out / "decode_check.json", check_rows, command="decode-check")
    failed = [r for r in check_rows if r.get("passed") is not True]
    print(f"checks: {len(check_rows)} rows, {len(failed)} not passed ({time.monotonic() - start:.0f} s)")
    for r in failed:
        print(f"  FAIL B{r['batch']} S{r['seqlen']} Tq{r['new_tokens']} {r['regime']} {r['tensor']}: {r['error']}")

    bench_rows, skipped_configs = [], 0
    for batch in BATCHES:
        for cache in CACHES:
            case = DecodeCase(batch, HEADS, KV_HEADS, cache, HEAD_DIM, 1, "bfloat16")
            regimes = ["dense"] + (["randn"] if (batch, cache) in SKIP_SHAPES else [])
            for regime in regimes:
                inputs = make_decode_inputs(case, regime, device=dev, seed=args.seed)
                bench_rows += measure_softmax(case, regime, inputs, dev)
                grid = config_grid(case) if regime == "dense" else [None]
                for i, config in enumerate(grid):
                    if i and time.monotonic() - start > args.budget_s:
                        skipped_configs += len(grid) - i
                        break
                    bench_rows.append(measure_decode(backend, case, regime, inputs=inputs, device=dev, config=config))
                del inputs
                torch.cuda.empty_cache()
    add_decode_speedups(bench_rows)
    write_rows(args.out / "decode_bench.json", bench_rows, command="decode-bench")
    if skipped_configs:
        print(f"time budget reached: {skipped_configs} grid configs not timed")
    print_summary(bench_rows, args.peak_tbps)
    print(f"total {time.monotonic() - start:.0f} s; rows in {args.out}")
    return 1 if failed else 0


def print_summary(rows: list[dict], peak_tbps: float) -> None:
    from tabulate import tabulate

    def fmt(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    table = []
    shapes = dict.fromkeys((r["batch"], r["seqlen"], r["regime"]) for r in rows)
    for batch, cache, regime in shapes:
        mine = [r for r in rows if (r["batch"], r["seqlen"], r["regime"]) == (batch, cache, regime)
                and r["backend"] == "triton" and r["status"] == "ok"]
        if not mine:
            table.append([batch, cache, regime] + [""] * 9 + ["no triton row ran"])
            continue
        chosen = mine[0]  # the grid starts with no config: what sb_attn_with_kvcache picks itself
        best = min(mine, key=lambda r: r["latency_ms"])
        changed = {k: v for k, v in (best["config"] or {}).items() if v != (chosen["config"] or {}).get(k)}
        table.append([
            batch, cache, regime, fmt(chosen["latency_ms"] * 1e3, ".1f"),
            fmt(chosen["kv_tbps"]), fmt(chosen["kv_tbps"] / peak_tbps * 100, ".0f"),
            fmt(chosen.get("speedup_sdpa_flash")), fmt(chosen.get("speedup_sdpa_cudnn")),
            fmt(chosen.get("speedup_flash_attn_with_kvcache")), fmt(chosen.get("skipped_fraction")),
            fmt(best["latency_ms"] * 1e3, ".1f"), ",".join(f"{k}={v}" for k, v in changed.items()) or "(same)",
        ])
    # Figures of the config sb_attn_with_kvcache picks (a shipped tuned entry, else the default),
    # then the fastest of the grid tried beside it and how it differs.
    headers = ["B", "cache", "regime", "picked us", "TB/s", "% peak", "x flash", "x cudnn", "x fa-kvc", "skipped",
               "grid best us", "grid best config"]
    print(tabulate(table, headers=headers, disable_numparse=True))


if __name__ == "__main__":
    sys.exit(main())
