"""Which wgmma schedules ptxas keeps asynchronous, on minimal Gluon kernels compiled for sm_90 on a
CPU: a Q K^T and a P V per step, K and the accumulator in shared memory and registers.

* ``across``: the next step's Q K^T issued in this step and waited for (``wait(1)``, the P V
  still running) in the next, so it is in flight across the loop's back edge;
* ``within``: two steps per iteration, both Q K^T issued together, each result read after a
  ``wait(1)`` while the other product runs, everything waited for before the back edge.

Prints ptxas's verdict for each (C7514: "wgmma.mma_async instructions are serialized").

    python ptxas_patterns.py
"""
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)


@gluon.jit
def pattern(O, n, WITHIN: gl.constexpr, num_warps: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    x = gl.zeros([64, 64], gl.bfloat16, blocked)
    q = gl.allocate_shared_memory(gl.bfloat16, [64, 64], shared, x)
    k1 = gl.allocate_shared_memory(gl.bfloat16, [64, 64], shared, x)
    k2 = gl.allocate_shared_memory(gl.bfloat16, [64, 64], shared, x + 1.0)  # distinct, or the products merge
    fence_async_shared()
    zero = gl.zeros([64, 64], gl.float32, s_layout)
    acc = warpgroup_mma_init(gl.zeros([64, 64], gl.float32, s_layout))
    if WITHIN:
        for t in range(n):
            za = warpgroup_mma(q, k1.permute((1, 0)), zero, use_acc=False, is_async=True)
            zb = warpgroup_mma(q, k2.permute((1, 0)), zero, use_acc=False, is_async=True)
            za = warpgroup_mma_wait(1, deps=(za,))
            acc = warpgroup_mma(gl.convert_layout((za * 1.5).to(gl.bfloat16), p_layout), k1, acc, is_async=True)
            zb = warpgroup_mma_wait(1, deps=(zb,))
            acc = warpgroup_mma(gl.convert_layout((zb * 1.5).to(gl.bfloat16), p_layout), k2, acc, is_async=True)
            acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
        acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        zp = warpgroup_mma(q, k1.permute((1, 0)), zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(gl.zeros([64, 64], gl.bfloat16, p_layout), k1, acc, is_async=True)
        for t in range(n):
            z = warpgroup_mma_wait(1, deps=(zp,))  # in flight: [Q K_t, P V_{t-1}]: Q K_t done
            p = gl.convert_layout((z * 1.5).to(gl.bfloat16), p_layout)
            zp = warpgroup_mma(q, k2.permute((1, 0)), zero, use_acc=False, is_async=True)
            acc = warpgroup_mma(p, k2, acc, is_async=True)
        acc, zp = warpgroup_mma_wait(0, deps=(acc, zp))
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, s_layout))
    gl.store(O + rows[:, None] * 64 + cols[None, :], acc)


def verdict(within: bool) -> str:
    src = GluonASTSource(fn=pattern, signature={"O": "*fp32", "n": "i32", "WITHIN": "constexpr", "num_warps": "constexpr"},
                         constexprs={"WITHIN": within, "num_warps": 4})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    return next((line.split("ptxas info    : ", 1)[-1] for line in log.splitlines() if "serialized" in line),
                "wgmmas kept asynchronous")


if __name__ == "__main__":
    for within in (False, True):
        print(f"{'within' if within else 'across'}: {verdict(within)}")
