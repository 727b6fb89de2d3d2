"""Where a short decode call's time goes on one GPU: the same CUDA-graph replay timed after an
L2 flush that writes a 256 MB buffer (triton.testing.do_bench's flush, what the harness used),
after one that only reads it, and back to back with no flush; and the kernels' own durations
from the profiler (CUPTI), with the gaps between them inside a replay::

    python scripts/gpu_decode_floor.py --out DIR

For stick-breaking (``sb_attn_with_kvcache``, the shipped config) and SDPA flash over the same
cache, B=1 at 4k/32k/128k and B=16 at 32k (bf16, D=128, H=32, H_kv=8, Tq=1). Also the device's
copy and read bandwidth (4 GiB). Writes floor.json and a Chrome trace per shape into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import sbbench
from sbbench.harness.decode import DecodeCase, capture_decode, make_decode_inputs, softmax_decoders

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPES = ((1, 4096), (1, 32768), (1, 131072), (16, 32768))
FLUSH_BYTES = 256 * 2**20
RUNS = 200


def timed(replay, flush) -> float:
    """Median ms of RUNS replays, each after ``flush`` (None: back to back, total / RUNS)."""
    for _ in range(10):
        replay()
    torch.cuda.synchronize()
    if flush is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(RUNS):
            replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / RUNS
    events = []
    for _ in range(RUNS):
        flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _cuda_kernels(prof) -> list:
    return sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                  key=lambda e: e.time_range.start)


def kernel_profile(replay, flush, trace: Path) -> dict:
    """Kernel durations (µs, mean over 20 replays) and the span of one replay's kernels, from the
    first kernel's start to the last one's end, after ``flush``. How many kernels the flush and
    the replay launch is counted by profiling each alone first; in the joint profile each
    iteration is then that many flush kernels followed by that many replay kernels."""
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for fn in (flush, replay):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as alone:
            fn()
            torch.cuda.synchronize()
        counts.append(len(_cuda_kernels(alone)))
    n_flush, n_replay = counts
    iterations = 20
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            flush()
            torch.cuda.synchronize()
            replay()
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    kernels = _cuda_kernels(prof)
    per_name: dict[str, list[float]] = {}
    spans, gaps = [], []
    step = n_flush + n_replay
    if len(kernels) != iterations * step:
        return {"error": f"{len(kernels)} kernels, expected {iterations} x ({n_flush} + {n_replay})"}
    for i in range(iterations):
        chunk = kernels[i * step:(i + 1) * step]
        for e in chunk:
            per_name.setdefault(e.name[:70], []).append(e.time_range.elapsed_us())
        own = chunk[n_flush:]
        spans.append(own[-1].time_range.end - own[0].time_range.start)
        gaps.append(sum(b.time_range.start - a.time_range.end for a, b in zip(own, own[1:])))
    return {
        "kernels_us": {n: round(statistics.mean(v), 2) for n, v in per_name.items()},
        "replay_kernels": n_replay,
        "replay_span_us": round(statistics.median(spans), 2),
        "gaps_inside_replay_us": round(statistics.median(gaps), 2),
    }


def bandwidth(dev) -> dict:
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    x.fill_(1)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    copy_tbps = 2 * x.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e12
    z = x.view(torch.float32)
    start.record()
    for _ in range(10):
        z.sum()
    end.record()
    torch.cuda.synchronize()
    read_tbps = x.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e12
    return {"copy_tbps_read_plus_write": round(copy_tbps, 3), "read_tbps_sum": round(read_tbps, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    flush_buffer = torch.empty(FLUSH_BYTES // 4, dtype=torch.float32, device=dev)
    flush_buffer.fill_(1.0)

    def write_flush():
        flush_buffer.zero_()

    def read_flush():
        flush_buffer.sum()

    record = {"device": torch.cuda.get_device_name(), "bandwidth": bandwidth(dev), "shapes": []}
    print(record["bandwidth"])
    for batch, cache in SHAPES:
        case = DecodeCase(batch, HEADS, KV_HEADS, cache, HEAD_DIM)
        inputs = make_decode_inputs(case, "dense", device=dev, seed=0)
        kv_bytes = case.kv_bytes(inputs["lengths"])
        calls = {
            "triton": lambda: sbbench.sb_attn_with_kvcache(
                inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], backend="triton"),
            "sdpa-flash": softmax_decoders(case, inputs)["sdpa-flash"][1],
        }
        for name, call in calls.items():
            with torch.no_grad():
                call()
                replay, failed = capture_decode(call, dev)
                if failed:
                    print(f"{name} B={batch} S={cache}: capture failed {failed}")
                    continue
                row = {"name": name, "batch": batch, "cache": cache, "kv_bytes": kv_bytes}
                for label, flush in (("write_flush", write_flush), ("read_flush", read_flush), ("no_flush", None)):
                    ms = timed(replay, flush)
                    row[f"{label}_us"] = round(ms * 1e3, 2)
                    row[f"{label}_tbps"] = round(kv_bytes / (ms * 1e-3) / 1e12, 3)
                for label, flush in (("write_flush", write_flush), ("read_flush", read_flush)):
                    row[f"profile_{label}"] = kernel_profile(
                        replay, flush, args.out / f"trace_{name}_B{batch}_S{cache}_{label}.json")
            record["shapes"].append(row)
            print(json.dumps(row))
        del inputs
        torch.cuda.empty_cache()
    (args.out / "floor.json").write_text(json.dumps(record, indent=1))
    print(f"{'name':<11} {'B':>3} {'cache':>7} {'write µs':>9} {'read µs':>8} {'none µs':>8} "
          f"{'TB/s w/r/n':>18} {'span w/r µs':>13}")
    for r in record["shapes"]:
        print(f"{r['name']:<11} {r['batch']:>3} {r['cache']:>7} {r['write_flush_us']:>9} {r['read_flush_us']:>8} "
              f"{r['no_flush_us']:>8} {r['write_flush_tbps']:>6}/{r['read_flush_tbps']}/{r['no_flush_tbps']} "
              f"{r['profile_write_flush']['replay_span_us']}/{r['profile_read_flush']['replay_span_us']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
