"""Streaming detokenisation of byte-level BPE (characters split across tokens) and stop strings."""

from __future__ import annotations

import pytest
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
