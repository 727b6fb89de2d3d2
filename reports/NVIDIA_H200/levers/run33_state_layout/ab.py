"""Run 33: the boundary states laid out block-major (a key block's rows adjacent, so a query
tile's stores in the dQ kernel and loads in the dK/dV kernel are whole cache lines), against the
kernels at a8c3fb8 (row-major: a row's blocks adjacent, a tile's rows (q + 1) floats apart),
A/B in one process on one GPU. Causal, B=4, dense inputs, do_bench median with L2 flushed,
each variant twice in turn:
  bwd        the backward alone (dQ and dK/dV kernels) on one forward's outputs, shipped configs;
  fwd+bwd    forward with stats, then the backward;
  fa2/cudnn  SDPA pinned to FLASH_ATTENTION / CUDNN_ATTENTION, same inputs.
The old module is ``git show a8c3fb8:kernels/triton_sb/kernels.py``, loaded from the path given.

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
    inv_temp = head_dim ** -0.5
    gen = torch.Generator(device=dev).manual_seed(1)
    do = torch.randn(q.shape, generator=gen, device=dev).to(q.dtype)
    drem = torch.randn(q.shape[:-1], generator=gen, device=dev).to(q.dtype)
    with torch.no_grad():
        o, rem, logrem, stop = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, True)

    def bwd(c=cfg):
        return triton_op.triton_sb_bwd(do, drem, q, k, v, logrem, stop, None, inv_temp, False, seqlen, c)

    def fwdbwd():
        o, rem, logrem_, stop_ = triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, True)
        return triton_op.triton_sb_bwd(do, drem, q, k, v, logrem_, stop_, None, inv_temp, False, seqlen, cfg)

    results, grads = {}, {}
    for rnd in ("", "#2"):
        for name in ("before", "after"):
            triton_op.kernels = MODULES[name]
            with torch.no_grad():
                if not rnd:
                    grads[name] = bwd()
                    grads[name + " again"] = bwd()
                results[f"bwd {name}{rnd}"] = time_cuda(bwd, rep_ms=250).median_ms
                results[f"fwd+bwd {name}{rnd}"] = time_cuda(fwdbwd, rep_ms=250).median_ms
        triton_op.kernels = kernels
    qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
    for label, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa_fwdbwd(backend=backend):
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do)
        results[f"{label} fwd+bwd"] = time_cuda(sdpa_fwdbwd, rep_ms=250).median_ms
    # The layout changes no arithmetic: the gradients must be bit-identical to the old
    # kernels' and from run to run.
    same = {n: bool(torch.equal(a, b)) for n, a, b in zip(("dq", "dk", "dv"), grads["after"], grads["before"])}
    repeat = {n: bool(torch.equal(a, b)) for n, a, b in zip(("dq", "dk", "dv"), grads["after"], grads["after again"])}
    row = {"dtype": dtype, "D": head_dim, "H": heads, "T": seqlen, "config": config,
           **{n: (round(ms, 4) if isinstance(ms, float) else ms) for n, ms in results.items()},
           "grads_equal_before_after": same, "grads_equal_run_to_run": repeat}
    rows.append(row)
    print(json.dumps(row), flush=True)
    (out / "ab.json").write_text(json.dumps({"rows": rows}, indent=1))
    del inp, q, k, v, do, drem, qg, kg, vg, grads, o, rem, logrem, stop
    torch.cuda.empty_cache()


def best(r, name):
    return min(r[name], r[f"{name}#2"])


print(f"{'ms (best of 2)':<16}{'bwd before':>11}{'after':>8}{'x':>6}{'f+b before':>12}{'after':>8}"
      f"{'fa2':>8}{'x fa2':>7}{'cudnn':>8}  same")
for r in rows:
    b0, b1, f0, f1 = (best(r, n) for n in ("bwd before", "bwd after", "fwd+bwd before", "fwd+bwd after"))
    print(f"{r['dtype'][:4]} D{r['D']} {r['T'] // 1024}k".ljust(16)
          + f"{b0:>11.3f}{b1:>8.3f}{b0 / b1:>6.3f}{f0:>12.3f}{f1:>8.3f}{r['fa2 fwd+bwd']:>8.3f}"
          + f"{r['fa2 fwd+bwd'] / f1:>7.3f}{r['cudnn fwd+bwd']:>8.3f}  "
          + f"{all(r['grads_equal_before_after'].values())}/{all(r['grads_equal_run_to_run'].values())}")
