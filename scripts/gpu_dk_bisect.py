"""Bisect dK errors seen on the H100 at D=128 (dense GQA bf16 with a 16-row dK/dV tile; packed
varlen GQA fp16): which dK/dV launch parameters reproduce them. Prints dk's err/budget per config."""
from sbbench.harness.cases import Case
from sbbench.harness.check import check_case
from sbbench.kernels.triton_sb import DEFAULT_CONFIG

CASES = [
    (Case(4, 4, 2, 2048, 128, "float16", varlen=True), "dense"),
    (Case(4, 4, 2, 2048, 128, "float16", varlen=True), "mixed"),
    (Case(4, 4, 4, 2048, 128, "float16", varlen=True), "dense"),
    (Case(2, 4, 2, 2048, 128, "float16"), "dense"),
]
VARIANTS = [{}, {"bwd_dkdv_num_stages": 1}, {"bwd_dkdv_num_warps": 8}, {"bwd_dkdv_BLOCK_M": 64},
            {"bwd_dkdv_BLOCK_M": 16, "bwd_dkdv_num_stages": 1}, {"bwd_num_stages": 1}, {"scan": "cumsum"}]
for case, regime in CASES:
    for cfg in VARIANTS:
        rows = check_case("triton", case, regime, device="cuda", config={**DEFAULT_CONFIG, **cfg}, fa2=False, seed=7)
        dk = next(r for r in rows if r["tensor"] == "dk")
        dq = next(r for r in rows if r["tensor"] == "dq")
        print(f"varlen={case.varlen} kv={case.kv_heads} {regime:6} {str(cfg):55} dk {dk['err_max']:.2e}/{dk['budget']:.2e} dq {dq['err_max']:.2e}/{dq['budget']:.2e}", flush=True)
