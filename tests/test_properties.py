"""Properties the operator has whatever the input (hypothesis): weights and the leftover stick are
probabilities that add up to one, the first position sees nothing without attend_current, packed
varlen is the same as each sequence alone, and GQA is the same as repeating the k/v heads. Each
runs on ``reference`` and on ``chunked`` (where the weights themselves are not visible, through
v = 1, which makes o the weights' row sums)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sbbench
from sbbench.kernels.reference import stick_breaking_weights

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ["reference", "chunked"]
# Small blocks so that hypothesis's short sequences still cross block boundaries in chunked.
CONFIGS = {"reference": None, "chunked": {"fwd_block_q": 16, "fwd_block_k": 16, "bwd_block_q": 16, "bwd_block_k": 16}}

seeds = st.integers(0, 2**31 - 1)
# Logit scales from gentle to the `peaked` regime's |z| ~ 30.
scales = st.sampled_from([0.1, 1.0, 3.0, 10.0, 30.0])


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def attn(backend, q, k, v, attend_current, inv_temp=None, **kw):
    return sbbench.sb_attn(q, k, v, inv_temp, attend_current, backend=backend, config=CONFIGS[backend], **kw)


@SETTINGS
@given(t=st.integers(1, 40), seed=seeds, scale=scales, attend_current=st.booleans())
def test_weights_are_a_partition_of_the_stick(t, seed, scale, attend_current):
    z = scale * randn((2, t, t), seed)
    weights, rem = stick_breaking_weights(z, attend_current)
    assert weights.min() >= 0 and weights.max() <= 1
    assert rem.min() >= 0 and rem.max() <= 1
    torch.testing.assert_close(weights.sum(-1) + rem, torch.ones_like(rem), rtol=0, atol=1e-12)
    # Causal: no weight on keys after the query (nor on the query itself unless attend_current).
    offset = 0 if attend_current else -1
    assert torch.equal(weights, torch.tril(weights, diagonal=offset))


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(t=st.integers(1, 70), h=st.integers(1, 3), d=st.integers(1, 9), seed=seeds, scale=scales, attend_current=st.booleans())
def test_stick_sums_to_one(backend, t, h, d, seed, scale, attend_current):
    q, k = scale * randn((1, h, t, d), seed), randn((1, h, t, d), seed + 1)
    v = torch.ones(1, h, t, d, dtype=torch.float64)
    o, rem = attn(backend, q, k, v, attend_current, inv_temp=1.0)
    # With v = 1 every component of o_i is sum_j A_ij.
    assert o.min() >= -1e-12 and o.max() <= 1 + 1e-12
    assert rem.min() >= 0 and rem.max() <= 1
    torch.testing.assert_close(o[..., 0] + rem, torch.ones_like(rem), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(t=st.integers(1, 40), seed=seeds, scale=scales, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_first_position_attends_nothing(backend, t, seed, scale, dtype):
    q, k, v = (scale * randn((2, 2, t, 5), seed + i, dtype) for i in range(3))
    if t > 1:
        # Query 1 equal to key 0: a logit >= 0, so a weight >= 1/2 that the check below can see
        # (random logits can all be so negative that every rem rounds to 1, e.g. at T=2,
        # scale 10, float32).
        q[:, :, 1] = k[:, :, 0]
    o, rem = attn(backend, q, k, v, False)
    assert torch.equal(o[:, :, 0], torch.zeros_like(o[:, :, 0]))
    assert torch.equal(rem[:, :, 0], torch.ones_like(rem[:, :, 0]))
    if t > 1:  # and the rest does attend: the property is not vacuous
        assert (rem[:, :, 1] <= 0.5).all()


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=4).filter(lambda ls: sum(ls) > 0),
    seed=seeds,
    attend_current=st.booleans(),
)
def test_varlen_equals_each_sequence_alone(backend, lengths, seed, attend_current):
    total, h, hkv, d = sum(lengths), 4, 2, 6
    q, k, v = randn((total, h, d), seed), randn((total, hkv, d), seed + 1), randn((total, hkv, d), seed + 2)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    o, rem = attn(backend, q, k, v, attend_current, cu_seqlens=cu, max_seqlen=max(lengths))
    assert o.shape == q.shape and rem.shape == (total, h)
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        if end == start:
            continue
        one = [x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        o1, rem1 = attn(backend, *one, attend_current)
        torch.testing.assert_close(o[start:end], o1[0].transpose(0, 1), rtol=0, atol=1e-12)
        torch.testing.assert_close(rem[start:end], rem1[0].transpose(0, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    hkv=st.integers(1, 3), group=st.integers(1, 4), t=st.integers(1, 40), seed=seeds, attend_current=st.booleans()
)
def test_gqa_equals_repeated_kv_heads(backend, hkv, group, t, seed, attend_current):
    h, d = hkv * group, 4
    q = randn((2, h, t, d), seed).requires_grad_()
    k, v = randn((2, hkv, t, d), seed + 1).requires_grad_(), randn((2, hkv, t, d), seed + 2).requires_grad_()
    # Query head j reads kv head j // group.
    k_rep, v_rep = (x.repeat_interleave(group, dim=1) for x in (k, v))
    o, rem = attn(backend, q, k, v, attend_current)
    o_rep, rem_rep = attn(backend, q, k_rep, v_rep, attend_current)
    torch.testing.assert_close(o, o_rep, rtol=0, atol=1e-12)
    torch.testing.assert_close(rem, rem_rep, rtol=0, atol=1e-12)
    # Gradients too: a kv head's gradient is the sum over the query heads that read it.
    dq, dk, dv = torch.autograd.grad(o.sum() + rem.sum(), (q, k, v))
    dq_r, dk_r, dv_r = torch.autograd.grad(o_rep.sum() + rem_rep.sum(), (q, k, v))
    for x, r in ((dq, dq_r), (dk, dk_r), (dv, dv_r)):
        torch.testing.assert_close(x, r, rtol=0, atol=1e-10)
