"""sb_attn_with_kvcache: decode rows equal sb_attn's rows on the whole sequence, the append writes
exactly the new slots, and every bad input raises an error naming its argument.

Backends here are the PyTorch ones (``reference`` and ``chunked``'s split-KV path); the Triton
kernel has its own module (tests/test_decode_triton.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sbbench
from sbbench import sb_attn, sb_attn_with_kvcache

B, H, HKV, D = 3, 4, 2, 8
LENGTHS = (0, 1, 9)  # ragged in one batch, including an empty cache and a single token


def strided_inputs(tq, capacity=16, dtype=torch.float64, seed=0, lengths=LENGTHS):
    """q, k_cache, v_cache with non-contiguous strides ((B, T, H, D) memory seen as (B, H, T, D))
    and int32 cache_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    # One head more than used, so that even Tq = 1 leaves q non-contiguous.
    q = torch.randn(batch, tq, H + 1, D, generator=gen, dtype=dtype)[:, :, 1:].transpose(1, 2)
    k_cache = torch.randn(batch, capacity, HKV, D, generator=gen, dtype=dtype).transpose(1, 2)
    v_cache = torch.randn(batch, capacity, HKV, D, generator=gen, dtype=dtype).transpose(1, 2)
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32)


def whole_sequence_rows(q, k_cache, v_cache, cache_seqlens, attend_current, backend="reference"):
    """For each sequence, the rows of sb_attn on its whole sequence (cache plus the queries'
    positions) at the queries' positions: what decode must return."""
    tq = q.shape[2]
    outs, rems = [], []
    for b, cached in enumerate(cache_seqlens.tolist()):
        total = cached + tq
        keys = k_cache[b : b + 1, :, :total]
        vals = v_cache[b : b + 1, :, :total]
        if keys.shape[2] < total:  # no slot for the last query's own key: it is never read
            pad = torch.zeros(1, keys.shape[1], total - keys.shape[2], keys.shape[3], dtype=keys.dtype)
            keys, vals = torch.cat([keys, pad], 2), torch.cat([vals, pad], 2)
        q_full = torch.zeros(1, q.shape[1], total, q.shape[3], dtype=q.dtype)
        q_full[0, :, cached:] = q[b]
        o, rem = sb_attn(q_full, keys, vals, None, attend_current, backend=backend)
        outs.append(o[0, :, cached:])
        rems.append(rem[0, :, cached:])
    return torch.stack(outs), torch.stack(rems)


def assert_close(got, want, atol):
    for name, x, ref in zip(("o", "rem"), got, want):
        assert x.shape == ref.shape and x.dtype == ref.dtype, (name, x.shape, ref.shape, x.dtype, ref.dtype)
        assert torch.isfinite(x).all(), f"{name} has NaN/Inf"
        err = (x.double() - ref.double()).abs().max().item()
        assert err <= atol, f"{name}: max error {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("backend,config", [("reference", None), ("chunked", {"num_splits": 1}),
                                            ("chunked", {"num_splits": 3})])
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("attend_current", [False, True])
def test_rows_of_whole_sequence_float64(backend, config, tq, attend_current):
    q, k_cache, v_cache, lengths = strided_inputs(tq)
    assert not q.is_contiguous() and not k_cache.is_contiguous()
    got = sb_attn_with_kvcache(q, k_cache, v_cache, lengths, None, attend_current, backend=backend, config=config)
    want = whole_sequence_rows(q, k_cache, v_cache, lengths, attend_current)
    assert_close(got, want, 1e-12)


