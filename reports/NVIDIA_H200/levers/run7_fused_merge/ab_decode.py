"""A/B of the decode launch on one GPU, same process: the split kernel plus a separate merge
kernel (decode.py at 42975c8, loaded from decode_before.py beside this file under another op
name) against the merge fused into the split kernel's last program per tile, with its counters
zeroed by a memset per call (``zeros``) or kept in a per-stream workspace that each call leaves
zeroed (``reuse``); SDPA flash over the same cache beside them. Graph replays after an L2 read
flush (median of 200), plus the profiler's kernel durations at B=1, 32k.

decode_before.py is not kept beside the records; it was made with
    git show 42975c8:kernels/triton_sb/decode.py \
      | sed 's/sbbench::triton_sb_decode"/sbbench::triton_sb_decode_before"/' > decode_before.py
and the fused kernel it was compared with was not landed (README.md beside this file)."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3] / "scripts"))
import gpu_decode_floor as floor  # noqa: E402

import sbbench  # noqa: E402
from sbbench.core.decode_problem import validate_decode  # noqa: E402
from sbbench.core.registry import get_backend  # noqa: E402
from sbbench.harness.decode import DecodeCase, capture_decode, make_decode_inputs, softmax_decoders  # noqa: E402
from sbbench.kernels.triton_sb import decode as fused  # noqa: E402
from sbbench.kernels.triton_sb import _decode_config_list  # noqa: E402

spec = importlib.util.spec_from_file_location("decode_before", HERE / "decode_before.py")
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
flush_buffer = torch.empty(floor.FLUSH_BYTES // 4, dtype=torch.float32, device=dev)
flush_buffer.fill_(1.0)


def read_flush():
    flush_buffer.sum()


rows = []
SHAPES = ((1, 4096), (1, 16384), (1, 32768), (1, 65536), (1, 131072), (16, 32768), (64, 32768))
for batch, cache in SHAPES:
    case = DecodeCase(batch, 32, 8, cache, 128)
    inp = make_decode_inputs(case, "dense", device=dev, seed=0)
    q, kc, vc, lens = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]
    problem = validate_decode(q, kc, vc, lens, None, False, None, None)
    config = get_backend("triton").resolve_decode_config(problem, None)
    cfg = _decode_config_list(config)
    inv_temp = 128 ** -0.5

    def call_before():
        return before.triton_sb_decode(q, kc, vc, lens, inv_temp, False, cfg)

    def call_fused():
        return fused.triton_sb_decode(q, kc, vc, lens, inv_temp, False, cfg)

    variants = {"before": (call_before, None), "zeros": (call_fused, False), "reuse": (call_fused, True),
                "sdpa-flash": (softmax_decoders(case, inp)["sdpa-flash"][1], None)}
    ref = None
    for name, (call, reuse) in variants.items():
        if reuse is not None:
            fused._REUSE_ZEROED = reuse
        with torch.no_grad():
            got = call()
            if name != "sdpa-flash":
                if ref is None:
                    ref = [x.clone() for x in got[:2]]
                same = all(torch.equal(a, b) for a, b in zip(ref, got[:2]))
            else:
                same = None
            replay, failed = capture_decode(call, dev)
            ms = floor.timed(replay, read_flush)
            row = {"variant": name, "batch": batch, "cache": cache, "config": config, "us": round(ms * 1e3, 2),
                   "kv_tbps": round(case.kv_bytes(inp["lengths"]) / (ms * 1e-3) / 1e12, 3), "bit_equal_to_before": same,
                   "capture_failed": failed}
            if batch == 1 and cache == 32768:
                row["profile"] = floor.kernel_profile(replay, read_flush, out / f"trace_{name}.json")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
    del inp
    torch.cuda.empty_cache()
(out / "ab_decode.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
print(f"{'B':>3} {'cache':>7} " + " ".join(f"{v:>16}" for v in ("before", "zeros", "reuse", "sdpa-flash")))
for batch, cache in SHAPES:
    cells = []
    for v in ("before", "zeros", "reuse", "sdpa-flash"):
        r = next(r for r in rows if r["batch"] == batch and r["cache"] == cache and r["variant"] == v)
        cells.append(f"{r['us']:>7} {100 * r['kv_tbps'] / 4.3:>5.0f}%{'' if r['bit_equal_to_before'] in (True, None) else '!'}")
    print(f"{batch:>3} {cache:>7} " + " ".join(f"{c:>16}" for c in cells))
