"""Run 27: the Gluon forward (gluon_fwd.py) beside the Triton forward and FA2, one process.

bf16 (and fp16 at T=4096), causal, B=4, dense inputs, D=128 H=12 and D=64 H=24, T=4096/8192/16384.
Triton: the shipped H200 config with the training statistics (as a training step runs it), and the
same config without block skipping (the Gluon kernel does not skip). Gluon: variants of key tile,
OVERLAP (next tile's Q K^T during this tile's exponentials), WS (producer warp), register cap.
Each variant's o and log-stick against the Triton kernel without skipping, as the largest
difference relative to the largest magnitude. do_bench median, L2 flushed.

    python ab.py OUT_DIR [occupancy|pairs]
"""
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
import gluon_fwd  # noqa: E402

from sbbench.core.problem import validate  # noqa: E402
from sbbench.core.registry import get_backend  # noqa: E402
from sbbench.harness.cases import Case  # noqa: E402
from sbbench.harness.inputs import make_inputs  # noqa: E402
from sbbench.harness.timing import time_cuda  # noqa: E402
from sbbench.kernels.triton_sb import _config_list  # noqa: E402
from sbbench.kernels.triton_sb import op as triton_op  # noqa: E402

VARIANTS = {
    64: [dict(block_n=64, overlap=False, ws=False), dict(block_n=64, overlap=True, ws=False),
         dict(block_n=32, overlap=False, ws=False), dict(block_n=32, overlap=True, ws=False),
         dict(block_n=64, overlap=False, ws=False, maxnreg=128), dict(block_n=64, overlap=True, ws=False, maxnreg=168),
         dict(block_n=64, overlap=False, ws=True, maxnreg=128), dict(block_n=64, overlap=True, ws=True, maxnreg=128)],
    128: [dict(block_n=32, overlap=False, ws=False), dict(block_n=32, overlap=True, ws=False),
          dict(block_n=64, overlap=False, ws=False), dict(block_n=64, overlap=True, ws=False),
          dict(block_n=32, overlap=True, ws=False, maxnreg=168),
          dict(block_n=32, overlap=False, ws=True, maxnreg=128), dict(block_n=32, overlap=True, ws=True, maxnreg=128)],
}


def name_of(v):
    overlap = {0: "", 1: " ov", 2: " pairs"}[int(v["overlap"])]
    return f"gluon bn{v['block_n']}{overlap}{' ws' if v['ws'] else ''}" + \
        (f" s{v['stages']}" if v.get("stages", 3) != 3 else "") + (f" r{v['maxnreg']}" if v.get("maxnreg") else "")


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


# Run 29: the producer warp at the occupancy of the Triton kernel. A cap of 80 registers gives
# the consumer warpgroup 136 (the producer warp gives back all but 24) and fits three programs
# per SM, as the Triton kernel runs at D=128 and at D=64 T=16384.
OCCUPANCY_VARIANTS = {
    64: [dict(block_n=64, overlap=False, ws=False), dict(block_n=64, overlap=False, ws=True, maxnreg=80),
         dict(block_n=32, overlap=False, ws=True, maxnreg=80), dict(block_n=64, overlap=False, ws=True, maxnreg=128)],
    128: [dict(block_n=32, overlap=False, ws=False), dict(block_n=32, overlap=False, ws=True, maxnreg=80),
          dict(block_n=32, overlap=False, ws=True, maxnreg=128)],
}
# Run 31: two tiles per loop iteration, each one's matrix products running while the warps
# transform the other (overlap=2), against the plain Gluon step; run 30 found the warps waiting
# on the Q K^T result in a fifth of the forward's samples.
PAIR_VARIANTS = {
    64: [dict(block_n=64, overlap=False, ws=False), dict(block_n=32, overlap=2, ws=False, stages=4),
         dict(block_n=32, overlap=2, ws=False, stages=4, maxnreg=128), dict(block_n=64, overlap=2, ws=False, stages=4)],
    128: [dict(block_n=32, overlap=False, ws=False), dict(block_n=32, overlap=2, ws=False, stages=4),
          dict(block_n=32, overlap=2, ws=False, stages=3, maxnreg=168)],
}
if len(sys.argv) > 2 and sys.argv[2] == "occupancy":
    VARIANTS = OCCUPANCY_VARIANTS
