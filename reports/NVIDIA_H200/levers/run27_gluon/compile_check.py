"""Compile gluon_fwd's variants for sm_90 without a GPU: registers, spills, barriers per loop."""
import itertools, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon import language as gl
sys.path.insert(0, os.path.dirname(__file__))
import gluon_fwd as G

def build(d, bn, stages, overlap, ws, dtype="bf16", bm=64, maxnreg=None):
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    def desc(rows):
        return f"tensordesc<{dtype}[{rows}, {d}],{gl.NVMMASharedLayout.get_default_for([rows, d], gdt)!r}>"
    sig = {"q_desc": desc(bm), "k_desc": desc(bn), "v_desc": desc(bn), "O": f"*{dtype}", "LOGREM": "*fp32",
           "T": "i32", "num_heads": "i32", "group": "i32", "scale2": "fp32",
           "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "STAGES": "constexpr",
           "SCAN": "constexpr", "OVERLAP": "constexpr", "WS": "constexpr", "num_warps": "constexpr"}
    const = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages, "SCAN": 1 if dtype == "bf16" else 2,
             "OVERLAP": overlap, "WS": ws, "num_warps": 4}
    opts = {"num_warps": 4}
    if maxnreg: opts["maxnreg"] = maxnreg
    src = GluonASTSource(fn=G.sb_fwd_gluon_kernel, signature=sig, constexprs=const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "k.cubin"); open(p, "wb").write(k.asm["cubin"])
        cuobj = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        res = subprocess.run([cuobj, "-res-usage", p], capture_output=True, text=True).stdout
        nvd = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
        sass = subprocess.run([nvd, "-c", p], capture_output=True, text=True).stdout
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
        px = os.path.join(tmp, "k.ptx"); open(px, "w").write(k.asm["ptx"])
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", px, "-o", os.path.join(tmp, "x.cubin")] +
                             ([f"--maxrregcount={maxnreg}"] if maxnreg else []), capture_output=True, text=True).stderr
    k.serialized = "serialized" in log
    regs = re.search(r"REG:(\d+)", res).group(1); stack = re.search(r"STACK:(\d+)", res).group(1)
    return k, regs, stack, sass

if __name__ == "__main__":
    for d, bn, st, ov, ws in [(64, 64, 3, False, False), (64, 64, 3, True, False), (64, 64, 3, False, True),
                              (64, 64, 3, True, True), (128, 32, 3, False, False), (128, 32, 3, True, False),
                              (128, 64, 3, True, False), (128, 32, 3, True, True)]:
        try:
            k, regs, stack, sass = build(d, bn, st, ov, ws)
            print(d, bn, st, ov, ws, "SERIALIZED" if k.serialized else "pipelined", "regs", regs, "stack", stack, "BAR.SYNC", sass.count("BAR.SYNC"),
                  "BAR.ARV", sass.count("BAR.ARV"), "LDL", sass.count("LDL"), "HGMMA", sass.count("HGMMA"),
                  "STS", sass.count(" STS"), "LDS", sass.count(" LDS"))
        except Exception as e:
            print(d, bn, st, ov, ws, "FAILED", str(e)[:3000])
