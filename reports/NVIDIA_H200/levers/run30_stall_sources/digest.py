"""Run 30's digest: from each kernel's source-page CSV (ncu --page source --print-source sass),
the stall samples per SASS instruction, summed by opcode and by stall reason, and the top
instructions. Writes DIR/digest.json; prints a table per kernel.

    python digest.py DIR
"""
import csv
import io
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

out = Path(sys.argv[1])
result = {}
for path in sorted(out.glob("src_d*.csv")):
    text = path.read_text(errors="replace")
    # One block per kernel: each starts with a header line naming the columns.
    blocks = re.split(r'\n(?=("Kernel Name"|"#"|"Address"))', text)
    chunks, current = [], []
    for line in text.splitlines():
        if line.startswith('"Address"') or line.startswith('"#",') or line.startswith('"Source"'):
            if current:
                chunks.append(current)
            current = [line]
        elif current:
            current.append(line)
        elif line.startswith("Kernel") or not line.strip():
            continue
    if current:
        chunks.append(current)
    for i, chunk in enumerate(chunks):
        rows = list(csv.reader(io.StringIO("\n".join(chunk))))
        header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
        col = {name: j for j, name in enumerate(header)}
        source_col = next((c for c in ("Source", "SASS") if c in col), None)
        sample_cols = [c for c in header if c.startswith("Warp Stall Sampling") or c.startswith("stall_")]
        reason_cols = [c for c in header if "stall" in c.lower() and c not in sample_cols]
        if source_col is None or not sample_cols:
            result[f"{path.stem}#{i}"] = {"header": header[:40]}
            continue
        total_col = sample_cols[0]

        def num(r, c):
            try:
                return float(r[col[c]].replace(",", ""))
            except (ValueError, KeyError):
                return 0.0
        by_op, top = Counter(), []
        for r in body:
            s = num(r, total_col)
            op = (r[col[source_col]].strip().split() or ["?"])
            op = op[1] if op[0].startswith("@") and len(op) > 1 else op[0]
            by_op[op.split(".")[0]] += s
            top.append((s, r[col.get("Address", 0)], r[col[source_col]].strip()[:90],
                        {c: num(r, c) for c in reason_cols if num(r, c) > 0}))
        total = sum(by_op.values()) or 1.0
        top.sort(key=lambda x: -x[0])
        result[f"{path.stem}#{i}"] = {
            "samples": total, "sample_column": total_col,
            "by_opcode_pct": {k: round(100 * v / total, 1) for k, v in by_op.most_common(15)},
            "top": [{"pct": round(100 * s / total, 2), "address": a, "sass": t, "reasons": rs}
                    for s, a, t, rs in top[:25]],
        }
(out / "digest.json").write_text(json.dumps(result, indent=1))
for name, r in result.items():
    print(f"== {name}: {r.get('samples')} samples ({r.get('sample_column')})")
    if "by_opcode_pct" not in r:
        print("   header:", r.get("header"))
        continue
    print("   by opcode %:", r["by_opcode_pct"])
    for t in r["top"][:15]:
        reasons = sorted(t["reasons"].items(), key=lambda x: -x[1])[:3]
        print(f"   {t['pct']:5.2f}%  {t['sass']:<70} {reasons}")
