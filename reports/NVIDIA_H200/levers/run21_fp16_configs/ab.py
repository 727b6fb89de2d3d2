"""Run 21: the fp16 entries of the H200 file came from short studies (3-36 trials, some without
the TMA parameters in their space); this times fp16 inputs under their shipped config (``fp16``)
and under the bf16 entry of the same key (``bf16's``), forward (no grad) and forward+backward
(forward with stats, then the backward), A/B in one process, each twice in turn; FA2 (SDPA pinned
to FLASH_ATTENTION) in the same run. Causal, B=4, dense, do_bench median with L2 flushed. Also the
largest difference between the two configs' results (o, rem, dq, dk, dv), relative to each
tensor's largest magnitude.

    python ab.py OUT_DIR
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
from sbbench.kernels.triton_sb import _config_list
from sbbench.kernels.triton_sb import op as triton_op

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
backend = get_backend("triton")
rows = []
for heads, head_dim in ((12, 128), (24, 64)):
    for seqlen in (4096, 8192, 16384):
        inp = make_inputs(Case(4, heads, heads, seqlen, head_dim, dtype="float16"), "dense", device=dev, seed=0)
        q, k, v = inp["q"], inp["k"], inp["v"]
        configs = {
            "fp16": backend.resolve_config(validate(q, k, v, None, False, None, None), None),
            "bf16's": backend.resolve_config(validate(*(x.to(torch.bfloat16) for x in (q, k, v)), None, False, None,
                                                      None), None),
        }
        inv_temp = head_dim ** -0.5
        gen = torch.Generator(device=dev).manual_seed(1)
        do = torch.randn(q.shape, generator=gen, device=dev).to(q.dtype)
        drem = torch.randn(q.shape[:-1], generator=gen, device=dev).to(q.dtype)
        results, outputs = {}, {}
        for rnd in ("", "#2"):
            for name, config in configs.items():
                cfg = _config_list(config)

                def fwd():
                    return triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, False)

                def fwdbwd():
                    o, rem, logrem, stop = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, True)
                    return (o, rem) + tuple(triton_op.triton_sb_bwd(do, drem, q, k, v, logrem, stop, None, inv_temp,
                                                                      False, seqlen, cfg))
                with torch.no_grad():
                    if not rnd:
                        outputs[name] = fwdbwd()
                    results[f"fwd {name}{rnd}"] = time_cuda(fwd, rep_ms=250).median_ms
                    results[f"fwd+bwd {name}{rnd}"] = time_cuda(fwdbwd, rep_ms=250).median_ms
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))

        def fa2_fwd():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fa2_fwdbwd():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)
        results["fa2 fwd"] = time_cuda(fa2_fwd, rep_ms=250).median_ms
        results["fa2 fwd+bwd"] = time_cuda(fa2_fwdbwd, rep_ms=250).median_ms
        diff = {n: float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
                for n, a, b in zip(("o", "rem", "dq", "dk", "dv"), outputs["bf16's"], outputs["fp16"])}
        row = {"D": head_dim, "H": heads, "T": seqlen, "configs": configs,
               **{n: round(ms, 4) for n, ms in results.items()}, "rel_diff": diff}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "ab.json").write_text(json.dumps({"rows": rows}, indent=1))
        del inp, q, k, v, do, drem, qg, kg, vg, outputs
        torch.cuda.empty_cache()


def best(r, name):
    return min(r[name], r[f"{name}#2"])


print(f"{'fp16 ms (best of 2)':<20}{'fwd fp16':>10}{'bf16s':>8}{'fa2':>8}{'f+b fp16':>10}{'bf16s':>8}{'fa2':>8}  max rel diff")
for r in rows:
    print(f"D{r['D']} {r['T'] // 1024}k".ljust(20) + f"{best(r, 'fwd fp16'):>10.3f}{best(r, 'fwd bf16' + chr(39) + 's'):>8.3f}"
          f"{r['fa2 fwd']:>8.3f}{best(r, 'fwd+bwd fp16'):>10.3f}{best(r, 'fwd+bwd bf16' + chr(39) + 's'):>8.3f}"
          f"{r['fa2 fwd+bwd']:>8.3f}  {max(r['rel_diff'].values()):.2e}")
