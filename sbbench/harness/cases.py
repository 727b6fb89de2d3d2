"""One benchmark/check case: the input's shape and kind, shared by check, bench and tune."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sbbench.core.errors import ArgumentError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
MODES = ("fwd", "bwd", "fwdbwd")
# docs/design.md section 5: FLOPs as causal FlashAttention, whatever was skipped.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ArgumentError("dtype", f"expected one of {', '.join(DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_case_fields(case: object, positive: tuple[str, ...]) -> None:
    """A case's fields named in ``positive`` are positive ints, its kv heads divide its heads,
    and its dtype is known; errors name the CLI flag (``kv-heads``)."""
    for name in positive:
        value = getattr(case, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(name, f"expected a positive int, got {value!r}")
    if case.heads % case.kv_heads:
        raise ArgumentError("kv_heads", f"{case.kv_heads} does not divide heads {case.heads}")
    dtype_from_name(case.dtype)


@dataclass(frozen=True)
class Case:
    """Shape and kind of one input. ``varlen`` packs ``batch`` sequences of ragged lengths whose
    longest is ``seqlen`` (and whose total is about ``batch * seqlen * 3/4``)."""

    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int
    dtype: str = "bfloat16"
    attend_current: bool = False
    varlen: bool = False

    def __post_init__(self) -> None:
        check_case_fields(self, ("batch", "heads", "kv_heads", "seqlen", "head_dim"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def flops(self, mode: str, seqlens: list[int] | None = None) -> float:
        """FLOPs counted as causal FlashAttention: forward 4*B*H*T*T*D/2 (per sequence for varlen)."""
        lengths = seqlens if seqlens is not None else [self.seqlen] * self.batch
        forward = sum(4.0 * self.heads * t * t * self.head_dim / 2 for t in lengths)
        return forward * MODE_FLOP_FACTOR[mode]

    def columns(self) -> dict:
        """The shape columns of a result row."""
        return asdict(self)
