"""Launching the Triton kernels, as ``torch.library`` custom ops with autograd.

The forward and backward are custom ops (``sbbench::triton_sb_fwd`` / ``sbbench::triton_sb_bwd``)
with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` of a model that calls
``sb_attn`` keeps one graph. Launch parameters travel as one int list (``params.config_to_list``),
and every kernel argument is passed by name.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from sbbench.kernels.triton_sb import kernels
from sbbench.kernels.triton_sb.params import config_from_list

LOG2E = 1.4426950408889634


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any batch/head/sequence strides but read head_dim contiguously, as every
    # layout people use (including x.transpose(1, 2) of (B, T, H, D)) has it.
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(name: str, x: torch.Tensor, varlen: bool) -> dict[str, int]:
    """The kernels' ``stride_<name>b``, ``..h`` and ``..t`` arguments for ``x``: its batch, head
    and token strides, dense (B, H, T, ...) or packed (total, H, ...), which has no batch axis."""
    if varlen:
        b, h, t = 0, x.stride(1), x.stride(0)
    else:
        b, h, t = x.stride(0), x.stride(1), x.stride(2)
    return {f"stride_{name}b": b, f"stride_{name}h": h, f"stride_{name}t": t}


def _layout(q: torch.Tensor, k: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int):
    """(num sequences, heads, kv heads, dense T or 0, rows in the packed row space, longest seq)."""
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1, q.shape[1], k.shape[1], 0, q.shape[0], max_seqlen
    b, h, t, _ = q.shape
    return b, h, k.shape[1], t, b * t, t


def _kernel_flags(dtype: torch.dtype, scan: str) -> dict:
    """Per-dtype arithmetic: float32 inputs get exact fp32 scans (tl.cumsum), IEEE fp32 dots
    and an accurate softplus; fp16 a two-part fp16 scan; bf16 a one-part one (see kernels.py)."""
    fp32 = dtype == torch.float32
    scan_mode = 0 if (scan == "cumsum" or fp32) else (1 if dtype == torch.bfloat16 else 2)
    return {"SCAN": scan_mode, "PRECISION": "ieee" if fp32 else "tf32", "ACCURATE": fp32}


def launch_options(
    config: Mapping[str, Any], dtype: torch.dtype, head_dim: int, attend_current: bool, varlen: bool
) -> dict[str, dict[str, Any]]:
    """Compile-time parameters, warps and stages of the three kernels (``"fwd"``, ``"bwd_dq"``,
    ``"bwd_dkdv"``) for a full, checked launch config (``params.config_from_list``): what the
    launchers pass by name, and what ``sass.py`` compiles to inspect a launch without a GPU."""
    c = config
    common = dict(HEAD_DIM=head_dim, ATTEND_CURRENT=int(attend_current), IS_VARLEN=varlen,
                  BLOCK_D=_block_d(head_dim), **_kernel_flags(dtype, c["scan"]))
    return {
        "fwd": dict(
            common, SKIP=c["skip_log2"] is not None,
            SKIP_CHECK_TILES=max(1, c["skip_check_keys"] // c["fwd_BLOCK_N"]), SKIP_LEVELS=c["skip_checks"],
            BLOCK_M=c["fwd_BLOCK_M"], BLOCK_N=c["fwd_BLOCK_N"], num_warps=c["fwd_num_warps"],
            num_stages=c["fwd_num_stages"], TMA=c["fwd_loads"] == "tma", **_register_cap(c["fwd_maxnreg"]),
        ),
        "bwd_dq": dict(
            common, BLOCK_M=c["bwd_BLOCK_M"], BLOCK_N=c["bwd_BLOCK_N"], STATE_N=c["bwd_dkdv_BLOCK_N"],
            STATES_BY_BLOCK=c["bwd_state_layout"] == "blocks",
            num_warps=c["bwd_num_warps"], num_stages=c["bwd_num_stages"], TMA=c["bwd_loads"] == "tma",
            **_register_cap(c["bwd_maxnreg"]),
        ),
        "bwd_dkdv": dict(
            common, BLOCK_M=c["bwd_dkdv_BLOCK_M"], BLOCK_N=c["bwd_dkdv_BLOCK_N"],
            STATES_BY_BLOCK=c["bwd_state_layout"] == "blocks",
            num_warps=c["bwd_dkdv_num_warps"], num_stages=c["bwd_dkdv_num_stages"], TMA=c["bwd_loads"] == "tma",
            **_register_cap(c["bwd_dkdv_maxnreg"]),
        ),
    }


def _register_cap(maxnreg: int) -> dict[str, int]:
    """ptxas's per-thread register cap (0: its own choice). The backward kernels are latency-bound
    at the two 4-warp programs per SM their registers allow; a cap of 168 fits three (128: four)
    at the price of some spills, which ``sass.py`` counts."""
    return {"maxnreg": maxnreg} if maxnreg else {}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def tma_loads_possible(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors can read these: a Hopper or later GPU (or the interpreter, which
    emulates them), every base address and every stride but the last (contiguous) one a positive
    multiple of 16 bytes, as the tensor memory accelerator requires."""
    device = tensors[0].device
    if device.type == "cuda" and (torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] < 9):
        return False
    for x in tensors:
        if x.data_ptr() % 16 or any(stride <= 0 or (stride * x.element_size()) % 16 for stride in x.stride()[:-1]):
            return False
    return True


