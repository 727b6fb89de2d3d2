"""Run 19: the weights' exponent taken whole from the suffix scan's product (its accumulator
starts at z2 - sp2 - carry, its matrix is negated), against the kernels at 9b22f58 (the
exponent's offsets and negation as ALU ops: one more per score in every kernel), A/B in one
process on one GPU. Causal, B=4, dense, the shipped H200 configs, do_bench median with L2
flushed, each variant twice in turn:
  fwd        no-grad forward (no per-row stats), ``before`` and ``after``;
  fwd+bwd    forward with stats, then the backward on its outputs;
  cap128     the new forward at a 128-register cap with two stages (four programs an SM);
  fa2        SDPA pinned to FLASH_ATTENTION, same inputs (autograd for fwd+bwd).
The old module is ``git show 9b22f58:kernels/triton_sb/kernels.py``, loaded from the path given.

    python ab.py OUT_DIR KERNELS_BEFORE_PY
"""
import importlib.util
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
spec = importlib.util.spec_from_file_location("kernels_before", sys.argv[2])
kernels_before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels_before)
MODULES = {"before": kernels_before, "after": kernels}
dev = torch.device("cuda")
rows = []
SHAPES = [("bfloat16", h, d, t) for h, d in ((12, 128), (24, 64)) for t in (4096, 8192, 16384)]
SHAPES += [("float16", h, d, t) for h, d in ((12, 128), (24, 64)) for t in (4096, 16384)]
for dtype, heads, head_dim, seqlen in SHAPES:
    inp = make_inputs(Case(4, heads, heads, seqlen, head_dim, dtype=dtype), "dense", device=dev, seed=0)
    q, k, v = inp["q"], inp["k"], inp["v"]
    config = get_backend("triton").resolve_config(validate(q, k, v, None, False, None, None), None)
    cfg = _config_list(config)
    cap = _config_list({**config, "fwd_maxnreg": 128, "fwd_num_stages": 2})
    inv_temp = head_dim ** -0.5
    gen = torch.Generator(device=dev).manual_seed(1)
    do = torch.randn(q.shape, generator=gen, device=dev).to(q.dtype)
    drem = torch.randn(q.shape[:-1], generator=gen, device=dev).to(q.dtype)

    def fwd(c=cfg):
        return triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, c, False)

    def fwdbwd():
        o, rem, logrem, stop = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, True)
        return (o, rem) + tuple(triton_op.triton_sb_bwd(do, drem, q, k, v, logrem, stop, None, inv_temp, False,
                                                          seqlen, cfg))

    results, outputs = {}, {}
    for rnd in ("", "#2"):
        for name in ("before", "after"):
            triton_op.kernels = MODULES[name]
            with torch.no_grad():
                if not rnd:
                    outputs[name] = fwdbwd()
                results[f"fwd {name}{rnd}"] = time_cuda(fwd, rep_ms=250).median_ms
                results[f"fwd+bwd {name}{rnd}"] = time_cuda(fwdbwd, rep_ms=250).median_ms
        triton_op.kernels = kernels
        with torch.no_grad():
            results[f"fwd cap128{rnd}"] = time_cuda(lambda: fwd(cap), rep_ms=250).median_ms
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))

    def fa2_fwd():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fa2_fwdbwd():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)
    results["fa2 fwd"] = time_cuda(fa2_fwd, rep_ms=250).median_ms
    results["fa2 fwd+bwd"] = time_cuda(fa2_fwdbwd, rep_ms=250).median_ms
    # How far the two kernels' results differ (o, rem, dq, dk, dv), relative to each tensor's
    # largest magnitude: a change of summation order, so small, not zero.
    diff = {n: float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
            for n, a, b in zip(("o", "rem", "dq", "dk", "dv"), outputs["after"], outputs["before"])}
    row = {"dtype": dtype, "D": head_dim, "H": heads, "T": seqlen,
           **{n: round(ms, 4) for n, ms in results.items()}, "rel_diff_after_before": diff}
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "ab.json").write_text(json.dumps({"rows": rows}, indent=1))
    del inp, q, k, v, do, drem, qg, kg, vg, outputs
    torch.cuda.empty_cache()


def best(r, name):
    return min(r[name], r[f"{name}#2"])


print(f"{'ms (best of 2)':<18}{'fwd before':>11}{'after':>8}{'cap128':>8}{'fa2':>8}{'x fa2':>7}"
      f"{'f+b before':>12}{'after':>8}{'fa2':>8}{'x fa2':>7}")
for r in rows:
    fa, fb = best(r, "fwd after"), best(r, "fwd+bwd after")
    print(f"{r['dtype'][:4]} D{r['D']} {r['T'] // 1024}k".ljust(18)
          + f"{best(r, 'fwd before'):>11.3f}{fa:>8.3f}{best(r, 'fwd cap128'):>8.3f}{r['fa2 fwd']:>8.3f}"
          + f"{r['fa2 fwd'] / fa:>7.2f}{best(r, 'fwd+bwd before'):>12.3f}{fb:>8.3f}{r['fa2 fwd+bwd']:>8.3f}"
          + f"{r['fa2 fwd+bwd'] / fb:>7.2f}")
