"""float32 errors of the Triton kernel in the CPU interpreter (exact numpy exp2/log2, no
special-function approximations) beside PyTorch's own float32 reference, both against float64,
on the case whose float32 check sits at the edge of its budget on the H100 (D=80, GQA, dense; a
shorter T so the interpreter finishes in about a minute). Prints max error / max |reference| per
tensor and seed.

    python scripts/fp32_interpreter_compare.py        # T=192 (env T=...)
"""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from sbbench import sb_attn  # noqa: E402
from sbbench.harness.cases import Case  # noqa: E402
from sbbench.harness.inputs import make_inputs  # noqa: E402
from sbbench.kernels.reference import reference  # noqa: E402

T = int(os.environ.get("T", "192"))
TILES = {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "bwd_BLOCK_M": 32, "bwd_BLOCK_N": 32,
         "bwd_dkdv_BLOCK_M": 32, "bwd_dkdv_BLOCK_N": 64}


def outputs_and_grads(fn, q, k, v, do, drem, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    o, rem = fn(q, k, v)
    grads = torch.autograd.grad((o * do.to(dtype)).sum() + (rem * drem.to(dtype)).sum(), (q, k, v))
    return [o, rem, *grads]


def main() -> None:
    inv_temp = 1 / math.sqrt(80)
    for seed in range(3):
        torch.manual_seed(seed)
        x = make_inputs(Case(1, 4, 2, T, 80, "float32"), "dense", device="cpu", requires_grad=False)
        q, k, v = x["q"], x["k"], x["v"]
        do, drem = torch.randn(q.shape), torch.randn(q.shape[:-1])
        oracle = outputs_and_grads(lambda a, b, c: reference(a, b, c, inv_temp, False), q, k, v, do, drem, torch.float64)
        torch32 = outputs_and_grads(lambda a, b, c: reference(a, b, c, inv_temp, False), q, k, v, do, drem, torch.float32)
        triton32 = outputs_and_grads(
            lambda a, b, c: sb_attn(a, b, c, inv_temp, False, backend="triton", config=TILES), q, k, v, do, drem,
            torch.float32,
        )
        for name, ref, a, b in zip(("o", "rem", "dq", "dk", "dv"), oracle, torch32, triton32):
            scale = ref.abs().max().item()
            err_torch = (a.double() - ref).abs().max().item() / scale
            err_triton = (b.double() - ref).abs().max().item() / scale
            print(f"seed {seed} {name:3} torch float32 {err_torch:.2e}  triton (interpreter) {err_triton:.2e}")


if __name__ == "__main__":
    main()
