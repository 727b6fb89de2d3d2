"""pytest-benchmark timings of the CPU backends' forward and backward at one small shape.

In the default run (pyproject sets --benchmark-disable) each body runs once, as a plain test that
checks the result against the reference. On a CPU runner, save and compare timings with::

    pytest tests/benchmarks -m benchmarks --benchmark-enable --benchmark-autosave
    pytest tests/benchmarks -m benchmarks --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:25%
"""

from __future__ import annotations

import os

import pytest
import torch

from sbbench.core.registry import get_backend
from sbbench.harness.cases import Case
from sbbench.harness.inputs import make_inputs
from sbbench.kernels.reference import dense_naive

pytestmark = pytest.mark.benchmarks

CASE = Case(batch=1, heads=4, kv_heads=4, seqlen=256, head_dim=32, dtype="float32")


def _cpu_backends() -> list[str]:
    names = ["reference", "chunked", "compiled"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


def _runnable(name: str):
    try:
        backend = get_backend(name)
    except ValueError as exc:  # a backend not registered in this checkout
        pytest.skip(str(exc))
    reason = backend.unavailable_reason()
    if reason is not None or "cpu" not in backend.devices:
        pytest.skip(f"{name} cannot run on the CPU here: {reason or 'GPU only'}")
    return backend


def _inputs(requires_grad: bool):
    x = make_inputs(CASE, "randn", device="cpu", seed=1234, requires_grad=requires_grad)
    return x["q"], x["k"], x["v"], 1.0 / CASE.head_dim**0.5


def _reference(q, k, v, inv_temp):
    with torch.no_grad():
        return dense_naive(q.double(), k.double(), v.double(), inv_temp, False)


@pytest.mark.parametrize("name", _cpu_backends())
def test_forward(benchmark, name):
    backend = _runnable(name)
    q, k, v, inv_temp = _inputs(requires_grad=False)
    o, rem = benchmark(lambda: backend.fn(q, k, v, inv_temp, False))
    o_ref, rem_ref = _reference(q, k, v, inv_temp)
    # A backend that got faster by computing something else must not pass as a speed-up.
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rem.double(), rem_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", _cpu_backends())
def test_backward(benchmark, name):
    backend = _runnable(name)
    q, k, v, inv_temp = _inputs(requires_grad=True)
    gen = torch.Generator().manual_seed(99)
    shape = (CASE.batch, CASE.heads, CASE.seqlen)
    do, drem = torch.randn(shape + (CASE.head_dim,), generator=gen), torch.randn(shape, generator=gen)

    def fresh_forward():
        # Untimed, before every round: a backward consumes its graph (torch.compile's donates
        # its buffers, so retain_graph is not an option).
        return (backend.fn(q, k, v, inv_temp, False),), {}

    def backward(outputs):
        return torch.autograd.grad(outputs, (q, k, v), (do, drem))

    grads = benchmark.pedantic(backward, setup=fresh_forward, rounds=10, warmup_rounds=1)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64, rem64 = dense_naive(q64, k64, v64, inv_temp, False)
    expected = torch.autograd.grad((o64, rem64), (q64, k64, v64), (do.double(), drem.double()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3)
