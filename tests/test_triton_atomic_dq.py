"""The Triton backend's non-deterministic backward (``sb_attn(..., deterministic=False)``): its
dK/dV kernel adds dz @ k into a float32 dQ with atomics instead of the dQ kernel forming dz again.

It must compute the same gradients as the deterministic backward (dK and dV bit-identical: their
arithmetic is untouched; dQ within rounding) for every feature the backward has: GQA, packed
varlen, both attend_current, ragged tiles, block skipping, the launch per group of kv heads. On a
CPU these run in the Triton interpreter, fp32 and fp16 only (its bf16 tl.dot is wrong)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from sbbench import sb_attn
from sbbench.cli import app
from sbbench.harness.bench import measure
from sbbench.harness.cases import Case
from sbbench.harness.check import check_case
from sbbench.kernels.reference import reference
from sbbench.kernels.triton_sb import DEFAULT_CONFIG
from sbbench.kernels.triton_sb import op as triton_op

# Small tiles so short sequences cross many blocks, the diagonal and ragged edges; the dK/dV key
# tile differs from the dQ one, so the two backwards add dz @ k up in different groupings.
SMALL = {"fwd_BLOCK_M": 16, "fwd_BLOCK_N": 16, "bwd_BLOCK_M": 16, "bwd_BLOCK_N": 16,
         "bwd_dkdv_BLOCK_M": 16, "bwd_dkdv_BLOCK_N": 32}
# Max |error| / max |reference| against float64 (as tests/test_triton.py), and between the modes.
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
DQ_MODES_TOL = {torch.float32: 1e-6, torch.float16: 2e-3}


def _inputs(q_shape, kv_heads, dtype, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_shape = (q_shape[0], kv_heads) + q_shape[2:] if len(q_shape) == 4 else (q_shape[0], kv_heads, q_shape[2])
    q = (scale * torch.randn(q_shape, generator=gen)).to(device, dtype)
    k = (scale * torch.randn(k_shape, generator=gen)).to(device, dtype)
    v = torch.randn(k_shape, generator=gen).to(device, dtype)
    return q, k, v


def _grads(q, k, v, attend_current, config, deterministic, cu_seqlens=None, max_seqlen=None):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    inv_temp = 1 / math.sqrt(q.shape[-1])
    o, rem = sb_attn(q, k, v, inv_temp, attend_current, backend="triton", cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen, config=config, deterministic=deterministic)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen).to(o)
    drem = torch.randn(rem.shape, generator=gen).to(rem)
    return torch.autograd.grad((o, rem), (q, k, v), (do, drem)), (do, drem)


def _reference_grads(q, k, v, attend_current, upstream, cu_seqlens=None, max_seqlen=None):
    q, k, v = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    o, rem = reference(q, k, v, 1 / math.sqrt(q.shape[-1]), attend_current, cu_seqlens=cu_seqlens,
                       max_seqlen=max_seqlen)
    return torch.autograd.grad((o, rem), (q, k, v), tuple(g.double() for g in upstream))


def _rel(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


def _assert_modes_agree(q, k, v, attend_current, config, tol, cu_seqlens=None, max_seqlen=None):
    """Atomic-mode gradients: dK, dV bit-identical to the deterministic backward's, dQ within
    rounding of it, and all three within ``tol`` of the float64 reference."""
    kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    (dq, dk, dv), upstream = _grads(q, k, v, attend_current, config, True, **kwargs)
    (dq_a, dk_a, dv_a), _ = _grads(q, k, v, attend_current, config, False, **kwargs)
    assert dq_a.dtype == q.dtype and dq_a.shape == q.shape
    assert torch.equal(dk, dk_a) and torch.equal(dv, dv_a)
    assert _rel(dq_a, dq) < DQ_MODES_TOL[q.dtype]
    ref = _reference_grads(q, k, v, attend_current, upstream, **kwargs)
    errors = {name: _rel(x, r) for name, x, r in zip(("dq", "dk", "dv"), (dq_a, dk_a, dv_a), ref)}
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_atomic_dq_dense(heads, kv_heads, attend_current, dtype, device):
    # T=45: not a multiple of any tile; D=24 pads to the 32-wide head tile.
    q, k, v = _inputs((2, heads, 45, 24), kv_heads, dtype, device)
    _assert_modes_agree(q, k, v, attend_current, SMALL, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("attend_current", [False, True])
def test_atomic_dq_packed_varlen_gqa(attend_current, dtype, device):
    lengths = [23, 1, 40, 7]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = _inputs((sum(lengths), 4, 16), 2, dtype, device, seed=1)
    _assert_modes_agree(q, k, v, attend_current, SMALL, TOL[dtype], cu_seqlens=cu, max_seqlen=max(lengths))


def test_atomic_dq_with_block_skipping_and_gqa(device):
    """Peaked logits: the forward stops early on some heads and not on others of the same kv
    head, so the dK/dV kernel visits rows whose walk never reached its block; their dz is zero
    and they must add nothing to dQ (their boundary sums are unwritten: NaN-filled here)."""
    q, k, v = _inputs((1, 4, 160, 16), 2, torch.float32, device, scale=2.0)
    k += 1.0
    q[:, 0::2] = -2.0
    config = {**SMALL, "skip_log2": -20, "skip_check_keys": 32, "skip_checks": 2}
    from sbbench.kernels.triton_sb import _skipped_fraction

    assert _skipped_fraction(q, k, v, 0.25, False, config={**DEFAULT_CONFIG, **config}) > 0.1
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        _assert_modes_agree(q, k, v, False, config, 1e-4)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_atomic_dq_by_head_groups(device, monkeypatch):
    """With the boundary-state budget at zero every kv head gets its own launch pair, each adding
    into its slice of the float32 dQ: the gradients must match the single launch's."""
    q, k, v = _inputs((2, 4, 37, 16), 2, torch.float32, device, seed=2)
    (whole, _, _), _ = _grads(q, k, v, False, SMALL, False)
    monkeypatch.setattr(triton_op, "STATE_BUDGET_Q_MULTIPLE", 0)
    assert triton_op.kv_heads_per_launch(q, 2, 1) == 1
    (grouped, _, _), _ = _grads(q, k, v, False, SMALL, False)
    assert _rel(grouped, whole) < DQ_MODES_TOL[torch.float32]


