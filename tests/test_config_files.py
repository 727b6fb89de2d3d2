"""Tuned-config files: malformed entries are skipped with one warning naming the file, values are
checked against the backend's config space, lookup falls back from the device's own file to the
nearest file of the same compute capability and then to the default, the loader works copied
alone (as the README shows), and the no-tuned-configs notice is one short line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sbbench
from sbbench.core import config_loader, tuned
from sbbench.core.config_loader import ConfigWarning
from sbbench.core.problem import AttnProblem
from sbbench.core.registry import get_backend
from sbbench.core.results import cpu_name

REPO = Path(__file__).resolve().parent.parent
KEY = {"pass": "fwd", "dtype": "float32", "head_dim": 16, "gqa_group": 1, "attend_current": False, "seqlen_bucket": 64}
GOOD = {"fwd_block_q": 32, "fwd_block_k": 16}
LOOKUP = dict(pass_="fwd", dtype="float32", head_dim=16, gqa_group=1, attend_current=False, seqlen=64)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the loader's once-per-process warnings afresh, and no cached lookup."""
    monkeypatch.setattr(config_loader, "_warned", set())
    monkeypatch.delenv("SBBENCH_CONFIG_DIR", raising=False)
    tuned.clear_cache()
    yield
    tuned.clear_cache()


def entry(config=None, **key) -> dict:
    return {"key": {**KEY, **key}, "config": dict(GOOD if config is None else config)}


def write(directory: Path, device: str, backend: str, entries: list, **fields) -> Path:
    path = config_loader.config_file(directory, device, backend)
    config_loader.write_config_file(path, {"schema_version": config_loader.SCHEMA_VERSION, "device": device,
                                           "backend": backend, **fields, "entries": entries})
    return path


def config_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, ConfigWarning)]


def without(key: str) -> dict:
    bad = entry()
    del bad["key"][key]
    return bad


