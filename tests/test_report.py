"""`sbbench report`: markdown and PNG plots from synthetic bench, check and tune rows."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from sbbench.cli import app
from sbbench.core.results import make_row, write_rows
from sbbench.harness import plots as plots_mod
from sbbench.harness import report as report_mod
from sbbench.harness.report import ReportInputError, write_report

H100 = "NVIDIA H100 80GB HBM3"
ENV = dict(device=H100, torch_version="2.11.0+cu130", triton_version="3.6.0", sbbench_version="0.1.0",
           git_commit="0123456789ab")
SHAPE = dict(batch=4, heads=12, kv_heads=12, head_dim=128, dtype="bfloat16", attend_current=False, varlen=False)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def bench_rows(with_speedup=True):
    """fa2 and triton, forward, dense inputs, three lengths; triton takes 2x fa2's time."""
    rows = []
    for seqlen in (1024, 2048, 4096):
        fa2 = 0.05 * (seqlen / 1024) ** 2
        for backend, latency in (("fa2", fa2), ("triton", 2 * fa2)):
            rows.append(make_row(
                command="bench", **ENV, **SHAPE, backend=backend,
                implementation="sdpa-flash" if backend == "fa2" else "triton", comparator="fa2",
                seqlen=seqlen, mode="fwd", regime="dense", status="ok", latency_ms=latency,
                latency_q20_ms=latency * 0.99, latency_q80_ms=latency * 1.01,
                tflops=4 * 4 * 12 * seqlen**2 * 128 / 2 / latency / 1e9, peak_mem_mib=seqlen / 10,
                speedup=(fa2 / latency if with_speedup else None), skipped_fraction=0.0,
            ))
    rows.append(make_row(command="bench", **ENV, **SHAPE, backend="upstream", seqlen=4096, mode="fwd",
                         regime="dense", status="error", error="backward does not compile\ndetails"))
    return rows


def check_rows():
    rows = []
    for backend in ("triton", "chunked"):
        for tensor in ("o", "rem", "dq", "dk", "dv"):
            failing = backend == "chunked" and tensor == "dk"
            rows.append(make_row(
                command="check", **ENV, **{**SHAPE, "dtype": "float16"}, backend=backend, seqlen=256, mode="fwdbwd",
                regime="randn", status="ok", tensor=tensor, err_max=3e-3 if failing else 5e-4, budget=1e-3,
                err_rel_fro=2e-4, err_pt=4e-4, fa2_rel_err=1.5e-4, passed=not failing,
            ))
    return rows


def tune_rows():
    """Trials as the tuner writes them; trial 2 failed, trial 6 is the fastest but over the
    numerics budget (passed false), so the best usable trial is 4."""
    latencies = [1.0, 0.9, None, 0.95, 0.7, 0.8, 0.5]
    return [make_row(command="tune", **ENV, **SHAPE, backend="triton", seqlen=4096, mode="fwd", regime="mixed",
                     status="error" if lat is None else "infeasible" if i == 6 else "ok",
                     error=None if lat else "out of resources", latency_ms=lat,
                     passed=None if lat is None else i != 6, trial=i, is_default=i == 0, default_latency_ms=1.0,
                     config={"BLOCK_M": 64, "BLOCK_N": 16 * (i + 1)},
                     **{"pass": "fwd"}, study="triton-fwd-tpe", sampler="tpe")
            for i, lat in enumerate(latencies)]


@pytest.fixture
def results(tmp_path):
    paths = [tmp_path / "bench.json", tmp_path / "check.json", tmp_path / "tune.json"]
    write_rows(paths[0], bench_rows(), command_line="sbbench bench --sweep sbbench/sweeps/h100.json")
    write_rows(paths[1], check_rows())
    write_rows(paths[2], tune_rows())
    return paths


