"""The Triton decode kernel (kernels/triton_sb/decode.py) against the float64 oracle.

On a CPU these run in the Triton interpreter, in float32 and float16 (the interpreter's bf16
tl.dot is wrong); bf16 and long caches run on a GPU (marked ``gpu``). Tolerance: the project's
budget (sbbench.harness.check.budget_metrics): max error <= 2 * err_pt + atol_floor, err_pt being
the error of the reference computed in the kernel's own dtype, plus what block skipping may move
in o and rem (skip_bound)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from sbbench import sb_attn_with_kvcache
from sbbench.core.decode_problem import validate_decode
from sbbench.core.registry import get_backend
from sbbench.harness.check import budget_metrics, skip_bound
from sbbench.kernels.reference import decode_rows

from tests.test_decode import whole_sequence_rows

H, HKV, D = 4, 2, 32
LENGTHS = (0, 1, 9, 70)  # ragged in one batch: empty, a single token, within a block, many blocks
SMALL = {"BLOCK_N": 16, "skip_check_keys": 16}


def decode_inputs(tq, dtype, device, lengths=LENGTHS, capacity=80, scale=1.0, seed=0):
    """Non-contiguous q and caches ((B, T, H, D) memory seen as (B, H, T, D), q with a head to
    spare so Tq = 1 is strided too)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    q = scale * torch.randn(batch, tq, H + 1, D, generator=gen)[:, :, 1:].transpose(1, 2)
    k_cache = scale * torch.randn(batch, capacity, HKV, D, generator=gen).transpose(1, 2)
    v_cache = torch.randn(batch, capacity, HKV, D, generator=gen).transpose(1, 2)
    q, k_cache, v_cache = (x.to(device, dtype) for x in (q, k_cache, v_cache))
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32, device=device)


def assert_within_budget(q, k_cache, v_cache, lengths, attend_current, config):
    got = sb_attn_with_kvcache(q, k_cache, v_cache, lengths, None, attend_current, backend="triton", config=config)
    inv_temp = q.shape[-1] ** -0.5
    ref64 = decode_rows(q, k_cache, v_cache, lengths, inv_temp, attend_current, compute_dtype=torch.float64)
    pt = decode_rows(q, k_cache, v_cache, lengths, inv_temp, attend_current)
    # What the call ran with: the tuned config file's entry for this shape when there is one.
    problem = validate_decode(q, k_cache, v_cache, lengths, None, attend_current, None, None)
    resolved = get_backend("triton").resolve_decode_config(problem, config)
    for name, x, ref, low in zip(("o", "rem"), got, ref64, pt):
        assert x.dtype == q.dtype and x.shape == ref.shape
        assert torch.isfinite(x).all(), f"{name}: NaN/Inf"
        metrics = budget_metrics(x, ref, low, q.dtype, skip_bound(name, resolved, v_cache))
        assert metrics["passed"], f"{name}: err {metrics['err_max']:.3g} over budget {metrics['budget']:.3g}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("config", [{**SMALL, "num_splits": 1}, {**SMALL, "num_splits": 3}], ids=["one_split", "splits"])
def test_matches_oracle_within_budget(dtype, tq, attend_current, config, device):
    assert_within_budget(*decode_inputs(tq, dtype, device), attend_current, config)


def test_default_config_and_rows_of_sb_attn(device):
    # The default launch (auto splits, 64-key tiles) against sb_attn's rows on whole sequences.
    q, k_cache, v_cache, lengths = decode_inputs(3, torch.float32, device)
    got = assert_within_budget(q, k_cache, v_cache, lengths, True, None)
    want = whole_sequence_rows(*(x.double().cpu() for x in (q, k_cache, v_cache)), lengths.cpu(), True)
    for x, ref in zip(got, want):
        assert (x.double().cpu() - ref).abs().max().item() < 1e-5


