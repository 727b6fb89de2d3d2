"""The Triton backend's launch parameters, each declared once.

A :class:`LaunchParam` holds everything about one parameter: its name, the pass it governs, the
values the tuner tries, its default, the rule every value must meet, and how it travels in the
int list the custom ops take. The config space, the default config, the int list's order and the
validation all derive from :data:`LAUNCH_PARAMS`, so a new parameter is one more entry there (and
its use in ``op.launch_options``). Importing this module needs neither triton nor a GPU.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from sbbench.core.registry import Param, Rule

# skip_log2 travels as this (or anything below it) when block skipping is off (None).
SKIP_OFF = -(10**6)
SCAN_CODES = {"dot": 1, "cumsum": 0}
LOADS_CODES = {"pointer": 0, "tma": 1}
DESCRIPTOR_CODES = {"kernel": 0, "host": 1}
STATE_LAYOUT_CODES = {"rows": 0, "blocks": 1}


@dataclass(frozen=True)
class LaunchParam(Param):
    """A :class:`~sbbench.core.registry.Param` that also says how its value becomes one int of the
    custom ops' launch list (``encode``) and back (``decode``): ``torch.library`` schemas take
    lists of ints, not dicts of mixed values."""

    encode: Callable[[Any], int] = int
    decode: Callable[[int], Any] = int


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# tl.dot needs every tile dimension a power of two of at least 16.
TILE = Rule(lambda v: _is_integer(v) and v >= 16 and not v & (v - 1), "a power of two >= 16 (tl.dot tiles)")
WARPS = Rule(lambda v: _is_integer(v) and v in (1, 2, 4, 8, 16), "1, 2, 4, 8 or 16")
STAGES = Rule(lambda v: _is_integer(v) and v >= 1, "an integer >= 1")
# ptxas takes a per-thread cap between 24 and 255; 0 leaves the choice to it.
REGISTER_CAP = Rule(lambda v: _is_integer(v) and (v == 0 or 24 <= v <= 255), "0 (no cap) or 24..255 registers")
# A threshold rem < 2^skip_log2 of 1 or more would skip keys whose weights are not negligible.
SKIP_THRESHOLD = Rule(lambda v: v is None or (_is_integer(v) and v < 0), "None (no skipping) or a negative integer")
POSITIVE = Rule(lambda v: _is_integer(v) and v >= 1, "a positive integer")
SKIP_LEVELS = Rule(lambda v: _is_integer(v) and 1 <= v <= 8, "an integer in 1..8")


def _encode_skip(value: int | None) -> int:
    return SKIP_OFF if value is None else int(value)


def _decode_skip(code: int) -> int | None:
    return None if code <= SKIP_OFF else code


def _named(name: str, codes: Mapping[str, int], pass_: str, default: str) -> LaunchParam:
    """A parameter whose values are names, travelling as the int ``codes`` gives each."""
    names = {code: value for value, code in codes.items()}
    rule = Rule(lambda v: isinstance(v, str) and v in codes, f"one of {sorted(codes)}")
    # An unknown code decodes to itself, which the rule then rejects by name.
    return LaunchParam(name, tuple(codes), pass_, default, rule, encode=codes.__getitem__,
                       decode=lambda code: names.get(code, code))


def _tile(name: str, choices: tuple[int, ...], pass_: str, default: int) -> LaunchParam:
    return LaunchParam(name, choices, pass_, default, TILE)


def _warps(name: str, pass_: str, default: int) -> LaunchParam:
    return LaunchParam(name, (2, 4, 8), pass_, default, WARPS)


def _register_cap(name: str, pass_: str) -> LaunchParam:
    # 168 and 128 are the caps at which one more 4-warp program fits on an SM; the cap buys
    # occupancy with spills, which pays at some head dims and not at others, so the default is
    # none and the tuned configs choose.
    return LaunchParam(name, (0, 168, 128), pass_, 0, REGISTER_CAP)


LAUNCH_PARAMS: tuple[LaunchParam, ...] = (
    # Forward. A 32-key tile with three pipeline stages keeps the per-score transform's
    # registers low enough for several programs per SM at D=64 and D=128; larger key tiles trade
    # that occupancy for fewer loop iterations.
    _tile("fwd_BLOCK_M", (16, 32, 64, 128, 256), "fwd", 64),
    _tile("fwd_BLOCK_N", (16, 32, 64, 128), "fwd", 32),
    _warps("fwd_num_warps", "fwd", 4),
    LaunchParam("fwd_num_stages", (1, 2, 3, 4), "fwd", 3, STAGES),
    # Block skipping stops a query tile's walk once every row's remaining stick is below
    # 2^skip_log2. At -30 a skipped key moves a float32 output of O(1) by under a tenth of an ulp;
    # the tuner may raise it as far as the numerics budget allows.
    LaunchParam("skip_log2", (-40, -30, -24, -20, -16, -12), "fwd", -30, SKIP_THRESHOLD,
                encode=_encode_skip, decode=_decode_skip),
    # Keys walked before the first skip check (each later check waits twice as long): a check
    # ends a software-pipelined loop, so rarer checks cost less when nothing can be skipped and
    # stop later when the stick runs out.
    LaunchParam("skip_check_keys", (128, 256, 512, 1024, 2048, 4096), "fwd", 256, POSITIVE),
    # How many skip checks before walking the rest without one: each check closes a pipelined
    # loop and opens another, which costs even when nothing can be skipped, so one by default.
    LaunchParam("skip_checks", (1, 2, 3, 5), "fwd", 1, SKIP_LEVELS),
    # The within-block suffix sum: a product with a 0/1 matrix on the tensor cores ("dot"), or
    # tl.cumsum. float32 inputs always use tl.cumsum (see kernels.py).
    _named("scan", SCAN_CODES, "fwd", "dot"),
    # How the forward reads K and V: per-thread pointer loads (cp.async), or the tensor memory
    # accelerator through a tensor descriptor per (sequence, kv head), which takes the address
    # arithmetic and the bounds masks off the threads. Hopper and later; elsewhere, and for
    # tensors whose base or strides are not 16-byte aligned (TMA's rule), the pointer loads run.
    _named("fwd_loads", LOADS_CODES, "fwd", "pointer"),
    # ptxas's register cap for the forward: a 64-key tile at D=64 with 3 stages and TMA loads
    # takes 187 registers uncapped (two 4-warp programs an SM) and 168 capped without spills
    # (three).
    _register_cap("fwd_maxnreg", "fwd"),
    # Backward, the dQ kernel's launch.
    _tile("bwd_BLOCK_M", (16, 32, 64, 128), "bwd", 64),
    _tile("bwd_BLOCK_N", (16, 32, 64, 128), "bwd", 32),
    _warps("bwd_num_warps", "bwd", 4),
    LaunchParam("bwd_num_stages", (1, 2, 3), "bwd", 3, STAGES),
    # Backward, the dK/dV kernel's launch. Its key tile also sets how often the dQ kernel stores
    # the boundary sums passed between the two kernels (T^2 / (2 N) floats each), so it must be a
    # multiple of the dQ key tile; 64 keeps those sums small enough for a peak memory near
    # FlashAttention-2's. The best dK/dV tiles differ by head dim, so the default is a middle one
    # and the tuned configs pick per head dim.
    _tile("bwd_dkdv_BLOCK_M", (16, 32, 64, 128), "bwd", 32),
    _tile("bwd_dkdv_BLOCK_N", (32, 64, 128), "bwd", 64),
    _warps("bwd_dkdv_num_warps", "bwd", 4),
    # One stage by default: triton 3.6 has miscompiled the two-stage dK/dV kernel on Hopper for
    # some tiles (wrong dK at D=128 with GQA, and on packed varlen fp16), while one stage was right
    # in every case. The tuner may still choose two: its numerics constraint rejects a wrong config.
    LaunchParam("bwd_dkdv_num_stages", (1, 2, 3), "bwd", 1, STAGES),
    _register_cap("bwd_maxnreg", "bwd"),
    _register_cap("bwd_dkdv_maxnreg", "bwd"),
    # How the backward reads the blocks it walks (K and V in the dQ kernel, q and dO in the dK/dV
    # kernel), as fwd_loads for the forward.
    _named("bwd_loads", LOADS_CODES, "bwd", "pointer"),
    # Where the backward's TMA descriptors of dense inputs are made: in the kernel, one per program
    # (and per head of a GQA group in the dK/dV kernel), or once per launch on the host. Host-made
    # ones cost no set-up in the kernel but address their tiles with four coordinates, which adds
    # instructions to the hot loops; which pays differs by head dim, so the tuned configs choose.
    # (The forward always takes host-made ones for dense inputs: they hold no scratch memory.)
    _named("bwd_descriptors", DESCRIPTOR_CODES, "bwd", "kernel"),
    # How the boundary sums passed from the dQ to the dK/dV kernel are laid out: each row's key
    # blocks adjacent ("rows"), or each key block's rows adjacent ("blocks"), so that the rows of
    # a query tile are stored and loaded as whole cache lines, at the price of a block offset
    # per dQ iteration. Which pays depends on the head dim and on how the dK/dV kernel loads its
    # tiles, so the tuned configs choose.
    _named("bwd_state_layout", STATE_LAYOUT_CODES, "bwd", "rows"),
)

CONFIG_SPACE: tuple[Param, ...] = LAUNCH_PARAMS
DEFAULT_CONFIG: dict[str, Any] = {p.name: p.default for p in LAUNCH_PARAMS}
# Order of the launch parameters in the int list the custom ops take.
CONFIG_FIELDS: tuple[str, ...] = tuple(p.name for p in LAUNCH_PARAMS)
_BY_NAME = {p.name: p for p in LAUNCH_PARAMS}


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first parameter of a full config that is invalid, alone
    or together with another."""
    for param in LAUNCH_PARAMS:
        param.check(config[param.name])
    if config["bwd_dkdv_BLOCK_N"] % config["bwd_BLOCK_N"]:
        raise ValueError(
            f"config: bwd_dkdv_BLOCK_N ({config['bwd_dkdv_BLOCK_N']}) must be a multiple of "
            f"bwd_BLOCK_N ({config['bwd_BLOCK_N']}): the dQ kernel stores boundary sums at its edges"
        )


def config_to_list(config: Mapping[str, Any]) -> list[int]:
    """The custom ops' int list for ``config`` over the defaults, checked first."""
    unknown = sorted(set(config) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"config: no launch parameter(s) {unknown}; they are {list(CONFIG_FIELDS)}")
    full = {**DEFAULT_CONFIG, **config}
    check_config(full)
    return [p.encode(full[p.name]) for p in LAUNCH_PARAMS]


def config_from_list(values: Sequence[int]) -> dict[str, Any]:
    """The config an int list encodes, checked (the custom ops may be called directly)."""
    if len(values) != len(LAUNCH_PARAMS):
        raise ValueError(f"cfg: expected {len(LAUNCH_PARAMS)} launch parameters ({', '.join(CONFIG_FIELDS)}), "
                         f"got {len(values)}")
    config = {p.name: p.decode(value) for p, value in zip(LAUNCH_PARAMS, values)}
    check_config(config)
    return config