# A nearer bucket than the good entry's (T=64): a lookup would take it were it not skipped.
MALFORMED = {
    "missing seqlen_bucket": (without("seqlen_bucket"), "key.seqlen_bucket missing"),
    "missing pass": (without("pass"), "key.pass missing"),
    "not an object": (["fwd", 64], "not an object but list"),
    "a number": (7, "not an object but int"),
    "head_dim a string": (entry(head_dim="16", seqlen_bucket=64), 'key.head_dim is "16"'),
    "attend_current a number": (entry(attend_current=0, seqlen_bucket=64), "key.attend_current is 0"),
    "bucket a float": (entry(seqlen_bucket=64.0), "key.seqlen_bucket is 64.0"),
    "bucket zero": (entry(seqlen_bucket=0), "key.seqlen_bucket is 0"),
    "unknown pass": (entry(**{"pass": "both"}), 'key.pass is "both"'),
    "config a list": ({"key": dict(KEY), "config": [32, 16]}, "no 'config' object"),
    "no key": ({"config": GOOD}, "no 'key' object"),
    "config value null": (entry({"fwd_block_q": None}), "config.fwd_block_q is null"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_entry_is_skipped_with_one_warning(tmp_path, name):
    bad, reason = MALFORMED[name]
    good = entry({"fwd_block_q": 64, "fwd_block_k": 64}, seqlen_bucket=256)
    path = write(tmp_path, "GPU X", "chunked", [bad, good])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):  # repeated lookups: still one warning
            found = config_loader.lookup_config("GPU X", "chunked", search_path=[tmp_path], **LOOKUP)
    assert found == {"fwd_block_q": 64, "fwd_block_k": 64}
    messages = config_warnings(record)
    assert len(messages) == 1, messages
    assert str(path) in messages[0] and "entry 0" in messages[0] and reason in messages[0], messages[0]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "not a readable config file"),
        ('{"schema_version": 99, "entries": []}', "expected schema_version"),
        ('{"schema_version": 1, "entries": {"a": 1}}', "missing 'entries' list"),
        ("[1, 2]", "expected schema_version"),
        (b"\xff\xfe\x00", "not a readable config file"),
    ],
)
def test_unusable_file_falls_back_to_the_default_with_a_warning(tmp_path, text, reason):
    path = config_loader.config_file(tmp_path, "GPU X", "chunked")
    path.parent.mkdir(parents=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert config_loader.lookup_config("GPU X", "chunked", search_path=[tmp_path], **LOOKUP) is None
    messages = config_warnings(record)
    assert any(str(path) in m and reason in m for m in messages), messages


def test_validate_skips_rejected_entries_naming_the_file(tmp_path):
    """An entry the caller's validator rejects is skipped for the next-nearest one."""
    path = write(tmp_path, "GPU X", "chunked", [entry({"fwd_block_q": 0}), entry(seqlen_bucket=128)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = config_loader.lookup_config(
            "GPU X", "chunked", search_path=[tmp_path], validate=lambda c: "too small" if c["fwd_block_q"] < 16 else None,
            **LOOKUP)
    assert found == GOOD
    [message] = config_warnings(record)
    assert str(path) in message and "entry 0" in message and "too small" in message


@pytest.mark.parametrize(
    "backend, config, reason",
    [
        ("chunked", {"fwd_block_q": 0}, "fwd_block_q=0 is not one of chunked's choices"),
        ("chunked", {"fwd_block_q": 64.0}, "fwd_block_q=64.0 is not one of chunked's choices"),
        ("chunked", {"fwd_block_q": True}, "fwd_block_q=True is not one of"),
        ("chunked", {"fwd_block_q": "64"}, "fwd_block_q='64' is not one of"),
        ("chunked", {"block": 64}, "chunked has no parameter 'block'"),
        ("triton", {"scan": "fft"}, "scan='fft' is not one of"),
        # Each value is one of the choices; together the kernels cannot launch them.
        ("triton", {"bwd_BLOCK_N": 64, "bwd_dkdv_BLOCK_N": 32}, "bwd_dkdv_BLOCK_N (32) must be a multiple of bwd_BLOCK_N (64)"),
    ],
)
def test_file_values_are_checked_against_the_backend(backend, config, reason):
    problem = tuned.file_config_problem(backend, config)
    assert problem is not None and reason in problem, problem
    assert not problem.startswith("config:")  # the caller passed no config argument


def test_file_values_the_backend_accepts():
    assert tuned.file_config_problem("chunked", {"fwd_block_q": 32, "bwd_block_k": 512}) is None
    assert tuned.file_config_problem("triton", {"bwd_BLOCK_N": 32, "bwd_dkdv_BLOCK_N": 64, "scan": "cumsum"}) is None


def _problem(seqlen=64) -> AttnProblem:
    return AttnProblem(batch=1, heads=2, kv_heads=2, seqlen=seqlen, head_dim=16, dtype=torch.float32,
                       device_type="cpu", attend_current=False, inv_temp=0.25)


def test_sb_attn_survives_a_malformed_file(tmp_path, monkeypatch):
    """Through sb_attn: every kind of bad entry for this very key, then a usable one further
    away; sb_attn runs with the usable one and never blames its config argument."""
    bad = [MALFORMED[name][0] for name in ("missing seqlen_bucket", "not an object", "head_dim a string")]
    bad += [entry({"fwd_block_q": 0}), entry({"fwd_block_q": 64.0}), entry({"fwd_blok_q": 64})]
    good = entry({"fwd_block_q": 16, "fwd_block_k": 32}, seqlen_bucket=256)
    bwd_bad = entry({"bwd_block_q": 3}, **{"pass": "bwd"})
    path = write(tmp_path, cpu_name(), "chunked", [*bad, good, bwd_bad])
    monkeypatch.setenv("SBBENCH_CONFIG_DIR", str(tmp_path))
    q = torch.randn(1, 2, 64, 16, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        o, rem = sbbench.sb_attn(q.float(), q.float(), q.float(), backend="chunked")
        o.sum().backward()
        resolved = get_backend("chunked").resolve_config(_problem(), None)
    assert resolved["fwd_block_q"] == 16 and resolved["fwd_block_k"] == 32
    assert resolved["bwd_block_q"] == get_backend("chunked").default_config["bwd_block_q"]
    messages = config_warnings(record)
    for index in [*range(len(bad)), len(bad) + 1]:
        naming = [m for m in messages if re.search(rf"{re.escape(str(path))}: entry {index}\b", m)]
        assert len(naming) == 1, (index, messages)
    assert "bwd_block_q=3 is not one of chunked's choices" in naming[0]
    ref, _ = sbbench.sb_attn(q.float(), q.float(), q.float(), backend="reference")
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_bench_and_check_survive_a_malformed_file(tmp_path):
    """The CLI on a file with a bad entry: exit 0, no traceback, one line naming the file."""
    bad = [without("seqlen_bucket"), "oops", entry({"fwd_block_q": 0})]
    path = write(tmp_path, cpu_name(), "chunked", bad)
    shape = ["--backends", "chunked", "--batch", "1", "--heads", "1", "--head-dim", "16", "--seqlens", "64",
             "--dtype", "fp32"]
    for command in (["bench", "--mode", "fwd", "--regime", "dense", *shape], ["check", *shape]):
        out = _run_cli(command, tmp_path, SBBENCH_CONFIG_DIR=str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and "UserWarning" not in out.stderr, out.stderr
        for index in range(len(bad)):
            lines = [line for line in out.stderr.splitlines() if line.startswith(f"sbbench: {path}: entry {index} ")]
            assert len(lines) == 1, out.stderr


def _run_cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", **env}
    return subprocess.run([sys.executable, "-c", "from sbbench.cli import main; main()", *args], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300)


def test_no_tuned_configs_notice_is_one_short_line(tmp_path):
    """The CPU commands: the notice for chunked (tunable here) once, as one line without a
    source line; nothing for triton, which runs in the interpreter and has nothing to tune."""
    env = {"SBBENCH_CONFIG_DIR": str(tmp_path / "empty")}
    out = _run_cli(["bench", "--backends", "chunked,triton", "--mode", "fwd,bwd", "--batch", "1", "--heads", "1",
                    "--head-dim", "16", "--seqlens", "32,64", "--dtype", "fp32", "--regime", "dense"], tmp_path, **env)
    assert out.returncode == 0, out.stderr
    notices = [line for line in out.stderr.splitlines() if "no tuned" in line]
    assert notices == [f"sbbench: no tuned chunked configs for {cpu_name()}; using defaults"], out.stderr
    assert "UserWarning" not in out.stderr and "warn" not in out.stderr, out.stderr


def test_other_warnings_keep_their_usual_format():
    """The one-line format applies to sbbench's ConfigWarning only."""
    text = warnings.formatwarning("something else", UserWarning, "somefile.py", 3)
    assert "UserWarning" in text and "somefile.py:3" in text
    assert warnings.formatwarning("sbbench: x", ConfigWarning, "somefile.py", 3) == "sbbench: x\n"


# ---- which file: the device's own, the nearest of the same architecture, or the default ----

H100, H200, GH200, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB"


def _configs(n: int) -> list:
    return [entry({"fwd_block_q": 16 * 2**n, "fwd_block_k": 16})]


@pytest.fixture
def arch_dirs(tmp_path):
    """Two search directories: ``user`` (first) and ``shipped``; each device's file holds a
    distinct fwd_block_q so the test can tell which file a lookup used."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    write(shipped, H100, "triton", _configs(1), compute_capability=[9, 0])
    write(shipped, GH200, "triton", _configs(2), compute_capability=[9, 0])
    write(shipped, A100, "triton", _configs(3), compute_capability=[8, 0])
    write(user, "NVIDIA H100 PCIe", "triton", _configs(4), compute_capability=[9, 0])
    write(user, "NVIDIA H800", "triton", _configs(5))  # no capability: never a fallback
    return [user, shipped]


def _lookup(device, search_path, capability=None, **key):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        found = config_loader.lookup_config(device, "triton", search_path=search_path,
                                            compute_capability=capability, **{**LOOKUP, **key})
    return (found or {}).get("fwd_block_q"), config_warnings(record)


def test_lookup_order_exact_then_same_architecture_then_default(arch_dirs):
    user, shipped = arch_dirs
    # 1. The device's own file, silently, even when given its capability.
    assert _lookup(H100, arch_dirs, (9, 0)) == (32, [])
    # 2. No own file: the nearest file of the same capability, with one warning naming it.
    # Nearest by name: "NVIDIA H100 80GB HBM3" and "NVIDIA H100 PCIe" share "NVIDIA H100 " with
    # "NVIDIA H100 NVL"; of the two, name order picks the 80GB file.
    found, messages = _lookup("NVIDIA H100 NVL", arch_dirs, (9, 0))
    assert found == 32 and len(messages) == 1
    assert str(config_loader.config_file(shipped, H100, "triton")) in messages[0]
    assert "same compute capability 9.0" in messages[0]
    # "NVIDIA H200" shares "NVIDIA H" with the H100 files, "NVIDIA " only with the GH200.
    assert _lookup(H200, arch_dirs, (9, 0))[0] == 32
    # 3. No file of that capability, or no capability given: the default, with one warning.
    found, messages = _lookup(H200, arch_dirs, (10, 0))
    assert found is None and messages == ["sbbench: no tuned triton configs for NVIDIA H200; using defaults"]
    assert _lookup(H200, arch_dirs, None) == (None, [])  # said once per process
    # The same-architecture file is used for every key, each lookup warning no more.
    assert _lookup(H200, arch_dirs, (9, 0), pass_="bwd") == (None, [f"sbbench: no tuned triton config for bwd "
                                                                   f"float32 D16 g1 in "
                                                                   f"{config_loader.config_file(shipped, H100, 'triton')}; using defaults"])


def test_own_file_first_on_the_search_path_wins(arch_dirs):
    user, shipped = arch_dirs
    write(user, H100, "triton", _configs(6), compute_capability=[9, 0])
    assert _lookup(H100, arch_dirs, (9, 0)) == (16 * 2**6, [])
    # The shadowed shipped H100 file is not a candidate either: the user's copy stands for it.
    files = config_loader.same_architecture_files(H200, "triton", (9, 0), arch_dirs)
    assert [f.path for f in files] == [config_loader.config_file(user, H100, "triton"),
                                      config_loader.config_file(user, "NVIDIA H100 PCIe", "triton"),
                                      config_loader.config_file(shipped, GH200, "triton")]


def test_same_architecture_configs_for_a_warm_start(arch_dirs):
    user, shipped = arch_dirs
    found = config_loader.same_architecture_configs(H200, "triton", (9, 0), search_path=arch_dirs, **LOOKUP)
    assert found == [({"fwd_block_q": 32, "fwd_block_k": 16}, config_loader.config_file(shipped, H100, "triton")),
                     ({"fwd_block_q": 256, "fwd_block_k": 16}, config_loader.config_file(user, "NVIDIA H100 PCIe", "triton")),
                     ({"fwd_block_q": 64, "fwd_block_k": 16}, config_loader.config_file(shipped, GH200, "triton"))]
    # The device's own file is never among them; another key or architecture finds nothing.
    own = config_loader.same_architecture_configs(H100, "triton", (9, 0), search_path=arch_dirs, **LOOKUP)
    assert config_loader.config_file(shipped, H100, "triton") not in [p for _, p in own] and len(own) == 2
    assert config_loader.same_architecture_configs(H200, "triton", (9, 0), search_path=arch_dirs,
                                                   **{**LOOKUP, "head_dim": 32}) == []
    assert config_loader.same_architecture_configs(H200, "triton", (7, 5), search_path=arch_dirs, **LOOKUP) == []


def test_own_file_first_for_another_dtypes_warm_start(tmp_path):
    """``include_own``: the device's own file first (an fp16 study starts from the key's bf16
    configs on this GPU too), then the same-architecture files; without it, never the own file."""
    bf16 = {**LOOKUP, "dtype": "bfloat16"}
    own = write(tmp_path, H200, "triton", [entry({"fwd_block_q": 64, "fwd_block_k": 16}, dtype="bfloat16"),
                                           entry({"fwd_block_q": 128, "fwd_block_k": 16}, dtype="float16")],
                compute_capability=[9, 0])
    other = write(tmp_path, H100, "triton", [entry({"fwd_block_q": 256, "fwd_block_k": 16}, dtype="bfloat16")],
                  compute_capability=[9, 0])
    write(tmp_path, A100, "triton", [entry({"fwd_block_q": 16, "fwd_block_k": 16}, dtype="bfloat16")],
          compute_capability=[8, 0])
    found = config_loader.same_architecture_configs(H200, "triton", (9, 0), search_path=[tmp_path], include_own=True,
                                                    **bf16)
    assert found == [({"fwd_block_q": 64, "fwd_block_k": 16}, own), ({"fwd_block_q": 256, "fwd_block_k": 16}, other)]
    assert config_loader.same_architecture_configs(H200, "triton", (9, 0), search_path=[tmp_path], **bf16) == [
        ({"fwd_block_q": 256, "fwd_block_k": 16}, other)]
    assert config_loader.SIBLING_DTYPES == {"float16": "bfloat16", "bfloat16": "float16"}


@pytest.mark.parametrize("capability", [(9,), "9.0", (9, 0.5), (-1, 0)])
def test_compute_capability_argument_is_checked(arch_dirs, capability):
    with pytest.raises(ValueError, match="^compute_capability:"):
        config_loader.lookup_config(H200, "triton", search_path=arch_dirs, compute_capability=capability, **LOOKUP)


def test_malformed_capability_field_is_ignored_with_a_warning(tmp_path):
    path = write(tmp_path, H100, "triton", _configs(1), compute_capability="9.0")
    found, messages = _lookup(H200, [tmp_path], (9, 0))
    assert found is None
    assert any(str(path) in m and "compute_capability" in m for m in messages), messages


def test_shipped_files_record_their_compute_capability():
    for path in config_loader.SHIPPED_DIR.glob("*/*.json"):
        data = config_loader.read_config_file(path)
        assert config_loader._capability_of(data.get("compute_capability")) is not None, path


# ---- the loader copied alone ----

def _run_isolated(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -I``: no user site, no PYTHONPATH, no current directory on sys.path, so neither
    torch's nor sbbench's install can be reached through the environment; the script's own
    directory (cwd) is put on sys.path explicitly, as a library that vendors the file has it."""
    prelude = f"import sys; sys.path.insert(0, {str(cwd)!r}); sys.modules['torch'] = None; sys.modules['sbbench'] = None\n"
    return subprocess.run([sys.executable, "-I", "-c", prelude + script], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_loader_copied_alone_finds_configs_including_by_capability(tmp_path):
    shutil.copy(REPO / "sbbench" / "core" / "config_loader.py", tmp_path / "config_loader.py")
    decode = {"key": {**KEY, "pass": "decode", "batch_bucket": 16, "seqlen_bucket": 32768}, "config": {"num_splits": 8}}
    write(tmp_path / "configs", H100, "triton", _configs(1) + [decode], compute_capability=[9, 0])
    decode_key = {**LOOKUP, "pass_": "decode", "seqlen": 20000, "batch": 9}
    script = (
        "import json, warnings\n"
        "warnings.simplefilter('always')\n"
        "from config_loader import lookup_config, same_architecture_configs\n"
        f"key = {LOOKUP!r}\n"
        f"decode_key = {decode_key!r}\n"
        f"own = lookup_config({H100!r}, 'triton', search_path=['configs'], **key)\n"
        f"sibling = lookup_config({H200!r}, 'triton', search_path=['configs'], compute_capability=(9, 0), **key)\n"
        f"none = lookup_config({H200!r}, 'triton', search_path=['configs'], **key)\n"
        f"warm = same_architecture_configs({H200!r}, 'triton', (9, 0), search_path=['configs'], **key)\n"
        f"dec = lookup_config({H100!r}, 'triton', search_path=['configs'], **decode_key)\n"
        f"dec_warm = same_architecture_configs({H200!r}, 'triton', (9, 0), search_path=['configs'], **decode_key)\n"
        "print(json.dumps([own, sibling, none, [c for c, _ in warm], dec, [c for c, _ in dec_warm]]))\n"
    )
    out = _run_isolated(script, tmp_path)
    assert out.returncode == 0, out.stderr
    want = {"fwd_block_q": 32, "fwd_block_k": 16}
    assert json.loads(out.stdout) == [want, want, None, [want], {"num_splits": 8}, [{"num_splits": 8}]]
    assert "same compute capability 9.0" in out.stderr


def _readme_loader_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    [block] = [b for b in blocks if "from config_loader import" in b]
    return block


def test_readme_loader_example_works_as_written(tmp_path):
    """The README's example, verbatim, beside a copy of the loader and of the shipped configs
    as the example's comment lays them out."""
    example = _readme_loader_example()
    shutil.copy(REPO / "sbbench" / "core" / "config_loader.py", tmp_path / "config_loader.py")
    shutil.copytree(config_loader.SHIPPED_DIR, tmp_path / "configs")
    assigned = re.findall(r"^(\w+) = lookup_config", example, flags=re.M)
    assert assigned, example
    out = _run_isolated(example + f"\nimport json; print(json.dumps([{', '.join(assigned)}]))\n", tmp_path)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    configs = [e["config"] for path in sorted(config_loader.SHIPPED_DIR.glob("*/triton.json"))
               for e in config_loader.read_config_file(path)["entries"]]
    assert results and all(r in configs for r in results), results


def test_export_records_the_compute_capability_the_tuner_saw():
    """``sbbench export`` takes the capability from the studies' environment (the newest study
    that recorded one); without it, and without that GPU here, the field is left out."""
    from sbbench.autotune.export import _capability_field
    from sbbench.autotune.store import StoredStudy, TuneKey

    key = TuneKey("NVIDIA H200", "triton", "fwd", "bfloat16", 64, 1, False, 4096)
    old = StoredStudy("a", key, "tpe", {"created": "2026-01-01", "compute_capability": [8, 0]})
    new = StoredStudy("b", key, "tpe", {"created": "2026-02-01", "compute_capability": [9, 0]})
    unknown = StoredStudy("c", key, "grid", {"created": "2026-03-01"})
    assert _capability_field("NVIDIA H200", [old, unknown, new]) == {"compute_capability": [9, 0]}
    if not torch.cuda.is_available():
        assert _capability_field("NVIDIA H200", [unknown]) == {}


# ---------------------------------------------------------------------------------------------
# decode keys: nearest batch bucket, then nearest cache-length bucket


def decode_entry(batch_bucket: int, seqlen_bucket: int, num_splits: int) -> dict:
    return {"key": {**KEY, "pass": "decode", "batch_bucket": batch_bucket, "seqlen_bucket": seqlen_bucket},
            "config": {"num_splits": num_splits}}


DECODE_GRID = [decode_entry(b, t, 10 * i + j) for i, b in enumerate((1, 16, 64)) for j, t in enumerate((4096, 32768, 131072))]


@pytest.mark.parametrize("batch, cache, want", [
    (1, 4096, 0),  # the exact key
    (13, 32768, 11),  # batch bucket 16
    (2, 131072, 2),  # batch bucket 2: one octave from 1, three from 16
    (4, 8192, 10),  # batch bucket 4: two octaves from 1 and from 16, a tie the larger wins; cache 8192: 4096 nearest
    (4, 65536, 12),  # cache bucket 65536: one octave from 32768 and from 131072, a tie the larger wins
    (256, 5000, 20),  # beyond the largest batch: 64
    (64, 1 << 20, 22),  # beyond the longest cache: 131072
])
def test_decode_lookup_takes_the_nearest_batch_bucket_then_the_nearest_cache_bucket(tmp_path, batch, cache, want):
    write(tmp_path, H100, "triton", DECODE_GRID)
    found = config_loader.lookup_config(H100, "triton", search_path=[tmp_path], **{
        **LOOKUP, "pass_": "decode", "seqlen": cache, "batch": batch})
    assert found == {"num_splits": want}


def test_decode_lookup_prefers_the_batch_over_the_cache_length(tmp_path):
    # The exact cache bucket lives only at a far batch bucket: the nearer batch wins.
    write(tmp_path, H100, "triton", [decode_entry(1, 4096, 1), decode_entry(64, 131072, 2)])
    found = config_loader.lookup_config(H100, "triton", search_path=[tmp_path],
                                        **{**LOOKUP, "pass_": "decode", "seqlen": 131072, "batch": 2})
    assert found == {"num_splits": 1}


def test_decode_entries_leave_fwd_and_bwd_lookups_alone(tmp_path):
    fwd, bwd = entry(), entry({"bwd_block_q": 64}, **{"pass": "bwd"})
    write(tmp_path, H100, "triton", [fwd, bwd] + DECODE_GRID)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert config_loader.lookup_config(H100, "triton", search_path=[tmp_path], **LOOKUP) == GOOD
        assert config_loader.lookup_config(H100, "triton", search_path=[tmp_path],
                                           **{**LOOKUP, "pass_": "bwd"}) == {"bwd_block_q": 64}
    assert config_warnings(record) == []
    # Only decode entries: a decode lookup finds nothing for fwd, and the other way round.
    write(tmp_path, A100, "triton", DECODE_GRID)
    assert config_loader.lookup_config(A100, "triton", search_path=[tmp_path], warn_default=False, **LOOKUP) is None
    write(tmp_path, GH200, "triton", [fwd, bwd])
    assert config_loader.lookup_config(GH200, "triton", search_path=[tmp_path], warn_default=False,
                                       **{**LOOKUP, "pass_": "decode", "batch": 1}) is None


def test_decode_lookup_needs_the_batch_and_decode_entries_their_batch_bucket(tmp_path):
    write(tmp_path, H100, "triton", [decode_entry(1, 4096, 1)])
    with pytest.raises(ValueError, match="batch"):
        config_loader.lookup_config(H100, "triton", search_path=[tmp_path], **{**LOOKUP, "pass_": "decode"})
    bad = decode_entry(1, 4096, 2)
    del bad["key"]["batch_bucket"]
    assert config_loader.entry_problem(bad) == "key.batch_bucket missing"
    assert config_loader.entry_problem(decode_entry(0, 4096, 2)) == "key.batch_bucket is 0, expected a positive integer"


def _decode_problem(batch: int, capacity: int, new_tokens: int = 1, attend_current: bool = False, append: bool = False):
    from sbbench.core.decode_problem import validate_decode

    q = torch.randn(batch, 4, new_tokens, 16)
    k_cache = torch.zeros(batch, 2, capacity, 16)
    new = torch.randn(batch, 2, new_tokens, 16) if append else None
    return validate_decode(q, k_cache, k_cache.clone(), torch.zeros(batch, dtype=torch.int32), None, attend_current,
                           new, None if new is None else new.clone())


def test_decode_key_buckets_the_batch_and_the_cache_length_the_capacity_allows():
    # The cache length comes from S_max (no read of cache_seqlens): S_max less the slots the
    # queries take, here 4096 in each case.
    for problem in (_decode_problem(5, 4096), _decode_problem(5, 4098, new_tokens=3),
                    _decode_problem(5, 4097, attend_current=True), _decode_problem(5, 4099, new_tokens=3, append=True)):
        assert tuned.decode_cache_length(problem) == 4096
        key = tuned.config_key(problem, "decode")
        assert (key["pass"], key["batch_bucket"], key["seqlen_bucket"], key["gqa_group"]) == ("decode", 8, 4096, 2)
    assert tuned.config_key(_decode_problem(1, 4097), "decode")["seqlen_bucket"] == 8192


def test_sb_attn_with_kvcache_uses_the_decode_entry_of_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SBBENCH_CONFIG_DIR", str(tmp_path))
    key = {"pass": "decode", "dtype": "float32", "head_dim": 16, "gqa_group": 2, "attend_current": False}
    entries = [{"key": {**key, "batch_bucket": b, "seqlen_bucket": t}, "config": {"num_splits": n}}
               for b, t, n in ((1, 64, 2), (4, 64, 8), (4, 512, 16))]
    entries.append({"key": {**key, "batch_bucket": 1, "seqlen_bucket": 128}, "config": {"num_splits": 3}})  # not a choice
    write(tmp_path, cpu_name(), "chunked", entries)
    chunked = get_backend("chunked")
    assert chunked.resolve_decode_config(_decode_problem(3, 60), None) == {"num_splits": 8}
    assert chunked.resolve_decode_config(_decode_problem(3, 400), None) == {"num_splits": 16}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # Batch 1, cache 100: the nearest entry (T128) has a value outside chunked's choices,
        # skipped with a warning naming the file; the next nearest (T64) is used.
        assert chunked.resolve_decode_config(_decode_problem(1, 100), None) == {"num_splits": 2}
    assert any("num_splits=3 is not one of chunked's choices" in m and "chunked.json" in m
               for m in config_warnings(record))
    # An explicit config wins over the file.
    assert chunked.resolve_decode_config(_decode_problem(3, 60), {"num_splits": 1}) == {"num_splits": 1}
