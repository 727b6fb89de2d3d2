"""Decode cases in the harness (sbbench.harness.decode) and their CLI (decode-check/decode-bench)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from sbbench.cli import app
from sbbench.core.registry import get_backend
from sbbench.core.results import IDENTITY_COLUMNS
from sbbench.harness.decode import DecodeCase, make_decode_inputs, run_decode_bench, run_decode_check

SMALL = DecodeCase(batch=3, heads=4, kv_heads=2, cache_len=40, head_dim=16, new_tokens=3, dtype="float32",
                   attend_current=True, ragged=True)


def test_check_rows_pass_and_use_the_schema():
    rows = run_decode_check(["chunked", "reference"], [SMALL], ["randn", "dense"], "cpu", seed=3)
    assert len(rows) == 8
    for row in rows:
        assert set(IDENTITY_COLUMNS) <= set(row)
        assert row["mode"] == "decode" and row["seqlen"] == 40 and row["new_tokens"] == 3 and row["varlen"]
        assert row["status"] == "ok" and row["passed"], row
        assert row["budget"] > 0 and row["err_max"] <= row["budget"]


def test_a_wrong_decode_fails_its_check():
    chunked = get_backend("chunked")

    def off_by_one_key(q, k_cache, v_cache, cache_seqlens, inv_temp, attend_current, *, config=None):
        return chunked.decode(q, k_cache, v_cache, cache_seqlens, inv_temp, not attend_current, config=config)

    wrong = dataclasses.replace(chunked, name="wrong", decode=off_by_one_key)
    rows = run_decode_check([wrong], [SMALL], ["randn"], "cpu", seed=4)
    assert any(r["passed"] is False for r in rows), rows


def test_ragged_lengths_and_capacity():
    inputs = make_decode_inputs(SMALL, "mixed", seed=1)
    lengths = inputs["lengths"]
    assert lengths[0] == 40 and len(set(lengths)) > 1 and min(lengths) >= 1
    assert inputs["k_cache"].shape == (3, 2, 40 + 3 - 1 + 1, 16)
    assert inputs["cache_seqlens"].dtype == torch.int32


def test_bench_rows_on_cpu():
    case = dataclasses.replace(SMALL, ragged=False, attend_current=False, new_tokens=1)
    rows = run_decode_bench(["chunked"], [case], ["randn"], "cpu", seed=2)
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["sdpa-flash"]["status"] == "unsupported"  # softmax decode needs a GPU
    row = by_backend["chunked"]
    assert row["status"] == "ok" and row["latency_ms"] > 0 and row["mode"] == "decode"
    # K/V bytes: 40 keys x 2 kv heads x 16 dims x 4 bytes x (K and V) x 3 sequences.
    assert row["kv_tbps"] == pytest.approx(40 * 2 * 16 * 4 * 2 * 3 / (row["latency_ms"] * 1e-3) / 1e12)


def test_bad_case_names_the_field():
    with pytest.raises(ValueError, match="^kv_heads:"):
        DecodeCase(batch=1, heads=4, kv_heads=3, cache_len=8, head_dim=16)
    with pytest.raises(ValueError, match="^cache_len:"):
        DecodeCase(batch=1, heads=4, kv_heads=2, cache_len=0, head_dim=16)


def test_cli_decode_check_and_bad_flag(tmp_path):
    runner = CliRunner()
    out = tmp_path / "rows.json"
    args = ["decode-check", "--backends", "chunked", "--batch", "2", "--cache-len", "24", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "16", "--dtype", "float64", "--ragged", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.exists() and "0 failed" in result.output
    bad = runner.invoke(app, ["decode-bench", "--cache-len", "4k"])
    assert bad.exit_code == 2 and "--cache-len" in bad.output


def test_decode_check_reuses_the_references_of_a_fixed_seed(monkeypatch):
    import sbbench.harness.decode as decode

    calls = []
    real = decode.decode_rows

    def counting(*args, **kwargs):
        calls.append(kwargs.get("compute_dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_rows", counting)
    oracles = {}
    first = decode.check_decode_case("reference", SMALL, "randn", seed=4, oracles=oracles)
    assert calls == [torch.float64, torch.float32] and len(oracles) == 1
    again = decode.check_decode_case("reference", SMALL, "randn", seed=4, oracles=oracles)
    assert len(calls) == 2  # the same inputs: nothing recomputed
    assert [(r["tensor"], r["err_max"]) for r in again] == [(r["tensor"], r["err_max"]) for r in first]
    # Inputs the caller made may differ from what the seed makes: no reuse then.
    inputs = make_decode_inputs(SMALL, "randn", device="cpu", seed=4)
    decode.check_decode_case("reference", SMALL, "randn", seed=4, inputs=inputs, oracles=oracles)
    assert len(calls) == 4
