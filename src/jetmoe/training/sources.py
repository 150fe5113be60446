"""Reading training examples from disk: text files, folders of them, JSONL with a text field, chat JSONL.

An example is either a document (`str`) or a conversation (`list` of {"role", "content"} messages, the loss
then counts only the assistant turns). Chat JSONL records may hold `messages`, or `prompt` + `completion`,
or `instruction` (+ optional `input`) + `output`; the latter two become a user turn and an assistant turn.
Files are read strictly as UTF-8: bad bytes are an error naming the file and offset, never silently replaced.
Large text files are streamed in pieces, so a corpus larger than RAM can be tokenised.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .corpus import corpus_fingerprint, stdlib_documents

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
_PIECE_CHARS = 1 << 20  # a large text file is tokenised in ~1M-character pieces cut at line ends


@dataclass(frozen=True)
class Source:
    """What to read: files (expanded from the given paths) in a format, or the embedded corpus."""

    files: tuple[str, ...]
    data_format: str  # text | jsonl | chat | embedded
    text_field: str = "text"

    def fingerprint(self) -> str:
        """Changes when any input file changes (path, size, modification time) or the format does."""
        digest = hashlib.sha256(f"{self.data_format}|{self.text_field}".encode())
        if self.data_format == "embedded":
            digest.update(corpus_fingerprint().encode())
        for path in self.files:
            stat = os.stat(path)
            digest.update(f"|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:20]

    def examples(self) -> Iterator[str | list[dict]]:
        if self.data_format == "embedded":
            yield from stdlib_documents()
            return
        for path in self.files:
            if self.data_format == "text":
                yield from _text_pieces(path)
            else:
                yield from _jsonl_examples(path, self.data_format, self.text_field)

    def texts(self) -> Iterator[str]:
        """Plain text of every example (what a tokenizer is trained on)."""
        for example in self.examples():
            if isinstance(example, str):
                yield example
            else:
                for message in example:
                    yield message["content"]


def resolve_source(paths: list[str], data_format: str = "auto", text_field: str = "text") -> Source:
    """Expand files and folders (sorted, recursively), check them, and decide the format."""
    if not paths:
        return Source(files=(), data_format="embedded")
    files: list[str] = []
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"data path {path!r} does not exist")
        if os.path.isdir(path):
            found = sorted(
                os.path.join(directory, name)
                for directory, _, names in os.walk(path)
                for name in names
                if name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES) and not name.startswith(".")
            )
            if not found:
                raise ValueError(
                    f"data folder {path!r} holds no data files (looked for {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})"
                )
            files.extend(found)
        else:
            files.append(path)
    for path in files:
        if os.path.getsize(path) == 0:
            raise ValueError(f"data file {path!r} is empty")
    formats = {_file_format(path, data_format) for path in files}
    if len(formats) > 1:
        raise ValueError(
            f"data files mix formats {sorted(formats)}; give one kind per run (or set data_format explicitly)"
        )
    return Source(files=tuple(files), data_format=formats.pop(), text_field=text_field)


def _file_format(path: str, data_format: str) -> str:
    if data_format != "auto":
        return data_format
    if not path.endswith(JSONL_SUFFIXES):
        return "text"
    first = _first_record(path)
    return "chat" if any(key in first for key in ("messages", "prompt", "instruction")) else "jsonl"


def _first_record(path: str) -> dict:
    for number, line in _lines(path):
        if line.strip():
            return _parse_record(path, number, line)
    raise ValueError(f"data file {path!r} holds no JSON records")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line), decoding strictly so bad bytes name the file and the byte offset."""
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"data file {path!r} is not valid UTF-8: byte offset {offset + error.start} (line {number}): "
                    f"{error.reason}; convert it to UTF-8 first"
                ) from None
            offset += len(raw)


def _text_pieces(path: str) -> Iterator[str]:
    """A text file as one document, yielded in pieces of whole lines (the pieces are joined by the tokeniser)."""
    piece: list[str] = []
    size = 0
    for _, line in _lines(path):
        piece.append(line)
        size += len(line)
        if size >= _PIECE_CHARS:
            yield TextPiece("".join(piece), last=False)
            piece, size = [], 0
    yield TextPiece("".join(piece), last=True)


class TextPiece(str):
    """A piece of a document; `last` says whether the document ends with it (a separator follows)."""

    last: bool

    def __new__(cls, text: str, last: bool = True):
        piece = super().__new__(cls, text)
        piece.last = last
        return piece


def _parse_record(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"data file {path!r} line {number}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"data file {path!r} line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl_examples(path: str, data_format: str, text_field: str) -> Iterator[str | list[dict]]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        record = _parse_record(path, number, line)
        if data_format == "chat":
            yield _conversation(path, number, record)
        else:
            text = record.get(text_field)
            if not isinstance(text, str):
                raise ValueError(
                    f"data file {path!r} line {number}: no string field {text_field!r} "
                    f"(keys: {sorted(record)}); set text_field"
                )
            yield text


def _conversation(path: str, number: int, record: dict) -> list[dict]:
    where = f"data file {path!r} line {number}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: `messages` must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not isinstance(
                message.get("role"), str
            ):
                raise ValueError(f"{where}: each message needs a string `role` and `content`, got {message!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant turn to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record and "completion" in record:
        prompt, answer = record["prompt"], record["completion"]
    elif "instruction" in record and "output" in record:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        answer = record["output"]
    else:
        raise ValueError(
            f"{where}: a chat record needs `messages`, `prompt` + `completion`, or `instruction` + `output` "
            f"(keys: {sorted(record)})"
        )
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise ValueError(f"{where}: prompt and completion must be strings")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
