"""Trial workers: each trial runs in a separate process, so a bad config cannot take the tuner down.

A launch config can fail in ways that no ``try`` survives: an illegal CUDA address poisons the
whole CUDA context of its process, a segfault or ``os._exit`` ends the process, a kernel that
never terminates hangs it. So the tuner (the parent) only asks and tells Optuna; every trial is
timed and checked in a worker process started with the ``spawn`` method (a forked child would
inherit a CUDA context it cannot use). The parent waits on a pipe with the per-trial time limit;
when the worker dies or overruns, the parent kills it, records the trial as failed with the
reason, and starts a fresh worker for the next trial.

A worker serves one device: ``CUDA_VISIBLE_DEVICES`` is set to its GPU before CUDA starts, so
inside it the GPU is ``cuda:0``. Workers outlive single trials, so imports, Triton's compiled
kernels and the timing inputs are paid for once per worker, not once per trial.

The worker times and checks only through the harness: ``sbbench.harness.bench.measure`` for
the latency and ``sbbench.harness.check.check_case`` for the numerics budget; for the
``decode`` pass (task mode ``decode``) ``sbbench.harness.decode``'s ``measure_decode`` and
``check_decode_case``.
"""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sbbench.core.errors import ArgumentError

# Error text that means the kernel could not be built or launched at all (too much shared memory
# or too many registers for the chip): nothing ran, so the CUDA context is still usable.
_HARMLESS_ERRORS = ("outofresources", "out of resource", "shared memory", "compilationerror", "registers")


def import_plugins(specs: Sequence[str]) -> None:
    """Import ``module`` or ``module:function`` (then call it): how a tunable backend that is
    not built in registers itself, in the tuner and in every worker."""
    for spec in specs:
        module_name, _, func = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ArgumentError("plugins", f"cannot import {module_name!r}: {exc}") from exc
        if func:
            target = getattr(module, func, None)
            if not callable(target):
                raise ArgumentError("plugins", f"{module_name!r} has no function {func!r}")
            target()


# ---------------------------------------------------------------------------------------------
# child side


def _die_with_parent() -> None:
    # If the tuner is killed (SIGKILL), a worker stuck in a kernel would otherwise live on and
    # hold its GPU. A watcher thread notices the reparenting and exits. (prctl's PDEATHSIG is no
    # use here: it fires when the *thread* that started the worker ends, and the tuner starts
    # replacement workers from short-lived threads.)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="sbbench-parent-watch", daemon=True).start()


