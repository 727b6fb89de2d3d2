"""The PyTorch backends against the oracle: float64 gradcheck of ``reference`` and ``chunked``;
``chunked`` and ``compiled`` equal to ``reference`` in float32 (forward and backward), on shapes
whose T is a multiple of no chunk size, T = 1, and head dims that are not powers of two."""

from __future__ import annotations

import pytest
import torch

import sbbench

# Inductor's own internals use a deprecated torch.jit API while compiling.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

TINY = {"fwd_block_q": 2, "fwd_block_k": 3, "bwd_block_q": 3, "bwd_block_k": 2}
SMALL = {"fwd_block_q": 16, "fwd_block_k": 16, "bwd_block_q": 16, "bwd_block_k": 16}
# Each case: (B, H, H_kv, T, D). T = 50/37/130/300 are multiples of no block size; 1 is the
# single-token edge; 80 and 24 are head dims that are not powers of two.
SHAPES = [(2, 4, 2, 50, 24), (1, 2, 1, 1, 80), (1, 3, 3, 37, 80), (2, 4, 1, 130, 24), (1, 2, 2, 300, 16)]


def inputs(b, h, hkv, t, d, dtype=torch.float32, seed=0, requires_grad=False, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(b, h, t, d, generator=gen, dtype=torch.float64)
    k = scale * torch.randn(b, hkv, t, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, t, d, generator=gen, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)]


def packed_inputs(lengths, h, hkv, d, dtype=torch.float32, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, n, d, generator=gen, dtype=torch.float64) for n in (h, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)], cu, max(lengths)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over max |ref|: relative to the tensor's scale, robust to entries near 0."""
    scale = ref.detach().abs().max().clamp_min(1e-30)
    return float((x.detach().double() - ref.detach().double()).abs().max() / scale)


