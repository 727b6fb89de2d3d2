"""Decode merge, A/B in one process on one GPU: ``masked`` loads only the partial outputs of the
splits it keeps (its o load waits on the sticks' load, two memory round trips); ``select`` loads
every written split's partial beside the sticks and zeroes the dropped ones with a select
(NaN-safe, one round trip). bf16, D=128, H=32, H_kv=8, Tq=1, dense cache, shipped configs,
read-flush graph replay, median of 200, each variant twice. Then run 9's numerics check (B=2,
H=8, H_kv=2, cache 8192, dense and mixed, seeds 0-11) with ``select``.

    python ab_merge_select.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3] / "scripts"))
import gpu_decode_floor as floor  # noqa: E402

from sbbench.core.decode_problem import validate_decode  # noqa: E402
from sbbench.core.registry import get_backend  # noqa: E402
from sbbench.harness.decode import DecodeCase, capture_decode, check_decode_case, make_decode_inputs  # noqa: E402
from sbbench.kernels.triton_sb import _decode_config_list  # noqa: E402
from sbbench.kernels.triton_sb import decode  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
flush_buffer = torch.empty(floor.FLUSH_BYTES // 4, dtype=torch.float32, device=dev)
flush_buffer.fill_(1.0)
SHAPES = ((1, 16384), (1, 32768), (1, 65536), (1, 131072), (16, 32768))
VARIANTS = ("masked", "select", "masked#2", "select#2")
rows = []
for batch, cache in SHAPES:
    case = DecodeCase(batch, 32, 8, cache, 128)
    inp = make_decode_inputs(case, "dense", device=dev, seed=0)
    q, kc, vc, lens = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]
    kv_bytes = case.kv_bytes(inp["lengths"])
    shipped = get_backend("triton").resolve_decode_config(validate_decode(q, kc, vc, lens, None, False, None, None), None)
    for name in VARIANTS:
        decode._SELECT_DROPPED = name.startswith("select")
        cfg = _decode_config_list(shipped)
        call = lambda cfg=cfg: decode.triton_sb_decode(q, kc, vc, lens, 128 ** -0.5, False, cfg)
        with torch.no_grad():
            call()
            replay, failed = capture_decode(call, dev)
            ms = floor.timed(replay, lambda: flush_buffer.sum())
        row = {"variant": name, "batch": batch, "cache": cache, "us": round(ms * 1e3, 2),
               "kv_pct": round(100 * kv_bytes / (ms * 1e-3) / 4.3e12, 1), "capture_failed": failed}
        rows.append(row)
        print(json.dumps(row), flush=True)
    del inp
    torch.cuda.empty_cache()

decode._SELECT_DROPPED = True
failed = []
for regime in ("dense", "mixed"):
    for seed in range(12):
        got = check_decode_case("triton", DecodeCase(2, 8, 2, 8192, 128), regime, device="cuda", seed=seed)
        failed += [(regime, seed, r["tensor"], r["err_max"], r["budget"]) for r in got if not r["passed"]]
print(f"check with select: {len(failed)} failed rows of 48: {failed}")
(out / "ab_merge_select.json").write_text(json.dumps({"rows": rows, "check_failed": failed}, indent=1))
print(f"{'variant':<11}" + "".join(f"{f'B{b} {c // 1024}k':>15}" for b, c in SHAPES))
for name in VARIANTS:
    cells = [next(r for r in rows if r["variant"] == name and r["batch"] == b and r["cache"] == c) for b, c in SHAPES]
    print(f"{name:<11}" + "".join(f"{r['us']:>8.2f} {r['kv_pct']:>4.0f}%" for r in cells))