def test_deterministic_is_the_default_and_bit_reproducible(device):
    q, k, v = _inputs((1, 2, 33, 16), 2, torch.float32, device)
    (first, *_), _ = _grads(q, k, v, False, SMALL, True)
    q2, k2, v2 = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, rem = sb_attn(q2, k2, v2, 0.25, backend="triton", config=SMALL)
    gen = torch.Generator().manual_seed(7)
    do, drem = torch.randn(o.shape, generator=gen), torch.randn(rem.shape, generator=gen)
    (dq_default,) = torch.autograd.grad((o, rem), (q2,), (do, drem))
    assert torch.equal(first, dq_default)


def test_nondeterministic_refused_by_a_backend_without_it(device):
    q, k, v = _inputs((1, 2, 16, 16), 2, torch.float32, device)
    with pytest.raises(ValueError, match=r"^deterministic: backend 'reference'"):
        sb_attn(q, k, v, backend="reference", deterministic=False)
    sb_attn(q, k, v, backend="reference", deterministic=True)  # the default mode: accepted by all
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool"):
        sb_attn(q, k, v, backend="triton", deterministic="no")


def test_harness_rows_name_the_mode(device):
    case = Case(1, 2, 1, 40, 16, "float32", attend_current=True)
    rows = check_case("triton", case, "randn", device=device, fa2=False, seed=3, deterministic=False)
    assert [r["tensor"] for r in rows] == ["o", "rem", "dq", "dk", "dv"]
    assert all(r["passed"] is True and r["deterministic"] is False for r in rows), rows
    refused = check_case("reference", case, "randn", device=device, fa2=False, seed=3, deterministic=False)
    assert [(r["status"], r["deterministic"]) for r in refused] == [("unsupported", False)]
    assert "deterministic" in refused[0]["error"]
    row = measure("triton", case, "fwdbwd", "randn", device=device, seed=3, deterministic=False)
    assert row["status"] == "ok" and row["deterministic"] is False
    assert measure("triton", case, "fwd", "randn", device=device, seed=3)["deterministic"] is True


def test_cli_nondeterministic_flag(tmp_path):
    out = tmp_path / "check.json"
    result = CliRunner().invoke(app, [
        "check", "--backends", "triton,reference", "--seqlens", "24", "--head-dim", "16", "--dtype", "float32",
        "--regime", "randn", "--nondeterministic", "--no-fa2", "--no-progress", "--seed", "4", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert {(r["backend"], r["status"], r["deterministic"]) for r in rows} == {
        ("triton", "ok", False), ("reference", "unsupported", False)}


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads", [(64, 8), (128, 4)])
@pytest.mark.parametrize("attend_current", [False, True])
def test_atomic_dq_within_budget_in_bf16_on_the_gpu(head_dim, heads, attend_current):
    case = Case(2, heads, heads // 2, 1024, head_dim, "bfloat16", attend_current=attend_current)
    for regime in ("dense", "randn"):
        rows = check_case("triton", case, regime, device="cuda", fa2=False, seed=11, deterministic=False)
        assert all(r["passed"] is True for r in rows), [(r["tensor"], r["error"]) for r in rows if not r["passed"]]
