"""Input regimes (docs/design.md section 5). Stick-breaking cost depends on the data once blocks
can be skipped, so every benchmark names its regime.

``dense`` keeps the shape of the obvious construction q = 0.25 (N+1), k = 0.25 (N-1) (q leaning
+1, k leaning -1, so logits are negative) but not its scale. At that scale the logits' mean is
-0.0625 sqrt(D) (-0.71 at D=128): every key takes a third of the stick, which is gone (below
2^-30) after about 50 keys, so the "worst case, no block can be skipped" regime would be the best
case for skipping. The scale is set so the logits are N(-8, 0.5) at every head dim: the stick
then lasts past 16k keys (sum of softplus ~ 16384 e^-8 ~ 6 nats) and nothing is skipped, which
is what the regime is for.
"""

from __future__ import annotations

import math

import torch

from sbbench.harness.cases import Case

REGIMES = ("dense", "randn", "mixed", "peaked")
DENSE_MEAN_LOGIT = -8.0
DENSE_LOGIT_STD = 0.5
PEAKED_LOGIT_STD = 8.0  # |z| reaches ~30 over a few thousand keys
BEACON_LOGIT = 12.0  # two such keys use up more than 2^-30 of the stick


def ragged_lengths(case: Case, generator: torch.Generator) -> list[int]:
    """Sequence lengths of a packed varlen case: the first is ``seqlen``, one is 1 when batch > 2,
    the rest uniform in [1, seqlen]."""
    lengths = [case.seqlen]
    if case.batch > 2:
        lengths.append(1)
    while len(lengths) < case.batch:
        lengths.append(int(torch.randint(1, case.seqlen + 1, (1,), generator=generator)))
    return lengths


def _dense_qk(shape_q, shape_k, head_dim, dtype, device, gen):
    # q_d = s(1 + r a), k_d = -s(1 - r b) with a, b ~ N(0,1): <q,k>/sqrt(D) has mean -s^2 sqrt(D)
    # and variance s^4 r^2 (2 + r^2); solve for the mean and std we want.
    s2 = -DENSE_MEAN_LOGIT / math.sqrt(head_dim)
    c2 = (DENSE_LOGIT_STD / s2) ** 2
    r = math.sqrt(-1.0 + math.sqrt(1.0 + c2))
    s = math.sqrt(s2)
    q = s * (1.0 + r * torch.randn(shape_q, generator=gen, device=device, dtype=torch.float32))
    k = -s * (1.0 - r * torch.randn(shape_k, generator=gen, device=device, dtype=torch.float32))
    return q, k


def make_inputs(
    case: Case,
    regime: str,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    requires_grad: bool = False,
) -> dict:
    """Fresh inputs for ``case`` in ``regime``: a dict with q, k, v and, for varlen, cu_seqlens,
    max_seqlen and the lengths. Dense tensors are (B, H, T, D); packed ones (total, H, D)."""
    if regime not in REGIMES:
        raise ValueError(f"regime: expected one of {', '.join(REGIMES)}, got {regime!r}")
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)
    cpu_gen = torch.Generator()
    cpu_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen, device=device)))

    if case.varlen:
        lengths = ragged_lengths(case, cpu_gen)
        total = sum(lengths)
        shape_q, shape_k = (1, case.heads, total, case.head_dim), (1, case.kv_heads, total, case.head_dim)
    else:
        lengths = None
        shape_q = (case.batch, case.heads, case.seqlen, case.head_dim)
        shape_k = (case.batch, case.kv_heads, case.seqlen, case.head_dim)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    if regime == "randn":
        q, k = randn(shape_q), randn(shape_k)
    elif regime == "peaked":
        scale = math.sqrt(PEAKED_LOGIT_STD)
        q, k = scale * randn(shape_q), scale * randn(shape_k)
    else:
        q, k = _dense_qk(shape_q, shape_k, case.head_dim, torch.float32, device, gen)
        if regime == "mixed":
            k = _plant_beacons(q, k, case, gen)
    v = randn(shape_k)

    tensors = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        x = x.to(case.torch_dtype)
        if case.varlen:
            x = x[0].transpose(0, 1).contiguous()  # (total, H, D)
        tensors[name] = x.requires_grad_(requires_grad)
    if case.varlen:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)
        tensors.update(cu_seqlens=cu, max_seqlen=max(lengths), lengths=lengths)
    return tensors


def _plant_beacons(q: torch.Tensor, k: torch.Tensor, case: Case, gen: torch.Generator) -> torch.Tensor:
    """``mixed``: dense keys plus a few "beacon" keys that every query matches strongly. Each kv
    head draws its beacon rate log-uniformly between one per sequence and one per 32 keys, so the
    stick runs out at distances spread from tens of keys to the whole sequence."""
    batch, kv_heads, t, d = k.shape
    device = k.device
    log_lo, log_hi = math.log(1.0 / max(t, 2)), math.log(1.0 / 32)
    u = torch.rand((batch, kv_heads, 1), generator=gen, device=device)
    rate = torch.exp(log_lo + u * (log_hi - log_lo))
    is_beacon = torch.rand((batch, kv_heads, t), generator=gen, device=device) < rate
    # Queries lean along +1 (see _dense_qk); a key along +1 scaled to logit BEACON_LOGIT.
    mean_q = q.mean(dim=(1, 2), keepdim=True).mean(dim=-1, keepdim=True).clamp_min(1e-3)
    beacon = torch.full_like(k[..., :1, :], 1.0) * (BEACON_LOGIT * math.sqrt(d) / (d * mean_q))
    return torch.where(is_beacon[..., None], beacon.expand_as(k), k)
