"""A small Llama-2-style tokenizer built locally: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens)
and the Metaspace "▁" pre-tokenizer, wrapped by transformers' LlamaTokenizer. Nothing is downloaded.

Characters outside the vocabulary (CJK, emoji, most accented letters) become one byte token per UTF-8 byte.
"""

from __future__ import annotations

from transformers import LlamaTokenizer

WORDS = ["▁nice", "▁Z", "rich", "▁done", "Re", "actions", "▁the", "▁a", "ing", "▁東"]
LETTERS = "abcdefghijklmnopqrstuvwxyz:.!?,\nü▁"


def byte_token(value: int) -> str:
    return f"<0x{value:02X}>"


def build_llama_tokenizer() -> LlamaTokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for value in range(256):
        vocab[byte_token(value)] = len(vocab)
    for char in sorted(set(LETTERS) | {c for word in WORDS for c in word}):
        vocab.setdefault(char, len(vocab))
    merges = []
    for word in WORDS:  # each word from its prefixes, one merge a character
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges)
