"""Run 13, A/B in one process on one GPU (bf16, shipped H200 configs).

Forward, B=4, causal, dense, D=128 H=12 and D=64 H=24, T=4096 and 16384, latency (median, CUDA
events) and peak memory above the inputs of one no-grad forward:
  ``device+stats``  K/V descriptors made in the kernel (128 B of scratch per descriptor and
                    program) and the per-row log-stick and first key stored (the launch before);
  ``host+stats``    descriptors of the whole K/V tensors made on the host (the training forward);
  ``host``          host descriptors, no per-row stats (the inference forward now);
  ``fa2``, ``cudnn`` SDPA pinned to FLASH_ATTENTION / CUDNN_ATTENTION.

Decode, D=128, H=32, H_kv=8, Tq=1, read-flush graph replay, median of 200 (µs, % of 4.3 TB/s):
  ``before``        decode.py of the previous commit (.whl/ab/decode_before.py, op renamed);
  ``new``           one-wave launches publish nothing (no board memset), checks staggered by
                    dispatch round, merge launched as a programmatic dependent (PDL);
  ``new-split2``    stagger by split parity, as before; ``new-nopdl``: merge launched plainly;
  ``off``           new with skipping off; ``sdpa-flash``.
  Dense caches (nothing to skip), then randn caches (sticks run out) for the skipped fraction.
Then the decode numerics of run 9 (B=2, H=8, H_kv=2, cache 8192, dense and mixed, 12 seeds).

    python ab.py OUT_DIR
"""
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_decode_floor as floor  # noqa: E402

from sbbench.core.decode_problem import validate_decode  # noqa: E402
from sbbench.core.problem import validate  # noqa: E402
from sbbench.core.registry import get_backend  # noqa: E402
from sbbench.harness.decode import DecodeCase, capture_decode, check_decode_case, make_decode_inputs, softmax_decoders  # noqa: E402
from sbbench.harness.timing import peak_memory_mib, time_cuda  # noqa: E402
from sbbench.kernels.triton_sb import _decode_config_list, _config_list, decode, kernels  # noqa: E402
from sbbench.kernels.triton_sb import op as triton_op  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
rows = []


def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------- forward
host_forward_kv = triton_op._forward_kv


def device_forward_kv(options, k, v, varlen):
    chosen = host_forward_kv(options, k, v, varlen)
    return {"K": k, "V": v, "TMA": kernels.DEVICE_DESCRIPTORS} if chosen["TMA"] == kernels.HOST_DESCRIPTORS else chosen


