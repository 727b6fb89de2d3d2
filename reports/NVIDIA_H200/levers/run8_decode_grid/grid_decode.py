"""Decode launch variants around the shipped config, one process, one GPU: block skipping's
cost on the dense regime (where it skips nothing: every key is read), the split count and the
pipeline depth. Graph replays after an L2 read flush (median of 200), bf16, D=128, H=32,
H_kv=8, Tq=1, SDPA flash over the same cache beside them; kernel durations from the profiler
at B=1, 32k for the shipped config and for skipping off.

    python grid_decode.py OUT_DIR
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
from sbbench.harness.decode import DecodeCase, capture_decode, make_decode_inputs, softmax_decoders  # noqa: E402
from sbbench.kernels.triton_sb import _decode_config_list  # noqa: E402
from sbbench.kernels.triton_sb.decode import triton_sb_decode  # noqa: E402

VARIANTS = {
    "shipped": {},
    "splits33": {"num_splits": 33},
    "check1024": {"skip_check_keys": 1024},
    "off": {"skip_log2": None},
    "off_stages2": {"skip_log2": None, "num_stages": 2},
    "off_stages4": {"skip_log2": None, "num_stages": 4},
    "off_splits64": {"skip_log2": None, "num_splits": 64},
    "off_n128_stages2": {"skip_log2": None, "BLOCK_N": 128, "num_stages": 2},
    "off_warps8": {"skip_log2": None, "num_warps": 8},
    "check1024_stages4": {"skip_check_keys": 1024, "num_stages": 4},
    "check1024_splits64": {"skip_check_keys": 1024, "num_splits": 64},
}
SHAPES = ((1, 16384), (1, 32768), (1, 65536), (1, 131072), (16, 32768))

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
flush_buffer = torch.empty(floor.FLUSH_BYTES // 4, dtype=torch.float32, device=dev)
flush_buffer.fill_(1.0)


def read_flush():
    flush_buffer.sum()


rows = []
for batch, cache in SHAPES:
    case = DecodeCase(batch, 32, 8, cache, 128)
    inp = make_decode_inputs(case, "dense", device=dev, seed=0)
    q, kc, vc, lens = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]
    kv_bytes = case.kv_bytes(inp["lengths"])
    problem = validate_decode(q, kc, vc, lens, None, False, None, None)
    shipped = get_backend("triton").resolve_decode_config(problem, None)
    calls = {}
    for name, override in VARIANTS.items():
        if batch > 1 and "splits" in name:
            continue
        config = {**shipped, **override}
        cfg = _decode_config_list(config)
        calls[name] = (config, lambda cfg=cfg: triton_sb_decode(q, kc, vc, lens, 128 ** -0.5, False, cfg))
    calls["sdpa-flash"] = (None, softmax_decoders(case, inp)["sdpa-flash"][1])
    for name, (config, call) in calls.items():
        with torch.no_grad():
            call()
            replay, failed = capture_decode(call, dev)
            ms = floor.timed(replay, read_flush)
            row = {"variant": name, "batch": batch, "cache": cache, "config": config, "us": round(ms * 1e3, 2),
                   "kv_tbps": round(kv_bytes / (ms * 1e-3) / 1e12, 3), "capture_failed": failed}
            if batch == 1 and cache == 32768 and name in ("shipped", "off", "check1024"):
                row["profile"] = floor.kernel_profile(replay, read_flush, out / f"trace_{name}.json")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    del inp
    torch.cuda.empty_cache()
(out / "grid_decode.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
names = list(dict.fromkeys(r["variant"] for r in rows))
print(f"{'variant':<20}" + "".join(f"{f'B{b} {c // 1024}k':>16}" for b, c in SHAPES))
for name in names:
    cells = []
    for b, c in SHAPES:
        r = next((r for r in rows if r["variant"] == name and r["batch"] == b and r["cache"] == c), None)
        cells.append(f"{r['us']:>8.2f} {100 * r['kv_tbps'] / 4.3:>4.0f}%" if r else "-")
    print(f"{name:<20}" + "".join(f"{x:>16}" for x in cells))
