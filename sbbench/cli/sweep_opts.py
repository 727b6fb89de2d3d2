"""The sweep flags check, bench and tune share (``--backends --mode --batch ...``), as typer options.

Each command gets its own set (:class:`SweepOptions`), because the defaults its ``--help`` shows
differ: they are read from the tables in :mod:`sbbench.harness.sweep`, the same ones the sweep is
built from, so the help cannot drift from what runs. A command annotates its parameters with the
set's attributes (``batch: BENCH.batch = None``) and hands the values to
:func:`sbbench.harness.sweep.sweeps_from_flags`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sbbench.harness.inputs import REGIMES
from sbbench.harness.sweep import DEFAULT_BACKENDS, DEFAULT_SHAPES


def _listed(values: list[Any]) -> str:
    """``[1024, 2048, 4096]`` as ``1024..4096`` (the flag's own range syntax) when they are
    successive powers of two, else comma-separated."""
    doubling = len(values) > 2 and all(isinstance(v, int) for v in values) and all(
        b == 2 * a for a, b in zip(values, values[1:])
    )
    return f"{values[0]}..{values[-1]}" if doubling else ", ".join(str(v) for v in values)


def _per_device(command: str, field: str) -> str:
    if field == "backends":
        gpu, cpu = DEFAULT_BACKENDS[("cuda", command)], DEFAULT_BACKENDS[("cpu", command)]
        return f"GPU: {_listed(gpu)}; CPU: {_listed(cpu)} (those that can run)"
    gpu, cpu = DEFAULT_SHAPES[("cuda", command)][field], DEFAULT_SHAPES[("cpu", command)][field]
    if gpu == cpu:
        return _listed(gpu)
    return f"GPU: {_listed(gpu)}; CPU: {_listed(cpu)}"


class SweepOptions:
    """The sweep options of one command (``check``, ``bench`` or ``tune``), each an ``Annotated``
    type whose ``--help`` shows that command's default on a GPU and on a CPU."""

    def __init__(self, command: str) -> None:
        def option(names: str, help: str, kind: Any = Optional[str], default: str | None = None) -> Any:
            return Annotated[kind, typer.Option(*names.split(), help=help, show_default=default or False)]

        def shaped(field: str) -> str:
            return _per_device(command, field)

        self.backends = option(
            "--backends", "Comma-separated backends: registered names (`sbbench list`) or a user's module:function.",
            default=shaped("backends"))
        self.mode = option("--mode", "Comma-separated modes: fwd, bwd, fwdbwd, or all.", default=shaped("mode"))
        self.batch = option("--batch", "Batch size(s), comma-separated (varlen: number of packed sequences).",
                            default=shaped("batch"))
        self.heads = option("--heads", "Query heads H, comma-separated.", default=shaped("heads"))
        self.kv_heads = option("--kv-heads", "Key/value heads (GQA/MQA; must divide --heads).",
                               default="--heads")
        self.head_dim = option("--head-dim", "Head dim D, comma-separated.", default=shaped("head_dim"))
        self.seqlens = option("--seqlens", "Sequence lengths T: comma-separated, or a..b for the powers of two "
                              "between.", default=shaped("seqlens"))
        self.dtype = option("--dtype", "Comma-separated: bfloat16 (bf16), float16 (fp16), float32 (fp32), float64.",
                            default=shaped("dtype"))
        self.regime = option("--regime", f"Input regime(s): {', '.join(REGIMES)}, or all.", default=shaped("regime"))
        self.attend_current = option("--attend-current/--no-attend-current", "Whether query i attends key i.",
                                     Optional[bool], "no-attend-current")
        self.varlen = option("--varlen/--no-varlen",
                             "Packed variable-length input (cu_seqlens) of --batch ragged sequences.",
                             Optional[bool], "no-varlen")
        self.device = option("--device", "cpu or cuda.", default="cuda when a GPU is visible, else cpu")
        self.sweep = option("--sweep", "A sweep file (JSON or YAML): a list of sweeps; flags given override its "
                            "fields.", Optional[Path])


CHECK = SweepOptions("check")
BENCH = SweepOptions("bench")
TUNE = SweepOptions("tune")

# The names ``sbbench tune`` annotates its parameters with.
AttendCurrentOpt = TUNE.attend_current
BatchOpt = TUNE.batch
DtypeOpt = TUNE.dtype
HeadDimOpt = TUNE.head_dim
HeadsOpt = TUNE.heads
KvHeadsOpt = TUNE.kv_heads
SeqlensOpt = TUNE.seqlens
SweepFileOpt = TUNE.sweep
