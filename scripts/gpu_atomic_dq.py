"""The Triton backend's non-deterministic backward (``deterministic=False``: dQ summed with
atomics in the dK/dV kernel) beside the deterministic one and FlashAttention-2, on one GPU::

    python scripts/gpu_atomic_dq.py --out reports/NVIDIA_H200/atomic_dq

1. Check (bf16, dense and randn regimes, T=1024, D=64 H=8 and D=128 H=4, GQA group 2, both
   attend_current): the atomic mode against the float64 oracle within the budget.
2. Bench (bf16, causal, B=4, dense regime, D=64 H=24 and D=128 H=12, T=4096/8192/16384):
   forward+backward latency of ``triton`` deterministic, ``triton`` atomic and ``fa2`` on the
   same inputs, with the shipped (tuned) configs.

Writes check.json and bench.json (sbbench results schema; the ``deterministic`` column names the
mode) into --out and prints a table last: atomic / deterministic latency, and each beside FA2.
A time budget (--budget-s) drops the remaining bench shapes when reached, and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sbbench.core.results import write_rows
from sbbench.harness.bench import add_speedups, measure
from sbbench.harness.cases import Case
from sbbench.harness.check import check_case
from sbbench.harness.inputs import make_inputs

BENCH_SHAPES = ((64, 24), (128, 12))  # (head_dim, heads)
# Measured in this order (both head dims at each length), so a time budget drops 8192 first.
SEQLENS = (4096, 16384, 8192)
CHECK_SHAPES = ((64, 8), (128, 4))
# (label, backend, deterministic) in the order each shape is measured.
VARIANTS = (("fa2", "fa2", True), ("deterministic", "triton", True), ("atomic", "triton", False))


def run_checks(dev: torch.device, seed: int) -> list[dict]:
    rows = []
    for head_dim, heads in CHECK_SHAPES:
        for attend_current in (False, True):
            case = Case(2, heads, heads // 2, 1024, head_dim, "bfloat16", attend_current=attend_current)
            for regime in ("dense", "randn"):
                rows += check_case("triton", case, regime, device=dev, fa2=False, seed=seed, deterministic=False)
    return rows


def run_bench(dev: torch.device, seed: int, modes: list[str], budget_s: float, start: float) -> tuple[list[dict], int]:
    rows, dropped = [], 0
    shapes = [(d, h, t) for t in SEQLENS for d, h in BENCH_SHAPES]
    for i, (head_dim, heads, seqlen) in enumerate(shapes):
        if time.monotonic() - start > budget_s:
            dropped = len(shapes) - i
            break
        case = Case(4, heads, heads, seqlen, head_dim, "bfloat16")
        inputs = make_inputs(case, "dense", device=dev, seed=seed)
        for mode in modes:
            for _, backend, deterministic in VARIANTS:
                rows.append(measure(backend, case, mode, "dense", device=dev, inputs=inputs, baseline="fa2",
                                    seed=seed, deterministic=deterministic))
        del inputs
        torch.cuda.empty_cache()
    add_speedups(rows, "fa2")
    return rows, dropped


def _label(row: dict) -> str:
    return next(label for label, backend, det in VARIANTS
                if row["backend"] == backend and (backend == "fa2" or row["deterministic"] is det))


def print_summary(check_rows: list[dict], bench_rows: list[dict]) -> None:
    from tabulate import tabulate

    checks = {}
    for r in check_rows:
        key = (r["head_dim"], r["attend_current"], r["regime"])
        checks.setdefault(key, []).append(r)
    print(tabulate(
        [[d, ac, regime, "pass" if all(r["passed"] is True for r in rs) else
          "FAIL " + ", ".join(f"{r['tensor']}: {r['error']}" for r in rs if r["passed"] is not True)]
         for (d, ac, regime), rs in checks.items()],
        headers=["D", "attend_current", "regime", "atomic check (T=1024 bf16)"], disable_numparse=True,
    ))
    print()

    def fmt(x, spec=".3f"):
        return "" if x is None else format(x, spec)

    table = []
    shapes = dict.fromkeys((r["head_dim"], r["heads"], r["seqlen"], r["mode"]) for r in bench_rows)
    for shape in shapes:
        mine = {_label(r): r for r in bench_rows if (r["head_dim"], r["heads"], r["seqlen"], r["mode"]) == shape}
        ms = {label: (r["latency_ms"] if r["status"] == "ok" else None) for label, r in mine.items()}
        det, atomic, fa2 = ms.get("deterministic"), ms.get("atomic"), ms.get("fa2")
        problems = "; ".join(f"{label}: {r['status']} {r['error'] or ''}".strip()
                             for label, r in mine.items() if r["status"] != "ok")
        table.append([
            *shape, fmt(fa2), fmt(det), fmt(atomic), fmt(atomic / det if atomic and det else None),
            fmt(det / fa2 if det and fa2 else None, ".2f"), fmt(atomic / fa2 if atomic and fa2 else None, ".2f"),
            problems,
        ])
    print(tabulate(table, headers=["D", "H", "T", "mode", "fa2 ms", "det ms", "atomic ms", "atomic/det",
                                   "det/fa2", "atomic/fa2", "notes"], disable_numparse=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="fwdbwd", help="bench modes, comma-separated (fwdbwd, bwd, fwd)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="start no bench shape after this")
    args = parser.parse_args()
    start, dev = time.monotonic(), torch.device("cuda")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    check_rows = run_checks(dev, args.seed)
    write_rows(args.out / "check.json", check_rows, command="check")
    failed = [r for r in check_rows if r.get("passed") is not True]
    print(f"checks: {len(check_rows)} rows, {len(failed)} not passed ({time.monotonic() - start:.0f} s)")

    bench_rows, dropped = run_bench(dev, args.seed, args.modes.split(","), args.budget_s, start)
    write_rows(args.out / "bench.json", bench_rows, command="bench")
    if dropped:
        print(f"time budget reached: {dropped} bench shapes not measured")
    print(f"total {time.monotonic() - start:.0f} s; rows in {args.out}")
    print_summary(check_rows, bench_rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