def _descriptor_scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_descriptor_allocator() -> None:
    """Kernels that build tensor descriptors on the device need global scratch for them, which
    triton takes from the allocator set for the calling thread (none by default). A caller's
    own allocator is kept."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_descriptor_scratch)


def _tma_loads(wanted: bool, *tensors: torch.Tensor) -> bool:
    """Whether a launch whose config asks for TMA loads (``wanted``) gets them for these
    tensors; when it does, the descriptors' scratch allocator is in place."""
    if not (wanted and tma_loads_possible(*tensors)):
        return False
    ensure_descriptor_allocator()
    return True


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


def _logrem_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the forward keeps of each row's log-stick for the backward: the running sum it
    formed, float64 for float32 inputs and float32 otherwise (kernels._row_sum), so that
    fp16/bf16 keep 4 bytes a row where 8 would add nothing."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def descriptor_kind(kernel: str, config: Mapping[str, Any], varlen: bool) -> int:
    """Where a kernel's TMA loads get their descriptors. Packed inputs: per-head descriptors made
    in the kernel, whose bounds end each sequence. Dense ones: descriptors of the whole
    (B, H, T, D) tensors made on the host, which need no scratch memory, for the forward always
    and for the backward kernels as ``bwd_descriptors`` says."""
    if varlen or (kernel != "fwd" and config["bwd_descriptors"] == "kernel"):
        return kernels.DEVICE_DESCRIPTORS
    return kernels.HOST_DESCRIPTORS


# The tensors each kernel walks in tiles (through descriptors with TMA loads), and the launch
# option that is the tile's row count.
WALKED_TILES = {"fwd": (("K", "V"), "BLOCK_N"), "bwd_dq": (("K", "V"), "BLOCK_N"), "bwd_dkdv": (("Q", "DO"), "BLOCK_M")}


def _walked_tiles(
    wanted: bool, kind: int, tensors: Mapping[str, torch.Tensor], rows: int, block_d: int, *check: torch.Tensor
) -> tuple[int, dict[str, Any]]:
    """(TMA mode, kernel arguments) for the tensors a kernel walks in tiles of ``rows`` rows:
    POINTER_LOADS unless the config asks for TMA (``wanted``) and every tensor (``tensors`` and
    ``check``) allows it, else ``kind`` (``descriptor_kind``); with HOST_DESCRIPTORS the
    arguments are descriptors of the dense tensors."""
    if not _tma_loads(wanted, *tensors.values(), *check):
        return kernels.POINTER_LOADS, dict(tensors)
    if kind == kernels.DEVICE_DESCRIPTORS:
        return kind, dict(tensors)
    block = [1, 1, rows, block_d]
    return kind, {name: TensorDescriptor(x, list(x.shape), list(x.stride()), block) for name, x in tensors.items()}


