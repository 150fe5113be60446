"""A tiny random JetMoE checkpoint with a locally trained byte-level BPE tokenizer, built in a temp dir.

Nothing is downloaded. The tokenizer is trained on ASCII sentences only, so any non-ASCII character is
split into single-byte tokens: exactly the case streaming detokenisation must get right.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import jetmoe

SENTENCES = [
    "The Python language is a programming language.",
    "A mixture of experts routes every token to two experts.",
    "The quick brown fox jumps over the lazy dog.",
    "Generation streams text one token at a time.",
    "Servers answer many clients at once with continuous batching.",
    "Hello world, hello model, hello tokens and bytes.",
] * 4
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: JetMoE's pad/bos/eos convention
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(vocab_size: int = 300, chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, **overrides) -> jetmoe.JetMoeForCausalLM:
    """TINY geometry, random weights large enough that logits are far from uniform (no greedy near-ties)."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=16,
        intermediate_size=96,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,  # tied random embeddings make greedy repeat the prompt token forever
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            values = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                values = 1.0 + 0.2 * values
            elif name.endswith("bias"):
                values = 0.1 * values
            elif "embed_tokens" in name:
                values = 1.0 * values
            else:
                values = values * param.shape[-1] ** -0.5
            param.copy_(values)
    return model.eval()


def build_toy_checkpoint(path: Path, seed: int = 0, chat_template: bool = True, **overrides) -> Path:
    tokenizer = build_tokenizer(chat_template=chat_template)
    vocab = -(-len(tokenizer) // 16) * 16
    model = build_model(vocab, seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


PROMPTS = ["The Python language", "Hello world, hello model", "A mixture of experts routes"]


def load_toy(path, attn_implementation: str = "sdpa", dtype=torch.float32) -> jetmoe.JetMoeForCausalLM:
    return jetmoe.JetMoeForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).eval()
