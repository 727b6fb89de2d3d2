"""``sbbench decode-check`` and ``sbbench decode-bench``: the harness's decode cases
(sbbench.harness.decode) on the command line.

Shapes are the product of the comma-separated lists given. ``decode-check`` exits 1 when a row
fails its budget or errors; ``decode-bench`` prints latency, achieved K/V bandwidth, skipped
fraction and the speedup over softmax decode. Bad input is a one-line message and exit 2.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from tabulate import tabulate

from sbbench.cli.app import app, flag_message
from sbbench.cli.harness_cmds import _fail_usage, _fmt, _status, _write_outputs
from sbbench.core.results import shape_label

JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Write the rows to this JSON results file.")]
BackendsOpt = Annotated[
    Optional[str], typer.Option("--backends", help="Comma-separated decode backends (default: triton on a GPU, chunked on a CPU).")
]
BatchOpt = Annotated[str, typer.Option("--batch", help="Comma-separated batch sizes.")]
CacheOpt = Annotated[str, typer.Option("--cache-len", help="Comma-separated cache lengths (tokens per sequence).")]
NewTokensOpt = Annotated[str, typer.Option("--new-tokens", help="Comma-separated query counts per sequence (Tq).")]
HeadsOpt = Annotated[int, typer.Option("--heads", help="Query heads.")]
KvHeadsOpt = Annotated[int, typer.Option("--kv-heads", help="Key/value heads (must divide --heads).")]
HeadDimOpt = Annotated[int, typer.Option("--head-dim", help="Head dimension.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float16, bfloat16, float32 or float64.")]
RegimeOpt = Annotated[str, typer.Option("--regime", help="Comma-separated input regimes (dense, randn, mixed, peaked).")]
AttendCurrentOpt = Annotated[bool, typer.Option("--attend-current/--no-attend-current", help="Queries attend to their own key.")]
RaggedOpt = Annotated[bool, typer.Option("--ragged/--uniform", help="Ragged cache lengths within each batch.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: the GPU when there is one).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed the random inputs (default: fresh every run).")]


# The library names the backend a single call runs; these commands take a list.
DECODE_FLAGS = {"backend": "--backends"}


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _fail_usage(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise _fail_usage(f"{flag}: no value given")
    return values


def _setup(backends, batch, cache_len, new_tokens, heads, kv_heads, head_dim, dtype, regime, attend_current, ragged,
           device):
    from sbbench.harness.decode import DecodeCase

    names = [b.strip() for b in (backends or ("triton" if torch.cuda.is_available() else "chunked")).split(",")]
    try:
        cases = [
            DecodeCase(b, heads, kv_heads, n, head_dim, t, dtype, attend_current, ragged)
            for b, n, t in itertools.product(_ints("--batch", batch), _ints("--cache-len", cache_len),
                                             _ints("--new-tokens", new_tokens))
        ]
    except (ValueError, TypeError) as exc:
        raise _fail_usage(flag_message(exc, DECODE_FLAGS)) from None
    regimes = [r.strip() for r in regime.split(",") if r.strip()]
    return [n for n in names if n], cases, regimes, device


def _run(runner, backends, batch, cache_len, new_tokens, heads, kv_heads, head_dim, dtype, regime, attend_current,
         ragged, device, seed) -> list[dict[str, Any]]:
    """The cases the flags describe, run by ``runner`` (run_decode_check / run_decode_bench)."""
    names, cases, regimes, device = _setup(backends, batch, cache_len, new_tokens, heads, kv_heads, head_dim, dtype,
                                           regime, attend_current, ragged, device)
    try:
        return runner(names, cases, regimes, device, seed=seed)
    except (ValueError, TypeError) as exc:
        raise _fail_usage(flag_message(exc, DECODE_FLAGS)) from None


def decode_check_table(rows: list[dict[str, Any]]) -> str:
    headers = ["backend", "shape", "dtype", "regime", "tensor", "err_max", "err_pt", "budget", "result"]
    body = [[r["backend"], shape_label(r), r["dtype"], r["regime"], r.get("tensor") or "", _fmt(r.get("err_max")),
             _fmt(r.get("err_pt")), _fmt(r.get("budget")), _status(r)] for r in rows]
    return tabulate(body, headers=headers, disable_numparse=True)


def decode_bench_table(rows: list[dict[str, Any]]) -> str:
    headers = ["backend", "shape", "dtype", "regime", "us", "K/V TB/s", "skipped", "vs flash", "vs cudnn", "vs fa-kvc",
               "result"]
    body = [[r["backend"], shape_label(r), r["dtype"], r["regime"], _fmt((r.get("latency_ms") or 0) * 1e3 or None, ".4g"),
             _fmt(r.get("kv_tbps"), ".3g"), _fmt(r.get("skipped_fraction"), ".2f"),
             _fmt(r.get("speedup_sdpa_flash"), ".2f"), _fmt(r.get("speedup_sdpa_cudnn"), ".2f"),
             _fmt(r.get("speedup_flash_attn_with_kvcache"), ".2f"), _status(r, 50)] for r in rows]
    return tabulate(body, headers=headers, disable_numparse=True)


@app.command("decode-check")
def decode_check_command(
    backends: BackendsOpt = None, batch: BatchOpt = "1,4", cache_len: CacheOpt = "1024", new_tokens: NewTokensOpt = "1",
    heads: HeadsOpt = 32, kv_heads: KvHeadsOpt = 8, head_dim: HeadDimOpt = 128, dtype: DtypeOpt = "bfloat16",
    regime: RegimeOpt = "dense,randn", attend_current: AttendCurrentOpt = False, ragged: RaggedOpt = False,
    device: DeviceOpt = None, json_path: JsonOpt = None, seed: SeedOpt = None,
) -> None:
    """Check decode from a KV cache against the float64 oracle (budget 2*err_pt + floor); exit 1 on a failure."""
    from sbbench.harness.check import row_failed
    from sbbench.harness.decode import run_decode_check

    rows = _run(run_decode_check, backends, batch, cache_len, new_tokens, heads, kv_heads, head_dim, dtype, regime,
                attend_current, ragged, device, seed)
    typer.echo(decode_check_table(rows))
    _write_outputs(rows, "decode-check", json_path)
    failed = [r for r in rows if row_failed(r)]
    typer.echo(f"{len(rows)} rows, {len(failed)} failed")
    raise typer.Exit(1 if failed else 0)


@app.command("decode-bench")
def decode_bench_command(
    backends: BackendsOpt = None, batch: BatchOpt = "1,16,64", cache_len: CacheOpt = "4096,32768",
    new_tokens: NewTokensOpt = "1", heads: HeadsOpt = 32, kv_heads: KvHeadsOpt = 8, head_dim: HeadDimOpt = 128,
    dtype: DtypeOpt = "bfloat16", regime: RegimeOpt = "dense", attend_current: AttendCurrentOpt = False,
    ragged: RaggedOpt = False, device: DeviceOpt = None, json_path: JsonOpt = None, seed: SeedOpt = None,
) -> None:
    """Time decode: latency, achieved K/V bandwidth, skipped fraction, speedup over softmax decode."""
    from sbbench.harness.decode import run_decode_bench

    rows = _run(run_decode_bench, backends, batch, cache_len, new_tokens, heads, kv_heads, head_dim, dtype, regime,
                attend_current, ragged, device, seed)
    typer.echo(decode_bench_table(rows))
    _write_outputs(rows, "decode-bench", json_path)