def images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_writes_markdown_and_plots(tmp_path, results):
    out = tmp_path / "reports" / "h100"
    result = runner.invoke(app, ["report", *map(str, results), "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "README.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(images(markdown)) == pngs  # every plot is referenced, every reference exists
    assert any(p.startswith("bench_fwd_dense_d128_bfloat16") for p in pngs)
    assert any(p.startswith("tune_") for p in pngs)
    for png in pngs:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC and (out / png).stat().st_size > 5000
    # Header: device, versions, commit, the commands and the file's recorded command line.
    for text in (H100, "2.11.0+cu130", "3.6.0", "0123456789ab", "sdpa-flash", "bench (7)", "check (10)",
                 "sbbench bench --sweep sbbench/sweeps/h100.json"):
        assert text in markdown, text
    for section in ("## Benchmarks", "## Numerics checks", "## Tuning", "### Bench rows that did not run"):
        assert section in markdown, section
    # A failed row shows the first line of its error, not the whole message.
    assert "backward does not compile" in markdown and "backward does not compile details" not in markdown
    assert f"wrote {out / 'README.md'} with {len(pngs)} plot(s)" in result.stdout
    assert not list(out.glob(".report.tmp*"))  # staging folder cleaned up


def test_report_tables_hold_the_numbers(tmp_path, results):
    written = write_report(results, tmp_path / "out")
    markdown = written.markdown.read_text()
    # triton at 2x fa2's latency: speedup 0.5, in the summary (geomean) and per row.
    assert re.search(r"\| fwd\s+\| dense\s+\| triton\s+\| 3\s+\|.*\| 0\.5\s+\|", markdown)
    assert re.search(r"\| 4096\s+\| triton\s+\|.*\| 1\.6 \[1\.584-1\.616\]\s+\|.*\| 0\.5\s+\| 410\s+\|", markdown)
    # Checks: 9 of 10 pass; chunked dk fails at 3x its budget, with the fa2 error beside.
    assert "**9 passed, 1 failed, 0 errors** out of 10 checks." in markdown
    assert re.search(r"\| chunked\s+\| float16\s+\| dk\s+\| FAIL 0/1\s+\| 3\.00e-03\s+\| 1\.00e-03\s+\| 3\s+\|"
                     r" 2\.00e-04\s+\| 1\.50e-04\s+\| 1\.33x", markdown)
    assert re.search(r"\| triton\s+\| float16\s+\| o\s+\| PASS 1/1", markdown)
    # Tuning: 7 trials, 1 failed, 1 over budget, best usable 0.7 ms at trial 4 (not the 0.5 ms
    # one over budget), 1.43x over the default, its config.
    assert re.search(r"\| triton tpe fwd mixed bfloat16 B=4 H=12 T=4096 D=128\s+\| 7\s+\| 0\s+\| 1\s+\| 1\s+\| 1\s+\| 0\.7\s+\| 4\s+"
                     r"\| 1\.43x\s+\| \{\"BLOCK_M\": 64, \"BLOCK_N\": 80\}", markdown)


@pytest.mark.parametrize("variant", ["not recorded", "against another baseline"])
def test_speedup_computed_from_fa2_rows_when_not_recorded(tmp_path, variant):
    rows = bench_rows(with_speedup=False)
    if variant == "against another baseline":  # bench --baseline chunked: its speedup column is not over fa2
        rows = [dict(r, comparator="chunked", speedup=7.0) for r in rows]
    path = tmp_path / "bench.json"
    write_rows(path, rows)
    markdown = write_report([path], tmp_path / "out").markdown.read_text()
    assert re.search(r"\| 2048\s+\| triton\s+\|.*\| 0\.5\s+\|", markdown)


def test_tune_history_lists_are_expanded(tmp_path):
    path = tmp_path / "tune.json"
    row = make_row(command="tune", **ENV, **SHAPE, backend="triton", seqlen=2048, mode="fwd", status="ok",
                   history=[{"latency_ms": 2.0, "status": "ok"}, {"latency_ms": None, "status": "failed"}, 1.5])
    write_rows(path, [row])
    written = write_report([path], tmp_path / "out")
    markdown = written.markdown.read_text()
    assert re.search(r"\| 3\s+\| 0\s+\| 1\s+\| 0\s+\| -\s+\| 1\.5\s+\| 2\s+\|", markdown)
    assert len(written.plots) == 1 and written.plots[0].name.startswith("tune_")


def test_default_out_is_the_device_report_folder(tmp_path, results, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["report", str(results[0])])
    assert result.exit_code == 0, result.output
    # In its own folder: the device's narrative README beside it is never overwritten.
    assert (tmp_path / "reports" / "NVIDIA_H100_80GB_HBM3" / "report" / "README.md").is_file()
    assert not (tmp_path / "reports" / "NVIDIA_H100_80GB_HBM3" / "README.md").exists()


def test_rewrite_replaces_own_plots_and_keeps_other_files(tmp_path, results):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text("{}")  # the gate's baseline lives here too
    (out / "bench_fwd_randn_d64_float32.png").write_bytes(PNG_MAGIC)  # from an older report
    write_report([results[0]], out)
    assert (out / "bench.json").read_text() == "{}"
    assert not (out / "bench_fwd_randn_d64_float32.png").exists()
    assert sorted(p.name for p in out.glob("*.png")) == ["bench_fwd_dense_d128_bfloat16.png"]


def test_failure_while_rendering_leaves_previous_report(tmp_path, results, monkeypatch):
    out = tmp_path / "out"
    write_report(results, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots_mod, "tune_figure", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report(results, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, no staging left


def test_bad_path_clear_error(tmp_path, results):
    missing = tmp_path / "nope.json"
    result = runner.invoke(app, ["report", str(results[0]), str(missing), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "RESULTS" in result.stderr and "nope.json" in result.stderr and "cannot read" in result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()  # nothing written for unusable input


def test_truncated_and_folder_inputs_clear_error(tmp_path, results):
    broken = tmp_path / "broken.json"
    broken.write_text(results[0].read_text()[:100])
    result = runner.invoke(app, ["report", str(broken)])
    assert result.exit_code == 2 and "not valid JSON" in result.stderr
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.stderr


def test_out_that_is_a_file_names_the_option(tmp_path, results):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = runner.invoke(app, ["report", str(results[0]), "--out", str(target)])
    assert result.exit_code == 2
    assert "--out" in result.stderr and "is a file" in result.stderr


def test_mixed_devices_refused(tmp_path, results):
    other = tmp_path / "a100.json"
    write_rows(other, [dict(r, device="NVIDIA A100-SXM4-80GB") for r in bench_rows()])
    with pytest.raises(ReportInputError, match="several devices"):
        write_report([results[0], other], tmp_path / "out")
    result = runner.invoke(app, ["report", str(results[0]), str(other), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "A100" in result.stderr


# --- rows the report cannot place ---------------------------------------------------------------


def test_rows_without_a_device_are_refused(tmp_path):
    placeless = tmp_path / "placeless.json"
    write_rows(placeless, [dict(r, device=None) for r in bench_rows()])
    out = tmp_path / "out"
    result = runner.invoke(app, ["report", str(placeless), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "placeless.json" in result.stderr and "7 of its 7 rows name no device" in result.stderr
    assert not out.exists() and "Traceback" not in result.output


def test_rows_of_no_known_command_are_refused(tmp_path):
    other = tmp_path / "other.json"
    write_rows(other, [make_row(command="profile", **ENV, **SHAPE, backend="triton", seqlen=1024, mode="fwd",
                                regime="dense", status="ok")])
    result = runner.invoke(app, ["report", str(other), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no bench, check, tune rows" in result.stderr and "profile" in result.stderr
    assert not (tmp_path / "out").exists()


def test_rows_of_other_commands_beside_known_ones_are_explained(tmp_path, results):
    mixed = tmp_path / "mixed.json"
    write_rows(mixed, bench_rows() + [make_row(command="profile", **ENV, **SHAPE, backend="triton", seqlen=1024,
                                                mode="fwd", regime="dense", status="ok")])
    result = runner.invoke(app, ["report", str(mixed), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "1 profile row(s) left out" in result.stderr
    assert "Rows of other commands (profile) are not part of this report" in (tmp_path / "out" / "README.md").read_text()


# --- figures ------------------------------------------------------------------------------------


def _recording_axes(monkeypatch):
    """Record what bench_figure draws: per panel, (label, color) of each line and the y scale."""
    drawn: list[dict] = []
    real_new_figure = plots_mod.new_figure

    def new_figure(width, height):
        fig = real_new_figure(width, height)
        original = fig.savefig

        def savefig(path, **kw):
            panels = []
            for ax in fig.axes:
                lines = {line.get_label(): line.get_color() for line in ax.get_lines()}
                panels.append({"scale": ax.get_yscale(), "lines": lines, "ylabel": ax.get_ylabel(),
                               "texts": [t.get_text() for t in ax.texts]})
            drawn.append({"title": fig._suptitle.get_text() if fig._suptitle else None, "panels": panels})
            return original(path, **kw)

        fig.savefig = savefig
        return fig

    monkeypatch.setattr(plots_mod, "new_figure", new_figure)
    return drawn


def test_backend_colour_is_fixed_across_figures_and_reports(tmp_path, monkeypatch):
    drawn = _recording_axes(monkeypatch)
    both = tmp_path / "both.json"
    rows = bench_rows() + [dict(r, mode="fwdbwd") for r in bench_rows() if r["backend"] == "triton"]
    write_rows(both, rows)
    write_report([both], tmp_path / "a")
    # A second report without fa2: triton keeps its colour (sorted-name palettes would shift it).
    alone = tmp_path / "alone.json"
    write_rows(alone, [r for r in bench_rows() if r["backend"] == "triton"])
    write_report([alone], tmp_path / "b")
    colours = {line: colour for fig in drawn for panel in fig["panels"] for line, colour in panel["lines"].items()
               if line in ("triton", "fa2")}
    seen = [panel["lines"]["triton"] for fig in drawn for panel in fig["panels"] if "triton" in panel["lines"]]
    assert len(drawn) == 3 and len(seen) >= 5 and len(set(seen)) == 1
    assert colours["triton"] != colours["fa2"]
    assert plots_mod.backend_color("triton") == "tab:red"
    assert plots_mod.backend_color("mypkg.mod:fn") == plots_mod.backend_color("mypkg.mod:fn")


def test_log_axis_where_backends_differ_by_more_than_10x(tmp_path, monkeypatch):
    drawn = _recording_axes(monkeypatch)
    rows = bench_rows()
    slow = tmp_path / "slow.json"
    write_rows(slow, rows + [dict(r, backend="chunked", latency_ms=r["latency_ms"] * 100, tflops=r["tflops"] / 100,
                                  latency_q20_ms=None, latency_q80_ms=None, speedup=r["speedup"] / 100)
                             for r in rows if r["backend"] == "fa2"])
    write_report([slow], tmp_path / "slow")
    tflops, speedup, memory = drawn[-1]["panels"]
    assert tflops["scale"] == "log" and "log scale" in tflops["ylabel"]
    assert speedup["scale"] == "log"
    assert memory["scale"] == "linear"  # 102 to 410 MiB: within 10x
    write_report([tmp_path / "slow.json"], tmp_path / "again")  # stable
    close = tmp_path / "close.json"
    write_rows(close, bench_rows())  # triton 2x fa2: linear
    write_report([close], tmp_path / "close")
    assert [p["scale"] for p in drawn[-1]["panels"]] == ["linear", "linear", "linear"]


def test_oom_points_are_marked_and_titles_name_b_h_d(tmp_path, monkeypatch):
    drawn = _recording_axes(monkeypatch)
    rows = bench_rows()
    rows.append(make_row(command="bench", **ENV, **SHAPE, backend="triton", seqlen=8192, mode="fwd", regime="dense",
                         status="oom", error="CUDA out of memory"))
    path = tmp_path / "oom.json"
    write_rows(path, rows)
    written = write_report([path], tmp_path / "out")
    (figure,) = drawn
    assert figure["title"] == "fwd, dense inputs, B=4 H=12 D=128, bfloat16"
    for panel in figure["panels"]:
        assert "OOM" in panel["texts"]
        assert panel["lines"]["triton OOM"] == plots_mod.backend_color("triton")
    # The failed upstream row of bench_rows is an error of a backend with no ok row: no line, but marked.
    assert all("upstream ERROR" in panel["lines"] for panel in figure["panels"])
    assert written.plots[0].read_bytes().startswith(PNG_MAGIC)
    assert "### fwd, dense inputs, B=4 H=12 D=128, bfloat16" in written.markdown.read_text()
