"""Sweeps: which backends, shapes, modes and regimes a check, bench or tune run covers.

Given by the fields every such command shares (``backends mode batch heads kv_heads head_dim
seqlens dtype regime attend_current varlen device``; the CLI has a flag for each), or by a sweep
file (JSON, or YAML when PyYAML is installed): a list of sweeps, each an object with any of
those names (``kv_heads``/``kv-heads`` alike) plus an optional ``baseline``::

    [{"backends": "fa2,triton", "seqlens": "1024..16384", "mode": ["fwd", "fwdbwd"],
      "batch": 4, "heads": 12, "head_dim": 128, "dtype": "bfloat16", "regime": "dense"}]

A field left out takes the default of the device and command; a field given beside the file
overrides that field in every sweep of the file. Lists may be comma-separated strings;
``a..b`` is the powers of two from a to b (``1024..16384``), and ``all`` names every mode or
regime. Every combination of the shape fields is one :class:`Case`.

Defaults: on a GPU, B=4, H=12, D=128, T=1024..16384, bfloat16 with fa2, triton, compiled and
chunked (those available); the check, which runs a T x T float64 oracle, uses smaller shapes. On
the CPU: small float32 shapes with the CPU backends (chunked, compiled, and triton only under
TRITON_INTERPRET=1), sized to finish in seconds.

The command-line options themselves live in :mod:`sbbench.cli.sweep_opts`; a command calls
:func:`sweeps_from_flags` with their values.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from sbbench.core.errors import ArgumentError
from sbbench.core.registry import get_backend, parse_backend_list
from sbbench.harness.cases import DTYPES, MODES, Case
from sbbench.harness.inputs import REGIMES

COMMANDS = ("check", "bench", "tune")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                 "fp64": "float64", "double": "float64"}

# Per (device type, command): the shape fields of the default sweep.
_GPU_BENCH = {
    "batch": [4], "heads": [12], "head_dim": [128], "seqlens": [1024, 2048, 4096, 8192, 16384],
    "dtype": ["bfloat16"], "regime": ["dense"], "mode": ["fwd", "fwdbwd"],
}
# The oracle materialises several B*H*T*T float64 tensors (plus their autograd copies): at
# B*H = 16 and T = 2048 that is about 0.5 GiB each, comfortable on any GPU.
_GPU_CHECK = {
    "batch": [2], "heads": [8], "head_dim": [64, 128], "seqlens": [256, 1024, 2048],
    "dtype": ["bfloat16"], "regime": ["dense", "randn"], "mode": ["fwd", "bwd"],
}
# CPU defaults are for a quick look and CI smoke tests on 2 cores: seconds, not minutes.
_CPU_BENCH = {
    "batch": [1], "heads": [2], "head_dim": [32], "seqlens": [128, 256],
    "dtype": ["float32"], "regime": ["dense"], "mode": ["fwd", "fwdbwd"],
}
# The CPU check, in float32 (whose budget is tight: err_pt ~ 1e-7 relative): the worst case
# for block skipping (dense) and the one where the stick runs out within a few keys (randn).
_CPU_CHECK = {
    "batch": [1], "heads": [2], "head_dim": [32], "seqlens": [128],
    "dtype": ["float32"], "regime": ["dense", "randn"], "mode": ["fwd", "bwd"],
}
DEFAULT_SHAPES = {
    ("cuda", "bench"): _GPU_BENCH, ("cuda", "tune"): _GPU_BENCH, ("cuda", "check"): _GPU_CHECK,
    ("cpu", "bench"): _CPU_BENCH, ("cpu", "tune"): _CPU_BENCH, ("cpu", "check"): _CPU_CHECK,
}
# fa2 is the benchmark's baseline, with cudnn timed beside it; a check reports fa2 beside every row as
# the numerics anchor instead.
DEFAULT_BACKENDS = {
    ("cuda", "bench"): ["fa2", "cudnn", "triton", "compiled", "chunked"],
    ("cuda", "tune"): ["triton", "chunked"],
    ("cuda", "check"): ["triton", "compiled", "chunked"],
    ("cpu", "bench"): ["chunked", "compiled", "triton"],
    ("cpu", "tune"): ["chunked"],
    ("cpu", "check"): ["chunked", "compiled", "triton"],
}

FIELDS = ("backends", "mode", "batch", "heads", "kv_heads", "head_dim", "seqlens", "dtype", "regime",
          "attend_current", "varlen", "baseline")


@dataclass
class Sweep:
    """One sweep, resolved: backend names (or import paths), cases, modes, regimes, and notes
    on default backends left out because they cannot run here."""

    backends: list[str]
    cases: list[Case]
    modes: list[str]
    regimes: list[str]
    device: str
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# parsing


def _split(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for item in value:
            out.extend(_split(item) if isinstance(item, str) else [item])
        return out
    return [value]


def parse_ints(value: Any, name: str) -> list[int]:
    """``4``, ``"1,2"``, ``[1, 2]`` or ``"1024..16384"`` (powers of two) to positive ints."""
    out: list[int] = []
    for item in _split(value):
        if isinstance(item, str) and ".." in item:
            lo_text, _, hi_text = item.partition("..")
            lo, hi = _one_int(lo_text, name), _one_int(hi_text, name)
            if lo > hi:
                raise ArgumentError(name, f"range {item!r} runs backwards")
            n = lo
            while n <= hi:
                out.append(n)
                n *= 2
        else:
            out.append(_one_int(item, name))
    if not out:
        raise ArgumentError(name, "no value given")
    return out


def _one_int(item: Any, name: str) -> int:
    if isinstance(item, bool):
        raise ArgumentError(name, f"expected a positive integer, got {item!r}")
    try:
        value = int(item) if not isinstance(item, float) or item.is_integer() else None
    except (TypeError, ValueError):
        value = None
    if value is None or value < 1:
        raise ArgumentError(name, f"expected a positive integer, got {item!r}")
    return value


def parse_choices(value: Any, name: str, choices: Sequence[str]) -> list[str]:
    items = _split(value)
    if items == ["all"]:
        return list(choices)
    for item in items:
        if item not in choices:
            raise ArgumentError(name, f"expected one of {', '.join(choices)} (or all), got {item!r}")
    if not items:
        raise ArgumentError(name, "no value given")
    return list(dict.fromkeys(items))


def parse_dtypes(value: Any) -> list[str]:
    items = [DTYPE_ALIASES.get(str(item).lower(), str(item).lower()) for item in _split(value)]
    return parse_choices(items, "dtype", tuple(DTYPES))


def parse_bools(value: Any, name: str) -> list[bool]:
    out = []
    for item in _split(value):
        if isinstance(item, bool):
            out.append(item)
        elif isinstance(item, str) and item.lower() in ("true", "false"):
            out.append(item.lower() == "true")
        else:
            raise ArgumentError(name, f"expected true or false, got {item!r}")
    return out


# --------------------------------------------------------------------------------------------
# building sweeps


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_backends(device_type: str, command: str) -> tuple[list[str], list[str]]:
    """The default backends that can run here, and a note for each one left out (and why)."""
    names, notes = [], []
    for name in DEFAULT_BACKENDS[(device_type, command)]:
        if device_type == "cpu" and name == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            notes.append("triton: left out on the CPU (set TRITON_INTERPRET=1 to run it in Triton's interpreter)")
            continue
        try:
            backend = get_backend(name)
        except ValueError as exc:
            notes.append(f"{name}: {exc}")
            continue
        reason = backend.unavailable_reason()
        if reason is None and device_type not in backend.devices:
            reason = f"runs on {'/'.join(backend.devices)} only"
        if reason is not None:
            notes.append(f"{name}: unavailable here ({reason})")
            continue
        names.append(name)
    return names, notes


def build_sweep(
    command: str = "bench",
    *,
    device: str | None = None,
    backends: Any = None,
    mode: Any = None,
    batch: Any = None,
    heads: Any = None,
    kv_heads: Any = None,
    head_dim: Any = None,
    seqlens: Any = None,
    dtype: Any = None,
    regime: Any = None,
    attend_current: Any = None,
    varlen: Any = None,
    baseline: str | None = None,
) -> Sweep:
    """One sweep from flag values (None = the default for this device and command).

    Raises ``ValueError`` naming the flag for anything unusable: an unknown backend, mode,
    regime or dtype, a non-positive size, kv-heads that do not divide heads.
    """
    if command not in COMMANDS:
        raise ArgumentError("command", f"expected one of {', '.join(COMMANDS)}, got {command!r}")
    device = device or default_device()
    device_type = device.split(":", 1)[0]
    if device_type not in ("cpu", "cuda"):
        raise ArgumentError("device", f"expected cpu or cuda, got {device!r}")
    shapes = DEFAULT_SHAPES[(device_type, command)]
    notes: list[str] = []
    if backends is None:
        names, notes = default_backends(device_type, command)
        if not names:
            raise ArgumentError("backends", "none of the default backends can run here (" + "; ".join(notes) + ")")
    else:
        names = [b.name for b in parse_backend_list(_split(backends))]
        if not names:
            raise ArgumentError("backends", "no backend named")
    if baseline is not None:
        try:
            get_backend(baseline)  # an unknown baseline is a usage error now, not a late surprise
        except ArgumentError as exc:
            raise ArgumentError("baseline", exc.message) from None

    heads_list = parse_ints(heads if heads is not None else shapes["heads"], "heads")
    cases = []
    for b, h, d, t, dt, ac, vl in itertools.product(
        parse_ints(batch if batch is not None else shapes["batch"], "batch"),
        heads_list,
        parse_ints(head_dim if head_dim is not None else shapes["head_dim"], "head-dim"),
        parse_ints(seqlens if seqlens is not None else shapes["seqlens"], "seqlens"),
        parse_dtypes(dtype if dtype is not None else shapes["dtype"]),
        parse_bools(attend_current if attend_current is not None else False, "attend-current"),
        parse_bools(varlen if varlen is not None else False, "varlen"),
    ):
        for kv in parse_ints(kv_heads, "kv-heads") if kv_heads is not None else [h]:
            cases.append(Case(b, h, kv, t, d, dt, ac, vl))
    return Sweep(
        backends=names,
        cases=list(dict.fromkeys(cases)),
        modes=parse_choices(mode if mode is not None else shapes["mode"], "mode", MODES),
        regimes=parse_choices(regime if regime is not None else shapes["regime"], "regime", REGIMES),
        device=device,
        baseline=baseline,
        notes=notes,
    )


def read_sweep_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The sweeps of a JSON or YAML file as dicts (keys checked, ``-`` read as ``_``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ArgumentError("sweep", f"cannot read {path} ({exc.strerror or exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ArgumentError("sweep", f"{path} is YAML, which needs PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ArgumentError("sweep", f"{path} is not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArgumentError("sweep", f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if isinstance(data, Mapping) and "sweeps" in data:
        data = data["sweeps"]
    if not isinstance(data, list) or not data or not all(isinstance(s, Mapping) for s in data):
        raise ArgumentError("sweep", f"{path} must hold a non-empty list of sweeps (objects)")
    sweeps = []
    for i, entry in enumerate(data):
        normalised = {str(key).replace("-", "_"): value for key, value in entry.items()}
        # "modes", "regimes" and "dtypes" read as the singular flags, a common slip.
        for plural in ("modes", "regimes", "dtypes"):
            if plural in normalised and plural[:-1] not in normalised:
                normalised[plural[:-1]] = normalised.pop(plural)
        unknown = sorted(set(normalised) - set(FIELDS) - {"name"})
        if unknown:
            raise ArgumentError("sweep", f"{path} sweep {i}: unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
        sweeps.append(normalised)
    return sweeps


def sweeps_from_flags(
    command: str,
    *,
    sweep_file: str | os.PathLike | None = None,
    device: str | None = None,
    **flags: Any,
) -> list[Sweep]:
    """The sweeps a command runs: the sweep file's (flags given override its fields), or one
    sweep from the flags alone. ``flags`` are :func:`build_sweep`'s keyword arguments."""
    unknown = sorted(set(flags) - set(FIELDS))
    if unknown:
        raise TypeError(f"sweeps_from_flags: unknown flag(s) {unknown}")
    given = {key: value for key, value in flags.items() if value is not None}
    if sweep_file is None:
        return [build_sweep(command, device=device, **given)]
    sweeps = []
    for i, entry in enumerate(read_sweep_file(sweep_file)):
        fields = {key: value for key, value in entry.items() if key != "name"}
        fields.update(given)
        try:
            sweeps.append(build_sweep(command, device=device, **fields))
        except ValueError as exc:
            raise ArgumentError("sweep", f"{sweep_file} sweep {i}: {exc}") from None
    return sweeps


def cases_from_file(path: str | os.PathLike, command: str = "bench", device: str | None = None) -> list[Case]:
    """Every case of a sweep file, in order, without repeats."""
    cases: list[Case] = []
    for sweep in sweeps_from_flags(command, sweep_file=path, device=device):
        cases.extend(sweep.cases)
    return list(dict.fromkeys(cases))
