"""Decode cases for the harness: check and bench ``sb_attn_with_kvcache`` backends.

A :class:`DecodeCase` is Tq new queries per sequence over a KV cache (uniform lengths, or a
ragged batch). Checking compares o and rem with ``reference`` run in float64 on the same inputs,
within the budget of :mod:`sbbench.harness.check` (FlashAttention-2's rule, its helpers reused).
Benchmarking reports median latency, achieved K/V bandwidth (the bytes of K and V the queries
must read over the time), the fraction of those keys a backend skipped, and the speedup over
softmax decode on the same cache:

- ``sdpa-flash`` and ``sdpa-cudnn``: PyTorch SDPA pinned to FLASH_ATTENTION and to
  CUDNN_ATTENTION, with no mask (a decode query sees the whole cache); GQA by folding each kv
  head's query heads into its query rows, so each kv head's cache is read once, as in the
  stick-breaking kernel;
- ``flash_attn_with_kvcache`` when the flash_attn package imports.

On a GPU every call is timed from a CUDA graph replay with the L2 cache flushed before each run:
decode calls take microseconds, and host launch overhead (Python, argument checks) would
otherwise decide the numbers; generation loops replay graphs too. Rows use the shared results
schema with mode ``decode``; ``seqlen`` is the cache length and ``varlen`` marks a ragged batch.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

import torch

from sbbench.core.decode_problem import DecodeProblem, validate_decode
from sbbench.core.registry import Backend
from sbbench.core.results import DecodeBenchRow, DecodeCheckRow, RowT, environment, new_row
from sbbench.harness.cases import check_case_fields, dtype_from_name
from sbbench.harness.check import _contract_violation, _references, _why, budget_metrics, poisoned_outputs, skip_bound
from sbbench.harness.inputs import PEAKED_LOGIT_STD, REGIMES, _dense_qk, _plant_beacons, ragged_lengths
from sbbench.harness.runner import failure, implementation_of, release_memory, resolve_backend, resolve_device
from sbbench.harness.timing import Timing, time_cpu, time_cuda_with_setup, time_fn, time_once
from sbbench.kernels.reference import decode_rows

MODE = "decode"
SOFTMAX_DECODERS = ("flash_attn_with_kvcache", "sdpa-flash", "sdpa-cudnn")
GRAPH_TIMER = "CUDA graph replay, L2 flushed per run by reading 256 MB (clean lines), CUDA events per run"


@dataclass(frozen=True)
class DecodeCase:
    """Tq new queries per sequence over caches of ``cache_len`` tokens (with ``ragged``: the
    first sequence that long, the others of lengths drawn in [1, cache_len])."""

    batch: int
    heads: int
    kv_heads: int
    cache_len: int
    head_dim: int
    new_tokens: int = 1
    dtype: str = "bfloat16"
    attend_current: bool = False
    ragged: bool = False

    def __post_init__(self) -> None:
        check_case_fields(self, ("batch", "heads", "kv_heads", "cache_len", "head_dim", "new_tokens"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def seqlen(self) -> int:  # what ragged_lengths draws up to
        return self.cache_len

    @property
    def capacity(self) -> int:
        """Cache slots: exactly the keys the longest sequence's last query reads."""
        return self.cache_len + self.new_tokens - 1 + int(self.attend_current)

    def columns(self) -> dict[str, Any]:
        """Shape columns of a result row (the schema's, plus new_tokens)."""
        return {
            "batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads, "seqlen": self.cache_len,
            "head_dim": self.head_dim, "dtype": self.dtype, "attend_current": self.attend_current,
            "varlen": self.ragged, "new_tokens": self.new_tokens,
        }

    def kv_bytes(self, lengths: Sequence[int]) -> int:
        """Bytes of K and V the queries must read: each sequence's visible keys, once per kv head."""
        keys = sum(n + self.new_tokens - 1 + int(self.attend_current) for n in lengths)
        return 2 * keys * self.kv_heads * self.head_dim * self.torch_dtype.itemsize