@torch.library.custom_op("sbbench::triton_sb_fwd", mutates_args=())
def triton_sb_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    inv_temp: float,
    attend_current: bool,
    max_seqlen: int,
    cfg: list[int],
    with_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (o, rem, log2 of 1/rem, first visited key per row) for one call. Without
    ``with_stats`` (inference: no backward will follow) the last two are empty, (heads, 0)."""
    config = config_from_list(cfg)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    varlen = cu_seqlens is not None
    n_seq, heads, kv_heads, t_dense, rows, longest = _layout(q, k, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rem = torch.empty(q.shape[:-1], dtype=q.dtype, device=q.device)  # (B, H, T) or (total, H)
    stat_rows = rows if with_stats else 0
    logrem = torch.empty((heads, stat_rows), dtype=_logrem_dtype(q.dtype), device=q.device)
    stop = torch.empty((heads, stat_rows), dtype=torch.int32, device=q.device)
    if rows == 0:
        return o, rem, logrem, stop
    options = launch_options(config, q.dtype, head_dim, attend_current, varlen)["fwd"]
    names, rows_option = WALKED_TILES["fwd"]
    options["TMA"], kv = _walked_tiles(options["TMA"], descriptor_kind("fwd", config, varlen), dict(zip(names, (k, v))),
                                       options[rows_option], options["BLOCK_D"])
    pairs = n_seq * heads
    kernels.sb_fwd_kernel[(triton.cdiv(longest, options["BLOCK_M"]) * pairs,)](
        Q=q, O=o, REM=rem, LOGREM=logrem, STOP=stop, **kv,
        CU_SEQLENS=cu_seqlens if varlen else rem,  # unread when dense: any pointer will do
        **_strides("q", q, varlen), **_strides("k", k, varlen), **_strides("v", v, varlen),
        **_strides("o", o, varlen), **_strides("r", rem, varlen),
        T_dense=t_dense, total_rows=rows, num_heads=heads, group=heads // kv_heads, num_pairs=pairs,
        sched_pairs=SCHED_PAIRS_QUERY_MAJOR, scale2=inv_temp * LOG2E,
        skip_threshold=float(-config["skip_log2"]) if options["SKIP"] else 0.0, STATS=with_stats, **options,
    )
    return o, rem, logrem, stop


@triton_sb_fwd.register_fake
def _(q, k, v, cu_seqlens, inv_temp, attend_current, max_seqlen, cfg, with_stats=True):
    rows = q.shape[0] if cu_seqlens is not None else q.shape[0] * q.shape[2]
    stat_rows = rows if with_stats else 0
    heads = q.shape[1]
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape[:-1]),
        q.new_empty((heads, stat_rows), dtype=_logrem_dtype(q.dtype)),
        q.new_empty((heads, stat_rows), dtype=torch.int32),
    )


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


# The dQ kernel leaves two float32 boundary sums per (row, dK/dV key block) for the dK/dV kernel:
# heads x T^2 / STATE_N floats, which outgrow everything else at long T (at B=4, H=24, T=16k with
# 64-key blocks they would take 1.5 GiB). The backward therefore runs over groups of kv heads (with
# their query heads) whose sums fit in this multiple of q's bytes (FlashAttention-2 itself holds a
# float32 dq accumulator, twice q's bytes for bf16 input). Heads are independent, so the gradients
# are bit-identical whatever the grouping. Each group is two more launches, and each launch ends
# with its longest dK/dV programs running on a partly idle GPU, so a larger multiple buys fewer
# launches with more memory; 3x keeps the backward's peak near FlashAttention-2's.
STATE_BUDGET_Q_MULTIPLE = 3

# (sequence, head) pairs per chunk of the launch order (kernels._work_order): within a chunk
# every pair's longest program starts before any pair's shorter ones. Larger chunks shorten the
# causal tail; smaller ones keep the K/V a chunk walks in L2. The query-major kernels (forward,
# dQ) read one q tile and walk K/V, which a chunk of 16 pairs shares well. The key-major dK/dV
# kernel goes pair by pair (a chunk of 1): its programs each read all of their pair's q and do,
# which any larger chunk spreads over more pairs than L2 holds.
SCHED_PAIRS_QUERY_MAJOR = 16
SCHED_PAIRS_KEY_MAJOR = 1


def kv_heads_per_launch(q: torch.Tensor, kv_heads: int, state_total: int) -> int:
    """How many kv heads (each with its query heads) one backward launch takes under the
    boundary-state budget: at least one, at most all, and as even a split as that many launches
    allow (24 heads under a budget of 11 go 8 + 8 + 8, not 11 + 11 + 2: a launch of few heads
    leaves most of the GPU idle while its longest programs finish)."""
    group = q.shape[1] // kv_heads
    state_bytes_per_kv_head = 2 * 4 * state_total * group
    budget = STATE_BUDGET_Q_MULTIPLE * q.numel() * q.element_size()
    most = max(1, min(kv_heads, budget // max(state_bytes_per_kv_head, 1)))
    return triton.cdiv(kv_heads, triton.cdiv(kv_heads, most))


def check_state_offsets(longest: int, state_n: int, layout: str) -> None:
    """Raise ``ValueError`` when a sequence of ``longest`` tokens is too long for the kernels'
    int32 boundary-state offsets: within a sequence they reach its slot count by row (about
    T^2 / (2 N)) and block * T by block (about T^2 / N), N the dK/dV key tile."""
    if layout == "blocks":
        reach, limit_note = ((longest - 1) // state_n) * longest, "by block"
    else:
        reach, limit_note = _state_slots(longest, state_n), "by row"
    if reach >= 2**31:
        raise ValueError(
            f"seqlen: {longest} tokens take boundary-state offsets past int32 with bwd_dkdv_BLOCK_N={state_n} "
            f"laid out {limit_note} (bwd_state_layout={layout!r}); a larger bwd_dkdv_BLOCK_N or the 'rows' "
            f"layout reaches further"
        )


def _state_slots(lengths: int | torch.Tensor, block_n: int) -> int | torch.Tensor:
    """Boundary-state slots a sequence of each length (an int, or a tensor of them) needs: row i
    owns i // block_n + 1."""
    full, part = lengths // block_n, lengths % block_n
    return block_n * full * (full + 1) // 2 + part * (full + 1)


