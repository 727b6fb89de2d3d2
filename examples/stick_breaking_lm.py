"""A tiny stick-breaking language model that generates text from a KV cache.

The attention module is used the way published stick-breaking models use it: grouped-query
attention, no position embedding (the stick itself orders the keys: the nearest key breaks it
first), and the stick left over attends to a learned per-head bias vector::

    out = o + rem * head_bias

Generation prefills the prompt with ``sb_attn`` (writing the prompt's keys and values into the
cache), then decodes one token per step with ``sb_attn_with_kvcache``, which appends the new
token's key and value to the cache before attending.

Run it (CPU, random weights; ``--device cuda`` on a GPU)::

    python examples/stick_breaking_lm.py --tokens 16
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn

from sbbench import sb_attn, sb_attn_with_kvcache


@dataclass
class KVCache:
    """Keys and values of every layer, (layers, B, H_kv, capacity, D), and the tokens held per
    sequence."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor  # int32 (B,)

    @classmethod
    def empty(cls, layers, batch, kv_heads, capacity, head_dim, dtype, device) -> "KVCache":
        shape = (layers, batch, kv_heads, capacity, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device),
        )


class StickBreakingAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, attend_current: bool = False):
        super().__init__()
        if dim % heads or heads % kv_heads:
            raise ValueError(f"heads: {heads} must divide dim {dim}, and kv_heads {kv_heads} must divide heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attend_current = attend_current
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        # What the leftover stick attends to, per head.
        self.head_bias = nn.Parameter(0.02 * torch.randn(heads, self.head_dim))

    def _split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, heads, self.head_dim).transpose(1, 2)  # a view: no copy

    def forward(
        self, x: torch.Tensor, layer_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        *, prefill: bool = False, backend: str = "auto",
    ) -> torch.Tensor:
        """x (B, T, dim). Without a cache: attention over x alone. With ``layer_cache`` (k, v,
        seqlens): ``prefill`` attends over x and writes its keys and values at the start of the
        cache; otherwise x's tokens are new ones appended at ``seqlens`` and attend to the cache."""
        q = self._split_heads(self.q_proj(x), self.heads)
        k = self._split_heads(self.k_proj(x), self.kv_heads)
        v = self._split_heads(self.v_proj(x), self.kv_heads)
        if layer_cache is None or prefill:
            o, rem = sb_attn(q, k, v, None, self.attend_current, backend=backend)
            if layer_cache is not None:
                k_cache, v_cache, _ = layer_cache
                k_cache[:, :, : x.shape[1]] = k
                v_cache[:, :, : x.shape[1]] = v
        else:
            k_cache, v_cache, seqlens = layer_cache
            o, rem = sb_attn_with_kvcache(q, k_cache, v_cache, seqlens, None, self.attend_current, k=k, v=v,
                                          backend=backend)
        out = o + rem[..., None] * self.head_bias[None, :, None, :]
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, attend_current: bool):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = StickBreakingAttention(dim, heads, kv_heads, attend_current)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, layer_cache=None, *, prefill=False, backend="auto"):
        x = x + self.attn(self.attn_norm(x), layer_cache, prefill=prefill, backend=backend)
        return x + self.mlp(self.mlp_norm(x))


class StickBreakingLM(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                 attend_current: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, attend_current) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        attn = self.blocks[0].attn
        weight = self.lm_head.weight
        return KVCache.empty(len(self.blocks), batch, attn.kv_heads, capacity, attn.head_dim, weight.dtype,
                             weight.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *, prefill: bool = False,
                backend: str = "auto") -> torch.Tensor:
        """Logits (B, T, vocab) of tokens (B, T). With a cache, ``prefill`` fills it from the
        prompt; otherwise the tokens are appended. Either way ``cache.seqlens`` advances by T."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.seqlens)
            x = block(x, layer_cache, prefill=prefill, backend=backend)
        if cache is not None:
            cache.seqlens += tokens.shape[1]
        return self.lm_head(self.norm(x))


@torch.no_grad()
def generate(model: StickBreakingLM, prompt: torch.Tensor, new_tokens: int, *, backend: str = "auto",
             prefill_backend: str = "auto") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding: (generated tokens (B, new_tokens), the logits each was chosen from)."""
    batch, prompt_len = prompt.shape
    cache = model.new_cache(batch, prompt_len + new_tokens)
    logits = model(prompt, cache, prefill=True, backend=prefill_backend)[:, -1]
    chosen, step_logits = [], []
    for step in range(new_tokens):
        step_logits.append(logits)
        token = logits.argmax(-1)
        chosen.append(token)
        if step + 1 < new_tokens:
            logits = model(token[:, None], cache, backend=backend)[:, -1]
    return torch.stack(chosen, 1), step_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = StickBreakingLM().to(args.device).eval()
    prompt = torch.randint(0, 256, (2, 8), device=args.device)
    tokens, _ = generate(model, prompt, args.tokens)
    for row, out in zip(prompt.tolist(), tokens.tolist()):
        print(f"prompt {row} -> {out}")


if __name__ == "__main__":
    main()
