"""``sbbench tune --pass decode`` on the CPU: one study per decode key (batch bucket, cache-length
bucket), trials timed with ``measure_decode`` and checked against float64, exported into the
backend's config file next to fwd/bwd entries, and picked up by ``sb_attn_with_kvcache``.

Tiny shapes; the shared fixtures and CLI helpers are in tests/tune_helpers.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from optuna.trial import TrialState

from sbbench.core import config_loader, registry, tuned
from sbbench.core.results import TuneRow, cpu_name, row_columns

# env is a fixture: imported here so that pytest finds it.
from tune_helpers import _cli, _real, _study_names, _trials, _tune, env  # noqa: F401

DECODE_FLAGS = ("--backend", "chunked", "--pass", "decode", "--batch", "1,3", "--heads", "4", "--kv-heads", "2",
                "--head-dim", "16", "--seqlens", "40,64", "--dtype", "float16")


def test_decode_tune_export_used_by_sb_attn_with_kvcache(env, monkeypatch):
    storage = f"sqlite:///{env / 'tune.db'}"
    result = _tune(storage, *DECODE_FLAGS, "--trials", "2", "--json", str(env / "run.json"))
    # Batches 1 and 3 are buckets 1 and 4; cache lengths 40 and 64 share bucket 64: two studies.
    names = _study_names(storage)
    assert names == [f"sbbench/{config_loader.device_file_stem(cpu_name())}/chunked/decode/float16/d16/g2/ac0/B{b}/T64/tpe"
                     for b in (1, 4)]
    assert "same key as" in result.output and "batch bucket 1, seqlen bucket 64" in result.output
    for name in names:
        trials = _real(_trials(storage, name))
        assert len(trials) == 2 and trials[0].user_attrs.get("is_default")
        assert trials[0].params == {"num_splits": 4} and trials[0].state == TrialState.COMPLETE
        # The default ran first, so it was checked against float64 (within the budget).
        assert trials[0].user_attrs["checked"] is True and trials[0].user_attrs["constraint"][0] <= 0
        assert all(t.user_attrs["config"] == t.params for t in trials)  # the whole decode config, nothing else

    rows = json.loads((env / "run.json").read_text())["rows"]
    assert len(rows) == 4 and all(tuple(r) == row_columns(TuneRow) for r in rows)
    assert {(r["pass"], r["mode"], r["seqlen"], r["new_tokens"], r["seqlen_bucket"]) for r in rows} == {
        ("decode", "decode", 40, 1, 64)}
    assert sorted({(r["batch"], r["batch_bucket"]) for r in rows}) == [(1, 1), (3, 4)]
    assert all(r["status"] in ("ok", "pruned") and r["latency_ms"] > 0 for r in rows)
    assert all(r["kv_tbps"] > 0 for r in rows if r["status"] == "ok")

    out = env / "configs"
    exported = _cli("export", "--storage", storage, "--out", str(out), "--min-speedup", "1")
    assert exported.exit_code == 0, exported.output
    data = config_loader.read_config_file(config_loader.config_file(out, cpu_name(), "chunked"))
    entries = {e["key"]["batch_bucket"]: e for e in data["entries"]}
    assert sorted(entries) == [1, 4]
    for name, bucket in zip(names, (1, 4)):
        best = min((t for t in _real(_trials(storage, name)) if t.state == TrialState.COMPLETE), key=lambda t: t.value)
        entry = entries[bucket]
        assert entry["key"] == {"pass": "decode", "dtype": "float16", "head_dim": 16, "gqa_group": 2,
                                "attend_current": False, "batch_bucket": bucket, "seqlen_bucket": 64}
        assert entry["config"] == best.params and entry["latency_ms"] == pytest.approx(best.value)
        assert entry["default_latency_ms"] > 0 and entry["speedup_over_default"] >= 1

    # sb_attn_with_kvcache hands chunked's decode the exported config of its key. The default
    # is swapped for a decoy that differs from both exports, so this fails if the file were not read.
    monkeypatch.setenv("SBBENCH_CONFIG_DIR", str(out))
    tuned.clear_cache()
    original = registry.get_backend("chunked")
    seen = []

    def spy(*args, config=None):
        seen.append(dict(config))
        return original.decode(*args, config=config)

    decoy = {"num_splits": next(n for n in (32, 16) if n not in {e["config"]["num_splits"] for e in entries.values()})}
    monkeypatch.setitem(registry._REGISTRY, "chunked", dataclasses.replace(original, decode=spy, decode_default_config=decoy))
    from sbbench import sb_attn_with_kvcache

    for batch, bucket in ((3, 4), (1, 1)):
        q = torch.randn(batch, 4, 1, 16, dtype=torch.float16)
        k_cache, v_cache = (torch.randn(batch, 2, 40, 16, dtype=torch.float16) for _ in range(2))
        o, _ = sb_attn_with_kvcache(q, k_cache, v_cache, torch.full((batch,), 39, dtype=torch.int32), backend="chunked")
        assert seen[-1] == entries[bucket]["config"]
        ref, _ = sb_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(),
                                      torch.full((batch,), 39, dtype=torch.int32), backend="reference")
        assert torch.allclose(o.double(), ref, atol=2e-2)


def test_decode_and_fwd_in_one_run_keep_their_keys(env):
    storage = f"sqlite:///{env / 'tune.db'}"
    flags = [f for f in DECODE_FLAGS if f not in ("decode",)]
    flags[flags.index("--pass") + 1:flags.index("--pass") + 1] = ["fwd,decode"]
    flags[flags.index("--batch") + 1] = "1"
    flags[flags.index("--seqlens") + 1] = "64"
    _tune(storage, *flags, "--trials", "1", "--no-check")
    names = _study_names(storage)
    assert len(names) == 2
    [fwd] = [n for n in names if "/fwd/" in n]
    [decode] = [n for n in names if "/decode/" in n]
    assert fwd.endswith("/ac0/T64/tpe") and decode.endswith("/ac0/B1/T64/tpe")
    assert set(_real(_trials(storage, fwd))[0].params) == {"fwd_block_q", "fwd_block_k"}
    assert set(_real(_trials(storage, decode))[0].params) == {"num_splits"}


@pytest.mark.parametrize("args, flag", [
    (("--pass", "decode", "--new-tokens", "0"), "--new-tokens"),
    (("--pass", "decode,sideways"), "--pass"),
])
def test_bad_decode_input_names_the_flag(env, args, flag):
    result = _cli("tune", "--storage", f"sqlite:///{env / 'tune.db'}", "--no-progress", "--backend", "chunked",
                  "--batch", "1", "--heads", "2", "--head-dim", "16", "--seqlens", "64", "--trials", "1", *args)
    assert result.exit_code == 2 and flag in result.output and "Traceback" not in result.output


def test_triton_decode_tune_in_the_interpreter_exports_what_its_decode_then_uses(env, monkeypatch):
    storage = f"sqlite:///{env / 'tune.db'}"
    _tune(storage, "--backend", "triton", "--pass", "decode", "--batch", "1", "--heads", "4", "--kv-heads", "2",
          "--head-dim", "16", "--seqlens", "64", "--dtype", "float16", "--trials", "2", "--check-seqlen", "8")
    [name] = _study_names(storage)
    assert "/triton/decode/float16/d16/g2/ac0/B1/T64/" in name
    out = env / "configs"
    assert _cli("export", "--storage", storage, "--out", str(out), "--min-speedup", "1").exit_code == 0
    [entry] = config_loader.read_config_file(config_loader.config_file(out, cpu_name(), "triton"))["entries"]
    original = registry.get_backend("triton")
    assert set(entry["config"]) == {p.name for p in original.decode_config_space}

    monkeypatch.setenv("SBBENCH_CONFIG_DIR", str(out))
    tuned.clear_cache()
    decoy = {**original.decode_default_config, "num_splits": 64 if entry["config"]["num_splits"] != 64 else 32}
    monkeypatch.setitem(registry._REGISTRY, "triton", dataclasses.replace(original, decode_default_config=decoy))
    from sbbench.harness.decode import DecodeCase, decode_problem_of, make_decode_inputs

    case = DecodeCase(1, 4, 2, 64, 16, dtype="float16")
    problem = decode_problem_of(make_decode_inputs(case, "randn", seed=0), case)
    assert registry.get_backend("triton").resolve_decode_config(problem, None) == entry["config"]
