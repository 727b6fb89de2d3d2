"""Run 15: the forward's register cap with host-made K/V descriptors, A/B in one process on one GPU.
Run 14 measured host-made descriptors 6-9% slower than in-kernel ones at D=64 T=8k/16k (the
64-key TMA tile): ptxas gives that kernel 187 registers (two 4-warp programs per SM) against 168
(three). bf16, B=4, H=24, causal, dense regime, the shipped D=64 T=16384 config with its
fwd_maxnreg set per variant; D=128 H=12 (shipped config, 162 registers uncapped) beside it.
Latency (do_bench median, L2 flushed), peak memory above the inputs of one no-grad forward:
  ``device+stats``        descriptors made in the kernel, per-row stats stored, no cap (before);
  ``host+stats``          host-made descriptors (training forward), no cap;
  ``host+stats cap168``   the same, fwd_maxnreg=168;
  ``host cap168``         no per-row stats (inference forward), fwd_maxnreg=168;
  ``fa2``, ``cudnn``.

    python regcap_ab.py OUT_DIR
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
from sbbench.harness.timing import peak_memory_mib, time_cuda
from sbbench.kernels.triton_sb import _config_list, kernels
from sbbench.kernels.triton_sb import op as triton_op

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
host_forward_kv = triton_op._forward_kv


def device_forward_kv(options, k, v, varlen):
    chosen = host_forward_kv(options, k, v, varlen)
    return {"K": k, "V": v, "TMA": kernels.DEVICE_DESCRIPTORS} if chosen["TMA"] == kernels.HOST_DESCRIPTORS else chosen


def timed(fn):
    with torch.no_grad():
        fn()
        return time_cuda(fn, rep_ms=300).median_ms, peak_memory_mib(lambda: fn(), dev)


rows = []
SHAPES = ((24, 64, 8192), (24, 64, 16384), (12, 128, 16384))
VARIANTS = (("device+stats", "device", True, 0), ("host+stats", "host", True, 0), ("host+stats cap168", "host", True, 168),
            ("host cap168", "host", False, 168), ("device+stats#2", "device", True, 0), ("host+stats cap168#2", "host", True, 168))
for heads, head_dim, seqlen in SHAPES:
    inp = make_inputs(Case(4, heads, heads, seqlen, head_dim), "dense", device=dev, seed=0)
    q, k, v = inp["q"], inp["k"], inp["v"]
    shipped = get_backend("triton").resolve_config(validate(q, k, v, None, False, None, None), None)
    results = {}
    for name, desc, stats, cap in VARIANTS:
        triton_op._forward_kv = device_forward_kv if desc == "device" else host_forward_kv
        cfg = _config_list({**shipped, "fwd_maxnreg": cap})
        results[name] = timed(lambda cfg=cfg, stats=stats: triton_op.triton_sb_fwd(
            q, k, v, None, head_dim ** -0.5, False, seqlen, cfg, stats))
    triton_op._forward_kv = host_forward_kv
    for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        results[name] = timed(sdpa)
    for name, (ms, mib) in results.items():
        row = {"variant": name, "D": head_dim, "H": heads, "T": seqlen, "ms": round(ms, 4), "peak_mib": round(mib, 2),
               "vs_fa2": round(results["fa2"][0] / ms, 3), "shipped": {k_: v_ for k_, v_ in shipped.items() if k_.startswith("fwd")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    del inp, q, k, v
    torch.cuda.empty_cache()
(out / "regcap_ab.json").write_text(json.dumps({"rows": rows}, indent=1))
names = list(dict.fromkeys(r["variant"] for r in rows))
print(f"{'bf16 fwd':<20}" + "".join(f"{f'D{d} {t // 1024}k':>22}" for _, d, t in SHAPES))
for name in names:
    cells = [next(r for r in rows if r["variant"] == name and (r["D"], r["T"]) == (d, t)) for _, d, t in SHAPES]
    print(f"{name:<20}" + "".join(f"{r['ms']:>7.3f} {r['vs_fa2']:>5.2f}x {r['peak_mib']:>6.1f}M" for r in cells))
