"""Why the decode tuner's numerics check failed (o: err nan) for the default config at B=16
(its check case: B=2, H=8, H_kv=2, cache 8192, bf16, D=128): the check over many seeds with the
merge loading every split's partial (as shipped) and with dropped splits' partials masked off;
and, per failing call, which splits' partials were left NaN by the split kernel (the check fills
fresh allocations with NaN) and whether the merge dropped them. Then B=1 32k timing of both.

    python diagnose.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3] / "scripts"))
import gpu_decode_floor as floor  # noqa: E402

from sbbench.harness.check import poisoned_outputs  # noqa: E402
from sbbench.harness.decode import DecodeCase, capture_decode, check_decode_case, make_decode_inputs  # noqa: E402
from sbbench.kernels.triton_sb import decode  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
real_merge = decode.sb_decode_merge_kernel
seen = []


class Spy:
    """Stands in for the merge kernel: notes which splits' partials hold NaN, then launches."""

    def __getitem__(self, grid):
        def launch(o_part, lr_part, *args, **kwargs):
            torch.cuda.synchronize()
            splits = o_part.shape[0]
            o_nan = o_part.isnan().flatten(1).any(1).tolist()
            lr_nan = lr_part.isnan().flatten(1).any(1).tolist()
            lr = lr_part.float().flatten(1)
            seen.append({"splits": splits, "o_nan_splits": [s for s in range(splits) if o_nan[s]],
                         "lr_nan_splits": [s for s in range(splits) if lr_nan[s]],
                         "lr_max": [round(float(x), 1) for x in lr.nan_to_num(0).max(1).values.tolist()]})
            return real_merge[grid](o_part, lr_part, *args, **kwargs)
        return launch


decode.sb_decode_merge_kernel = Spy()
result = {}
for mask in (False, True):
    decode._MASK_DROPPED = mask
    fails, details = 0, []
    for regime in ("dense", "mixed"):
        for seed in range(12):
            case = DecodeCase(2, 8, 2, 8192, 128)
            seen.clear()
            rows = check_decode_case("triton", case, regime, device="cuda", seed=seed)
            bad = [r for r in rows if not r["passed"]]
            if bad:
                fails += 1
                details.append({"regime": regime, "seed": seed, "rows": [(r["tensor"], r["err_max"], r["error"]) for r in bad],
                                "partials": list(seen)})
            elif seed == 0:
                details.append({"regime": regime, "seed": seed, "ok": True, "partials": list(seen)})
    result[f"mask_dropped={mask}"] = {"failed_calls": fails, "of": 24, "details": details}
    print(f"mask_dropped={mask}: {fails}/24 checks failed", flush=True)
    for d in details[:4]:
        print(json.dumps(d)[:600], flush=True)

decode.sb_decode_merge_kernel = real_merge
flush_buffer = torch.empty(floor.FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
flush_buffer.fill_(1.0)
case = DecodeCase(1, 32, 8, 32768, 128)
inp = make_decode_inputs(case, "dense", device="cuda", seed=0)
import sbbench  # noqa: E402
timing = {}
for mask in (False, True, False, True):
    decode._MASK_DROPPED = mask
    call = lambda: sbbench.sb_attn_with_kvcache(inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"],
                                                backend="triton")
    with torch.no_grad():
        call()
        replay, _ = capture_decode(call, torch.device("cuda"))
        us = floor.timed(replay, lambda: flush_buffer.sum()) * 1e3
    timing.setdefault(f"mask_dropped={mask}", []).append(round(us, 2))
result["b1_32k_us"] = timing
print("B=1 32k us:", timing)
(out / "diagnose.json").write_text(json.dumps(result, indent=1))
