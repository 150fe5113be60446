"""Test helpers: tiny configs, and our model beside transformers' JetMoe (the oracle) with identical weights.

The oracle is imported here and in the tests only; library code never imports it. (A module with a unique
name rather than conftest.py, so that `from oracle_pair import ...` is never ambiguous.)
"""

from __future__ import annotations

import torch
import transformers
from transformers.models.jetmoe import modeling_jetmoe as oracle_modeling

import jetmoe

# The tiny geometry of reference-semantics.md: V=128, H=64, L=2, Nkv=2, D=16, I=96, E=4, k=2.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_key_value_heads=2,
    kv_channels=16,
    intermediate_size=96,
    num_local_experts=4,
    num_experts_per_tok=2,
)
# More experts and k=3; I=42 (168-byte rows) also takes the grouped matmul's unaligned fallback path.
WIDE = dict(TINY, num_local_experts=6, num_experts_per_tok=3, intermediate_size=42)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# What the issue requires of parity in fp32.
ATOL = 2e-5
GRAD_ATOL = 1e-4


def make_configs(geometry: dict | None = None, **overrides):
    """(ours, oracle's) configs with the same fields."""
    fields = dict(geometry or TINY, **overrides)
    return jetmoe.JetMoeConfig(**fields), transformers.JetMoeConfig(**fields)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and non-zero: biases and norm weights included, so none of them can hide.

    Scaled so the model is far from uniform routing and logits spread out (a stronger test than init).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            values = torch.randn(param.shape, generator=generator)
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                values = 1.0 + 0.2 * values  # norm weights around 1, never 0
            elif name.endswith("bias"):
                values = 0.1 * values
            elif "embed_tokens" in name:
                values = 0.5 * values
            else:
                values = values * param.shape[-1] ** -0.5  # unit-gain projections
            param.copy_(values)


def build_pair(
    geometry: dict | None = None,
    attn_implementation: str = "sdpa",
    head: str = "causal_lm",
    seed: int = 0,
    **overrides,
):
    """(ours, oracle): same config, same (random non-zero) weights, fp32, eval mode."""
    ours_config, oracle_config = make_configs(geometry, **overrides)
    ours_cls, oracle_cls = {
        "causal_lm": (jetmoe.JetMoeForCausalLM, transformers.JetMoeForCausalLM),
        "seq_cls": (jetmoe.JetMoeForSequenceClassification, transformers.JetMoeForSequenceClassification),
        "base": (jetmoe.JetMoeModel, transformers.JetMoeModel),
    }[head]
    ours_config._attn_implementation = attn_implementation
    oracle_config._attn_implementation = attn_implementation
    oracle = oracle_cls(oracle_config)
    randomize_(oracle, seed)
    ours = ours_cls(ours_config)
    missing, unexpected = ours.load_state_dict(oracle.state_dict(), strict=True)
    assert not missing and not unexpected
    if ours_config.tie_word_embeddings and head == "causal_lm":
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    return ours.eval(), oracle.eval()


def random_ids(batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 1, low: int = 3) -> torch.Tensor:
    """Token ids avoiding 0..low-1 (bos/eos/pad live there in these tests)."""
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def padding_mask(lengths: list[int], total: int, side: str) -> torch.Tensor:
    """[B, total] 0/1 mask with `lengths[b]` real tokens, padding on `side` ("left" or "right")."""
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, total - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_close(ours: torch.Tensor, oracle: torch.Tensor, atol: float = ATOL, what: str = "tensor") -> float:
    """Absolute closeness; returns the max difference (and prints it, so `-s` shows parity errors)."""
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    diff = max_diff(ours, oracle)
    print(f"PARITY {what}: max abs diff {diff:.3e}")
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.1e}"
    return diff


__all__ = [
    "ATOL",
    "ATTN_IMPLEMENTATIONS",
    "GRAD_ATOL",
    "TINY",
    "WIDE",
    "assert_close",
    "build_pair",
    "make_configs",
    "max_diff",
    "oracle_modeling",
    "padding_mask",
    "random_ids",
    "randomize_",
]
