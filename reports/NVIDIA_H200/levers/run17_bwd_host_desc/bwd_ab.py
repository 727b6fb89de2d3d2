"""Run 17: the backward's walked tiles (the dQ kernel's K/V, the dK/dV kernel's q/dO) through
tensor descriptors made on the host, against descriptors made in the kernel (per program, and per
head of the group in the dK/dV kernel), A/B in one process on one GPU. bf16, B=4, causal, dense,
the shipped configs (their T=16384 entries, which T=8192 also uses, read the backward's tiles with
TMA); the backward alone (``triton_sb_bwd`` on one forward's outputs), do_bench median with L2
flushed, twice each in turn; FA2's forward+backward beside it.

    python bwd_ab.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sbbench.core.problem import validate
from sbbench.core.registry import get_backend
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.harness.timing import time_cuda
from sbbench.kernels.triton_sb import _config_list, kernels
from sbbench.kernels.triton_sb import op as triton_op

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
host_kind = triton_op.descriptor_kind
rows = []
SHAPES = ((12, 128, 8192), (12, 128, 16384), (24, 64, 8192), (24, 64, 16384))
for heads, head_dim, seqlen in SHAPES:
    inp = make_inputs(Case(4, heads, heads, seqlen, head_dim), "dense", device=dev, seed=0)
    q, k, v = inp["q"], inp["k"], inp["v"]
    cfg = _config_list(get_backend("triton").resolve_config(validate(q, k, v, None, False, None, None), None))
    inv_temp = head_dim ** -0.5
    with torch.no_grad():
        o, rem, logrem, stop = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, True)
    gen = torch.Generator(device=dev).manual_seed(1)
    do, drem = torch.randn(o.shape, generator=gen, device=dev).to(o), torch.randn(rem.shape, generator=gen, device=dev).to(rem)
    results = {}
    for name in ("device", "host", "device#2", "host#2"):
        triton_op.descriptor_kind = (lambda varlen: kernels.DEVICE_DESCRIPTORS) if name.startswith("device") else host_kind
        fn = lambda: triton_op.triton_sb_bwd(do, drem, q, k, v, logrem, stop, None, inv_temp, False, seqlen, cfg)
        grads = fn()
        results[name] = time_cuda(fn, rep_ms=400).median_ms
        if name == "device":
            reference = grads
        elif name == "host":
            same = all(torch.equal(a, b) for a, b in zip(grads, reference))
    triton_op.descriptor_kind = host_kind
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))

    def fa2():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)
    results["fa2 fwd+bwd"] = time_cuda(fa2, rep_ms=400).median_ms
    row = {"D": head_dim, "H": heads, "T": seqlen, **{k_: round(v_, 4) for k_, v_ in results.items()},
           "host_grads_equal_device": same}
    rows.append(row)
    print(json.dumps(row), flush=True)
    del inp, q, k, v, o, rem, logrem, stop, do, drem, qg, kg, vg
    torch.cuda.empty_cache()
(out / "bwd_ab.json").write_text(json.dumps({"rows": rows}, indent=1))
print(f"{'bf16 bwd ms':<12}" + "".join(f"{n:>12}" for n in ("device", "host", "device#2", "host#2", "fa2 f+b")) + "  same grads")
for r in rows:
    print(f"D{r['D']} {r['T'] // 1024}k".ljust(12) + "".join(f"{r[n]:>12.3f}" for n in ("device", "host", "device#2", "host#2", "fa2 fwd+bwd"))
          + f"  {r['host_grads_equal_device']}")