def test_skipping_stops_far_splits_and_keeps_the_result(device):
    # randn logits use the stick up within tens of keys: far splits and blocks are skipped.
    from sbbench.core.registry import get_backend

    q, k_cache, v_cache, lengths = decode_inputs(1, torch.float32, device, lengths=(150, 200), capacity=200, scale=2.0)
    inv_temp = D ** -0.5
    backend = get_backend("triton")
    config = {**SMALL, "num_splits": 4, "skip_log2": -12}
    skipped = backend.decode_skipped_fraction(q, k_cache, v_cache, lengths, inv_temp, False, config=config)
    assert skipped > 0.5, skipped
    off = {**config, "skip_log2": None}
    assert backend.decode_skipped_fraction(q, k_cache, v_cache, lengths, inv_temp, False, config=off) == 0.0
    o_skip, rem_skip = backend.decode(q, k_cache, v_cache, lengths, inv_temp, False, config=config)
    o_full, rem_full = backend.decode(q, k_cache, v_cache, lengths, inv_temp, False, config=off)
    # The dropped weights stay in the stick: off by at most 2^skip_log2 (times max |v|).
    bound = 2.0**-12 * v_cache.abs().max().item()
    assert (o_skip - o_full).abs().max().item() <= bound
    assert (rem_skip - rem_full).abs().max().item() <= 2.0**-12


def test_far_splits_stop_on_what_nearer_ones_published(device):
    """Keys far from the query have very negative logits (their own splits never use a stick
    up) and the nearest keys very positive ones (the nearest split uses it up at once). Far
    splits stop only on what the nearest split published: in a launch of more than one wave of
    programs, where the nearer splits run first. A one-wave launch does not publish, and its far
    splits read every key. Either way o and rem equal the unskipped result within the bound."""
    from sbbench.kernels.triton_sb import decode as decode_kernel

    capacity, near = 192, 8
    direction = torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(3)), dim=0)
    sign = torch.where(torch.arange(capacity) >= capacity - near, 1.0, -1.0)
    k_seq = (sign[:, None] * direction * 8.0).expand(HKV, capacity, D)
    config = {**SMALL, "num_splits": 4, "skip_log2": -12}
    fractions = {}
    for batch in (1, 2):
        q = (direction * 8.0).expand(batch, H, 1, D).contiguous().to(device)
        k_cache = k_seq.expand(batch, HKV, capacity, D).contiguous().to(device)
        v_cache = torch.randn(batch, HKV, capacity, D, generator=torch.Generator().manual_seed(4)).to(device)
        lengths = torch.full((batch,), capacity, dtype=torch.int32, device=device)
        tiles = batch * HKV  # one row tile holds a group's H / H_kv rows
        one_wave = tiles * config["num_splits"] <= decode_kernel.INTERPRETER_SMS * decode_kernel.PROGRAMS_PER_SM
        assert one_wave == (batch == 1) or device != "cpu"
        backend = get_backend("triton")
        fractions[batch] = backend.decode_skipped_fraction(q, k_cache, v_cache, lengths, D ** -0.5, False, config=config)
        o_skip, rem_skip = backend.decode(q, k_cache, v_cache, lengths, D ** -0.5, False, config=config)
        o_full, rem_full = backend.decode(q, k_cache, v_cache, lengths, D ** -0.5, False,
                                          config={**config, "skip_log2": None})
        assert (o_skip - o_full).abs().max().item() <= 2.0**-12 * v_cache.abs().max().item()
        assert (rem_skip - rem_full).abs().max().item() <= 2.0**-12
    if device == "cpu":  # the interpreter runs the nearer splits first; a GPU decides by timing
        # 12 blocks in 4 splits of 3, each checking after 1 or 2 (staggered): one wave skips
        # only within the nearest split, more waves at least one block of every split.
        assert fractions[1] <= 2 / 12 and fractions[2] >= 4 / 12, fractions


