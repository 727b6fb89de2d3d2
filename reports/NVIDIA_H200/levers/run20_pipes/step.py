"""Run 20: one training step (forward, then the backward) of the triton backend with the shipped
H200 config, or of FA2 (SDPA pinned to FLASH_ATTENTION), twice: the first compiles and warms up,
the second is what ncu profiles (run.sh skips the first step's kernel launches).

    python step.py triton|fa2 HEADS HEAD_DIM SEQLEN
"""
import sys

import torch

from sbbench.api import sb_attn
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs

from torch.nn.attention import SDPBackend, sdpa_kernel

which = sys.argv[1]
heads, head_dim, seqlen = (int(a) for a in sys.argv[2:5])
inp = make_inputs(Case(4, heads, heads, seqlen, head_dim), "dense", device=torch.device("cuda"), seed=0)
q, k, v = (inp[n].detach().requires_grad_(True) for n in ("q", "k", "v"))
for _ in range(2):
    if which == "triton":
        o, rem = sb_attn(q, k, v, backend="triton")
        (o.float().sum() + rem.float().sum()).backward()
    else:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.float().sum().backward()
torch.cuda.synchronize()
print("ok", tuple(o.shape))
