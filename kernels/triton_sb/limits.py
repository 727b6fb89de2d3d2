"""Which launch configs of the Triton kernels are worth building: the ``triton`` backend's
launch filter, judged from the config, the head dim and the device before anything compiles.

A program holds its float32 accumulators and its score tiles in registers: more values per
thread than a thread has registers (255) spill to local memory and run many times slower; a
tile that gives each thread only a couple of scores leaves the tensor cores idle. Its software
pipeline keeps ``num_stages`` copies of the tiles it streams in shared memory, which must fit
the device's per-block limit. These bounds are deliberately loose: they remove configs that
cannot win, not configs that merely might lose.
"""

from __future__ import annotations

from typing import Any, Mapping

import triton

from sbbench.core.problem import AttnProblem

# float32 values one thread may hold in registers before it must spill (of its 255 registers,
# some go to addresses and loop state).
MAX_VALUES_PER_THREAD = 256
# Scores per thread below which a tile is too small to keep the matrix units busy.
MIN_SCORES_PER_THREAD = 4
# Live (row, key) tiles per program besides the accumulators: the forward keeps the logits,
# their log-sigmoid and the running sums; the backward kernels the probabilities and their
# gradient on top of those.
LIVE_SCORE_TILES = {"fwd": 3, "bwd_dq": 4, "bwd_dkdv": 4}
# Besides the pipelined tiles, each kernel stages one float32 (row, key) tile through shared
# memory to change its register layout between its matrix products (the scores computed by one
# product become an operand of the next).
SCORE_TILE_SCRATCH_BYTES = 4
# Hopper's per-block limit, used when the device did not report one.
DEFAULT_SHARED_MEMORY = 227 * 1024


def _kernel_tiles(config: Mapping[str, Any], head_dim: int) -> dict[str, dict[str, int]]:
    """Per kernel: its tiles, warps and stages, its accumulator rows, and the rows of the tiles
    it streams through shared memory each step."""
    d = max(16, triton.next_power_of_2(head_dim))
    fwd_m, fwd_n = config["fwd_BLOCK_M"], config["fwd_BLOCK_N"]
    dq_m, dq_n = config["bwd_BLOCK_M"], config["bwd_BLOCK_N"]
    kv_m, kv_n = config["bwd_dkdv_BLOCK_M"], config["bwd_dkdv_BLOCK_N"]
    return {
        # Query tile resident (q, o accumulator); k and v streamed.
        "fwd": dict(m=fwd_m, n=fwd_n, warps=config["fwd_num_warps"], stages=config["fwd_num_stages"],
                    acc_rows=fwd_m, resident_rows=fwd_m, streamed_rows=2 * fwd_n, d=d),
        # Query tile resident (q, do, dq accumulator); k and v streamed.
        "bwd_dq": dict(m=dq_m, n=dq_n, warps=config["bwd_num_warps"], stages=config["bwd_num_stages"],
                       acc_rows=dq_m, resident_rows=2 * dq_m, streamed_rows=2 * dq_n, d=d),
        # Key tile resident (k, v, dk and dv accumulators); q and do streamed.
        "bwd_dkdv": dict(m=kv_m, n=kv_n, warps=config["bwd_dkdv_num_warps"], stages=config["bwd_dkdv_num_stages"],
                         acc_rows=2 * kv_n, resident_rows=2 * kv_n, streamed_rows=2 * kv_m, d=d),
    }


def launch_filter(problem: AttnProblem, config: Mapping[str, Any], limits: Mapping[str, Any]) -> str | None:
    """Why ``config`` cannot run or cannot be fast for ``problem``, or None."""
    from sbbench.kernels.triton_sb.params import check_config

    try:
        check_config(config)
    except ValueError as exc:  # a value or combination the launcher refuses
        return str(exc)
    element = problem.dtype.itemsize
    shared = limits.get("shared_memory_per_block") or DEFAULT_SHARED_MEMORY
    for kernel, t in _kernel_tiles(config, problem.head_dim).items():
        threads = 32 * t["warps"]
        scores = t["m"] * t["n"]
        if scores < MIN_SCORES_PER_THREAD * threads:
            return (f"{kernel}: a {t['m']}x{t['n']} tile gives {t['warps']} warps under "
                    f"{MIN_SCORES_PER_THREAD} scores per thread")
        values = (t["acc_rows"] * t["d"] + LIVE_SCORE_TILES[kernel] * scores) / threads
        if values > MAX_VALUES_PER_THREAD:
            return (f"{kernel}: {values:.0f} float32 values per thread in registers "
                    f"(> {MAX_VALUES_PER_THREAD}): it would spill")
        stages = max(1, t["stages"])
        needed = (t["resident_rows"] + stages * t["streamed_rows"]) * t["d"] * element + scores * SCORE_TILE_SCRATCH_BYTES
        if needed > shared:
            return f"{kernel}: {needed // 1024} KiB of shared memory for {stages} stage(s) (> {shared // 1024} KiB)"
    return None


def decode_launch_filter(problem: Any, config: Mapping[str, Any], limits: Mapping[str, Any]) -> str | None:
    """Why a decode launch config cannot run for ``problem`` (a ``DecodeProblem``), or None.

    The split kernel streams K and V tiles through a software pipeline of ``num_stages`` steps,
    which keeps ``num_stages - 1`` tiles of each in shared memory ahead of the one in use."""
    from sbbench.kernels.triton_sb.decode import _check_decode_launch

    try:
        _check_decode_launch(config)
    except ValueError as exc:
        return str(exc)
    shared = limits.get("shared_memory_per_block") or DEFAULT_SHARED_MEMORY
    d = max(16, triton.next_power_of_2(problem.head_dim))
    buffered = max(1, config["num_stages"] - 1)
    needed = buffered * 2 * config["BLOCK_N"] * d * problem.dtype.itemsize
    if needed > shared:
        return f"decode: {needed // 1024} KiB of shared memory for {config['num_stages']} stage(s) (> {shared // 1024} KiB)"
    return None
