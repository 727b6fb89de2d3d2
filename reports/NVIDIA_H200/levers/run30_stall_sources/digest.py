"""Run 30's digest: from each kernel's source page (ncu --page source --csv --print-source sass,
here gzipped), where the warp-state samples fall: per stall reason, per instruction kind, the
"barrier" reason split by the instruction it is charged to (WARPGROUP.DEPBAR: a warpgroup
waiting for its wgmma results; BAR.SYNC; other instructions: the one after a CTA barrier), and
the top instructions. Writes DIR/digest.json; prints the same.

    python digest.py DIR
"""
import csv
import gzip
import io
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

ALL = "Warp Stall Sampling (All Samples)"


def kernels(path):
    """(kernel name, CSV lines) per kernel of a source-page export."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", errors="replace") as f:
        name, chunk = None, None
        for line in f.read().splitlines():
            if line.startswith('"Kernel Name"'):
                if chunk:
                    yield name, chunk
                name, chunk = line.split(",")[1].strip('"'), []
            elif chunk is not None:
                chunk.append(line)
        if chunk:
            yield name, chunk


def opcode(sass):
    words = sass.split()
    word = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "?")
    return word


out = Path(sys.argv[1])
result = {}
for path in sorted(out.glob("src_d*.csv*")):
    head_dim = path.name.split("_d")[1].split(".")[0]
    for name, chunk in kernels(path):
        rows = list(csv.reader(io.StringIO("\n".join(chunk))))
        header, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
        col = {n: i for i, n in enumerate(header)}
        reasons = [n for n in header if n.startswith("stall_") and "(Not Issued)" not in n]

        def num(r, n):
            try:
                return float(r[col[n]].replace(",", "") or 0)
            except ValueError:
                return 0.0
        total = sum(num(r, ALL) for r in body) or 1.0
        by_reason, by_kind, barrier_at = Counter(), defaultdict(Counter), Counter()
        top = []
        for r in body:
            sass = r[col["Source"]].strip()
            op = opcode(sass)
            kind = op.split(".")[0]
            for n in reasons:
                by_reason[n[6:]] += num(r, n)
                by_kind[kind][n[6:]] += num(r, n)
            at = ("WARPGROUP.DEPBAR" if op.startswith("WARPGROUP.DEPBAR") else "WARPGROUP.ARRIVE"
                  if op.startswith("WARPGROUP.ARRIVE") else "BAR.SYNC" if op.startswith("BAR.SYNC") else "other")
            barrier_at[at] += num(r, "stall_barrier")
            top.append((num(r, ALL), sass[:90]))
        top.sort(key=lambda x: -x[0])
        pct = lambda v: round(100 * v / total, 1)  # noqa: E731
        result[f"D={head_dim} {name}"] = {
            "samples": total,
            "reasons_pct": {k: pct(v) for k, v in by_reason.most_common()},
            "barrier_pct_by_instruction": {k: pct(v) for k, v in barrier_at.items()},
            "kinds_pct": {k: pct(sum(c.values())) for k, c in sorted(by_kind.items(), key=lambda kv: -sum(kv[1].values()))[:12]},
            "top": [{"pct": round(100 * s / total, 2), "sass": t} for s, t in top[:12]],
        }
(out / "digest.json").write_text(json.dumps(result, indent=1))
for name, r in result.items():
    print(f"== {name}: {r['samples']:.0f} samples")
    print("   reasons %:", dict(list(r["reasons_pct"].items())[:8]))
    print("   'barrier' charged to %:", r["barrier_pct_by_instruction"])
    print("   instruction kinds %:", r["kinds_pct"])
    for t in r["top"][:6]:
        print(f"   {t['pct']:5.2f}%  {t['sass']}")