def _disable_kernel_launches() -> None:
    """Make every Triton kernel call compile (into Triton's on-disk cache) without launching.

    A compile worker runs a config's pass on inputs of the real shapes, so the kernels it builds
    are specialised exactly as the timing worker's will be (Triton specialises on argument
    values such as divisibility by 16), and the timing worker then loads them from the cache
    instead of compiling. No kernel runs, so compiling costs the GPU nothing but memory.
    """
    from triton.runtime.jit import JITFunction

    launch = JITFunction.run

    def compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return launch(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_only  # type: ignore[method-assign]


# Compile workers drop a study's inputs after each config when they are larger than this.
KEEP_COMPILE_INPUTS_BYTES = 1 << 30


def _device_limits(device: str) -> dict[str, Any]:
    """What a backend's launch filter needs to know of the device before launching anything."""
    if not device.startswith("cuda"):
        return {}
    import torch

    props = torch.cuda.get_device_properties(torch.device(device))
    return {
        "compute_capability": [props.major, props.minor],
        "multiprocessors": props.multi_processor_count,
        "shared_memory_per_block": getattr(props, "shared_memory_per_block_optin", None),
        "registers_per_multiprocessor": getattr(props, "regs_per_multiprocessor", None),
        "total_memory": props.total_memory,
    }


def _worker_main(conn: Any, gpu: tuple[int, str] | None, plugins: Sequence[str], role: str = "time") -> None:
    # Ctrl-C reaches the whole process group; the tuner decides what happens to a running trial,
    # so workers ignore SIGINT and are ended by their parent.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if gpu is not None:
        # Before CUDA starts in this process: the worker then sees exactly one GPU, cuda:0.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu[1]
    try:
        import torch

        from sbbench.core.results import environment

        device = "cpu"
        if gpu is not None:
            # Had anything started CUDA before the variable was set, the worker would still see
            # the tuner's GPUs: then it picks its own by index instead.
            device = "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{gpu[0]}"
            torch.cuda.set_device(torch.device(device))
        import_plugins(plugins)
        # Imported now, while the start-up time limit applies, so that the first trial's time
        # limit covers only its own compile, timing and check.
        import sbbench.harness.bench  # noqa: F401
        import sbbench.harness.check  # noqa: F401
        import sbbench.harness.decode  # noqa: F401
        from sbbench.core.registry import backend_names

        backend_names()
        # The numerics check toggles torch.use_deterministic_algorithms, whose first call imports
        # torch._inductor (seconds): pay that here too, with the state left as it was.
        torch.use_deterministic_algorithms(
            torch.are_deterministic_algorithms_enabled(),
            warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        )
        if role == "compile" and device.startswith("cuda"):
            _disable_kernel_launches()
        limits = _device_limits(device)
        info = {"ok": True, "pid": os.getpid(), "device_arg": device, "role": role,
                "gpu": None if gpu is None else gpu[1], **environment(device),
                "compute_capability": limits.get("compute_capability"), "device_limits": limits}
    except BaseException as exc:  # report why the worker cannot start instead of dying silently
        conn.send({"ok": False, "error": f"worker failed to start: {exc!r}", "traceback": traceback.format_exc()})
        return
    conn.send(info)
    cache: dict[Any, Any] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the tuner went away
        if task is None:
            return
        if role == "compile":
            reply = _compile_task(task, device, cache)
        elif task.get("prepare"):
            reply = _prepare_task(task, device, cache)
        else:
            reply = _run_task(task, device, cache)
        conn.send(reply)
        if reply.get("restart"):
            return  # the parent starts a fresh worker: this CUDA context may be poisoned


def is_resource_error(text: str) -> bool:
    """Whether an error says the config could not be built or launched for lack of resources."""
    lowered = text.lower()
    return any(s in lowered for s in _HARMLESS_ERRORS)


def _context_poisoned(device: str, text: str) -> bool:
    if not device.startswith("cuda"):
        return False
    lowered = text.lower()
    if is_resource_error(text):
        return False
    import torch

    try:
        torch.cuda.synchronize()
    except Exception:
        return True
    # An asynchronous fault may surface later; any CUDA-level error text is reason enough to
    # start clean rather than let it corrupt the next trial's timing.
    return "cuda error" in lowered or "illegal" in lowered or "acceleratorerror" in lowered


def _task_case(task: Mapping[str, Any], name: str = "case") -> Any:
    """The task's case (or check case): a DecodeCase for the decode pass, else a Case."""
    from sbbench.harness.cases import Case
    from sbbench.harness.decode import DecodeCase

    return (DecodeCase if task["mode"] == "decode" else Case)(**task[name])


# Cache keys of a study's inputs in a worker: the timing case's, and (compile workers) the
# check case's.
_INPUTS_KEY = {"case": "inputs", "check_case": "check_inputs"}


def _timing_inputs(task: Mapping[str, Any], device: str, cache: dict[Any, Any], case_field: str = "case") -> Any:
    """The same inputs for every trial of a study (seeded), so trials differ only by config:
    in the ``mixed`` regime the data decides how many blocks can be skipped. ``case_field``
    ``"check_case"``: the check case's, with gradients (the check runs forward and backward)."""
    from sbbench.harness.decode import make_decode_inputs
    from sbbench.harness.inputs import make_inputs

    prefix = _INPUTS_KEY[case_field]
    key = (prefix, tuple(sorted(task[case_field].items())), task["regime"], task["mode"], task["input_seed"])
    if key not in cache:
        # One study's inputs (and references) at a time: a long sweep must not pile up GPU memory.
        for old in [k for k in cache if k[0] == prefix]:
            del cache[old]
        if case_field == "case":
            cache.pop("oracles", None)
        case = _task_case(task, case_field)
        if task["mode"] == "decode":
            cache[key] = make_decode_inputs(case, task["regime"], device=device, seed=task["input_seed"])
        else:
            cache[key] = make_inputs(case, task["regime"], device=device, seed=task["input_seed"],
                                     requires_grad=case_field == "check_case" or task["mode"] != "fwd")
    return cache[key]


def _constraint(rows: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """Optuna's constraint value (<= 0 feasible) from check rows: the worst err/budget - 1.

    Graded rather than 0/1 so that TPE learns how far a config is from the budget.
    """
    worst, worst_text = -math.inf, "no check rows"
    for row in rows:
        err, budget, passed = row.get("err_max"), row.get("budget"), row.get("passed")
        ratio = None
        if isinstance(err, (int, float)) and isinstance(budget, (int, float)) and budget > 0 and math.isfinite(err):
            ratio = err / budget - 1.0
        if passed is False:
            # Failed without a usable ratio (NaN, Inf, unwritten output): clearly infeasible.
            value = ratio if ratio is not None and ratio > 0 else 1000.0
        elif ratio is not None:
            value = min(ratio, 0.0)
        else:
            continue
        if value > worst:
            worst = value
            worst_text = f"{row.get('tensor')}: err {err!r} budget {budget!r}" + ("" if passed is not False else " FAILED")
    if worst == -math.inf:
        worst = 0.0
    return float(min(worst, 1e6)), worst_text


def _run_pass_once(task: Mapping[str, Any], device: str, cache: dict[Any, Any], case_field: str = "case") -> None:
    """One untimed call of the task's pass with its config on the study's timing inputs; with
    ``case_field="check_case"``, of what the numerics check runs (forward and backward, or
    decode) on the check case, whose shape may specialise other kernels than the timing case's
    (Triton specialises integer arguments equal to 1, such as a batch of one): building those
    belongs in the compile workers, not in a checked trial."""
    from sbbench.harness.bench import run_once
    from sbbench.harness.decode import run_decode_once

    case, inputs = _task_case(task, case_field), _timing_inputs(task, device, cache, case_field)
    if task["mode"] == "decode":
        run_decode_once(task["backend"], case, inputs, config=dict(task["config"]))
    else:
        mode = task["mode"] if case_field == "case" else "fwdbwd"
        run_once(task["backend"], case, mode, inputs, device=device, config=dict(task["config"]))


def _compile_task(task: Mapping[str, Any], device: str, cache: dict[Any, Any]) -> dict[str, Any]:
    """Build what one config of the pass needs, launching nothing (see _disable_kernel_launches)."""
    started = time.perf_counter()
    reply: dict[str, Any] = {"restart": False, "status": "ok"}
    try:
        _run_pass_once(task, device, cache)
        if task.get("check_case"):
            _run_pass_once(task, device, cache, "check_case")
    except BaseException as exc:  # the timing worker meets the same failure and records it
        reply.update(status="error", error=f"{type(exc).__name__}: {exc}"[:4000])
        reply["restart"] = _context_poisoned(device, str(reply["error"]))
    _release_large_inputs(cache, device)
    reply["worker_seconds"] = time.perf_counter() - started
    return reply


def _prepare_task(task: Mapping[str, Any], device: str, cache: dict[Any, Any]) -> dict[str, Any]:
    """What a study needs before its first trial, so that no trial pays for it: the timing
    inputs, one untimed call of the pass (the process's first launches, the autograd and custom-op
    set-up), and the check case's references (computed once per study; see ``_check_rows``)."""
    started = time.perf_counter()
    reply: dict[str, Any] = {"restart": False, "status": "ok"}
    try:
        _run_pass_once(task, device, cache)
        if task.get("check_case"):
            for regime in task.get("check_regimes") or [task["regime"]]:
                _check_rows(task, regime, device, cache)
    except BaseException as exc:  # the trials meet the same failure and record it
        reply.update(status="error", error=f"{type(exc).__name__}: {exc}"[:4000])
        reply["restart"] = _context_poisoned(device, str(reply["error"]))
        cache.clear()
    reply["worker_seconds"] = time.perf_counter() - started
    return reply


def _release_large_inputs(cache: dict[Any, Any], device: str) -> None:
    """A compile worker keeps a study's inputs between configs only when they are small: eight
    compile workers each holding a 34 GB KV cache would not fit beside the timing worker's."""
    import torch

    large = [k for k, v in cache.items() if isinstance(k, tuple) and k[0] in _INPUTS_KEY.values()
             and _tensor_bytes(v) > KEEP_COMPILE_INPUTS_BYTES]
    for key in large:
        del cache[key]
    if large and device.startswith("cuda"):
        torch.cuda.empty_cache()  # back to the device, for the other workers


def _tensor_bytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _run_task(task: Mapping[str, Any], device: str, cache: dict[Any, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    reply: dict[str, Any] = {"restart": False}
    try:
        from sbbench.harness.bench import measure
        from sbbench.harness.decode import measure_decode

        decode = task["mode"] == "decode"
        case = _task_case(task)
        inputs = _timing_inputs(task, device, cache)
        timing_started = time.perf_counter()  # the study's inputs are made once, not per config
        timing_args = dict(device=device, config=dict(task["config"]), inputs=inputs,
                           prune_above_ms=task.get("prune_above_ms"), **dict(task.get("measure_kwargs") or {}))
        if decode:
            row = measure_decode(task["backend"], case, task["regime"], **timing_args)
        else:
            row = measure(task["backend"], case, task["mode"], task["regime"], **timing_args)
        reply["timing_seconds"] = time.perf_counter() - timing_started
        reply.update(
            status=row.get("status"), error=row.get("error"), latency_ms=row.get("latency_ms"),
            latency_q20_ms=row.get("latency_q20_ms"), latency_q80_ms=row.get("latency_q80_ms"),
            implementation=row.get("implementation"), skipped_fraction=row.get("skipped_fraction"),
            kv_tbps=row.get("kv_tbps"),
        )
        check_below = task.get("check_below_ms")
        if row.get("status") == "pruned":
            pass
        elif row.get("status") != "ok" or not _positive(row.get("latency_ms")):
            reply["status"] = row.get("status") if row.get("status") not in (None, "ok") else "error"
            reply["error"] = row.get("error") or f"measure returned no latency (status {row.get('status')!r})"
        elif task.get("check_case") and check_below is not None and row["latency_ms"] >= check_below:
            # Slower than the study's best checked config: it cannot become the best, so its
            # numerics need not be known (export only ever takes checked configs).
            reply["checked"] = False
        elif task.get("check_case"):
            reply["checked"] = True
            rows = [row for regime in task.get("check_regimes") or [task["regime"]]
                    for row in _check_rows(task, regime, device, cache)]
            # A backend that raises in the check (or a check that cannot run) is a failed trial;
            # only a run that finished with outputs outside the budget is infeasible.
            errors = [r for r in rows if r.get("status") != "ok"]
            if errors:
                reply["status"] = errors[0].get("status") or "error"
                reply["error"] = f"check: {errors[0].get('error')}"
            else:
                value, worst = _constraint(rows)
                reply.update(constraint=value, check_worst=worst, check_passed=all(r.get("passed") is not False for r in rows))
    except BaseException as exc:  # any failure of one config is that trial's result, not ours
        text = f"{type(exc).__name__}: {exc}"
        reply.update(status="oom" if "out of memory" in text.lower() else "error", error=text[:4000],
                     traceback=traceback.format_exc()[-4000:])
    if reply.get("status") not in ("ok", "pruned"):
        reply["restart"] = _context_poisoned(device, str(reply.get("error") or ""))
        cache.clear()
        if device.startswith("cuda"):
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:
                reply["restart"] = True
    reply["worker_seconds"] = time.perf_counter() - started
    return reply


def _check_rows(task: Mapping[str, Any], regime: str, device: str, cache: dict[Any, Any]) -> list[dict[str, Any]]:
    """The numerics check of the task's config on its check case in ``regime``. Every config of
    a study is checked on the same inputs (``check_seed``), so the references are computed once
    and kept in the worker's cache."""
    from sbbench.harness.check import check_case
    from sbbench.harness.decode import check_decode_case

    case, config, extra = _task_case(task, "check_case"), dict(task["config"]), dict(task.get("check_kwargs") or {})
    if task.get("check_seed") is not None:
        extra.setdefault("seed", task["check_seed"])
    extra["oracles"] = cache.setdefault("oracles", {})
    if task["mode"] == "decode":
        return check_decode_case(task["backend"], case, regime, device=device, config=config, **extra)
    return check_case(task["backend"], case, regime, device=device, config=config, fa2=False, **extra)


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ---------------------------------------------------------------------------------------------
# parent side


class WorkerStartError(RuntimeError):
    """A worker process could not start (a plug-in that fails to import, a broken install, no such GPU)."""


@dataclass
class TrialOutcome:
    """What one trial produced; ``status`` is ``ok`` only when a latency was measured."""

    status: str
    reply: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Worker:
    """One worker process serving one device (a GPU index, or the CPU when ``gpu`` is None),
    replaced whenever it dies, overruns its time limit or reports a poisoned CUDA context."""

    def __init__(self, gpu: tuple[int, str] | None, plugins: Sequence[str] = (), startup_timeout: float = 600.0,
                 label: str | None = None, role: str = "time") -> None:
        # gpu: (index among the GPUs the tuner sees, id for CUDA_VISIBLE_DEVICES), or None.
        # role: "time" (trials: timing and numerics) or "compile" (builds kernels ahead, runs none).
        self.gpu = gpu
        self.role = role
        self.plugins = tuple(plugins)
        self.startup_timeout = startup_timeout
        self.info: dict[str, Any] | None = None
        self.restarts = 0
        self._label = label
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None

    @property
    def label(self) -> str:
        if self._label:
            return self._label
        return "cpu" if self.gpu is None else f"gpu {self.gpu[0]}"

    def start(self) -> dict[str, Any]:
        """Start the process (if not running) and return what it reported: device and versions."""
        if self._proc is not None and self._proc.is_alive():
            assert self.info is not None
            return self.info
        self._discard()
        parent, child = self._ctx.Pipe()
        # Not a daemon: a daemonic process may not have children, and torch.compile (the
        # `compiled` backend) starts compile workers.
        proc = self._ctx.Process(target=_worker_main, args=(child, self.gpu, self.plugins, self.role), daemon=False)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        if not parent.poll(self.startup_timeout):
            self._discard()
            raise WorkerStartError(f"{self.label}: worker did not start within {self.startup_timeout:.0f} s")
        try:
            info = parent.recv()
        except (EOFError, OSError):
            code = proc.exitcode if proc.join(5) is None else proc.exitcode
            self._discard()
            raise WorkerStartError(f"{self.label}: worker exited while starting ({_exit_text(code)})") from None
        if not info.get("ok"):
            self._discard()
            raise WorkerStartError(f"{self.label}: {info.get('error')}")
        self.info = info
        return info

    def run(self, task: Mapping[str, Any], timeout: float) -> TrialOutcome:
        """Run one trial; a dead, hung or poisoned worker becomes a failed trial and is replaced."""
        try:
            self.start()
        except WorkerStartError as exc:
            return TrialOutcome("crashed", {"status": "crashed", "error": str(exc), "restart": True})
        proc, conn = self._proc, self._conn
        try:
            conn.send(dict(task))
        except (OSError, ValueError) as exc:
            self._discard()
            return TrialOutcome("crashed", {"status": "crashed", "error": f"worker unreachable: {exc}"})
        if not conn.poll(timeout):
            self._discard()
            self.restarts += 1
            return TrialOutcome(
                "timeout", {"status": "timeout", "error": f"no result within the per-trial limit of {timeout:g} s; worker killed"}
            )
        try:
            reply = conn.recv()
        except (EOFError, OSError):
            proc.join(10)
            code = proc.exitcode
            self._discard()
            self.restarts += 1
            return TrialOutcome("crashed", {"status": "crashed", "error": f"worker process died ({_exit_text(code)})"})
        if reply.get("restart"):
            self._discard()
            self.restarts += 1
        status = reply.get("status") or "error"
        return TrialOutcome(status, reply)

    def _discard(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(10)

    def kill(self) -> None:
        """Kill the process now (from another thread); the thread waiting on it sees it die."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def close(self) -> None:
        """Ask the worker to exit, then make sure it has."""
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5)
            except (OSError, ValueError):
                pass
        self._discard()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def visible_gpu_ids(devices: Sequence[int]) -> list[tuple[int, str]]:
    """``devices`` indices (which count the GPUs this process sees, so they respect a
    CUDA_VISIBLE_DEVICES already set) with the id each worker puts in its CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return [(d, str(d)) for d in devices]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    out = []
    for d in devices:
        if d >= len(ids):
            raise ArgumentError("devices", f"index {d} but CUDA_VISIBLE_DEVICES={visible!r} shows {len(ids)} GPU(s)")
        out.append((d, ids[d]))
    return out


if __name__ == "__main__":  # pragma: no cover - run as a module by mistake
    sys.exit("sbbench.autotune.worker is started by the tuner, not run directly")