if len(sys.argv) > 2 and sys.argv[2] == "pairs":
    VARIANTS = PAIR_VARIANTS
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
backend = get_backend("triton")
rows = []
cases = [(12, 128, t, "bfloat16") for t in (4096, 8192, 16384)] + [(24, 64, t, "bfloat16") for t in (4096, 8192, 16384)]
cases += [(12, 128, 4096, "float16"), (24, 64, 4096, "float16")]
if VARIANTS is PAIR_VARIANTS:
    cases = [(12, 128, t, "bfloat16") for t in (4096, 8192, 16384)] + [(24, 64, t, "bfloat16") for t in (4096, 8192, 16384)]
    cases += [(12, 128, 4096, "float16"), (24, 64, 4096, "float16")]
if VARIANTS is OCCUPANCY_VARIANTS:
    cases = [(12, 128, t, "bfloat16") for t in (4096, 16384)] + [(24, 64, t, "bfloat16") for t in (4096, 16384)]
for heads, head_dim, seqlen, dtype in cases:
    inp = make_inputs(Case(4, heads, heads, seqlen, head_dim, dtype=dtype), "dense", device=dev, seed=0)
    q, k, v = inp["q"], inp["k"], inp["v"]
    inv_temp = head_dim ** -0.5
    shipped = backend.resolve_config(validate(q, k, v, None, False, None, None), None)
    cfgs = {"triton": _config_list(shipped), "triton noskip": _config_list({**shipped, "skip_log2": None})}
    row = {"D": head_dim, "H": heads, "T": seqlen, "dtype": dtype, "shipped": shipped, "ms": {}, "rel_diff": {},
           "errors": {}}
    with torch.no_grad():
        ref = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfgs["triton noskip"], True)
        ref_o, ref_logrem = ref[0], ref[2]
        for name, cfg in cfgs.items():
            row["ms"][name] = time_cuda(lambda: triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg,
                                                                        True), rep_ms=200).median_ms
        for var in VARIANTS[head_dim]:
            name = name_of(var)
            t0 = time.time()
            try:
                o, logrem = gluon_fwd.sb_fwd_gluon(q, k, v, **var)
                torch.cuda.synchronize()
                row["rel_diff"][name] = {"o": rel(o, ref_o), "logrem": rel(logrem, ref_logrem.float())}
                row["ms"][name] = time_cuda(lambda: gluon_fwd.sb_fwd_gluon(q, k, v, **var), rep_ms=200).median_ms
            except Exception as e:  # a variant that does not build is a result too
                row["errors"][name] = f"{type(e).__name__}: {str(e)[-600:]}"
            print(f"  {name}: {time.time() - t0:.1f} s", flush=True)

        def fa2():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        row["ms"]["fa2"] = time_cuda(fa2, rep_ms=200).median_ms
        row["ms"]["cudnn"] = time_cuda(cudnn, rep_ms=200).median_ms
    rows.append(row)
    print(json.dumps({k: row[k] for k in ("D", "T", "dtype", "ms", "rel_diff", "errors")}), flush=True)
    (out / "ab.json").write_text(json.dumps({"rows": rows}, indent=1))
    del inp, q, k, v, ref
    torch.cuda.empty_cache()

names = []
for r in rows:
    for n in r["ms"]:
        if n not in names:
            names.append(n)
print("\nms (x FA2 in brackets: FA2 ms / this)")
for r in rows:
    fa2 = r["ms"]["fa2"]
    cells = [f"{n}={r['ms'][n]:.3f}({fa2 / r['ms'][n]:.2f})" for n in names if n in r["ms"]]
    print(f"D{r['D']} {r['T'] // 1024}k {r['dtype'][:4]}: " + "  ".join(cells))
print("max rel diff o/logrem per variant:",
      {n: max(max(r["rel_diff"][n].values()) for r in rows if n in r["rel_diff"]) for n in names if n.startswith("gluon")})
