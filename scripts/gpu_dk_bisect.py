"""Which dK/dV launch parameters give a wrong dK at D=128 (one GPU, a few minutes).

Triton has built a wrong dK for the dK/dV kernel with 2 pipelining stages at D=128 (GQA; packed
varlen fp16), so the shipped configs use 2 stages only where the check passes. Rerun this after a
Triton upgrade before widening the tuning space: it prints dk's and dq's error over budget for the
default config and a few variants on the cases that failed. A ratio above 1 is a wrong gradient.

    python scripts/gpu_dk_bisect.py
"""

from __future__ import annotations

from sbbench.harness.cases import Case
from sbbench.harness.check import check_case
from sbbench.kernels.triton_sb import DEFAULT_CONFIG

CASES = [
    (Case(4, 4, 2, 2048, 128, "float16", varlen=True), "dense"),
    (Case(4, 4, 2, 2048, 128, "float16", varlen=True), "mixed"),
    (Case(4, 4, 4, 2048, 128, "float16", varlen=True), "dense"),
    (Case(2, 4, 2, 2048, 128, "float16"), "dense"),
]
# The default (1 stage) first, then 2-stage builds of the dK/dV kernel over the tiles that failed
# (16 and 32 rows) and the ones the tuned configs use (64 rows; 128 rows with 8 warps).
VARIANTS = [{}] + [{"bwd_dkdv_num_stages": 2, **tile} for tile in (
    {}, {"bwd_dkdv_BLOCK_M": 16}, {"bwd_dkdv_BLOCK_M": 64}, {"bwd_dkdv_BLOCK_M": 128, "bwd_dkdv_num_warps": 8})]


def main() -> None:
    print(f"{'case':34} {'config over the default':55} {'dk err/budget':>13} {'dq err/budget':>13}")
    for case, regime in CASES:
        label = f"varlen={case.varlen} kv_heads={case.kv_heads} {regime}"
        for variant in VARIANTS:
            rows = check_case("triton", case, regime, device="cuda", config={**DEFAULT_CONFIG, **variant},
                              fa2=False, seed=7)
            ratio = {r["tensor"]: r["err_max"] / r["budget"] for r in rows}
            print(f"{label:34} {str(variant):55} {ratio['dk']:13.2f} {ratio['dq']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
