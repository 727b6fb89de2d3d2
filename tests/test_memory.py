"""``chunked`` keeps O(T) extra memory: forward + backward on the CPU, measured for real.

Each backend runs in a fresh interpreter, so one backend's freed-but-cached pages, allocator
arenas or lazily loaded kernels never count against the other. The child builds the inputs, runs a
tiny forward + backward first (so one-off initialisation is not charged to the big run), records
``ru_maxrss`` as its baseline, runs forward + backward once at the size asked, and reports how far
the peak resident set rose above the baseline: the backend's extra memory, gradients included.

Print both figures:  python tests/test_memory.py [--seqlen 8192] [--heads 4] [--head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from sbbench import sb_attn

    backend, b, h, t, d = sys.argv[1], *map(int, sys.argv[2:6])
    torch.manual_seed(0)

    def run(t):
        q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
        do, drem = torch.randn(b, h, t, d), torch.randn(b, h, t)
        return q, k, v, do, drem

    def fwd_bwd(q, k, v, do, drem):
        o, rem = sb_attn(q, k, v, backend=backend)
        torch.autograd.backward((o, rem), (do, drem))

    fwd_bwd(*run(min(t, 64)))
    args = run(t)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    fwd_bwd(*args)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"backend": backend, "extra_mib": (peak - base) / 1024, "seconds": seconds}))
    """
)


def measure_extra_memory(backend: str, seqlen: int, batch: int = 1, heads: int = 4, head_dim: int = 64) -> dict:
    """Peak resident memory (MiB) that one float32 forward + backward of ``backend`` adds above
    its inputs, on the CPU, measured in a fresh interpreter; also the seconds it took."""
    if sys.platform != "linux":
        raise RuntimeError("measure_extra_memory reads ru_maxrss in KiB, as Linux reports it")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, backend, str(batch), str(heads), str(seqlen), str(head_dim)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{backend} at T={seqlen} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(seqlen: int, heads: int = 4, head_dim: int = 64) -> tuple[dict, dict]:
    chunked = measure_extra_memory("chunked", seqlen, heads=heads, head_dim=head_dim)
    reference = measure_extra_memory("reference", seqlen, heads=heads, head_dim=head_dim)
    return chunked, reference


def _report(seqlen: int, chunked: dict, reference: dict) -> str:
    return (
        f"B=1 H=4 T={seqlen} D=64 float32 forward+backward, peak RSS above inputs: "
        f"chunked {chunked['extra_mib']:.1f} MiB ({chunked['seconds']:.1f} s), "
        f"reference {reference['extra_mib']:.1f} MiB ({reference['seconds']:.1f} s), "
        f"ratio {reference['extra_mib'] / max(chunked['extra_mib'], 1e-9):.0f}x"
    )


def _check(seqlen: int) -> None:
    chunked, reference = compare(seqlen)
    print(_report(seqlen, chunked, reference))
    # The T x T weights alone are B*H*T*T*4 bytes; reference must show at least that, or the
    # measurement is not measuring.
    assert reference["extra_mib"] >= 4 * seqlen * seqlen * 4 / 2**20
    assert chunked["extra_mib"] < reference["extra_mib"] / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
def test_chunked_uses_a_tenth_of_reference_memory_t2048():
    # Runs every time (~10 s): reference needs ~0.65 GiB here, chunked a few tens of MiB.
    _check(2048)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss units are Linux's")
@pytest.mark.skipif(
    os.environ.get("SBBENCH_SLOW") != "1",
    reason="T=8192: reference needs ~10 GiB and over a minute on 2 cores; set SBBENCH_SLOW=1",
)
def test_chunked_uses_a_tenth_of_reference_memory_t8192():
    _check(8192)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args(argv)
    chunked, reference = compare(args.seqlen, args.heads, args.head_dim)
    print(_report(args.seqlen, chunked, reference).replace("H=4", f"H={args.heads}").replace("D=64", f"D={args.head_dim}"))


if __name__ == "__main__":
    main()
