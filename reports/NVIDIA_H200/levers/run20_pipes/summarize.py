"""Run 20's table: per profiled kernel, from ncu's raw CSV pages in DIR (ncu_*.csv): duration,
issue slots used, the busiest instruction pipes (% of their peak), tensor-pipe activity, eligible
warps per scheduler and cycle, and the largest stall reasons (warps stalled per issued
instruction). Writes DIR/pipes.json.

    python summarize.py DIR
"""
import csv
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
kernels = []
for path in sorted(out.glob("ncu_*.csv")):
    lines = [line for line in path.read_text().splitlines() if line.startswith('"')]
    if len(lines) < 3:
        print(f"{path.name}: no kernels profiled")
        continue
    rows = list(csv.reader(lines))
    header, body = rows[0], rows[2:]
    for row in body:
        rec = dict(zip(header, row))

        def num(name):
            try:
                return float(rec[name].replace(",", ""))
            except (KeyError, ValueError):
                return None
        pipes = {m.group(1): num(k) for k in rec
                 if (m := re.fullmatch(r"sm__inst_executed_pipe_(\w+)\.avg\.pct_of_peak_sustained_active", k))}
        cycles = {m.group(1): num(k) for k in rec
                  if (m := re.fullmatch(r"sm__pipe_(\w+)_cycles_active\.avg\.pct_of_peak_sustained_active", k))}
        stalls = {m.group(1): num(k) for k in rec
                  if (m := re.fullmatch(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio", k))}
        kernels.append({
            "file": path.stem, "kernel": rec.get("Kernel Name", "?")[:60],
            "duration_us": (num("gpu__time_duration.sum") or 0) / 1000,
            "issue_active_pct": num("smsp__issue_active.avg.pct_of_peak_sustained_active"),
            "warps_eligible": num("smsp__warps_eligible.avg.per_cycle_active"),
            "warps_active": num("smsp__warps_active.avg.per_cycle_active"),
            "registers": num("launch__registers_per_thread"),
            "pipes_pct": {k: v for k, v in pipes.items() if v is not None},
            "pipe_cycles_pct": {k: v for k, v in cycles.items() if v is not None},
            "stalls": {k: v for k, v in stalls.items() if v is not None},
        })
(out / "pipes.json").write_text(json.dumps({"kernels": kernels}, indent=1))


def top(d, n):
    return ", ".join(f"{k} {v:.0f}" if v >= 10 else f"{k} {v:.2f}" for k, v in sorted(d.items(), key=lambda x: -x[1])[:n])


for k in kernels:
    print(f"{k['file']:<16} {k['kernel'][:34]:<34} {k['duration_us']:>9.1f} us  issue {k['issue_active_pct'] or 0:>5.1f}%"
          f"  eligible {k['warps_eligible'] or 0:.2f}/{k['warps_active'] or 0:.1f} warps  regs {k['registers'] or 0:.0f}")
    print(f"    pipes % of peak: {top(k['pipes_pct'], 7)}")
    print(f"    pipe cycles %:   {top(k['pipe_cycles_pct'], 6)}")
    print(f"    stalls per issue: {top(k['stalls'], 7)}")