def assert_rel(x: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert x.shape == ref.shape and x.dtype == ref.dtype, what
    assert torch.isfinite(x).all(), f"{what}: NaN/Inf"
    err = rel_err(x, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


# --- float64 gradcheck -----------------------------------------------------------------------


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("backend, config", [("reference", None), ("chunked", TINY)], ids=["reference", "chunked"])
def test_gradcheck_dense_gqa(backend, config, attend_current):
    q, k, v = inputs(1, 4, 2, 7, 3, dtype=torch.float64, requires_grad=True, seed=1)

    def fn(q, k, v):
        return sbbench.sb_attn(q, k, v, 0.7, attend_current, backend=backend, config=config)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("backend, config", [("reference", None), ("chunked", TINY)], ids=["reference", "chunked"])
def test_gradcheck_varlen(backend, config, attend_current):
    (q, k, v), cu, m = packed_inputs([4, 1, 5], 2, 1, 3, dtype=torch.float64, requires_grad=True, seed=2)

    def fn(q, k, v):
        return sbbench.sb_attn(q, k, v, None, attend_current, backend=backend, config=config, cu_seqlens=cu, max_seqlen=m)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_chunked_large_logits():
    # Logits up to |z| ~ 20: the softplus thresholds and the running log-stick in float64.
    q, k, v = inputs(1, 1, 1, 6, 2, dtype=torch.float64, requires_grad=True, seed=3, scale=3.5)
    assert torch.autograd.gradcheck(lambda q, k, v: sbbench.sb_attn(q, k, v, 1.0, False, backend="chunked", config=TINY), (q, k, v))


# --- chunked against reference ---------------------------------------------------------------


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_forward_matches_reference_fp32(shape, attend_current):
    q, k, v = inputs(*shape, seed=hash(shape) % 1000)
    o_ref, rem_ref = sbbench.sb_attn(q, k, v, None, attend_current, backend="reference")
    for config in (None, SMALL):
        o, rem = sbbench.sb_attn(q, k, v, None, attend_current, backend="chunked", config=config)
        assert_rel(o, o_ref, 1e-5, f"o {config}")
        assert_rel(rem, rem_ref, 1e-5, f"rem {config}")


def test_chunked_float32_forward_within_twice_pytorch_error():
    # FlashAttention-2's rule without the floor: chunked's float32 o must stay within 2x the
    # error of the naive formula run in float32, on each of 12 fixed randn draws. This holds
    # because chunked sums A v far-first (``chunked._far_first``); nearest-first, unlucky draws
    # exceed it. (With logits a few times larger the error is the rounding of z itself, which
    # chunked and the float32 reference round differently, so the draws are plain randn.)
    worst = 0.0
    for seed in range(12):
        q, k, v = inputs(1, 2, 1, 128, 32, seed=seed)
        o64, _ = sbbench.sb_attn(q.double(), k.double(), v.double(), None, True, backend="reference")
        o32, _ = sbbench.sb_attn(q, k, v, None, True, backend="reference")
        o, _ = sbbench.sb_attn(q, k, v, None, True, backend="chunked")
        err_pt = float((o32.double() - o64).abs().max())
        worst = max(worst, float((o.double() - o64).abs().max()) / (2 * err_pt))
    assert worst <= 1.0, f"chunked float32 o error {worst:.2f}x of 2x PyTorch's"


def test_chunked_float64_matches_reference_to_rounding():
    q, k, v = inputs(2, 4, 2, 50, 24, dtype=torch.float64, scale=3.0)
    o_ref, rem_ref = sbbench.sb_attn(q, k, v, backend="reference")
    o, rem = sbbench.sb_attn(q, k, v, backend="chunked", config=SMALL)
    assert_rel(o, o_ref, 1e-12, "o")
    assert_rel(rem, rem_ref, 1e-12, "rem")


@pytest.mark.parametrize("attend_current", [False, True])
def test_chunked_many_tiny_blocks_forward_backward(attend_current):
    # T = 50 with 16-wide blocks: 4 query chunks x up to 4 key blocks, partial last blocks,
    # blocks that straddle the diagonal; forward and backward blocks of different sizes.
    config = {"fwd_block_q": 16, "fwd_block_k": 32, "bwd_block_q": 32, "bwd_block_k": 16}
    q, k, v = inputs(2, 4, 2, 50, 24, requires_grad=True, seed=4)
    gen = torch.Generator().manual_seed(5)
    do, drem = torch.randn(2, 4, 50, 24, generator=gen), torch.randn(2, 4, 50, generator=gen)
    results = {}
    for backend, cfg in (("reference", None), ("chunked", config)):
        o, rem = sbbench.sb_attn(q, k, v, None, attend_current, backend=backend, config=cfg)
        grads = torch.autograd.grad((o, rem), (q, k, v), (do, drem))
        results[backend] = (o, rem, *grads)
    for name, x, ref in zip(("o", "rem", "dq", "dk", "dv"), results["chunked"], results["reference"]):
        assert_rel(x, ref, 1e-5, name)


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_chunked_backward_matches_reference_fp32(shape, attend_current):
    q, k, v = inputs(*shape, requires_grad=True, seed=6)
    b, h, _, t, d = shape
    gen = torch.Generator().manual_seed(7)
    do, drem = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, generator=gen)
    grads = {}
    for backend in ("reference", "chunked"):
        o, rem = sbbench.sb_attn(q, k, v, None, attend_current, backend=backend, config=SMALL if backend == "chunked" else None)
        grads[backend] = torch.autograd.grad((o, rem), (q, k, v), (do, drem))
    for name, x, ref in zip(("dq", "dk", "dv"), grads["chunked"], grads["reference"]):
        assert x.shape == ref.shape
        assert_rel(x, ref, 1e-5, name)


def test_chunked_gradient_through_rem_only_and_o_only():
    q, k, v = inputs(1, 2, 2, 20, 8, requires_grad=True, seed=8)
    # rem does not depend on v: reference's graph leaves dv out, chunked must return zeros.
    for pick in (0, 1):
        ref = torch.autograd.grad(
            sbbench.sb_attn(q, k, v, backend="reference")[pick].sum(), (q, k, v), allow_unused=True, materialize_grads=True
        )
        got = torch.autograd.grad(sbbench.sb_attn(q, k, v, backend="chunked", config=SMALL)[pick].sum(), (q, k, v))
        for x, r in zip(got, ref):
            assert_rel(x, r, 1e-5, f"output {pick}")


def test_chunked_takes_transposed_bthd_views_without_copy():
    gen = torch.Generator().manual_seed(9)
    b, t, h, d = 2, 40, 4, 16
    q_bthd, k_bthd, v_bthd = (torch.randn(b, t, n, d, generator=gen) for n in (h, 2, 2))
    q, k, v = (x.transpose(1, 2).requires_grad_() for x in (q_bthd, k_bthd, v_bthd))
    assert not q.is_contiguous() and q.data_ptr() == q_bthd.data_ptr()
    o, rem = sbbench.sb_attn(q, k, v, backend="chunked", config=SMALL)
    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
    o_ref, rem_ref = sbbench.sb_attn(qc, kc, vc, backend="reference")
    assert_rel(o, o_ref, 1e-5, "o")
    assert_rel(rem, rem_ref, 1e-5, "rem")
    g = torch.autograd.grad(o.sum() + rem.sum(), (q, k, v))
    g_ref = torch.autograd.grad(o_ref.sum() + rem_ref.sum(), (qc, kc, vc))
    for x, r in zip(g, g_ref):
        assert_rel(x, r, 1e-5, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_half_precision_within_budget(dtype):
    # docs/design.md section 4: err <= 2 err_pt + floor, err_pt being reference in the same dtype.
    q, k, v = inputs(1, 2, 2, 100, 32, seed=10)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    o64, rem64 = sbbench.sb_attn(q64, k64, v64, backend="reference")
    ql, kl, vl = (x.to(dtype) for x in (q, k, v))
    o_pt, rem_pt = sbbench.sb_attn(ql, kl, vl, backend="reference")
    o, rem = sbbench.sb_attn(ql, kl, vl, backend="chunked", config=SMALL)
    assert o.dtype == dtype and rem.dtype == dtype
    for x, pt, ref in ((o, o_pt, o64), (rem, rem_pt, rem64)):
        err = (x.double() - ref).abs().max()
        err_pt = (pt.double() - ref).abs().max()
        assert err <= 2 * err_pt + 1e-5, (float(err), float(err_pt))


def test_chunked_varlen_matches_reference():
    (q, k, v), cu, m = packed_inputs([50, 1, 17, 33], 4, 2, 24, requires_grad=True, seed=11)
    outs = {}
    for backend, cfg in (("reference", None), ("chunked", SMALL)):
        o, rem = sbbench.sb_attn(q, k, v, backend=backend, config=cfg, cu_seqlens=cu, max_seqlen=m)
        outs[backend] = (o, rem, *torch.autograd.grad(o.sum() + 2 * rem.sum(), (q, k, v)))
    for name, x, ref in zip(("o", "rem", "dq", "dk", "dv"), outs["chunked"], outs["reference"]):
        assert_rel(x, ref, 1e-5, name)


# --- compiled against reference --------------------------------------------------------------
# Every new guard combination costs an inductor compile (seconds on CPU; dynamo also specialises
# size-1 dims and equal sizes), so these tests keep B = 1, one dtype and few shape classes.
COMPILED_SHAPES = [(1, 4, 2, 50, 24), (1, 4, 2, 37, 80)]


@pytest.mark.parametrize(
    "attend_current, shapes",
    [(False, COMPILED_SHAPES + [(1, 4, 2, 1, 24)]), (True, COMPILED_SHAPES)],
    ids=["exclusive", "attend-current"],
)
def test_compiled_forward_matches_reference_fp32(attend_current, shapes):
    for shape in shapes:
        q, k, v = inputs(*shape, seed=12)
        o_ref, rem_ref = sbbench.sb_attn(q, k, v, None, attend_current, backend="reference")
        o, rem = sbbench.sb_attn(q, k, v, None, attend_current, backend="compiled")
        assert_rel(o, o_ref, 1e-5, f"o {shape}")
        assert_rel(rem, rem_ref, 1e-5, f"rem {shape}")


def test_compiled_varlen_and_backward_match_reference():
    (q, k, v), cu, m = packed_inputs([30, 1, 17], 4, 2, 24, requires_grad=True, seed=13)
    outs = {}
    for backend in ("reference", "compiled"):
        o, rem = sbbench.sb_attn(q, k, v, backend=backend, cu_seqlens=cu, max_seqlen=m)
        outs[backend] = (o, rem, *torch.autograd.grad(o.sum() + 2 * rem.sum(), (q, k, v)))
    for name, x, ref in zip(("o", "rem", "dq", "dk", "dv"), outs["compiled"], outs["reference"]):
        assert_rel(x, ref, 1e-5, name)


def test_compiled_does_not_recompile_per_sequence_length():
    from torch._dynamo.utils import counters

    def run(t):
        q, k, v = inputs(1, 4, 2, t, 24, seed=t)
        o, rem = sbbench.sb_attn(q, k, v, backend="compiled")
        assert_rel(o, sbbench.sb_attn(q, k, v, backend="reference")[0], 1e-5, f"o T={t}")

    run(29)  # compiles unless an earlier test already did
    before = counters["stats"]["unique_graphs"]
    for t in (45, 61, 100):
        run(t)
    assert counters["stats"]["unique_graphs"] == before, "a new sequence length compiled a new graph"
