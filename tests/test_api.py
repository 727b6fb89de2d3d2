"""sb_attn's interface: every bad input of docs/design.md section 1 raises ValueError/TypeError
naming the argument; backends are chosen, refused and plugged in as the design says."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

import sbbench
from sbbench.core import registry
from sbbench.core.registry import Backend
from sbbench.kernels.reference import reference as reference_fn


def qkv(b=1, h=2, hkv=2, t=8, d=4, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, d, generator=gen, dtype=dtype).to(device)
    k = torch.randn(b, hkv, t, d, generator=gen, dtype=dtype).to(device)
    v = torch.randn(b, hkv, t, d, generator=gen, dtype=dtype).to(device)
    return q, k, v


def packed(lengths=(3, 5), h=2, hkv=2, d=4):
    total = sum(lengths)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(total, n, d, generator=gen) for n in (h, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, max(lengths)


def raises(exc, arg: str, fn, *args, **kwargs):
    """``fn`` raises ``exc`` whose message starts by naming ``arg``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(f"{arg}:"), f"message does not name {arg!r}: {info.value}"
    return info.value


# --- shapes, heads, head dims ----------------------------------------------------------------


@pytest.mark.parametrize("good, bad, wrong, words", [
    ({"t": 8}, {"t": 9}, "k", ""),  # sequence length
    ({"b": 2}, {"b": 1}, "k", ""),  # batch
    ({"h": 4}, {"hkv": 3}, "k", "heads"),  # query heads not a multiple of kv heads
    ({"d": 4}, {"d": 6}, "k", ""),  # head dim
    ({}, {"t": 7}, "v", ""),  # v's shape alone
    ({"d": 4}, {"d": 6}, "v", ""),  # v's head dim alone
], ids=["seqlen-k", "batch-k", "heads-k", "head_dim-k", "seqlen-v", "head_dim-v"])
def test_shape_mismatch_names_the_tensor(good, bad, wrong, words):
    q, k, v = qkv(**good)
    replaced = dict(zip("kv", qkv(**bad)[1:]))
    if wrong == "k":
        k, v = replaced["k"], replaced["v"]
    else:
        v = replaced["v"]
    err = raises(ValueError, wrong, sbbench.sb_attn, q, k, v)
    assert words in str(err)


def test_dense_needs_four_dims():
    q, k, v, *_ = packed()
    err = raises(ValueError, "q", sbbench.sb_attn, q, k, v)
    assert "cu_seqlens" in str(err)


def test_packed_needs_three_dims():
    q, k, v = qkv()
    cu = torch.tensor([0, 8], dtype=torch.int32)
    raises(ValueError, "q", sbbench.sb_attn, q, k, v, cu_seqlens=cu, max_seqlen=8)


# --- types, dtypes, devices ------------------------------------------------------------------


def test_non_tensor_q_is_type_error():
    _, k, v = qkv()
    raises(TypeError, "q", sbbench.sb_attn, [[1.0]], k, v)


def test_integer_tensor_is_type_error():
    q, k, v = qkv()
    raises(TypeError, "v", sbbench.sb_attn, q, k, v.to(torch.int64))


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch_names_argument(which):
    q, k, v = qkv()
    args = {"k": k, "v": v}
    args[which] = args[which].double()
    raises(TypeError, which, sbbench.sb_attn, q, args["k"], args["v"])


@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mismatch_names_argument(which):
    # The meta device stands in for a second device: validation reads no data.
    q, k, v = qkv()
    args = {"k": k, "v": v}
    args[which] = args[which].to("meta")
    raises(ValueError, which, sbbench.sb_attn, q, args["k"], args["v"])


def test_cu_seqlens_device_mismatch():
    q, k, v, cu, m = packed()
    raises(ValueError, "cu_seqlens", sbbench.sb_attn, q, k, v, cu_seqlens=cu.to("meta"), max_seqlen=m)


# --- cu_seqlens and max_seqlen ---------------------------------------------------------------


def test_cu_seqlens_wrong_dtype():
    q, k, v, cu, m = packed()
    raises(TypeError, "cu_seqlens", sbbench.sb_attn, q, k, v, cu_seqlens=cu.long(), max_seqlen=m)


