"""Tokenizers for training: an HF tokenizer from a path, or a byte-level BPE trained on the corpus.

Also turns an example into token ids plus a loss mask: documents are trained on in full; in a conversation
only the assistant turns (and the end-of-turn token) are, the prompt tokens are masked out.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Ids 0-2 match JetMoE's (Llama) tokenizer: <unk> 0, <s> 1 (bos), </s> 2 (eos).
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

# A turn-tagged template for tokenizers that bring none. The assistant turn ends with </s> (eos), so the model
# learns to stop; the text before each assistant turn is a prefix of the whole, which the masking relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}</s>"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a tokenizer from {path!r}: {error}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path!r} has no eos token, which separates packed documents")
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every byte sequence encodes; no unknown tokens) with JetMoE's special-token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Changes whenever the ids a text encodes to could change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = f"|{tokenizer.eos_token_id}|{tokenizer.bos_token_id}|{tokenizer.chat_template}"
    return hashlib.sha256((body + extra).encode()).hexdigest()[:20]


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's normal encoding starts with bos (then every packed document does too)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask): mask 1 on the tokens of assistant turns (what the loss counts), 0 on the prompt."""
    template = tokenizer.chat_template or CHAT_TEMPLATE

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )

    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt_text = render(index, True)
            if not prompt_text.startswith(done):
                raise ValueError("the tokenizer's chat template is not prefix-stable; cannot mask prompt tokens")
            _extend(tokenizer, ids, mask, prompt_text[len(done) :], 0)
            done = prompt_text
        full_text = render(index + 1, False)
        if not full_text.startswith(done):
            raise ValueError("the tokenizer's chat template is not prefix-stable; cannot mask prompt tokens")
        _extend(tokenizer, ids, mask, full_text[len(done) :], 1 if message["role"] == "assistant" else 0)
        done = full_text
    return ids, mask


def _extend(tokenizer, ids: list[int], mask: list[int], text: str, flag: int) -> None:
    if text:
        new = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(new)
        mask.extend([flag] * len(new))
