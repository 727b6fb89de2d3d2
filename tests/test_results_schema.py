"""One typed row per command kind: every column a real row of bench, check, decode-check and
decode-bench carries is declared in ``sbbench.core.results`` (the tune rows are checked in
tests/test_tune.py, where a real tuning run writes them), and committed results still load."""

from __future__ import annotations

from pathlib import Path

import pytest

from sbbench.core import results
from sbbench.core.results import (
    IDENTITY_COLUMNS,
    METRIC_COLUMNS,
    BenchRow,
    CheckRow,
    DecodeBenchRow,
    DecodeCheckRow,
    ResultRow,
    TuneRow,
    new_row,
    read_rows,
    row_columns,
)
from sbbench.harness.bench import run_bench
from sbbench.harness.cases import Case
from sbbench.harness.check import run_check
from sbbench.harness.decode import DecodeCase, run_decode_bench, run_decode_check

REPO = Path(__file__).resolve().parents[1]
CASE = Case(batch=1, heads=2, kv_heads=1, seqlen=24, head_dim=8, dtype="float32")
DECODE = DecodeCase(batch=2, heads=2, kv_heads=1, cache_len=24, head_dim=8, dtype="float32", ragged=True)


def _assert_declared(rows, row_type):
    assert rows
    declared = row_columns(row_type)
    for row in rows:
        assert tuple(row) == declared, set(row) ^ set(declared)


def test_every_kind_starts_with_the_shared_columns():
    assert row_columns(ResultRow) == IDENTITY_COLUMNS + METRIC_COLUMNS
    for row_type in (BenchRow, CheckRow, TuneRow, DecodeBenchRow, DecodeCheckRow):
        assert row_columns(row_type)[: len(row_columns(ResultRow))] == row_columns(ResultRow)
    assert "pass" in row_columns(TuneRow)


def test_bench_rows_carry_exactly_the_declared_columns():
    rows = run_bench(["chunked"], [CASE], ["fwd", "bwd"], ["randn"], device="cpu", baseline="reference",
                     progress=False, seed=1)
    assert {r["status"] for r in rows} == {"ok"}
    _assert_declared(rows, BenchRow)


def test_check_rows_carry_exactly_the_declared_columns():
    rows = run_check(["chunked"], [CASE], ["randn"], device="cpu", seed=1, progress=False)
    assert {r["tensor"] for r in rows} == {"o", "rem", "dq", "dk", "dv"}
    _assert_declared(rows, CheckRow)


def test_decode_rows_carry_exactly_the_declared_columns():
    checked = run_decode_check(["chunked"], [DECODE], ["randn"], device="cpu", seed=1)
    assert {r["tensor"] for r in checked} == {"o", "rem"}
    _assert_declared(checked, DecodeCheckRow)
    timed = run_decode_bench(["chunked"], [DECODE], ["randn"], device="cpu", seed=1)
    # The softmax decoders need a GPU: unsupported rows, declared like the timed one.
    assert {r["status"] for r in timed} == {"ok", "unsupported"}
    _assert_declared(timed, DecodeBenchRow)


def test_new_row_refuses_an_undeclared_column():
    with pytest.raises(TypeError, match="fields: BenchRow has no column 'tensr'"):
        new_row(BenchRow, command="bench", backend="chunked", tensr="o")
    row = new_row(CheckRow, command="check", backend="chunked", config={"a": 1})
    assert row["atol_floor"] is None and row["config"] == {"a": 1}


@pytest.mark.parametrize("path", sorted((REPO / "reports").glob("*/*.json")), ids=lambda p: p.parent.name + "/" + p.name)
def test_committed_results_still_load(path):
    try:
        rows = read_rows(path)
    except results.ResultsFileError:
        pytest.skip(f"{path.name} is not a results file")
    assert all(set(IDENTITY_COLUMNS) <= set(r) for r in rows)
