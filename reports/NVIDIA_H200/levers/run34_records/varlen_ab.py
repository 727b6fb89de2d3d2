"""Run 34, second call: the gate flagged the packed-varlen training row (bf16, B=8, H=12, longest
T=4096, D=128) 5.4% slower against the old baseline, the one varlen row of the sweep and the
only row the new bwd_state_layout=blocks of the D=128 T=4096 entry reaches in packed form. Here
rows against blocks in one process, on the sweep's inputs (seed 0), forward+backward through
sb_attn with the entry's other parameters; the dense D=128 T=4096 row beside it. do_bench
median, L2 flushed, three rounds taken in turn.

    python varlen_ab.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

from sbbench import sb_attn
from sbbench.core.registry import get_backend
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.harness.runner import problem_of
from sbbench.harness.timing import time_cuda

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
rows = []
for case in (Case(8, 12, 12, 4096, 128, varlen=True), Case(4, 12, 12, 4096, 128)):
    inp = make_inputs(case, "dense", device=dev, seed=0)
    q, k, v = (inp[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
    extra = {"cu_seqlens": inp.get("cu_seqlens"), "max_seqlen": inp.get("max_seqlen")}
    config = get_backend("triton").resolve_config(problem_of(inp, case), None)
    gen = torch.Generator(device=dev).manual_seed(1)
    o, rem = sb_attn(q, k, v, backend="triton", config=config, **extra)
    do = torch.randn(o.shape, generator=gen, device=dev).to(o.dtype)
    drem = torch.randn(rem.shape, generator=gen, device=dev).to(rem.dtype)
    results, grads = {}, {}
    for rnd in range(3):
        for layout in ("rows", "blocks"):
            cfg = {**config, "bwd_state_layout": layout}

            def step(cfg=cfg):
                o, rem = sb_attn(q, k, v, backend="triton", config=cfg, **extra)
                return torch.autograd.grad((o, rem), (q, k, v), (do, drem))
            if rnd == 0:
                grads[layout] = step()
            results[f"{layout}#{rnd}"] = time_cuda(step, rep_ms=300).median_ms
    same = all(torch.equal(a, b) for a, b in zip(grads["rows"], grads["blocks"]))
    row = {"case": str(case), "config": config, **{n: round(t, 4) for n, t in results.items()},
           "grads_equal": same}
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "varlen_ab.json").write_text(json.dumps({"rows": rows}, indent=1))
for r in rows:
    best = {lay: min(r[f"{lay}#{i}"] for i in range(3)) for lay in ("rows", "blocks")}
    print(f"{r['case'][:60]:<60} rows {best['rows']:.3f}  blocks {best['blocks']:.3f}  "
          f"rows/blocks {best['rows'] / best['blocks']:.3f}  grads equal {r['grads_equal']}")
