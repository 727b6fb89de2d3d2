"""The Triton kernels' machine code without a GPU: compile a launch for an NVIDIA architecture
with the ptxas that ships in the triton wheel, disassemble it, and count the instructions of
each loop.

It shows, without spending device time, what a launch costs per score: registers and spills,
whether K/V tiles load as 16-byte copies or as masked 2-byte loads, and how many special-function
and other instructions each score takes (an inlined libdevice routine shows up at once). The
tests use it to guard those properties; ``python -m sbbench.kernels.triton_sb.sass`` prints the
table for a launch config. (Not under ``TRITON_INTERPRET=1``: interpreted kernels cannot be
compiled.)

Pointer arguments get 16-byte alignment and strides divisibility by 16, as Triton specialises a
real launch on contiguous tensors; integer scalars are plain i32.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sbbench.kernels.triton_sb import kernels
from sbbench.kernels.triton_sb.op import WALKED_TILES, _logrem_dtype, descriptor_kind, launch_options
from sbbench.kernels.triton_sb.params import CONFIG_FIELDS, LAUNCH_PARAMS, config_from_list, config_to_list

KERNELS = {"fwd": kernels.sb_fwd_kernel, "bwd_dq": kernels.sb_bwd_dq_kernel, "bwd_dkdv": kernels.sb_bwd_dkdv_kernel}
# Element types of the pointer arguments that are not the inputs' dtype.
_POINTER_TYPES = {
    "STOP": "*i32", "CU_SEQLENS": "*i32", "ROW_HI": "*i32", "MAX_STOP": "*i32", "CU_STATES": "*i64",
    "DREM_REM": "*fp32", "STATE_R": "*fp32", "STATE_P": "*fp32",
}
_FLOAT_SCALARS = {"scale2", "inv_temp", "skip_threshold"}
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")


@dataclass
class Loop:
    """One loop of the machine code: its opcodes (with modifiers) and how many scores one pass
    of it computes per thread."""

    opcodes: collections.Counter = field(default_factory=collections.Counter)
    scores_per_thread: float = 0.0

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    def count(self, prefix: str) -> int:
        return sum(n for op, n in self.opcodes.items() if op.startswith(prefix))

    def per_score(self, prefix: str | None = None) -> float:
        n = self.instructions if prefix is None else self.count(prefix)
        return n / self.scores_per_thread


@dataclass
class Build:
    kernel: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    loops: list[Loop]
    sass: str

    def hot_loops(self) -> list[Loop]:
        """The loops that compute scores (they hold special-function-unit instructions)."""
        return [loop for loop in self.loops if loop.count("MUFU")]


def _signature(kernel: str, constexprs: Mapping[str, Any], dtype: torch.dtype) -> tuple[dict, dict]:
    fn = KERNELS[kernel]
    signature, attrs = {}, {}
    pointer_types = {**_POINTER_TYPES, "LOGREM": "*fp64" if _logrem_dtype(dtype) == torch.float64 else "*fp32"}
    if constexprs.get("TMA") == kernels.HOST_DESCRIPTORS:
        names, rows = WALKED_TILES[kernel]
        descriptor = f"tensordesc<{_TRITON_DTYPES[dtype]}[1, 1, {constexprs[rows]}, {constexprs['BLOCK_D']}]>"
        pointer_types.update(dict.fromkeys(names, descriptor))
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif pointer_types.get(name, "").startswith("tensordesc"):
            signature[name] = pointer_types[name]
        elif name.isupper():
            signature[name] = pointer_types.get(name, "*" + _TRITON_DTYPES[dtype])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources(cubin_path: str) -> tuple[int, int]:
    text = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True, text=True,
                          check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return int(match.group(1)), int(match.group(2))


def _loops(sass: str, scores_per_thread: float) -> list[Loop]:
    """Innermost loops, each the code between a label and a later branch back to it. An outer
    loop (the dK/dV kernel's loop over the heads of a group around its query-tile loops) holds
    several inner ones, and its counts would be their sum, not one pass over a tile."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line.strip()))}
    spans = []
    for i, line in enumerate(lines):
        target = _BRANCH.search(line)
        if target and labels.get(target.group(1), i) < i:
            spans.append((labels[target.group(1)], i))
    innermost = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    loops = []
    for start, end in innermost:
        loop = Loop(scores_per_thread=scores_per_thread)
        for body_line in lines[start:end + 1]:
            if m := _INSTRUCTION.match(body_line):
                loop.opcodes[m.group(1) + m.group(2)] += 1
        loops.append(loop)
    return loops


def build(
    kernel: str,
    config: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    attend_current: bool = False,
    varlen: bool = False,
    arch: int = 90,
) -> Build:
    """Compile ``kernel`` ("fwd", "bwd_dq" or "bwd_dkdv") as ``sb_attn`` would launch it with
    ``config`` (over the default), for compute capability ``arch``, and analyse its SASS."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"dtype: expected float16, bfloat16 or float32, got {dtype}")
    # Through the int list, as the custom ops receive it.
    full = config_from_list(config_to_list(config or {}))
    constexprs = dict(launch_options(full, dtype, head_dim, attend_current, varlen)[kernel])
    # As op launches a training step on aligned inputs.
    if constexprs["TMA"]:
        constexprs["TMA"] = descriptor_kind(kernel, full, varlen)
    if kernel == "fwd":
        constexprs["STATS"] = True
    # Compiler options (warps, stages, a register cap) go to triton.compile, the rest are constexprs.
    compile_options = {name: constexprs.pop(name) for name in ("num_warps", "num_stages", "maxnreg")
                       if name in constexprs}
    fn = KERNELS[kernel]
    signature, attrs = _signature(kernel, constexprs, dtype)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=compile_options,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        registers, spill = _resources(path)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    scores_per_thread = constexprs["BLOCK_M"] * constexprs["BLOCK_N"] / (32 * compile_options["num_warps"])
    return Build(kernel, registers, spill, compiled.metadata.shared, _loops(sass, scores_per_thread), sass)


def to_json(b: Build) -> dict[str, Any]:
    """A build without its SASS text, hot loops only."""
    return {"kernel": b.kernel, "registers": b.registers, "spill_bytes": b.spill_bytes, "shared_bytes": b.shared_bytes,
            "loops": [{"opcodes": dict(loop.opcodes), "scores_per_thread": loop.scores_per_thread}
                      for loop in b.hot_loops()]}


def from_json(data: Mapping[str, Any]) -> Build:
    loops = [Loop(collections.Counter(x["opcodes"]), x["scores_per_thread"]) for x in data["loops"]]
    return Build(data["kernel"], data["registers"], data["spill_bytes"], data["shared_bytes"], loops, "")


def main(argv: list[str] | None = None) -> None:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=VALUE",
                        help="launch parameter over the default (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="print the builds' hot loops as JSON (what the tests read: they run in the "
                        "Triton interpreter, whose kernels cannot be compiled, so they call this in a "
                        "subprocess)")
    args = parser.parse_args(argv)
    config = {}
    for item in args.config:
        name, _, value = item.partition("=")
        if name not in CONFIG_FIELDS:
            parser.error(f"--config: unknown parameter {name!r}")
        if isinstance(next(p for p in LAUNCH_PARAMS if p.name == name).default, str):
            config[name] = value
        elif name == "skip_log2" and value.lower() == "none":
            config[name] = None
        else:
            try:
                config[name] = int(value)
            except ValueError:
                parser.error(f"--config: {name} takes an integer, got {value!r}")
    rows, builds = [], []
    for kernel in KERNELS:
        b = build(kernel, config, dtype=getattr(torch, args.dtype), head_dim=args.head_dim, arch=args.arch)
        builds.append(b)
        for i, loop in enumerate(b.hot_loops()):
            rows.append([kernel, b.registers, b.spill_bytes, b.shared_bytes, i, loop.instructions,
                         f"{loop.per_score():.1f}", f"{loop.per_score('MUFU'):.2f}", f"{loop.per_score('FFMA'):.2f}",
                         loop.count("LDGSTS"), loop.count("LDG.E.U16") + loop.count("LDG.E.U8")])
    if args.json:
        print(json.dumps([to_json(b) for b in builds]))
        return
    print(tabulate(rows, headers=["kernel", "regs", "spill B", "shared B", "loop", "instr", "instr/score",
                                  "MUFU/score", "FFMA/score", "cp.async", "2-byte loads"]))


if __name__ == "__main__":
    main()