@torch.library.custom_op("sbbench::triton_sb_bwd", mutates_args=())
def triton_sb_bwd(
    do: torch.Tensor,
    drem: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logrem: torch.Tensor,
    stop: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    inv_temp: float,
    attend_current: bool,
    max_seqlen: int,
    cfg: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = config_from_list(cfg)
    q, k, v, do = (_last_dim_contiguous(x) for x in (q, k, v, do))
    varlen = cu_seqlens is not None
    if drem is None:
        drem = torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
    n_seq, heads, kv_heads, t_dense, rows, longest = _layout(q, k, cu_seqlens, max_seqlen)
    head_dim = q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if rows == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_m, state_n = config["bwd_BLOCK_M"], config["bwd_dkdv_BLOCK_N"]
    check_state_offsets(longest, state_n, config["bwd_state_layout"])
    num_key_blocks = triton.cdiv(longest, state_n)

    if varlen:
        slots = _state_slots((cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64), state_n)
        cu_states = torch.cat([slots.new_zeros(1), slots.cumsum(0)])
        state_total = int(cu_states[-1])  # one host sync: the buffers' size
    else:
        per_seq = _state_slots(t_dense, state_n)
        # [0, per_seq] made on the device: torch.tensor(list, device=cuda) is a blocking copy,
        # which would wait for the forward to finish before the backward's launches are queued.
        cu_states = torch.arange(0, 2 * per_seq, per_seq, dtype=torch.int64, device=q.device)
        state_total = n_seq * per_seq
    group = heads // kv_heads
    kv_step = kv_heads_per_launch(q, kv_heads, state_total)
    # Scratch for one launch's heads, reused by the next.
    state_r = torch.empty((kv_step * group, state_total), dtype=torch.float32, device=q.device)
    state_p = torch.empty((kv_step * group, state_total), dtype=torch.float32, device=q.device)
    drem_rem = torch.empty((kv_step * group, rows), dtype=torch.float32, device=q.device)
    options = launch_options(config, q.dtype, head_dim, attend_current, varlen)
    wanted_tma = options["bwd_dq"]["TMA"]
    # Arguments both kernels of every launch take alike.
    shared = dict(
        CU_SEQLENS=cu_seqlens if varlen else stop,  # unread when dense: any pointer will do
        CU_STATES=cu_states, DREM_REM=drem_rem, STATE_R=state_r, STATE_P=state_p, T_dense=t_dense, total_rows=rows,
        state_total=state_total, group=group, scale2=inv_temp * LOG2E, inv_temp=inv_temp, num_key_blocks=num_key_blocks,
    )
    for hk0 in range(0, kv_heads, kv_step):
        # Heads are dim 1 of every tensor, dense (B, H, T, ...) or packed (total, H, ...), and
        # dim 0 of the per-row (H, rows) buffers.
        hk1 = min(hk0 + kv_step, kv_heads)
        n_kv, h0, h1 = hk1 - hk0, hk0 * group, hk1 * group
        qc, doc, dremc, dqc = (x[:, h0:h1] for x in (q, do, drem, dq))
        kc, vc, dkc, dvc = (x[:, hk0:hk1] for x in (k, v, dk, dv))
        # Each kernel walks two of these; both kernels take TMA loads only if all four allow them.
        launch_tensors = {"Q": qc, "K": kc, "V": vc, "DO": doc}
        walks = {}
        for kernel in ("bwd_dq", "bwd_dkdv"):
            names, rows = WALKED_TILES[kernel]
            options[kernel]["TMA"], walks[kernel] = _walked_tiles(
                wanted_tma, descriptor_kind(kernel, config, varlen), {name: launch_tensors[name] for name in names},
                options[kernel][rows], options[kernel]["BLOCK_D"],
                *(x for name, x in launch_tensors.items() if name not in names))
        this_launch = dict(
            shared, Q=qc, K=kc, V=vc, DO=doc, STOP=stop[h0:h1],
            # Per (sequence, kv head, key block): the last row whose walk reached the block (-1: none).
            ROW_HI=torch.full((n_seq * n_kv, num_key_blocks), -1, dtype=torch.int32, device=q.device),
            # Per (sequence, kv head): the largest first key of any row (0: nothing skipped).
            MAX_STOP=torch.zeros(n_seq * n_kv, dtype=torch.int32, device=q.device),
            **_strides("q", qc, varlen), **_strides("k", kc, varlen), **_strides("v", vc, varlen),
            **_strides("do", doc, varlen),
        )
        q_pairs, kv_pairs = n_seq * (h1 - h0), n_seq * n_kv
        kernels.sb_bwd_dq_kernel[(triton.cdiv(longest, block_m) * q_pairs,)](
            DREM=dremc, LOGREM=logrem[h0:h1], DQ=dqc, **_strides("dr", dremc, varlen), **_strides("dq", dqc, varlen),
            num_heads=h1 - h0, num_pairs=q_pairs, sched_pairs=SCHED_PAIRS_QUERY_MAJOR,
            **{**this_launch, **walks["bwd_dq"]}, **options["bwd_dq"],
        )
        kernels.sb_bwd_dkdv_kernel[(num_key_blocks * kv_pairs,)](
            DK=dkc, DV=dvc, **_strides("dk", dkc, varlen), **_strides("dv", dvc, varlen),
            num_kv_heads=n_kv, num_pairs=kv_pairs, sched_pairs=SCHED_PAIRS_KEY_MAJOR,
            **{**this_launch, **walks["bwd_dkdv"]}, **options["bwd_dkdv"],
        )
    return dq, dk, dv


@triton_sb_bwd.register_fake
def _(do, drem, q, k, v, logrem, stop, cu_seqlens, inv_temp, attend_current, max_seqlen, cfg):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, inv_temp, attend_current, max_seqlen, cfg, with_stats = inputs
    if not with_stats:
        raise RuntimeError("triton_sb_fwd: with_stats=False keeps nothing for a backward; call it with "
                           "with_stats=True when q, k or v requires grad")
    o, _rem, logrem, stop = output
    ctx.save_for_backward(q, k, v, logrem, stop, cu_seqlens)
    ctx.args = (inv_temp, attend_current, max_seqlen, cfg)


def _backward(ctx, grad_o, grad_rem, _grad_logrem, _grad_stop):
    q, k, v, logrem, stop, cu_seqlens = ctx.saved_tensors
    inv_temp, attend_current, max_seqlen, cfg = ctx.args
    if grad_o is None:
        grad_o = torch.zeros_like(q)
    dq, dk, dv = triton_sb_bwd(
        grad_o, grad_rem, q, k, v, logrem, stop, cu_seqlens, inv_temp, attend_current, max_seqlen, cfg
    )
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("sbbench::triton_sb_fwd", _backward, setup_context=_setup_context)


def skipped_fraction_of(stop: torch.Tensor, cu_seqlens: Optional[torch.Tensor], t_dense: int, attend_current: bool) -> float:
    """Fraction of the causal (row, key) pairs the forward skipped, from its per-row first key."""
    heads, rows = stop.shape
    if cu_seqlens is None:
        positions = torch.arange(t_dense, device=stop.device).repeat(rows // t_dense)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
        positions = torch.arange(rows, device=stop.device) - starts
    visible = (positions + int(attend_current)).sum() * heads
    skipped = stop.long().sum()
    return float(skipped) / max(float(visible), 1.0)
