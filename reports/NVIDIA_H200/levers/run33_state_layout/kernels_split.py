"""Run 33, second call: where the block-major layout's time goes, per kernel (dQ, dK/dV), before
(a8c3fb8) and after, with torch.profiler's CUDA kernel times summed over 10 backward calls, at
D=64 and D=128, T=16384 (shipped configs), and at D=64 T=16384 with the backward's K/V loads or
descriptors changed (the shipped D=64 long-sequence config is the one that uses host-made
descriptors, and the one that got slower).

    python kernels_split.py OUT_DIR KERNELS_BEFORE_PY
"""
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sbbench.core.problem import validate
from sbbench.core.registry import get_backend
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.triton_sb import _config_list, kernels
from sbbench.kernels.triton_sb import op as triton_op

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
spec = importlib.util.spec_from_file_location("kernels_before", sys.argv[2])
kernels_before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels_before)
MODULES = {"before": kernels_before, "after": kernels}
dev = torch.device("cuda")
rows = []
for heads, head_dim, seqlen, overrides in (
    (12, 128, 16384, {}), (24, 64, 16384, {}), (24, 64, 16384, {"bwd_descriptors": "kernel"}),
    (24, 64, 16384, {"bwd_loads": "pointer"}), (24, 64, 8192, {}),
):
    inp = make_inputs(Case(4, heads, heads, seqlen, head_dim, dtype="bfloat16"), "dense", device=dev, seed=0)
    q, k, v = inp["q"], inp["k"], inp["v"]
    config = {**get_backend("triton").resolve_config(validate(q, k, v, None, False, None, None), None), **overrides}
    cfg = _config_list(config)
    inv_temp = head_dim ** -0.5
    gen = torch.Generator(device=dev).manual_seed(1)
    do = torch.randn(q.shape, generator=gen, device=dev).to(q.dtype)
    drem = torch.randn(q.shape[:-1], generator=gen, device=dev).to(q.dtype)
    with torch.no_grad():
        o, rem, logrem, stop = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, True)
    row = {"D": head_dim, "T": seqlen, "overrides": overrides}
    for rnd in ("", "#2"):
        for name in ("before", "after"):
            triton_op.kernels = MODULES[name]
            with torch.no_grad():
                triton_op.triton_sb_bwd(do, drem, q, k, v, logrem, stop, None, inv_temp, False, seqlen, cfg)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        triton_op.triton_sb_bwd(do, drem, q, k, v, logrem, stop, None, inv_temp, False, seqlen, cfg)
                    torch.cuda.synchronize()
            per = defaultdict(float)
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    per[ev.name] += ev.device_time_total / 1000 / 10  # ms per backward
            row[name + rnd] = {n: round(t, 4) for n, t in per.items() if t > 0.01}
    triton_op.kernels = kernels
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "kernels_split.json").write_text(json.dumps({"rows": rows}, indent=1))
    del inp, q, k, v, do, drem, o, rem, logrem, stop
    torch.cuda.empty_cache()

print(f"{'case (ms per backward, best of 2)':<44}{'dQ before':>10}{'after':>8}{'dK/dV before':>14}{'after':>8}")
for r in rows:
    def best(name, kernel):
        return min(r[name].get(kernel, 0.0), r[name + "#2"].get(kernel, 0.0))
    label = f"D={r['D']} T={r['T']} {r['overrides'] or 'shipped'}"
    print(f"{label:<44}{best('before', 'sb_bwd_dq_kernel'):>10.3f}{best('after', 'sb_bwd_dq_kernel'):>8.3f}"
          f"{best('before', 'sb_bwd_dkdv_kernel'):>14.3f}{best('after', 'sb_bwd_dkdv_kernel'):>8.3f}")