def test_cu_seqlens_not_a_tensor():
    q, k, v, cu, m = packed()
    raises(TypeError, "cu_seqlens", sbbench.sb_attn, q, k, v, cu_seqlens=cu.tolist(), max_seqlen=m)


@pytest.mark.parametrize("bad", [torch.tensor([[0, 3, 8]]), torch.tensor([0])], ids=["2d", "too-short"])
def test_cu_seqlens_wrong_shape(bad):
    q, k, v, _, m = packed()
    raises(ValueError, "cu_seqlens", sbbench.sb_attn, q, k, v, cu_seqlens=bad.to(torch.int32), max_seqlen=m)


@pytest.mark.parametrize(
    "values, what",
    [([1, 3, 8], "start at 0"), ([0, 6, 3, 8], "non-decreasing"), ([0, 3, 7], "ends at")],
    ids=["not-zero-start", "decreasing", "wrong-end"],
)
def test_cu_seqlens_bad_values(values, what):
    q, k, v, _, _ = packed()
    cu = torch.tensor(values, dtype=torch.int32)
    err = raises(ValueError, "cu_seqlens", sbbench.sb_attn, q, k, v, cu_seqlens=cu, max_seqlen=8)
    assert what in str(err)


def test_max_seqlen_too_small():
    q, k, v, cu, m = packed()
    raises(ValueError, "max_seqlen", sbbench.sb_attn, q, k, v, cu_seqlens=cu, max_seqlen=m - 1)


def test_max_seqlen_missing():
    q, k, v, cu, _ = packed()
    raises(ValueError, "max_seqlen", sbbench.sb_attn, q, k, v, cu_seqlens=cu)


@pytest.mark.parametrize("bad", [5.0, "5", True])
def test_max_seqlen_not_int(bad):
    q, k, v, cu, _ = packed()
    raises(TypeError, "max_seqlen", sbbench.sb_attn, q, k, v, cu_seqlens=cu, max_seqlen=bad)


def test_max_seqlen_without_cu_seqlens():
    q, k, v = qkv()
    raises(ValueError, "max_seqlen", sbbench.sb_attn, q, k, v, max_seqlen=8)


# --- attend_current, inv_temp ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 0, "yes", None, torch.tensor(True)])
def test_attend_current_must_be_bool(bad):
    q, k, v = qkv()
    raises(TypeError, "attend_current", sbbench.sb_attn, q, k, v, attend_current=bad)