def make_decode_inputs(
    case: DecodeCase, regime: str, *, device: str | torch.device = "cpu", seed: int | None = None
) -> dict[str, Any]:
    """q (B, H, Tq, D), k_cache and v_cache (B, H_kv, capacity, D), cache_seqlens int32 and the
    lengths, drawn one sequence at a time in the regime's distribution (sbbench.harness.inputs),
    so a large batch of long caches never needs a float32 copy of the whole cache."""
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {regime!r}")
    if not isinstance(case, DecodeCase):
        raise TypeError(f"case: expected a DecodeCase, got {type(case).__name__}")
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(random.getrandbits(62) if seed is None else seed)
    cpu_gen = torch.Generator()
    cpu_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen, device=device)))
    lengths = ragged_lengths(case, cpu_gen) if case.ragged else [case.cache_len] * case.batch
    dtype = case.torch_dtype
    shape_q = (1, case.heads, case.new_tokens, case.head_dim)
    shape_k = (1, case.kv_heads, case.capacity, case.head_dim)
    q = torch.empty((case.batch,) + shape_q[1:], dtype=dtype, device=device)
    k_cache = torch.empty((case.batch,) + shape_k[1:], dtype=dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    for b in range(case.batch):
        if regime in ("randn", "peaked"):
            scale = math.sqrt(PEAKED_LOGIT_STD) if regime == "peaked" else 1.0
            qb = scale * torch.randn(shape_q, generator=gen, device=device)
            kb = scale * torch.randn(shape_k, generator=gen, device=device)
        else:
            qb, kb = _dense_qk(shape_q, shape_k, case.head_dim, torch.float32, device, gen)
            if regime == "mixed":
                kb = _plant_beacons(qb, kb, case, gen)
        q[b], k_cache[b] = qb[0], kb[0]
        v_cache[b] = torch.randn(shape_k[1:], generator=gen, device=device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": seqlens, "lengths": lengths}


def decode_problem_of(inputs: Mapping[str, Any], case: DecodeCase) -> DecodeProblem:
    return validate_decode(
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], None, case.attend_current,
        None, None,
    )


def _row(row_type: type[RowT], command: str, name: str, implementation: str, case: DecodeCase, regime: str,
         device: torch.device, **fields: Any) -> RowT:
    return new_row(
        row_type, command=command, **environment(device), backend=name, implementation=implementation,
        **case.columns(), mode=MODE, regime=regime, **fields,
    )


def _bound_decode(backend: Backend, inputs: Mapping[str, Any], problem: DecodeProblem,
                  config: Mapping[str, Any] | None) -> tuple[Callable[[], tuple], dict[str, Any] | None]:
    """A no-argument call of the backend's decode on ``inputs``, and its resolved config."""
    resolved = backend.resolve_decode_config(problem, config) if (backend.decode_config_space or config) else None
    args = (inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], problem.inv_temp,
            problem.attend_current)

    def call() -> tuple:
        return backend.decode(*args, config=resolved)

    return call, resolved


def run_decode_once(backend: Backend | str, case: DecodeCase, inputs: Mapping[str, Any], *,
                    config: Mapping[str, Any] | None = None) -> tuple:
    """One call of the backend's decode on ``inputs`` (the tuner's compile workers build a
    config's kernels this way); its (o, rem)."""
    backend = resolve_backend(backend)
    call, _ = _bound_decode(backend, inputs, decode_problem_of(inputs, case), config)
    with torch.no_grad():
        return call()


def _shared_inputs(case: DecodeCase, regime: str, device: torch.device, seed: int | None):
    """(inputs for every backend of a (case, regime), None) or (None, (status, message))."""
    try:
        return make_decode_inputs(case, regime, device=device, seed=seed), None
    except Exception as exc:  # too large for the device: that case's result, not the sweep's end
        why = failure(exc)
        release_memory(device)
        return None, why


# --------------------------------------------------------------------------------------------
# check


