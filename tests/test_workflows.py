"""The GitHub Actions workflows and the gate script they call (ci/gpu_gate.sh), on the CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
H100_BASELINE = ROOT / "reports" / "NVIDIA_H100_80GB_HBM3" / "bench.json"


def workflow_job(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    triggers = data.get("on", data.get(True))
    assert triggers and "pull_request" in triggers and "push" in triggers
    (job,) = data["jobs"].values()
    return job


def step_runs(job: dict) -> list[str]:
    return [step.get("run", "") for step in job["steps"]]


def run_gate_script(*steps: str, cwd_env: dict[str, str]) -> subprocess.CompletedProcess:
    # The script calls `python` and `sbbench`: put this interpreter's bin folder first on PATH.
    env = {**os.environ, **cwd_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "ci" / "gpu_gate.sh"), *steps], capture_output=True, text=True,
                          env=env, timeout=120)


def test_workflows_live_only_where_github_runs_them():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["cpu.yml", "gpu.yml"]
    assert not (ROOT / "ci" / "workflows").exists()


def test_cpu_workflow_runs_the_ci_entry_point():
    job = workflow_job("cpu.yml")
    assert "self-hosted" not in str(job["runs-on"])
    assert [r.strip() for r in step_runs(job) if r] == ["bash .ci/run"]


def test_gpu_workflow_order_and_artifacts():
    job = workflow_job("gpu.yml")
    assert job["runs-on"] == ["self-hosted", "gpu"]
    runs = step_runs(job)
    keys = ("pip install -e '.[test]'", "ci/gpu_gate.sh device", "pytest -q -m gpu", "sbbench check",
            "ci/gpu_gate.sh bench", "ci/gpu_gate.sh gate", "ci/gpu_gate.sh report")
    order = [next(i for i, r in enumerate(runs) if key in r) for key in keys]
    assert order == sorted(order), order
    # The sweep and the baseline are named once, in ci/gpu_gate.sh, not in the workflow.
    assert "sweeps/" not in "\n".join(runs) and "bench.json" not in "\n".join(runs)
    (upload,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload["if"] == "${{ always() }}"
    for path in ("current.json", "gate.json", "check.json", "report-current/"):
        assert path in upload["with"]["path"]


def test_gate_script_takes_the_devices_sweep_else_the_device_neutral_one():
    text = (ROOT / "ci" / "gpu_gate.sh").read_text()
    assert "sweep=${SWEEP:-sbbench/sweeps/gate_$(device_stem).json}" in text
    assert '[ -f "$sweep" ] || sweep=sbbench/sweeps/gate.json' in text
    assert (ROOT / "sbbench" / "sweeps" / "gate.json").is_file()
    # A device's own sweep comes with that device's baseline.
    for sweep in (ROOT / "sbbench" / "sweeps").glob("gate_*.json"):
        stem = sweep.stem.removeprefix("gate_")
        assert (ROOT / "reports" / stem / "bench.json").is_file(), stem
    assert "reports/$(device_stem)/bench.json" in text and "--settings ci/gate.toml" in text


def test_gate_script_gates_a_run_against_itself(tmp_path):
    current = tmp_path / "current.json"
    shutil.copy(H100_BASELINE, current)
    out = run_gate_script("gate", cwd_env={"BASELINE": str(H100_BASELINE), "CURRENT": str(current),
                                           "GATE_JSON": str(tmp_path / "gate.json")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "gate.json").is_file()


def test_gate_script_fails_on_unusable_input_and_skips_a_missing_baseline(tmp_path):
    (tmp_path / "current.json").write_text('{"schema_version": 1, "rows": [')
    env = {"CURRENT": str(tmp_path / "current.json"), "GATE_JSON": str(tmp_path / "gate.json")}
    out = run_gate_script("gate", cwd_env={**env, "BASELINE": str(H100_BASELINE)})
    assert out.returncode == 2, out.stdout + out.stderr
    out = run_gate_script("gate", cwd_env={**env, "BASELINE": str(tmp_path / "none.json")})
    assert out.returncode == 0 and "no committed baseline" in out.stdout


@pytest.mark.parametrize("steps", [(), ("nonsense",)])
def test_gate_script_refuses_unknown_steps(steps):
    out = run_gate_script(*steps, cwd_env={})
    assert out.returncode == 2 and "gpu_gate.sh" in out.stderr


def test_ci_runs_the_readme_install_verbatim_and_it_stays_cpu_only():
    """.ci/run's commands are the README's set-up lines, and every torch they name is the +cpu
    build: an unpinned torch==2.13.0 resolves to the CUDA wheel on a stock Linux machine."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Set-up"):].split("```bash", 1)[1].split("```", 1)[0]
    setup = [line for line in block.splitlines() if line.startswith("python -m pip")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pip")]
    assert ci and all(line in setup for line in ci)
    assert ci[0] == setup[0] and "--no-deps" in ci[0] and "download.pytorch.org/whl/cpu/" in ci[0]
    assert ci[-1].endswith("python -m pytest -q")
    for line in setup:
        pins = re.findall(r"torch==(\S+)", line)
        assert pins and all(pin.endswith("+cpu") for pin in pins), line