def test_empty_cache_without_attend_current_attends_nothing():
    q, k_cache, v_cache, _ = strided_inputs(1)
    o, rem = sb_attn_with_kvcache(q, k_cache, v_cache, torch.zeros(B, dtype=torch.int32), backend="chunked")
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(rem, torch.ones_like(rem))


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=3),
    tq=st.integers(1, 4),
    splits=st.integers(1, 9),
    attend_current=st.booleans(),
)
def test_split_merge_is_exact_in_float64(lengths, tq, splits, attend_current):
    # Fresh sticks per split merged nearest first are the same function as one stick.
    q, k_cache, v_cache, seqlens = strided_inputs(tq, capacity=48, lengths=tuple(lengths))
    one = sb_attn_with_kvcache(q, k_cache, v_cache, seqlens, None, attend_current, backend="reference")
    split = sb_attn_with_kvcache(q, k_cache, v_cache, seqlens, None, attend_current, backend="chunked",
                                 config={"num_splits": splits})
    assert_close(split, one, 1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 4e-3)])
def test_chunked_low_precision_near_float64(dtype, atol):
    q, k_cache, v_cache, lengths = strided_inputs(3, dtype=dtype, lengths=(0, 1, 13))
    got = sb_attn_with_kvcache(q, k_cache, v_cache, lengths, None, True, backend="chunked", config={"num_splits": 4})
    want = whole_sequence_rows(*(x.double() for x in (q, k_cache, v_cache)), lengths, True)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_close(tuple(x.double() for x in got), want, atol)


def test_auto_picks_a_decode_backend_on_cpu():
    problem = sbbench.core.decode_problem.validate_decode(*strided_inputs(1), None, False, None, None)
    chosen = sbbench.core.registry.select_auto(problem, decode=True)
    assert chosen.decode is not None and chosen.name in ("chunked", "triton")


# --- the append --------------------------------------------------------------------------------


@pytest.mark.parametrize("tq", [1, 3])
def test_append_writes_exactly_the_new_slots(tq):
    q, k_cache, v_cache, lengths = strided_inputs(tq)
    gen = torch.Generator().manual_seed(7)
    k_new = torch.randn(B, HKV, tq, D, generator=gen, dtype=torch.float64)
    v_new = torch.randn(B, HKV, tq, D, generator=gen, dtype=torch.float64)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    got = sb_attn_with_kvcache(q, k_cache, v_cache, lengths, None, True, k=k_new, v=v_new, backend="chunked")
    k_want, v_want = k_before.clone(), v_before.clone()
    for b, cached in enumerate(lengths.tolist()):
        k_want[b, :, cached : cached + tq] = k_new[b]
        v_want[b, :, cached : cached + tq] = v_new[b]
    # Bit for bit: the new slots hold k, v, and every other slot is untouched.
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert not torch.equal(k_cache, k_before)
    assert_close(got, whole_sequence_rows(q, k_want, v_want, lengths, True), 1e-12)
    assert torch.equal(lengths, torch.tensor(LENGTHS, dtype=torch.int32)), "cache_seqlens must not advance"


def test_failed_call_leaves_the_cache_untouched():
    q, k_cache, v_cache, lengths = strided_inputs(1)
    k_new = torch.randn(B, HKV, 1, D, dtype=torch.float64)
    before = k_cache.clone()
    with pytest.raises(ValueError):
        sb_attn_with_kvcache(q, k_cache, v_cache, lengths, k=k_new, v=k_new, backend="chunked",
                             config={"no_such": 1})
    assert torch.equal(k_cache, before)


# --- bad input ---------------------------------------------------------------------------------


def raises(exc, arg, *args, **kwargs):
    with pytest.raises(exc) as info:
        sb_attn_with_kvcache(*args, **kwargs)
    assert str(info.value).startswith(f"{arg}:"), f"message does not name {arg!r}: {info.value}"
    return str(info.value)


def test_cache_too_short_for_the_append_names_cache_seqlens():
    q, k_cache, v_cache, _ = strided_inputs(3, capacity=10)
    k_new = torch.zeros(B, HKV, 3, D, dtype=torch.float64)
    lengths = torch.tensor([0, 7, 8], dtype=torch.int32)  # 8 + 3 > 10
    message = raises(ValueError, "cache_seqlens", q, k_cache, v_cache, lengths, k=k_new, v=k_new)
    assert "sequence 2" in message and "10" in message


