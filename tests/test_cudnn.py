"""The ``cudnn`` comparator: torch SDPA pinned to CUDNN_ATTENTION, benchmarked beside ``fa2``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from sbbench.core.registry import get_backend, parse_backend_list
from sbbench.core.results import make_row, write_rows
from sbbench.harness.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registered_as_a_softmax_comparator():
    backend = get_backend("cudnn")
    assert backend.kind == "softmax" and backend.auto_priority is None
    assert [b.name for b in parse_backend_list("fa2,cudnn,triton")] == ["fa2", "cudnn", "triton"]


def test_listed_as_unavailable_with_a_reason_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("the CPU-only behaviour")
    assert get_backend("cudnn").unavailable_reason() == "needs a CUDA GPU (torch sees none)"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", "from sbbench.cli import main; main()", "list"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("cudnn "))
    assert "softmax" in line and "needs a CUDA GPU" in line


def test_report_puts_cudnn_beside_fa2(tmp_path):
    """Bench rows of fa2, cudnn and triton: cudnn keeps its own lines in every table, with its
    speedup over fa2 (the baseline), and the header says what it ran as."""
    shape = dict(batch=4, heads=12, kv_heads=12, head_dim=128, dtype="bfloat16", attend_current=False, varlen=False)
    env = dict(device="GPU X", torch_version="2.11.0", triton_version="3.6.0", sbbench_version="0.1.0")
    rows = []
    for seqlen in (4096, 8192):
        fa2 = 0.1 * (seqlen / 4096) ** 2
        for backend, latency in (("fa2", fa2), ("cudnn", fa2 / 1.6), ("triton", fa2 / 0.8)):
            rows.append(make_row(
                command="bench", **env, **shape, backend=backend, implementation=f"{backend} impl",
                comparator="fa2", seqlen=seqlen, mode="fwdbwd", regime="dense", status="ok", latency_ms=latency,
                tflops=1.0, speedup=fa2 / latency,
            ))
    path = tmp_path / "bench.json"
    write_rows(path, rows)
    markdown = write_report([path], tmp_path / "out").markdown.read_text()
    assert "cudnn ran as" in markdown and "cudnn impl" in markdown
    assert re.search(r"\| fwdbwd\s+\| dense\s+\| cudnn\s+\| 2\s+\|.*\| 1\.6\s+\|", markdown)
    for seqlen in (4096, 8192):
        table_lines = [line for line in markdown.splitlines() if re.match(rf"\| {seqlen}\s+\|", line)]
        assert [re.split(r"\s*\|\s*", line)[2] for line in table_lines] == ["cudnn", "fa2", "triton"]
        assert re.search(r"\| cudnn\s+\|.*\| 1\.6\s+\|", table_lines[0])


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["dense", "randn"])
@pytest.mark.parametrize("head_dim,kv_heads", [(64, 4), (128, 2)])
def test_matches_float64_softmax_within_bf16_budget(head_dim, kv_heads, regime):
    """o, dq, dk, dv against float64 softmax attention, within the budget every bf16 backend is
    held to (twice the error of the same math in bf16, plus a floor), GQA included."""
    from sbbench.harness.cases import Case
    from sbbench.harness.check import check_case

    reason = get_backend("cudnn").unavailable_reason()
    if reason:
        pytest.skip(f"cudnn: {reason}")
    rows = check_case("cudnn", Case(2, 4, kv_heads, 2048, head_dim, "bfloat16"), regime, device="cuda", seed=0)
    assert [r["tensor"] for r in rows] == ["o", "dq", "dk", "dv"]
    assert all(r["implementation"].startswith("torch ") and "CUDNN_ATTENTION" in r["implementation"] for r in rows)
    failed = [(r["tensor"], r["status"], r["err_max"], r["budget"], r["error"]) for r in rows if not r["passed"]]
    assert not failed, failed