for heads, head_dim in ((12, 128), (24, 64)):
    for seqlen in (4096, 16384):
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(4, heads, seqlen, head_dim, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(3))
        cfg = _config_list(get_backend("triton").resolve_config(validate(q, k, v, None, False, None, None), None))
        inv_temp = head_dim ** -0.5
        calls = {
            "device+stats": ("device", True), "host+stats": ("host", True), "host": ("host", False),
        }
        for name, (desc, stats) in calls.items():
            triton_op._forward_kv = device_forward_kv if desc == "device" else host_forward_kv
            fn = lambda stats=stats: triton_op.triton_sb_fwd(q, k, v, None, inv_temp, False, seqlen, cfg, stats)
            with torch.no_grad():
                fn()
                t = time_cuda(fn, rep_ms=300)
                mem = peak_memory_mib(lambda: fn(), dev)
            emit({"part": "fwd", "variant": name, "D": head_dim, "H": heads, "T": seqlen, "ms": round(t.median_ms, 4),
                  "peak_mib": round(mem, 2)})
        triton_op._forward_kv = host_forward_kv
        for name, backend in (("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fn(backend=backend):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            with torch.no_grad():
                fn()
                t = time_cuda(fn, rep_ms=300)
                mem = peak_memory_mib(lambda: fn(), dev)
            emit({"part": "fwd", "variant": name, "D": head_dim, "H": heads, "T": seqlen, "ms": round(t.median_ms, 4),
                  "peak_mib": round(mem, 2)})
        del q, k, v
        torch.cuda.empty_cache()

# ----------------------------------------------------------------------------------------- decode
spec = importlib.util.spec_from_file_location("decode_before", ROOT / ".whl" / "ab" / "decode_before.py")
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
flush_buffer = torch.empty(floor.FLUSH_BYTES // 4, dtype=torch.float32, device=dev)
flush_buffer.fill_(1.0)
SHAPES = ((1, 16384), (1, 32768), (1, 65536), (1, 131072), (16, 32768), (64, 32768))
VARIANTS = ("before", "new", "before#2", "new#2", "new-split2", "new-nopdl", "off", "sdpa-flash")


def decode_variant(name, cfg, q, kc, vc, lens):
    decode.STAGGER_BY_WAVE = name != "new-split2"
    decode.MERGE_PDL = name != "new-nopdl"
    module = before if name.startswith("before") else decode
    return lambda: module.triton_sb_decode(q, kc, vc, lens, 128 ** -0.5, False, cfg)


for regime in ("dense", "randn"):
    for batch, cache in SHAPES if regime == "dense" else ((1, 131072), (1, 32768), (16, 32768)):
        case = DecodeCase(batch, 32, 8, cache, 128)
        inp = make_decode_inputs(case, regime, device=dev, seed=0)
        q, kc, vc, lens = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]
        kv_bytes = case.kv_bytes(inp["lengths"])
        shipped = get_backend("triton").resolve_decode_config(validate_decode(q, kc, vc, lens, None, False, None, None), None)
        for name in VARIANTS if regime == "dense" else ("before", "new", "before#2", "new#2", "sdpa-flash"):
            skipped = None
            if name == "sdpa-flash":
                call = softmax_decoders(case, inp)["sdpa-flash"][1]
            else:
                cfg = _decode_config_list({**shipped, "skip_log2": None} if name == "off" else shipped)
                call = decode_variant(name, cfg, q, kc, vc, lens)
                with torch.no_grad():
                    skipped = decode.skipped_fraction_of(call()[2], lens, q, kc, False)
            with torch.no_grad():
                call()
                replay, failed = capture_decode(call, dev)
                ms = floor.timed(replay, lambda: flush_buffer.sum())
            emit({"part": "decode", "regime": regime, "variant": name, "batch": batch, "cache": cache,
                  "us": round(ms * 1e3, 2), "kv_pct": round(100 * kv_bytes / (ms * 1e-3) / 4.3e12, 1),
                  "skipped": None if skipped is None else round(skipped, 4), "capture_failed": failed})
        del inp, q, kc, vc
        torch.cuda.empty_cache()

decode.STAGGER_BY_WAVE, decode.MERGE_PDL = True, True
failed = []
for regime in ("dense", "mixed"):
    for seed in range(12):
        got = check_decode_case("triton", DecodeCase(2, 8, 2, 8192, 128), regime, device="cuda", seed=seed)
        failed += [(regime, seed, r["tensor"], r["err_max"], r["budget"]) for r in got if not r["passed"]]
print(f"decode check (new): {len(failed)} failed rows of 48: {failed}")
(out / "ab.json").write_text(json.dumps({"rows": rows, "decode_check_failed": failed}, indent=1))

print(f"{'forward':<13}" + "".join(f"{f'D{d} {t // 1024}k':>18}" for d in (128, 64) for t in (4096, 16384)))
for name in ("device+stats", "host+stats", "host", "fa2", "cudnn"):
    cells = [next(r for r in rows if r["part"] == "fwd" and r["variant"] == name and r["D"] == d and r["T"] == t)
             for d in (128, 64) for t in (4096, 16384)]
    print(f"{name:<13}" + "".join(f"{r['ms']:>9.3f} {r['peak_mib']:>7.1f}M" for r in cells))
for regime in ("dense", "randn"):
    shapes = sorted({(r["batch"], r["cache"]) for r in rows if r.get("regime") == regime})
    print(f"{regime:<11}" + "".join(f"{f'B{b} {c // 1024}k':>16}" for b, c in shapes))
    for name in VARIANTS:
        cells = [next((r for r in rows if r.get("regime") == regime and r["variant"] == name and (r["batch"], r["cache"]) == s), None)
                 for s in shapes]
        if all(c is None for c in cells):
            continue
        print(f"{name:<11}" + "".join(f"{c['us']:>9.2f} {c['kv_pct']:>4.0f}% " if c else " " * 16 for c in cells))