def test_full_cache_without_append_is_fine():
    # Tq = 1 reading all S_max keys needs no free slot.
    q, k_cache, v_cache, _ = strided_inputs(1, capacity=10)
    full = torch.full((B,), 10, dtype=torch.int32)
    sb_attn_with_kvcache(q, k_cache, v_cache, full, backend="reference")
    raises(ValueError, "cache_seqlens", q, k_cache, v_cache, full, None, True)  # would read slot 10


@pytest.mark.parametrize(
    "lengths,exc",
    [
        (torch.tensor(LENGTHS, dtype=torch.int64), TypeError),
        (torch.tensor(LENGTHS, dtype=torch.float32), TypeError),
        (list(LENGTHS), TypeError),
        (torch.tensor([0, 1], dtype=torch.int32), ValueError),
        (torch.tensor([[0, 1, 2]], dtype=torch.int32), ValueError),
        (torch.tensor([0, -1, 2], dtype=torch.int32), ValueError),
    ],
)
def test_bad_cache_seqlens(lengths, exc):
    q, k_cache, v_cache, _ = strided_inputs(1)
    raises(exc, "cache_seqlens", q, k_cache, v_cache, lengths)


def test_heads_that_do_not_divide_name_k_cache():
    q, _, _, lengths = strided_inputs(1)
    cache = torch.zeros(B, 3, 16, D, dtype=torch.float64)
    assert "divide" in raises(ValueError, "k_cache", q, cache, cache, lengths)


@pytest.mark.parametrize(
    "arg,change,exc",
    [
        ("k_cache", lambda a: a.update(q=a["q"][:, :, :, :4]), ValueError),  # head dim differs from q's
        ("k_cache", lambda a: a.update(k_cache=a["k_cache"][:2], v_cache=a["v_cache"][:2]), ValueError),
        ("v_cache", lambda a: a.update(v_cache=a["v_cache"][:, :, :8]), ValueError),
        ("q", lambda a: a.update(q=a["q"][:, :, 0]), ValueError),
        ("q", lambda a: a.update(q=a["q"][:, :, :0]), ValueError),
        ("k_cache", lambda a: a.update(k_cache=a["k_cache"].float()), TypeError),
        ("v_cache", lambda a: a.update(v_cache=a["v_cache"].to("meta")), ValueError),
        ("q", lambda a: a.update(q=a["q"].to(torch.int64)), TypeError),
        ("attend_current", lambda a: a.update(attend_current=1), TypeError),
        ("inv_temp", lambda a: a.update(inv_temp=float("nan")), ValueError),
        ("v", lambda a: a.update(k=torch.zeros(B, HKV, 1, D, dtype=torch.float64)), ValueError),
        ("k", lambda a: a.update(k=torch.zeros(B, HKV, 2, D, dtype=torch.float64),
                                 v=torch.zeros(B, HKV, 2, D, dtype=torch.float64)), ValueError),
        ("v", lambda a: a.update(k=torch.zeros(B, HKV, 1, D, dtype=torch.float64),
                                 v=torch.zeros(B, HKV, 1, D)), TypeError),
        ("backend", lambda a: a.update(backend="fa2"), ValueError),
        ("backend", lambda a: a.update(backend="no_such_backend"), ValueError),
        ("config", lambda a: a.update(backend="chunked", config={"fwd_block_q": 64}), ValueError),
        ("config", lambda a: a.update(backend="chunked", config={"num_splits": 0}), ValueError),
    ],
)
def test_bad_input_names_the_argument(arg, change, exc):
    q, k_cache, v_cache, lengths = strided_inputs(1)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths)
    change(args)
    raises(exc, arg, **args)


def test_backend_without_decode_is_refused():
    q, k_cache, v_cache, lengths = strided_inputs(1)
    message = raises(ValueError, "backend", q, k_cache, v_cache, lengths, backend="compiled")
    assert "decode" in message
