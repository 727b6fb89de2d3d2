"""`compiled` arrangements of the stick-breaking transform on the GPU, one call: each variant's
forward and forward+backward latency and peak memory (B=4, H=12, D=128, bf16, dense), and its
max error against the float64 oracle beside eager `reference`'s (fp16, `mixed`, T=1024).
Variants: `reference`'s own form (inclusive reverse cumsum minus the key's own term), the
output-shifted exclusive cumsum (a pad of the cumsum's result), and the input-shifted one (the
cumsum of the log-sticks shifted left by one key). Prints a table last; writes
$OUT/compiled_probe.json. For choosing the arrangement; the figures of record come from
`sbbench bench`.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
import triton

from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.compiled import stick_breaking_weights_exclusive
from sbbench.kernels.reference import causal_keep, dense_naive, stick_breaking_weights

OUT = os.environ.get("OUT", "/tmp")


def input_shifted(z: torch.Tensor, attend_current: bool):
    """The exclusive suffix as the cumsum of the log-sticks shifted left by one key."""
    keep = causal_keep(z.shape[-1], attend_current, z.device)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    lomb = torch.where(keep, F.logsigmoid(-z), zero)
    suffix = torch.flip(torch.cumsum(torch.flip(F.pad(lomb[..., 1:], (0, 1)), (-1,)), -1), (-1,))
    return torch.where(keep, torch.exp(F.logsigmoid(z) + suffix), zero), torch.exp(suffix[..., 0] + lomb[..., 0])


# "output-shifted" is what `compiled` runs on the CPU.
VARIANTS = {
    "reference form": stick_breaking_weights,
    "output-shifted": stick_breaking_weights_exclusive,
    "input-shifted": input_shifted,
}


def make_fn(transform):
    def formula(q, k, v, inv_temp, attend_current):
        return dense_naive(q, k, v, inv_temp, attend_current, transform)

    return torch.compile(formula, dynamic=True)


def timings(fn, T: int) -> dict:
    B, H, D = 4, 12, 128
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do, it = torch.randn_like(q), 1 / math.sqrt(D)

    def fwd():
        with torch.no_grad():
            return fn(q, k, v, it, False)

    def fb():
        o, rem = fn(q, k, v, it, False)
        torch.autograd.backward((o, rem), (do, torch.ones_like(rem)))

    out = {}
    for mode, f in (("fwd", fwd), ("fwdbwd", fb)):
        f()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        f()
        torch.cuda.synchronize()
        out[f"{mode}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[f"{mode}_ms"] = triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")
    return out


def errors(fn) -> dict:
    case = Case(batch=1, heads=4, kv_heads=4, seqlen=1024, head_dim=64, dtype="float16")
    x = make_inputs(case, "mixed", seed=0, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    do = torch.randn(x["q"].shape, device="cuda", generator=gen)
    drem = torch.randn(x["q"].shape[:-1], device="cuda", generator=gen)

    def run(f, dtype):
        q, k, v = (x[n].detach().to(dtype).requires_grad_() for n in "qkv")
        o, rem = f(q, k, v, 1 / 8, False)
        grads = torch.autograd.grad([o, rem], [q, k, v], [do.to(dtype), drem.to(dtype)])
        return [t.detach().double() for t in (o, rem, *grads)]

    ref = run(lambda *a: dense_naive(*a), torch.float64)
    eager = run(lambda *a: dense_naive(*a), torch.float16)
    got = run(fn, torch.float16)
    names = ("o", "rem", "dq", "dk", "dv")
    return {n: float((g - r).abs().max() / max((e - r).abs().max(), 1e-30)) for n, g, e, r in zip(names, got, eager, ref)}


def main() -> None:
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    for name, transform in VARIANTS.items():
        fn = make_fn(transform)
        row = {"err_over_eager": errors(fn)}
        for T in (2048, 4096):
            row[T] = timings(fn, T)
        results["variants"][name] = row
        print(name, row, flush=True)
    with open(os.path.join(OUT, "compiled_probe.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"{'variant':16} {'T':>5} {'fwd ms':>8} {'f+b ms':>8} {'fwd MiB':>8} {'f+b MiB':>8}  max err / eager fp16 (o rem dq dk dv)")
    for name, row in results["variants"].items():
        errs = " ".join(f"{v:.2f}" for v in row["err_over_eager"].values())
        for T in (2048, 4096):
            r = row[T]
            print(f"{name:16} {T:5} {r['fwd_ms']:8.3f} {r['fwdbwd_ms']:8.3f} {r['fwd_peak_mib']:8.0f} {r['fwdbwd_peak_mib']:8.0f}  {errs}")


if __name__ == "__main__":
    main()
