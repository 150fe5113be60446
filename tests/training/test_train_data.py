"""Data pipeline: reading sources, tokenizers, token files (memmap, reuse), packing, split, order, chat masking."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jetmoe.training.corpus import module_document, pydoc_topics
from jetmoe.training.data import PackedSequences, TokenFile, build_token_file, step_positions, token_file_path
from jetmoe.training.objective import IGNORE_INDEX
from jetmoe.training.sources import resolve_source
from jetmoe.training.tokenizer import SPECIAL_TOKENS, encode_conversation, train_bpe

from train_helpers import write_corpus


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(resolve_source([corpus]).texts(), 300)


def test_bpe_tokenizer_has_jetmoe_special_ids_and_round_trips(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    text = "the lazy fox, déjà vu 🦊\n\tindented"  # bytes never seen in training still encode (byte-level)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids


def test_token_file_is_built_once_and_reused(tmp_path, corpus, tokenizer):
    source = resolve_source([corpus])
    first = build_token_file(source, tokenizer, str(tmp_path), log=lambda _: None)
    assert isinstance(first.tokens, np.memmap)
    stamp = os.stat(os.path.join(first.path, "tokens.bin")).st_mtime_ns
    messages = []
    second = build_token_file(source, tokenizer, str(tmp_path), log=messages.append)
    assert second.path == first.path and not messages  # no tokenising the second time
    assert os.stat(os.path.join(second.path, "tokens.bin")).st_mtime_ns == stamp
    assert np.array_equal(np.asarray(first.tokens), np.asarray(second.tokens))
    assert [name for name in os.listdir(tmp_path) if ".partial" in name] == []


def test_changed_data_gets_a_new_token_file(tmp_path, tokenizer):
    path = write_corpus(tmp_path / "c.txt", lines=30)
    before = token_file_path(str(tmp_path / "cache"), resolve_source([path]), tokenizer)
    with open(path, "a") as handle:
        handle.write("one more line that changes the data.\n")
    assert token_file_path(str(tmp_path / "cache"), resolve_source([path]), tokenizer) != before


def test_documents_are_packed_with_eos_separators(tmp_path, tokenizer):
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = ["first document here", "second one", "third and last document"]
    for index, text in enumerate(texts):
        (folder / f"{index}.txt").write_text(text)
    token_file = build_token_file(resolve_source([str(folder)]), tokenizer, str(tmp_path / "cache"), log=lambda _: None)
    expected = []
    for text in texts:  # folder files in sorted order, each followed by eos
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert np.asarray(token_file.tokens).tolist() == expected
    assert token_file.documents == 3 and token_file.mask is None
    packed = PackedSequences(token_file, seq_len=4, val_fraction=0.0, seed=0)
    assert packed.num_train == len(expected) // 4
    ids, labels = packed.sequence(1)
    assert ids.tolist() == expected[4:8] and labels.tolist() == expected[4:8]


def test_large_text_file_is_streamed_in_pieces_without_extra_separators(tmp_path, tokenizer, monkeypatch):
    import jetmoe.training.sources as sources

    monkeypatch.setattr(sources, "_PIECE_CHARS", 50)  # force many pieces from a small file
    path = write_corpus(tmp_path / "big.txt", lines=40)
    pieces = list(resolve_source([path]).examples())
    assert len(pieces) > 5 and [p.last for p in pieces].count(True) == 1
    assert "".join(pieces) == open(path, encoding="utf-8").read()
    token_file = build_token_file(resolve_source([path]), tokenizer, str(tmp_path / "cache"), log=lambda _: None)
    assert np.asarray(token_file.tokens).tolist().count(tokenizer.eos_token_id) == 1


def test_jsonl_text_field(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "alpha beta"}) + "\n\n" + json.dumps({"body": "gamma"}) + "\n")
    source = resolve_source([str(path)], text_field="body")
    assert source.data_format == "jsonl" and list(source.examples()) == ["alpha beta", "gamma"]
    with pytest.raises(ValueError, match=r"line 1: no string field 'text' \(keys: \['body'\]\)"):
        list(resolve_source([str(path)]).examples())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl' line 2: invalid JSON"):
        list(resolve_source([str(broken)]).examples())


def test_split_and_order_are_deterministic(corpus, tokenizer, tmp_path):
    token_file = build_token_file(resolve_source([corpus]), tokenizer, str(tmp_path), log=lambda _: None)
    a = PackedSequences(token_file, 16, val_fraction=0.1, seed=0)
    b = PackedSequences(token_file, 16, val_fraction=0.1, seed=0)
    other_seed = PackedSequences(token_file, 16, val_fraction=0.1, seed=1)
    total = len(token_file.tokens) // 16
    assert len(a.val_ids) == round(0.1 * total) and len(a.val_ids) + a.num_train == total
    assert not set(a.val_ids) & set(a.train_ids)
    assert np.array_equal(a.val_ids, other_seed.val_ids)  # the held-out set does not move with the seed
    order = [a.train_index(p) for p in range(2 * a.num_train)]
    assert order == [b.train_index(p) for p in range(2 * a.num_train)]
    assert order != [other_seed.train_index(p) for p in range(2 * a.num_train)]
    first, second = order[: a.num_train], order[a.num_train :]
    assert sorted(first) == sorted(second) == sorted(a.train_ids.tolist())  # each epoch visits every sequence once
    assert first != second  # reshuffled per epoch


def test_global_batch_split_is_the_same_for_any_process_count():
    one = [step_positions(3, 4, 2, 1, 0, m) for m in range(2)]
    two = [step_positions(3, 4, 1, 2, r, 0) for r in range(2)]
    assert one == two == [24, 28]


def test_chat_loss_is_masked_on_prompt_tokens(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"},
                      {"role": "assistant", "content": "see you"}]},
        {"prompt": "the question", "completion": "the answer"},
        {"instruction": "do this", "input": "with that", "output": "done"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    source = resolve_source([str(path)])
    assert source.data_format == "chat"
    ids, mask = encode_conversation(tokenizer, records[0]["messages"])
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "hello there</s>see you</s>"
    assert "be brief" in tokenizer.decode([i for i, m in zip(ids, mask) if not m])

    token_file = build_token_file(source, tokenizer, str(tmp_path / "cache"), log=lambda _: None)
    assert token_file.mask is not None and token_file.documents == 3
    packed = PackedSequences(token_file, seq_len=len(token_file.tokens), val_fraction=0.0, seed=0)
    ids, labels = packed.sequence(0)
    kept = [int(t) for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "hello there</s>see you</s>the answer</s>done</s>"
    assert (labels == IGNORE_INDEX).sum() > 0


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda d: str(d / "missing.txt"), FileNotFoundError, "data path .*missing.txt' does not exist"),
        (lambda d: (d / "empty.txt").write_text("") and None or str(d / "empty.txt"), ValueError, "empty.txt' is empty"),
        (lambda d: (d / "folder").mkdir() or str(d / "folder"), ValueError, "holds no data files"),
    ],
)
def test_missing_empty_inputs_are_clear_errors(tmp_path, make, error, pattern):
    with pytest.raises(error, match=pattern):
        resolve_source([make(tmp_path)])


def test_non_utf8_bytes_name_the_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt' is not valid UTF-8: byte offset 14 \(line 2\)"):
        list(resolve_source([str(path)]).examples())


def test_chat_record_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant turn"):
        list(resolve_source([str(path)], data_format="chat").examples())
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="a chat record needs `messages`"):
        list(resolve_source([str(path)], data_format="chat").examples())


def test_too_little_data_for_a_sequence(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    token_file = build_token_file(resolve_source([str(path)]), tokenizer, str(tmp_path / "cache"), log=lambda _: None)
    with pytest.raises(ValueError, match="not enough for two sequences of seq_len=64"):
        PackedSequences(token_file, 64, val_fraction=0.1, seed=0)


def test_truncated_token_file_is_reported(tmp_path, corpus, tokenizer):
    token_file = build_token_file(resolve_source([corpus]), tokenizer, str(tmp_path), log=lambda _: None)
    with open(os.path.join(token_file.path, "tokens.bin"), "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(ValueError, match="is truncated"):
        TokenFile.open(token_file.path)


def test_embedded_corpus_is_python_documentation():
    topics = list(pydoc_topics())
    assert len(topics) > 50 and any("assert_stmt" in t or "assert" in t for t in topics)
    document = module_document("demo", '"""Demo module."""\n\ndef f(a, b=1):\n    """Add things."""\n\n'
                                       'class C:\n    """A class."""\n    def m(self):\n        """A method."""\n'
                                       'def _private():\n    """hidden"""\n')
    assert document == "demo\n\nDemo module.\n\ndemo.f(a, b=1)\nAdd things.\n\nclass demo.C\nA class.\n\ndemo.C.m(self)\nA method."


def test_validation_shares_are_even_across_processes(corpus, tokenizer, tmp_path):
    """Every process runs the same number of validation batches (FSDP's collectives would hang otherwise)."""
    token_file = build_token_file(resolve_source([corpus]), tokenizer, str(tmp_path), log=lambda _: None)
    packed = PackedSequences(token_file, 16, val_fraction=0.1, seed=0)
    assert len(packed.val_ids) >= 5
    alone = [ids for ids, _ in packed.val_batches(batch_size=2, max_batches=3)]
    assert sum(len(b) for b in alone) == 6
    for world in (2, 4):
        shares = [[ids for ids, _ in packed.val_batches(2, 3, rank, world)] for rank in range(world)]
        assert len({len(batches) for batches in shares}) == 1
        assert len({sum(len(b) for b in batches) for batches in shares}) == 1
