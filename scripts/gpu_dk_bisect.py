"""Bisect a dK error seen at D=128: which dK/dV launch parameters reproduce it."""
import math, torch
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.reference import reference
from sbbench.kernels.triton_sb import DEFAULT_CONFIG, triton_sb_attn

def err(case, regime, cfg):
    x = make_inputs(case, regime, device="cuda", requires_grad=True, seed=3)
    q, k, v = x["q"], x["k"], x["v"]
    it = 1 / math.sqrt(case.head_dim)
    o, rem = triton_sb_attn(q, k, v, it, False, config={**DEFAULT_CONFIG, **cfg})
    gen = torch.Generator(device="cuda").manual_seed(0)
    do = torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype); dr = torch.randn(rem.shape, device="cuda", generator=gen).to(o.dtype)
    g = torch.autograd.grad((o * do).sum() + (rem * dr).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o2, r2 = reference(qd, kd, vd, it, False)
    g2 = torch.autograd.grad((o2 * do.double()).sum() + (r2 * dr.double()).sum(), (qd, kd, vd))
    return [f"{(a.double()-b).abs().max().item():.2e}" for a, b in zip(g, g2)]

for case in (Case(2, 4, 2, 1024, 128, "bfloat16"), Case(1, 4, 2, 1024, 128, "bfloat16"), Case(2, 4, 4, 1024, 128, "bfloat16"), Case(2, 4, 2, 1024, 64, "bfloat16")):
    for cfg in ({}, {"bwd_dkdv_num_stages": 1}, {"bwd_dkdv_BLOCK_M": 32}, {"bwd_dkdv_BLOCK_M": 64}, {"bwd_dkdv_num_warps": 8}, {"bwd_num_stages": 1}, {"bwd_BLOCK_N": 64}):
        print(case.batch, case.kv_heads, case.head_dim, cfg, err(case, "randn", cfg), flush=True)