def check_decode_case(
    backend: Backend | str, case: DecodeCase, regime: str, *, device: str | torch.device | None = None,
    config: Mapping[str, Any] | None = None, seed: int | None = None, inputs: Mapping[str, Any] | None = None,
    oracles: MutableMapping[Any, Any] | None = None,
) -> list[dict[str, Any]]:
    """Check one backend's decode on fresh inputs: rows for o and rem (``tensor``), with err_max,
    err_rel_fro, err_pt, budget (2 err_pt + atol_floor), passed; never raises because the
    backend failed (status ``error``/``oom``), and one ``unsupported`` row when it cannot run.

    ``oracles``: a dict kept by the caller; when the inputs are made here from a fixed ``seed``,
    the references of one (case, regime, seed) are computed once and reused."""
    backend = resolve_backend(backend)
    dev = resolve_device(device)
    seed = random.getrandbits(62) if seed is None else int(seed)

    def row(tensor: str | None, **fields: Any) -> DecodeCheckRow:
        return _row(DecodeCheckRow, "check", backend.name, implementation_of(backend), case, regime, dev,
                    tensor=tensor, seed=seed, **fields)

    made_here = inputs is None
    try:
        if inputs is None:
            inputs = make_decode_inputs(case, regime, device=dev, seed=seed)
        problem = decode_problem_of(inputs, case)
    except Exception as exc:
        status, message = failure(exc)
        release_memory(dev)
        return [row(None, status=status, error=f"making inputs: {message}", passed=False)]
    reason = backend.decode_unsupported_reason(problem)
    if reason is not None:
        return [row(None, status="unsupported", error=reason)]
    call, resolved = _bound_decode(backend, inputs, problem, config)
    try:
        with poisoned_outputs(), torch.no_grad():
            got = dict(zip(("o", "rem"), call()))
    except Exception as exc:
        status, message = failure(exc)
        release_memory(dev)
        return [row(name, config=resolved, status=status, error=message, passed=False) for name in ("o", "rem")]
    args = (inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], problem.inv_temp,
            case.attend_current)
    key = (case, regime, seed, str(dev)) if made_here else None

    def oracle(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(zip(("o", "rem"), decode_rows(*args, compute_dtype=dtype)))

    ref64, low = _references(oracles if made_here else None, key, oracle, case.torch_dtype)
    rows = []
    for name in ("o", "rem"):
        x, ref = got[name], ref64[name]
        contract = _contract_violation(name, x, ref, case.torch_dtype)
        if contract is not None:
            rows.append(row(name, config=resolved, status="error", passed=False, error=contract))
            continue
        metrics = budget_metrics(x, ref, low[name], case.torch_dtype, skip_bound(name, resolved, inputs["v_cache"]))
        error = None if metrics["passed"] else _why(name, metrics["err_max"], metrics["budget"], metrics["nonfinite"])
        rows.append(row(name, config=resolved, status="ok", error=error, **metrics))
    fault = release_memory(dev)
    if fault is not None:
        for r in rows:
            r.update(status="error", passed=False, error=f"CUDA fault after the run: {fault}")
    return rows


def run_decode_check(
    backends: Sequence[Backend | str], cases: Iterable[DecodeCase], regimes: Sequence[str],
    device: str | torch.device | None = None, *, seed: int | None = None,
) -> list[dict[str, Any]]:
    """:func:`check_decode_case` for every backend, case and regime; one set of inputs per
    (case, regime) shared by the backends."""
    chosen = [resolve_backend(b) for b in backends]
    if not chosen:
        raise ValueError("backends: no backend to check")
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    for case in cases:
        for regime in regimes:
            case_seed = random.getrandbits(62) if seed is None else seed + len(rows)
            inputs, _ = _shared_inputs(case, regime, dev, case_seed)  # None: each row says why
            for backend in chosen:
                rows.extend(check_decode_case(backend, case, regime, device=dev, seed=case_seed, inputs=inputs))
            del inputs
            release_memory(dev)
    return rows


# --------------------------------------------------------------------------------------------
# bench


def capture_decode(fn: Callable[[], Any], device: torch.device) -> tuple[Callable[[], Any], str | None]:
    """What to time for ``fn`` (already warmed up): on a GPU the replay of a CUDA graph of it,
    since a decode call takes tens of microseconds and the host's launch overhead (hundreds of
    microseconds through Python and the custom op) would otherwise be what is measured; ``fn``
    itself on the CPU, or when the call cannot be captured, with why (the second item)."""
    if device.type != "cuda":
        return fn, None
    graph = torch.cuda.CUDAGraph()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:
        torch.cuda.synchronize()
        return fn, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
    return graph.replay, None


def time_captured(replay: Callable[[], Any], device: torch.device, capture_failed: str | None = None) -> Timing:
    """Latency of what :func:`capture_decode` returned: graph replays with L2 flushed before
    each run, or plain timing (the timer says why) when there is no graph. The flush reads a
    buffer larger than L2 rather than writing one: a decode call reads its cache once, in tens
    of microseconds, and would otherwise be charged for writing back the flush's dirty lines
    (measured on an H200: 8.7 µs of a 56 µs call at B=1, 32k cache; scripts/gpu_decode_floor.py)."""
    if device.type != "cuda":
        return time_cpu(replay)
    if capture_failed is not None:
        timing = time_fn(replay, device)
        return Timing(timing.median_ms, timing.q20_ms, timing.q80_ms, timing.runs,
                      f"{timing.timer}; CUDA graph capture failed ({capture_failed})")
    timing = time_cuda_with_setup(lambda _: replay(), lambda: None, l2_flush="read")
    return Timing(timing.median_ms, timing.q20_ms, timing.q80_ms, timing.runs, GRAPH_TIMER)


def softmax_decoders(case: DecodeCase, inputs: Mapping[str, Any]) -> dict[str, tuple[str, Callable[[], Any]] | str]:
    """Softmax decode over the same cache, by name: (implementation, call) or why it cannot run.
    Uniform lengths only (SDPA has no per-sequence length): every sequence reads ``capacity`` keys."""
    found: dict[str, tuple[str, Callable[[], Any]] | str] = {}
    q, k_cache, v_cache = inputs["q"], inputs["k_cache"], inputs["v_cache"]
    if q.device.type != "cuda":
        return {name: "needs a CUDA GPU" for name in SOFTMAX_DECODERS}
    batch, heads, new_tokens, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    try:
        from flash_attn import flash_attn_with_kvcache

        q_bthd, k_bshd, v_bshd = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        seqlens = inputs["cache_seqlens"] + new_tokens - 1 + int(case.attend_current)
        found["flash_attn_with_kvcache"] = (
            "flash_attn.flash_attn_with_kvcache (split-KV, GQA)",
            lambda: flash_attn_with_kvcache(q_bthd, k_bshd, v_bshd, cache_seqlens=seqlens),
        )
    except Exception as exc:  # ImportError, or a wheel built for another CUDA
        found["flash_attn_with_kvcache"] = f"flash_attn not importable: {type(exc).__name__}"
    if case.ragged:
        reason = "ragged batch: SDPA over the cache needs one length"
        found.update({"sdpa-flash": reason, "sdpa-cudnn": reason})
        return found
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    folded = q.reshape(batch, kv_heads, heads // kv_heads * new_tokens, head_dim)
    for name, kind in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def call(kind=kind):
            with sdpa_kernel(kind):
                return scaled_dot_product_attention(folded, k_cache, v_cache)

        found[name] = (f"torch SDPA {kind.name}, no mask, GQA folded into query rows", call)
    return found


def _timed_row(name: str, implementation: str, call: Callable[[], Any], case: DecodeCase, regime: str,
               device: torch.device, kv_bytes: int, prune_above_ms: float | None = None,
               **fields: Any) -> DecodeBenchRow:
    row = _row(DecodeBenchRow, "bench", name, implementation, case, regime, device, **fields)
    try:
        with torch.no_grad():
            call()  # compiles, and a failing call fails here
            replay, capture_failed = capture_decode(call, device)
            # The first run is timed the way the full timing is (a graph replay), so that the
            # comparison with the best config's median is like for like.
            first_ms = None if prune_above_ms is None else time_once(replay, device)
            timing = None if first_ms is not None and first_ms > prune_above_ms \
                else time_captured(replay, device, capture_failed)
        if timing is None:
            row.update(status="pruned", latency_ms=first_ms,
                       timer="one run after the warm-up" + ("" if capture_failed else ", from a CUDA graph"),
                       error=f"first timed run {first_ms:.4g} ms > {prune_above_ms:.4g} ms: not timed further")
        else:
            row.update(status="ok", latency_ms=timing.median_ms, latency_q20_ms=timing.q20_ms,
                       latency_q80_ms=timing.q80_ms, timer=timing.timer,
                       kv_tbps=kv_bytes / (timing.median_ms * 1e-3) / 1e12)
    except Exception as exc:
        row["status"], row["error"] = failure(exc)
    fault = release_memory(device)
    if fault is not None and row["status"] in ("ok", "pruned"):
        row.update(status="error", error=f"CUDA fault after the run: {fault}")
    return row


def measure_decode(
    backend: Backend | str, case: DecodeCase, regime: str, *, inputs: Mapping[str, Any],
    device: str | torch.device | None = None, config: Mapping[str, Any] | None = None,
    prune_above_ms: float | None = None,
) -> DecodeBenchRow:
    """Time one backend's decode on ``inputs``: one row with latency, kv_tbps (achieved K/V
    bandwidth, TB/s), skipped_fraction and the resolved config. With ``prune_above_ms``, a
    first run after the warm-up slower than that ends the timing there: status ``pruned``,
    that run's time as the latency (how the tuner cuts configs that cannot win)."""
    backend = resolve_backend(backend)
    dev = resolve_device(device)
    kv_bytes = case.kv_bytes(inputs["lengths"])
    problem = decode_problem_of(inputs, case)
    reason = backend.decode_unsupported_reason(problem)
    if reason is not None:
        return _row(DecodeBenchRow, "bench", backend.name, implementation_of(backend), case, regime, dev, status="unsupported",
                    error=reason)
    call, resolved = _bound_decode(backend, inputs, problem, config)
    row = _timed_row(backend.name, implementation_of(backend), call, case, regime, dev, kv_bytes, prune_above_ms,
                     config=resolved)
    if row["status"] == "ok" and backend.decode_skipped_fraction is not None:
        with contextlib.suppress(Exception), torch.no_grad():
            row["skipped_fraction"] = backend.decode_skipped_fraction(
                inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["cache_seqlens"], problem.inv_temp,
                case.attend_current, config=resolved,
            )
    return row


def measure_softmax(case: DecodeCase, regime: str, inputs: Mapping[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """A row per softmax decoder (``unsupported`` with the reason when it cannot run)."""
    kv_bytes = case.kv_bytes(inputs["lengths"])
    rows = []
    for name, found in softmax_decoders(case, inputs).items():
        if isinstance(found, str):
            rows.append(_row(DecodeBenchRow, "bench", name, name, case, regime, device, status="unsupported", error=found))
        else:
            rows.append(_timed_row(name, found[0], found[1], case, regime, device, kv_bytes))
    return rows


def add_decode_speedups(rows: list[dict[str, Any]]) -> None:
    """Per (shape, regime): ``speedup_<softmax>`` = softmax latency / row latency for every
    softmax decoder that ran, and ``speedup`` (with ``comparator``) over the first of
    flash_attn_with_kvcache, sdpa-flash, sdpa-cudnn that ran. In place."""
    def key(row: Mapping[str, Any]) -> tuple:
        return tuple(row.get(c) for c in ("device", "batch", "heads", "kv_heads", "seqlen", "head_dim", "dtype",
                                          "attend_current", "varlen", "new_tokens", "regime"))

    softmax: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("backend") in SOFTMAX_DECODERS and r.get("status") == "ok":
            softmax.setdefault(key(r), {})[r["backend"]] = r["latency_ms"]
    for r in rows:
        if r.get("backend") in SOFTMAX_DECODERS or r.get("status") != "ok":
            continue
        found = softmax.get(key(r), {})
        for name in SOFTMAX_DECODERS:
            r[f"speedup_{name.replace('-', '_')}"] = found[name] / r["latency_ms"] if name in found else None
        main = next((n for n in SOFTMAX_DECODERS if n in found), None)
        if main is not None:
            r.update(comparator=main, speedup=found[main] / r["latency_ms"])


def run_decode_bench(
    backends: Sequence[Backend | str], cases: Iterable[DecodeCase], regimes: Sequence[str],
    device: str | torch.device | None = None, *, configs: Sequence[Mapping[str, Any] | None] = (None,),
    softmax: bool = True, seed: int | None = None,
) -> list[dict[str, Any]]:
    """Every backend (under each of ``configs``; None: its default) and the softmax decoders on
    the same inputs per (case, regime); rows with speedups filled."""
    chosen = [resolve_backend(b) for b in backends]
    if not chosen:
        raise ValueError("backends: no backend to benchmark")
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    for case in cases:
        for regime in regimes:
            inputs, why = _shared_inputs(case, regime, dev, seed)
            if inputs is None:
                rows.append(_row(DecodeBenchRow, "bench", ",".join(b.name for b in chosen), "", case, regime, dev, status=why[0],
                                 error=f"making inputs: {why[1]}"))
                continue
            if softmax:
                rows.extend(measure_softmax(case, regime, inputs, dev))
            for backend in chosen:
                for config in configs:
                    rows.append(measure_decode(backend, case, regime, inputs=inputs, device=dev, config=config))
            del inputs
            release_memory(dev)
    add_decode_speedups(rows)
    return rows
