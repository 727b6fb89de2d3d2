"""The Triton backend against the float64 oracle.

On a CPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in
float32 and float16 only: the interpreter's bf16 tl.dot is wrong (triton issue 11584). bf16 and
the long sequences run on a GPU (marked ``gpu``)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from sbbench import sb_attn
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.reference import reference
from sbbench.kernels.triton_sb import DEFAULT_CONFIG, _skipped_fraction
from sbbench.kernels.triton_sb import op as triton_op
from sbbench.kernels.triton_sb.kernels import _softplus2
from sbbench.kernels.triton_sb.params import config_from_list, config_to_list

# Small tiles so short sequences cross many blocks, the diagonal and ragged edges.
SMALL = {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 16, "bwd_BLOCK_M": 16, "bwd_BLOCK_N": 16,
         "bwd_dkdv_BLOCK_M": 16, "bwd_dkdv_BLOCK_N": 32}
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}


def _inputs(shape_q, kv_heads, dtype, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape_k = shape_q[:-3] + (kv_heads,) + shape_q[-2:] if len(shape_q) == 4 else (shape_q[0], kv_heads, shape_q[2])
    q = (scale * torch.randn(shape_q, generator=gen)).to(device, dtype)
    k = (scale * torch.randn(shape_k, generator=gen)).to(device, dtype)
    v = torch.randn(shape_k, generator=gen).to(device, dtype)
    return q, k, v


def _compare(q, k, v, attend_current, config, cu_seqlens=None, max_seqlen=None):
    """Max abs error of o, rem, dq, dk, dv against reference in float64, scaled by the reference."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    inv_temp = 1 / math.sqrt(q.shape[-1])
    o, rem = sb_attn(q, k, v, inv_temp, attend_current, backend="triton", cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen, config=config)
    do, drem = torch.randn_like(o), torch.randn_like(rem)
    grads = torch.autograd.grad((o * do).sum() + (rem * drem).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    o64, rem64 = reference(q64, k64, v64, inv_temp, attend_current, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    grads64 = torch.autograd.grad((o64 * do.double()).sum() + (rem64 * drem.double()).sum(), (q64, k64, v64))
    errors = {}
    for name, mine, ref in zip(("o", "rem", "dq", "dk", "dv"), (o, rem, *grads), (o64, rem64, *grads64)):
        assert torch.isfinite(mine).all(), f"{name} has NaN/Inf"
        errors[name] = ((mine.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("attend_current", [False, True])
def test_dense_gqa_ragged_tiles(dtype, attend_current, device):
    # T=45: not a multiple of any tile; 4 query heads reading 2 kv heads; D=80 (not a power of 2).
    q, k, v = _inputs((2, 4, 45, 80), 2, dtype, device)
    errors = _compare(q, k, v, attend_current, SMALL)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("attend_current", [False, True])
def test_varlen_ragged_with_length_one(attend_current, device):
    lengths = [23, 1, 40, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = _inputs((sum(lengths), 4, 32), 1, torch.float32, device)
    errors = _compare(q, k, v, attend_current, SMALL, cu_seqlens=cu, max_seqlen=max(lengths))
    assert max(errors.values()) < TOL[torch.float32], errors


def test_any_strides_transposed_input(device):
    # (B, T, H, D) memory seen as (B, H, T, D) without a copy.
    q, k, v = (x.transpose(1, 2) for x in _inputs((1, 37, 2, 16), 2, torch.float32, device)[:1] * 3)
    q2, k2, v2 = _inputs((1, 2, 37, 16), 2, torch.float32, device, seed=3)
    k, v = k2.transpose(1, 2).contiguous().transpose(1, 2), v2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    errors = _compare(q, k, v, False, SMALL)
    assert max(errors.values()) < TOL[torch.float32], errors


def _forward_backward(q, k, v, attend_current, config, cu_seqlens=None, max_seqlen=None):
    """o, rem and the gradients of a fixed random projection of them."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, rem = sb_attn(q, k, v, 1 / math.sqrt(q.shape[-1]), attend_current, backend="triton", cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen, config=config)
    gen = torch.Generator().manual_seed(1)
    do, drem = (torch.randn(x.shape, generator=gen).to(x.device, x.dtype) for x in (o, rem))
    grads = torch.autograd.grad((o * do).sum() + (rem * drem).sum(), (q, k, v))
    return (o.detach(), rem.detach(), *grads)


POINTER_LOADS = {"fwd_loads": "pointer", "bwd_loads": "pointer"}
TMA_LOADS = {"fwd_loads": "tma", "bwd_loads": "tma"}
HOST_MADE = {**TMA_LOADS, "bwd_descriptors": "host"}


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_tma_loads_read_what_pointer_loads_read(varlen, attend_current, device):
    # D=80 and T=45: the descriptors' zero fill past the head dim and past the sequence end
    # stands in for the pointer loads' masks; GQA (4 heads over 2); packed sequences each get
    # their own descriptor bounds. The backward's q and dO tiles past the sequence end as well.
    if varlen:
        lengths = [23, 1, 40]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q, k, v = _inputs((sum(lengths), 4, 80), 2, torch.float16, device)
        extra = dict(cu_seqlens=cu, max_seqlen=max(lengths))
    else:
        q, k, v = _inputs((2, 4, 45, 80), 2, torch.float16, device)
        extra = {}
    assert triton_op.tma_loads_possible(q, k, v)
    pointer = _forward_backward(q, k, v, attend_current, {**SMALL, **POINTER_LOADS}, **extra)
    for descriptors in (TMA_LOADS, HOST_MADE):
        tma = _forward_backward(q, k, v, attend_current, {**SMALL, **descriptors}, **extra)
        for mine, ref in zip(tma, pointer):
            if device == "cpu":  # the interpreter: same values loaded, same arithmetic
                assert torch.equal(mine, ref)
            else:  # the GPU compiles each its own way; both are held to the oracle elsewhere
                torch.testing.assert_close(mine, ref, rtol=2e-3, atol=2e-3)
    errors = _compare(q, k, v, attend_current, {**SMALL, **TMA_LOADS}, **extra)
    assert max(errors.values()) < TOL[torch.float16], errors


def test_tma_loads_fall_back_where_the_layout_forbids_them(device):
    q, k, v = _inputs((1, 2, 37, 24), 2, torch.float16, device)  # rows of 48 bytes
    assert triton_op.tma_loads_possible(k, v)
    odd = _inputs((1, 2, 37, 20), 2, torch.float16, device)  # rows of 40 bytes: not a multiple of 16
    offset = torch.randn(1, 2, 37, 25, device=device).to(torch.float16)[..., 1:]  # base 2 bytes in
    assert not triton_op.tma_loads_possible(*odd[1:])
    assert not triton_op.tma_loads_possible(offset)
    for q, k, v in (odd, (offset, offset, offset)):
        pointer = _forward_backward(q, k, v, False, {**SMALL, **POINTER_LOADS})
        tma = _forward_backward(q, k, v, False, {**SMALL, **TMA_LOADS})
        assert all(torch.equal(a, b) for a, b in zip(tma, pointer))


def test_dense_inputs_are_walked_through_host_descriptors(device):
    """Dense inputs get descriptors of the whole tensors, made on the host (no scratch); packed
    ones per-head descriptors made in the kernel; a misaligned tensor, among those walked or
    those only checked, pointer loads."""
    q, k, v = _inputs((1, 2, 37, 24), 2, torch.float16, device)
    misaligned = torch.randn(1, 2, 37, 25, device=device).to(torch.float16)[..., 1:]  # base 2 bytes in
    walked = {"K": k, "V": v}
    host, device_made = 2, 1
    kinds = {(kernel, bwd, varlen): triton_op.descriptor_kind(kernel, {"bwd_descriptors": bwd}, varlen)
             for kernel in ("fwd", "bwd_dq", "bwd_dkdv") for bwd in ("kernel", "host") for varlen in (False, True)}
    assert {key for key, kind in kinds.items() if kind == host} == {
        ("fwd", "kernel", False), ("fwd", "host", False), ("bwd_dq", "host", False), ("bwd_dkdv", "host", False)}
    chosen = {
        "dense": triton_op._walked_tiles(True, host, walked, 16, 32),
        "packed": triton_op._walked_tiles(True, device_made, walked, 16, 32),
        "pointer config": triton_op._walked_tiles(False, host, walked, 16, 32),
        "misaligned": triton_op._walked_tiles(True, host, {"K": misaligned, "V": misaligned}, 16, 32),
        "misaligned check": triton_op._walked_tiles(True, host, walked, 16, 32, q, misaligned),
    }
    assert {name: int(mode) for name, (mode, _) in chosen.items()} == {
        "dense": 2, "packed": 1, "pointer config": 0, "misaligned": 0, "misaligned check": 0}
    desc = chosen["dense"][1]["K"]
    assert (desc.shape, desc.strides, desc.block_shape) == (list(k.shape), list(k.stride()), [1, 1, 16, 32])
    assert chosen["packed"][1]["K"] is k and chosen["pointer config"][1]["V"] is v


@pytest.mark.parametrize("varlen", [False, True])
def test_inference_forward_keeps_no_stats(varlen, device, monkeypatch):
    """Without gradients the forward stores no log-stick or first key per row (its memory is o
    and rem alone), and o and rem are bit-identical to a training forward's; a backward through
    a forward that kept nothing is refused."""
    if varlen:
        lengths = [23, 1, 40]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q, k, v = _inputs((sum(lengths), 4, 32), 2, torch.float16, device)
        seqlen = max(lengths)
    else:
        cu = None
        q, k, v = _inputs((2, 4, 45, 32), 2, torch.float16, device)
        seqlen = 45
    cfg = config_to_list({**SMALL, **TMA_LOADS})
    kept = triton_op.triton_sb_fwd(q, k, v, cu, 0.2, False, seqlen, cfg, True)
    bare = triton_op.triton_sb_fwd(q, k, v, cu, 0.2, False, seqlen, cfg, False)
    assert bare[2].shape == bare[3].shape == (4, 0)
    assert kept[2].shape == kept[3].shape == (4, q.shape[0] if varlen else 2 * 45)
    assert torch.equal(bare[0], kept[0]) and torch.equal(bare[1], kept[1])

    calls = []
    real = triton_op.triton_sb_fwd

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    extra = dict(cu_seqlens=cu, max_seqlen=seqlen) if varlen else {}
    monkeypatch.setattr(triton_op, "triton_sb_fwd", spy)
    with torch.no_grad():
        o, rem = sb_attn(q, k, v, 0.2, backend="triton", config={**SMALL, **TMA_LOADS}, **extra)
    sb_attn(q, k, v.detach().requires_grad_(True), 0.2, backend="triton", config={**SMALL, **TMA_LOADS}, **extra)
    monkeypatch.undo()
    assert calls == [False, True]
    assert torch.equal(o, kept[0]) and torch.equal(rem, kept[1])
    with pytest.raises(RuntimeError, match="with_stats"):
        triton_op.triton_sb_fwd(q, k, v.detach().requires_grad_(True), cu, 0.2, False, seqlen, cfg, False)


@pytest.mark.parametrize("scan", ["dot", "cumsum"])
def test_block_skipping_bounded_and_consistent(scan, device):
    """Peaked logits use the stick up within a few keys: the forward stops early, its error stays
    under 2^skip_log2 * max|v|, and the gradients are those of what it computed."""
    q, k, v = _inputs((1, 2, 160, 16), 2, torch.float32, device, scale=2.0)
    config = {**SMALL, "skip_log2": -20, "skip_check_keys": 32, "skip_checks": 2, "scan": scan,
              "bwd_BLOCK_N": 16, "bwd_dkdv_BLOCK_N": 64}
    inv_temp = 1 / math.sqrt(16)
    skipped = _skipped_fraction(q, k, v, inv_temp, False, config=config)
    assert skipped > 0.3, skipped
    o, rem = sb_attn(q, k, v, inv_temp, backend="triton", config=config)
    o64, rem64 = reference(q.double(), k.double(), v.double(), inv_temp, False)
    bound = 2.0**-20 * v.abs().max().item() + 1e-5
    assert (o.double() - o64).abs().max().item() < bound
    assert (rem.double() - rem64).abs().max().item() < 2.0**-20 + 1e-6
    errors = _compare(q, k, v, False, config)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("state_layout", ["rows", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_skipping_with_gqa_reads_no_unwritten_state(dtype, state_layout, device):
    """Rows whose walk stopped right of a key block have no boundary sums for it, yet the dK/dV
    kernel visits them when another query head of the same kv head walked further. With
    torch.empty filling NaN (deterministic mode), reading those sums turns dK/dV into NaN."""
    q, k, v = _inputs((2, 4, 160, 16), 2, dtype, device, scale=2.0)
    # Heads 0 and 2 see logits around -8 and walk every key; heads 1 and 3 stop early.
    k += 1.0
    q[:, 0::2] = -2.0
    config = {**SMALL, "skip_log2": -20, "skip_check_keys": 32, "skip_checks": 2, "bwd_state_layout": state_layout}
    assert _skipped_fraction(q, k, v, 0.25, False, config={**DEFAULT_CONFIG, **config}) > 0.1
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        errors = _compare(q, k, v, False, config)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert max(errors.values()) < TOL[dtype], errors


def test_default_skip_invisible_in_float32(device):
    q, k, v = _inputs((1, 2, 96, 16), 2, torch.float32, device, scale=2.0)
    off = sb_attn(q, k, v, backend="triton", config={**SMALL, "skip_log2": None})
    on = sb_attn(q, k, v, backend="triton", config={**SMALL, "skip_check_keys": 16})
    assert _skipped_fraction(q, k, v, 0.25, False, config={**DEFAULT_CONFIG, **SMALL, "skip_check_keys": 16}) > 0
    for a, b in zip(off, on):
        assert (a - b).abs().max().item() <= 1e-7 * max(1.0, a.abs().max().item())


def _three_backwards(q, k, v, config):
    runs = []
    for _ in range(3):
        o, rem = sb_attn(q, k, v, backend="triton", config=config)
        runs.append(torch.autograd.grad(o.sum() + rem.sum(), (q, k, v)))
    return runs


def test_backward_is_deterministic(device):
    q, k, v = (x.requires_grad_(True) for x in _inputs((1, 4, 70, 32), 2, torch.float32, device))
    first, *others = _three_backwards(q, k, v, SMALL)
    for run in others:
        assert all(torch.equal(a, b) for a, b in zip(first, run))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads", [(64, 24), (128, 12)])
def test_backward_is_bit_identical_on_the_gpu_with_the_tuned_configs(head_dim, heads):
    # The shipped configs of this GPU (config=None), at a size that fills it: three backwards.
    q, k, v = (x.requires_grad_(True) for x in _inputs((2, heads, 4096, head_dim), heads, torch.bfloat16, "cuda"))
    first, *others = _three_backwards(q, k, v, None)
    for run in others:
        assert all(torch.equal(a, b) for a, b in zip(first, run))


def _grads(q, k, v, config, cu_seqlens=None, max_seqlen=None):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, rem = sb_attn(q, k, v, 0.3, False, backend="triton", cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                     config=config)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(o)
    drem = torch.randn(rem.shape, generator=gen).to(rem)
    return torch.autograd.grad((o, rem), (q, k, v), (do, drem))


@pytest.mark.parametrize("loads", ["pointer", "tma", "tma_host"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_backward_by_head_groups_is_bit_identical(varlen, loads, device, monkeypatch):
    """Under a boundary-state budget the backward runs one launch pair per group of kv heads; with
    the budget at zero every kv head is its own group, and the gradients must not change by a bit
    (a wrong head offset in any launch, or in the descriptors of a launch's head slices, would
    move them). The grouped run also orders its programs in chunks of 3 (sequence, head) pairs,
    the last one partial, where the whole run has one chunk: the launch order must not move them
    either."""
    config = {**SMALL, **{"pointer": POINTER_LOADS, "tma": TMA_LOADS, "tma_host": HOST_MADE}[loads]}
    if varlen:
        lengths = [40, 1, 23]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q, k, v = _inputs((sum(lengths), 6, 32), 3, torch.float16, device)
        extra = {"cu_seqlens": cu, "max_seqlen": max(lengths)}
    else:
        q, k, v = _inputs((2, 6, 50, 32), 3, torch.float16, device)
        extra = {}
    whole = _grads(q, k, v, config, **extra)
    monkeypatch.setattr(triton_op, "STATE_BUDGET_Q_MULTIPLE", 0)
    monkeypatch.setattr(triton_op, "SCHED_PAIRS_QUERY_MAJOR", 3)
    monkeypatch.setattr(triton_op, "SCHED_PAIRS_KEY_MAJOR", 3)
    assert triton_op.kv_heads_per_launch(q, 3, 10**6) == 1
    grouped = _grads(q, k, v, config, **extra)
    for name, a, b in zip(("dq", "dk", "dv"), whole, grouped):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_boundary_state_layouts_give_identical_gradients(varlen, device):
    """By row or by key block, the boundary sums are the same values stored in other places, so
    the gradients are bit-identical: GQA, ragged lengths, rows that stop early (skipping) and a
    dQ key tile finer than the dK/dV one (sums stored every other dQ tile)."""
    config = {**SMALL, "bwd_BLOCK_N": 16, "bwd_dkdv_BLOCK_N": 32, "skip_log2": -20, "skip_check_keys": 32}
    if varlen:
        lengths = [70, 1, 45]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        q, k, v = _inputs((sum(lengths), 4, 16), 2, torch.float32, device, scale=2.0)
        extra = {"cu_seqlens": cu, "max_seqlen": max(lengths)}
    else:
        q, k, v = _inputs((2, 4, 90, 16), 2, torch.float32, device, scale=2.0)
        extra = {}
    assert _skipped_fraction(q, k, v, 0.3, False, config={**DEFAULT_CONFIG, **config}, **extra) > 0
    by_row = _grads(q, k, v, {**config, "bwd_state_layout": "rows"}, **extra)
    by_block = _grads(q, k, v, {**config, "bwd_state_layout": "blocks"}, **extra)
    for name, a, b in zip(("dq", "dk", "dv"), by_row, by_block):
        assert torch.equal(a, b), name


def test_boundary_state_offsets_past_int32_are_refused():
    """The kernels' per-sequence state offsets are int32: by block they reach about T^2 / N
    (past 2^31 from T = 262145 at 32-key blocks), by row about half that; a longer sequence is refused
    by name, not silently wrapped."""
    for layout, state_n, ok, too_long in (("blocks", 32, 262144, 262145), ("blocks", 64, 370752, 370753),
                                          ("rows", 32, 370711, 370712), ("rows", 64, 524255, 524256)):
        triton_op.check_state_offsets(ok, state_n, layout)
        with pytest.raises(ValueError, match=rf"seqlen: {too_long} tokens .*bwd_dkdv_BLOCK_N={state_n}"):
            triton_op.check_state_offsets(too_long, state_n, layout)


def test_boundary_state_budget_at_long_sequences():
    """At B=4, H=24, D=64, T=16k (bf16) the boundary sums of all heads would take 1.5 GiB, 8x
    q's bytes; under the default budget (3x q's bytes) one launch takes 8 kv heads, the most
    that fit. At T=8k 17 fit, and the 24 heads go in two even launches of 12."""
    q = torch.empty((4, 24, 16384, 64), dtype=torch.bfloat16, device="meta")
    state_n = DEFAULT_CONFIG["bwd_dkdv_BLOCK_N"]
    state_total = 4 * int(triton_op._state_slots(torch.tensor(16384), state_n))
    q_bytes = q.numel() * q.element_size()
    per_head = 2 * 4 * state_total
    assert 8 < per_head * 24 / q_bytes < 8.1
    step = triton_op.kv_heads_per_launch(q, 24, state_total)
    budget = triton_op.STATE_BUDGET_Q_MULTIPLE * q_bytes
    assert step == 8 and per_head * step <= budget < per_head * (step + 1)
    state_8k = 4 * int(triton_op._state_slots(torch.tensor(8192), state_n))
    assert 2 * 4 * state_8k * 17 <= budget / 2 < 2 * 4 * state_8k * 18
    assert triton_op.kv_heads_per_launch(q[:, :, :8192], 24, state_8k) == 12
    # Short sequences keep one launch; GQA groups never split.
    assert triton_op.kv_heads_per_launch(q[:, :, :2048], 24, 4 * int(triton_op._state_slots(torch.tensor(2048), state_n))) == 24
    assert triton_op.kv_heads_per_launch(q, 3, state_total) == 1


def test_torch_compile_fullgraph(device):
    """The kernel is a torch.library custom op: a compiled caller keeps one graph."""
    q, k, v = (x.requires_grad_(True) for x in _inputs((1, 2, 33, 16), 2, torch.float32, device))

    def model(q, k, v):
        o, rem = sb_attn(q, k, v, backend="triton", config=SMALL)
        return (o * 2).sum() + rem.sum()

    backend = "inductor" if device == "cuda" else "aot_eager"  # CPU: the interpreter runs the op
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = torch.autograd.grad(model(q, k, v), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_bad_config_is_named():
    q, k, v = _inputs((1, 1, 8, 16), 1, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="fwd_BLOCK_M"):
        sb_attn(q, k, v, backend="triton", config={"fwd_BLOCK_M": 24})
    with pytest.raises(ValueError, match="bwd_dkdv_BLOCK_N"):
        sb_attn(q, k, v, backend="triton", config={"bwd_BLOCK_N": 64, "bwd_dkdv_BLOCK_N": 32})


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["dense", "randn", "mixed", "peaked"])
@pytest.mark.parametrize("seqlen,head_dim,batch,kv_heads", [(4096, 128, 1, 2), (16384, 64, 1, 1), (1024, 128, 2, 2)])
def test_bf16_within_budget_on_gpu(regime, seqlen, head_dim, batch, kv_heads):
    from sbbench.harness.check import check_case

    # One head at 16k: the float64 oracle materialises several T x T tensors (4 GiB each). The
    # last shape (batch 2, GQA, D=128) is where a miscompiled dK/dV launch config shows.
    heads = 1 if seqlen > 8192 else 4
    case = Case(batch, heads, min(kv_heads, heads), seqlen, head_dim, "bfloat16")
    rows = check_case("triton", case, regime, device="cuda", fa2=False)
    failed = [(r["tensor"], r["err_max"], r["budget"]) for r in rows if not r["passed"]]
    assert not failed, failed


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("regime", ["dense", "mixed"])
def test_varlen_within_budget_on_gpu(dtype, regime):
    """Packed varlen with GQA at D=128: where triton 3.6 miscompiled a 2-stage dK/dV kernel."""
    from sbbench.harness.check import check_case

    rows = check_case("triton", Case(4, 4, 2, 2048, 128, dtype, varlen=True), regime, device="cuda", fa2=False)
    failed = [(r["tensor"], r["err_max"], r["budget"]) for r in rows if not r["passed"]]
    assert not failed, failed



def test_launches_name_each_kernel_argument_once(monkeypatch, device):
    """Every launch passes each of its kernel's arguments by name, and nothing else but compiler
    options. The interpreter drops unknown keywords silently (a GPU compile raises on them), so
    this records the keywords of a CPU run and compares them with the kernels' signatures."""
    from sbbench.kernels.triton_sb import kernels

    seen = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert not args, f"{self.kernel.fn.__name__} got positional arguments"
                seen[self.kernel.fn.__name__] = set(kwargs)
                return self.kernel[grid](**kwargs)

            return launch

    recorded_kernels = {name: getattr(kernels, name) for name in ("sb_fwd_kernel", "sb_bwd_dq_kernel", "sb_bwd_dkdv_kernel")}
    for name, kernel in recorded_kernels.items():
        monkeypatch.setattr(kernels, name, Recorder(kernel))
    q, k, v = (x.requires_grad_(True) for x in _inputs((1, 2, 20, 16), 1, torch.float32, device))
    o, rem = sb_attn(q, k, v, backend="triton", config=SMALL)
    (o.sum() + rem.sum()).backward()
    compiler_options = {"num_warps", "num_stages", "maxnreg"}
    assert len(seen) == 3
    for name, keywords in seen.items():
        assert keywords - compiler_options == set(recorded_kernels[name].arg_names), name


@triton.jit
def _softplus_kernel(Z, OUT, SCAN: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    sp2, _ = _softplus2(tl.load(Z + offs), False, SCAN)
    tl.store(OUT + offs, sp2)


def test_softplus_polynomials_relative_error():
    """log2(1 + 2^-|z2|) as the kernels compute it for fp16 (SCAN=2) and bf16 (SCAN=1) inputs,
    against float64, relative, for z2 in [-16, 0]: each polynomial's fitted error plus float32
    rounding. The bf16 bound, 1e-4, is a fortieth of a bf16 ulp; one degree fewer would be 4e-4."""
    z2 = torch.linspace(-16.0, 0.0, 4096)
    exact = torch.log2(1 + torch.exp2(z2.double()))
    for scan, bound in ((1, 1e-4), (2, 4e-6)):
        got = torch.empty_like(z2)
        _softplus_kernel[(1,)](z2, got, SCAN=scan, N=z2.numel())
        rel = ((got.double() - exact) / exact).abs().max().item()
        assert rel < bound, (scan, rel)
