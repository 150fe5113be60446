"""Streaming detokenisation of byte-level BPE and SentencePiece byte fallback (characters split across
tokens) and stop strings."""

from __future__ import annotations

import random

import pytest
from llama_tokenizer import build_llama_tokenizer, byte_token
from toy_checkpoint import build_tokenizer

from jetmoe.generation.detokenizer import StopMatcher, StreamingDetokenizer

TEXT = "Grüße, naïve café: 5 € — 日本語 🙂🚀 done. ok"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(tokenizer, ids, prompt_ids=()):
    detok = StreamingDetokenizer(tokenizer, list(prompt_ids))
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


def test_multibyte_characters_really_are_split_across_tokens(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert sum("\ufffd" in tokenizer.decode([i]) for i in ids) >= 10  # bytes of é, €, 日, 🙂 ... one per token


def test_streamed_pieces_concatenate_to_the_full_decode_without_half_characters(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, tail = stream(tokenizer, ids, prompt_ids=tokenizer("Prompt: ")["input_ids"])
    assert "".join(pieces) + tail == TEXT
    assert tail == ""
    assert not any("\ufffd" in p for p in pieces)
    # Each emoji (4 bytes, 4 tokens) shows up whole, at once.
    assert "🙂" in pieces or any(p.endswith("🙂") or p.startswith("🙂") for p in pieces)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    pieces, tail = stream(tokenizer, ids)
    assert "".join(pieces) + tail == "hello world"


def test_an_unfinished_character_is_held_until_the_end(tokenizer):
    ids = tokenizer("ok €", add_special_tokens=False)["input_ids"]
    pieces, tail = stream(tokenizer, ids[:-1])  # drop the last byte of "€"
    assert "".join(pieces) == "ok "
    assert tail == "\ufffd"  # the stream ended mid-character: replaced, as a full decode would


def test_stop_matcher_holds_back_a_possible_stop_string():
    matcher = StopMatcher(["END", "\n\n"])
    assert matcher.feed("hello E") == "hello "  # "E" could start "END"
    assert matcher.feed("x") == "Ex"  # it did not
    assert matcher.feed(" and\n") == " and"
    assert matcher.feed("\nmore") == ""  # "\n\n" completed across two pieces
    assert matcher.stopped and matcher.feed("later") == "" and matcher.flush() == ""


def test_stop_matcher_earliest_stop_wins_and_flush_releases_the_tail():
    matcher = StopMatcher(["cd", "bcde"])
    assert matcher.feed("abcdef") == "a"  # "bcde" starts before "cd"
    free = StopMatcher(["xyz"])
    assert free.feed("abx") == "ab"
    assert free.flush() == "x"
    assert StopMatcher([]).feed("anything") == "anything"


# Llama-2-style SentencePiece: byte fallback decodes a run of byte tokens that is not valid UTF-8 as one
# U+FFFD per byte, so a window that starts inside a character garbles the characters after it too.


@pytest.fixture(scope="module")
def llama_tokenizer():
    return build_llama_tokenizer()


def test_llama_text_after_a_prompt_ending_in_byte_tokens_is_the_full_decode(llama_tokenizer):
    tok = llama_tokenizer
    prompt = tok("Reactions: 🙂🙂")["input_ids"]
    assert tok.convert_ids_to_tokens(prompt)[-8:] == [byte_token(b) for b in "🙂🙂".encode()]
    completion = tok("七 nice😀 Zürich 東京\n done", add_special_tokens=False)["input_ids"]
    completion = completion[1:]  # without its leading "▁": 七's bytes follow the prompt's directly
    assert tok.convert_ids_to_tokens(completion)[0] == byte_token("七".encode()[0])
    pieces, tail = stream(tok, completion, prompt_ids=prompt)
    assert "".join(pieces) + tail == tok.decode(completion) == "七 nice😀 Zürich 東京\n done"
    assert not any("\ufffd" in p for p in pieces)


def _random_llama_ids(tok, rng: random.Random) -> list[int]:
    """Ids of words, letters and out-of-vocabulary characters (as their byte tokens), and some eos."""
    words = [t for t in tok.get_vocab() if not t.startswith("<")]
    ids = []
    for _ in range(rng.randint(1, 16)):
        kind = rng.random()
        if kind < 0.45:
            ids += [tok.convert_tokens_to_ids(byte_token(b)) for b in rng.choice(FOREIGN).encode()]
        elif kind < 0.95:
            ids.append(tok.convert_tokens_to_ids(rng.choice(words)))
        else:
            ids.append(tok.eos_token_id)
    return ids


FOREIGN = "é€ß七東京日本😀🙂🚀Ωñ"


def _is_continuation_byte(tok, token_id: int) -> bool:
    token = tok.convert_ids_to_tokens(token_id)
    return token.startswith("<0x") and 0x80 <= int(token[3:5], 16) < 0xC0


def test_llama_streamed_text_is_the_full_decode_for_random_ids_and_prompt_splits(llama_tokenizer):
    """Whatever the ids and wherever the prompt ends, the stream shows the text after the prompt's last whole
    character: a prompt that ends inside a character leaves that character to the stream."""
    tok, rng = llama_tokenizer, random.Random(0)
    for case in range(400):
        ids = _random_llama_ids(tok, rng)
        split = rng.randint(0, len(ids))
        boundary = split
        while boundary < len(ids) and _is_continuation_byte(tok, ids[boundary]):
            boundary -= 1
        expected = tok.decode(ids, skip_special_tokens=True)
        shown = tok.decode(ids[:boundary], skip_special_tokens=True)
        assert expected.startswith(shown)
        pieces, tail = stream(tok, ids[split:], prompt_ids=ids[:split])
        assert "".join(pieces) + tail == expected[len(shown) :], (case, tok.convert_ids_to_tokens(ids), split)
        assert tail == "" and not any("\ufffd" in p for p in pieces), (case, pieces, tail)
