"""Cross-check of `sbbench bench`'s peak-memory column (one GPU, a minute): forward+backward of
triton and fa2 (B=4, H=12, D=128, bf16, dense, T=8192 and 16384) measured by hand with
torch.cuda.max_memory_allocated, beside the figure the harness reports for the same input. The two
should agree to within a few MiB; rerun it after changing how bench measures memory.

    python scripts/memory_by_hand.py
"""

import math

import torch

from sbbench import sb_attn
from sbbench.harness.bench import measure
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs


def by_hand(backend: str, case: Case) -> float:
    x = make_inputs(case, "dense", device="cuda", requires_grad=True)
    q, k, v = x["q"], x["k"], x["v"]
    do = torch.randn_like(q)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()  # inputs and do exist; everything above is the op's
    torch.cuda.reset_peak_memory_stats()
    if backend == "fa2":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(do)
    else:
        o, rem = sb_attn(q, k, v, 1 / math.sqrt(case.head_dim), backend=backend)
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main() -> None:
    for backend, seqlen in (("triton", 8192), ("fa2", 8192), ("triton", 16384), ("fa2", 16384)):
        case = Case(4, 12, 12, seqlen, 128, "bfloat16")
        hand = by_hand(backend, case)
        row = measure(backend, case, "fwdbwd", "dense", device="cuda")
        print(f"{backend:7} T={seqlen:6}  by hand {hand:8.1f} MiB   sbbench bench {row['peak_mem_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