@pytest.mark.parametrize("bad", ["0.5", True, torch.tensor(0.5), [0.5]])
def test_inv_temp_wrong_type(bad):
    q, k, v = qkv()
    raises(TypeError, "inv_temp", sbbench.sb_attn, q, k, v, bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_inv_temp_not_finite(bad):
    q, k, v = qkv()
    raises(ValueError, "inv_temp", sbbench.sb_attn, q, k, v, bad)


def test_inv_temp_defaults_to_inverse_sqrt_head_dim():
    q, k, v = qkv(d=9)
    o, rem = sbbench.sb_attn(q, k, v, backend="reference")
    o3, rem3 = sbbench.sb_attn(q, k, v, 1 / 3, backend="reference")
    torch.testing.assert_close(o, o3, rtol=0, atol=0)
    o_int, _ = sbbench.sb_attn(q, k, v, 1, backend="reference")  # an int is a number too
    assert not torch.equal(o_int, o)


# --- backends and configs --------------------------------------------------------------------


def test_unknown_backend():
    q, k, v = qkv()
    err = raises(ValueError, "backend", sbbench.sb_attn, q, k, v, backend="no-such-backend")
    assert "reference" in str(err)  # lists what is registered


def test_backend_not_a_string():
    q, k, v = qkv()
    raises(TypeError, "backend", sbbench.sb_attn, q, k, v, backend=3)


def test_unknown_config_key():
    q, k, v = qkv()
    err = raises(ValueError, "config", sbbench.sb_attn, q, k, v, backend="chunked", config={"block_m": 64})
    assert "fwd_block_q" in str(err)  # says which parameters exist


def test_config_on_backend_without_parameters():
    q, k, v = qkv()
    raises(ValueError, "config", sbbench.sb_attn, q, k, v, backend="reference", config={"fwd_block_q": 16})


def test_config_not_a_mapping():
    q, k, v = qkv()
    raises(TypeError, "config", sbbench.sb_attn, q, k, v, backend="chunked", config=[("fwd_block_q", 16)])


@pytest.mark.parametrize("bad", [0, -16, 16.0, "16", True])
def test_chunked_bad_block_value(bad):
    q, k, v = qkv()
    err = raises(ValueError, "config", sbbench.sb_attn, q, k, v, backend="chunked", config={"fwd_block_k": bad})
    assert "fwd_block_k" in str(err)


def _fake_backend(name, **spec):
    return Backend(name=name, fn=reference_fn, description="test double", **spec)


def test_comparator_refused(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "_test_softmax", _fake_backend("_test_softmax", kind="softmax"))
    q, k, v = qkv()
    err = raises(ValueError, "backend", sbbench.sb_attn, q, k, v, backend="_test_softmax")
    assert "comparator" in str(err)


def test_registered_comparators_refused():
    q, k, v = qkv()
    comparators = [b.name for b in registry.all_backends() if b.kind != "stickbreaking"]
    if not comparators:
        pytest.skip("no comparator backend registered")
    for name in comparators:
        raises(ValueError, "backend", sbbench.sb_attn, q, k, v, backend=name)


@pytest.mark.parametrize(
    "spec, inputs, why",
    [
        ({"dtypes": (torch.float16,)}, {}, "dtypes"),
        ({"max_head_dim": 4}, {"d": 8}, "head dims"),
        ({"min_head_dim": 16}, {"d": 8}, "head dims"),
        ({"gqa": False}, {"h": 4, "hkv": 2}, "GQA"),
        ({"devices": ("cuda",)}, {}, "runs on"),
        ({"availability": lambda: "package missing"}, {}, "package missing"),
    ],
    ids=["dtype", "max-head-dim", "min-head-dim", "gqa", "device", "unavailable"],
)
def test_explicit_backend_that_cannot_run_input(monkeypatch, spec, inputs, why):
    monkeypatch.setitem(registry._REGISTRY, "_test_narrow", _fake_backend("_test_narrow", **spec))
    q, k, v = qkv(**inputs)
    err = raises(ValueError, "backend", sbbench.sb_attn, q, k, v, backend="_test_narrow")
    assert why in str(err)


def test_explicit_backend_without_varlen(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "_test_dense", _fake_backend("_test_dense", varlen=False))
    q, k, v, cu, m = packed()
    err = raises(ValueError, "backend", sbbench.sb_attn, q, k, v, backend="_test_dense", cu_seqlens=cu, max_seqlen=m)
    assert "variable-length" in str(err)


def test_auto_prefers_chunked_on_cpu_and_skips_unsupported(monkeypatch):
    q, k, v = qkv()
    assert registry.select_auto(sbbench.core.problem.validate(q, k, v, None, False, None, None)).name == "chunked"
    # A preferred backend that cannot run the input is passed over, not an error.
    monkeypatch.setitem(
        registry._REGISTRY, "_test_fast", _fake_backend("_test_fast", auto_priority=-1, devices=("cuda",))
    )
    problem = sbbench.core.problem.validate(q, k, v, None, False, None, None)
    assert registry.select_auto(problem).name == "chunked"
    o, rem = sbbench.sb_attn(q, k, v)
    o_ref, rem_ref = sbbench.sb_attn(q, k, v, backend="reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rem, rem_ref, rtol=1e-5, atol=1e-6)


# --- plugins ---------------------------------------------------------------------------------

PLUGIN = textwrap.dedent(
    """
    import torch
    from sbbench.kernels.reference import dense_naive
    from sbbench.kernels.varlen import run_per_sequence

    calls = []

    def my_attn(q, k, v, inv_temp, attend_current, cu_seqlens=None, max_seqlen=None):
        calls.append((inv_temp, attend_current, cu_seqlens is not None, max_seqlen))
        if cu_seqlens is not None:
            return run_per_sequence(dense_naive, q, k, v, inv_temp, attend_current, cu_seqlens)
        return dense_naive(q, k, v, inv_temp, attend_current)

    class Holder:
        attn = staticmethod(my_attn)

    not_callable = 3
    """
)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "sb_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("sb_test_plugin")
    yield module
    import sys

    sys.modules.pop("sb_test_plugin", None)


@pytest.mark.parametrize("path", ["sb_test_plugin:my_attn", "sb_test_plugin:Holder.attn"])
def test_plugin_backend_by_import_path(plugin_module, path):
    q, k, v = qkv(h=4, hkv=2)
    o, rem = sbbench.sb_attn(q, k, v, 0.3, True, backend=path)
    o_ref, rem_ref = sbbench.sb_attn(q, k, v, 0.3, True, backend="reference")
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    torch.testing.assert_close(rem, rem_ref, rtol=0, atol=0)
    assert plugin_module.calls[-1] == (0.3, True, False, None)


def test_plugin_backend_receives_varlen(plugin_module):
    q, k, v, cu, m = packed()
    o, _ = sbbench.sb_attn(q, k, v, backend="sb_test_plugin:my_attn", cu_seqlens=cu, max_seqlen=m)
    o_ref, _ = sbbench.sb_attn(q, k, v, backend="reference", cu_seqlens=cu, max_seqlen=m)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
    assert plugin_module.calls[-1][2:] == (True, m)


@pytest.mark.parametrize(
    "path, exc",
    [
        ("sb_no_such_module_xyz:fn", ValueError),
        ("sb_test_plugin:missing", ValueError),
        ("sb_test_plugin:not_callable", TypeError),
        (":my_attn", ValueError),
        ("sb_test_plugin:", ValueError),
    ],
)
def test_bad_plugin_paths(plugin_module, path, exc):
    q, k, v = qkv()
    raises(exc, "backend", sbbench.sb_attn, q, k, v, backend=path)


@pytest.mark.parametrize(
    "fn, says",
    [
        ("only_o", "returned a float32 tensor of shape (1, 2, 8, 4) on cpu; expected (o, rem)"),
        ("three_outputs", "returned 3 values"),
        ("transposed_o", "of shape (1, 8, 2, 4) on cpu as o"),
        ("rem_with_head_dim", "of shape (1, 2, 8, 1) on cpu as rem"),
        ("rem_not_a_tensor", "returned a list as rem"),
        ("float64_outputs", "returned a float64 tensor"),
        ("on_meta_device", "on meta as o"),
    ],
)
def test_plugin_result_is_checked(fn, says):
    """tests/plugins/wrong.py: each returns something other than sb_attn's (o, rem)."""
    q, k, v = qkv()
    error = raises(TypeError, "backend", sbbench.sb_attn, q, k, v, backend=f"plugins.wrong:{fn}")
    assert f"plugins.wrong:{fn}" in str(error) and says in str(error)
    assert "expected (o, rem): o of shape (1, 2, 8, 4) and rem of shape (1, 2, 8), both float32 on cpu" in str(error)


def test_plugin_result_check_takes_varlen_shapes(plugin_module):
    q, k, v, cu, m = packed()
    o, rem = sbbench.sb_attn(q, k, v, backend="sb_test_plugin:my_attn", cu_seqlens=cu, max_seqlen=m)
    assert o.shape == q.shape and rem.shape == q.shape[:-1]


def test_config_loader_needs_only_the_standard_library(tmp_path):
    """Another library can copy sbbench/core/config_loader.py alone: it must import and look up
    configs in a process where torch (and sbbench) cannot be imported."""
    import subprocess
    import sys
    from pathlib import Path

    import sbbench.core.config_loader as loader

    copy = tmp_path / "config_loader.py"
    copy.write_text(Path(loader.__file__).read_text())
    entry = {"key": {"pass": "fwd", "dtype": "bfloat16", "head_dim": 128, "gqa_group": 1,
                     "attend_current": False, "seqlen_bucket": 4096},
             "config": {"fwd_BLOCK_M": 128}, "latency_ms": 1.0, "default_latency_ms": 1.2,
             "speedup_over_default": 1.2}
    loader.write_config_file(tmp_path / "cfg" / "GPU_X" / "triton.json",
                             {"schema_version": loader.SCHEMA_VERSION, "entries": [entry]})
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['sbbench'] = None\n"
        "from config_loader import lookup_config\n"
        f"print(lookup_config('GPU X', 'triton', pass_='fwd', dtype='bfloat16', head_dim=128, gqa_group=1, "
        f"attend_current=False, seqlen=8192, search_path=[{str(tmp_path / 'cfg')!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'fwd_BLOCK_M': 128" in out.stdout