def test_append_then_decode(device):
    q, k_cache, v_cache, lengths = decode_inputs(3, torch.float32, device)
    gen = torch.Generator().manual_seed(5)
    k_new, v_new = (torch.randn(len(LENGTHS), HKV, 3, D, generator=gen).to(device) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    got = sb_attn_with_kvcache(q, k_cache, v_cache, lengths, None, True, k=k_new, v=v_new, backend="triton")
    want = sb_attn_with_kvcache(q, k_ref, v_ref, lengths, None, True, k=k_new, v=v_new, backend="chunked")
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    for x, ref in zip(got, want):
        assert (x - ref).abs().max().item() < 1e-5


def test_bad_launch_config_names_config(device):
    q, k_cache, v_cache, lengths = decode_inputs(1, torch.float32, device)
    for bad in ({"BLOCK_N": 24}, {"num_splits": 1000}, {"skip_log2": 1.5}):
        with pytest.raises(ValueError, match="^config:"):
            sb_attn_with_kvcache(q, k_cache, v_cache, lengths, backend="triton", config=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("batch,capacity", [(1, 4096), (16, 2048), (4, 16384)])
def test_bf16_gpu_within_budget(tq, batch, capacity):
    gen = torch.Generator(device="cuda").manual_seed(tq * batch)
    heads, kv_heads, head_dim = 32, 8, 128
    lengths = torch.randint(0, capacity - tq + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    lengths[0] = capacity - tq
    q = torch.randn(batch, heads, tq, head_dim, generator=gen, device="cuda").bfloat16()
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen, device="cuda").bfloat16()
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen, device="cuda").bfloat16()
    for attend_current in (False, True):
        assert_within_budget(q, k_cache, v_cache, lengths, attend_current, None)


@pytest.mark.gpu
def test_gpu_decode_is_not_pruned_against_its_own_timing():
    """The tuner cuts a config whose first timed run is over twice the best median: for decode
    calls of tens of microseconds that first run must exclude the host's launch overhead, or
    every config but the first is cut."""
    from sbbench.harness.decode import DecodeCase, make_decode_inputs, measure_decode

    case = DecodeCase(batch=1, heads=32, kv_heads=8, cache_len=32768, head_dim=128, dtype="bfloat16")
    inputs = make_decode_inputs(case, "dense", device="cuda", seed=0)
    full = measure_decode("triton", case, "dense", inputs=inputs, device="cuda")
    assert full["status"] == "ok" and full["latency_ms"] < 0.2
    again = measure_decode("triton", case, "dense", inputs=inputs, device="cuda",
                           prune_above_ms=2 * full["latency_ms"])
    assert again["status"] == "ok", again["error"]


@given(tiles=st.integers(1, 40), capacity=st.integers(1, 200_000), block_n=st.sampled_from([16, 32, 64, 128]))
@settings(max_examples=300, deadline=None)
def test_auto_splits_leave_no_split_empty(tiles, capacity, block_n):
    # Auto splitting fills the interpreter's stand-in SMs, and every split of the longest
    # possible sequence gets at least one block: an empty split would be a program that reads
    # nothing and a wider merge.
    from sbbench.kernels.triton_sb.decode import INTERPRETER_SMS, PROGRAMS_PER_SM, auto_splits

    splits = auto_splits(tiles, capacity, block_n, torch.device("cpu"))
    blocks = -(-capacity // block_n)
    per_split = -(-blocks // splits)
    assert 1 <= splits <= max(1, INTERPRETER_SMS * PROGRAMS_PER_SM // tiles)
    assert (splits - 1) * per_split < blocks


def test_merge_never_reads_a_dropped_split(device):
    # A split the merge drops (the splits nearer than it used the stick up) contributes nothing,
    # and its partial output need not be finite: NaN there must not reach o.
    from sbbench.kernels.triton_sb.decode import sb_decode_merge_kernel

    splits, rows, d = 4, 3, 32
    gen = torch.Generator().manual_seed(0)
    o_part = torch.randn(splits, 1, rows, 1, d, generator=gen)
    lr_part = torch.full((splits, 1, rows, 1), 0.5)
    lr_part[2] = 40.0  # split 2 uses the stick up: the farther splits 0 and 1 are dropped (skip at 2^-30)
    o_part[:2] = float("nan")
    o_part, lr_part = o_part.to(device), lr_part.to(device)
    o = torch.empty(1, rows, 1, d, device=device)
    rem = torch.empty(1, rows, 1, device=device)
    sb_decode_merge_kernel[(1,)](
        o_part, lr_part, o, rem, *o.stride()[:3], *rem.stride(), rows, rows, 1, splits, d, 30.0,
        SKIP=True, BLOCK_R=4, BLOCK_D=d, SPLITS_P2=splits, ACCURATE=False, num_warps=4,
    )
    want = o_part[3] + 2.0**-0.5 * o_part[2]
    assert torch.isfinite(o).all()
    assert torch.allclose(o, want.view(1, rows, 1, d), atol=1e-6)
    assert torch.allclose(rem, torch.full_like(rem, 2.0**-40.5))
