"""The KV-cache client (examples/stick_breaking_lm.py): greedy generation with the cache gives the
tokens, and within a stated tolerance the logits, of recomputing the whole sequence with sb_attn
at every step."""

from __future__ import annotations

import pytest
import torch

from examples.stick_breaking_lm import StickBreakingLM, generate

# Logit tolerance, relative to the largest |logit|: float64 differs from the recomputation only by
# summation order; float32 by the decode kernel's own rounding (float32 budget ~1e-6 per attention
# output, amplified a little by two layers and the LM head).
LOGIT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def recompute(model, prompt, tokens):
    """Logits of each step from the whole sequence so far, no cache (sb_attn's reference)."""
    seq = torch.cat([prompt, tokens], 1)
    return [model(seq[:, : prompt.shape[1] + i], backend="reference")[:, -1] for i in range(tokens.shape[1])]


@pytest.mark.parametrize(
    "dtype,backend,attend_current",
    [(torch.float64, "chunked", False), (torch.float64, "reference", True), (torch.float32, "triton", True)],
)
def test_greedy_generation_matches_recomputation(dtype, backend, attend_current):
    torch.manual_seed(0)
    model = StickBreakingLM(vocab=64, dim=64, layers=2, heads=4, kv_heads=2, attend_current=attend_current)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for block in model.blocks:  # a bias the leftover stick visibly attends to
            block.attn.head_bias.normal_()
    prompt = torch.randint(0, 64, (2, 5))
    tokens, step_logits = generate(model, prompt, 6, backend=backend, prefill_backend="chunked")
    with torch.no_grad():
        want = recompute(model, prompt, tokens)
    for step, (got, ref) in enumerate(zip(step_logits, want)):
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        assert err <= LOGIT_RTOL[dtype] * scale, f"step {step}: logits off by {err:.3g} (scale {scale:.3g})"
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), f"step {step}: a different token"
    assert len(set(tokens.flatten().tolist())) > 1, "a degenerate model: every token the same"
