"""Streaming text out of a token stream: incremental detokenisation and stop strings.

Byte-level BPE tokens are byte strings, not characters: "€" can arrive as three tokens of one byte each, and
decoding such a prefix yields U+FFFD. `StreamingDetokenizer` decodes a small window of recent tokens twice
(with and without the newest ones) and emits the difference only once it no longer ends in U+FFFD, so the
concatenated deltas equal the full decode and never contain a half character. The window also carries a
few tokens of left context, which tokenizers that decide spacing from the neighbours (SentencePiece) need.
That context starts at a character boundary: SentencePiece's byte fallback decodes a run of byte tokens that
is not valid UTF-8 as one U+FFFD per byte, so a window starting inside a character would garble the
characters after it too.

`StopMatcher` holds back the tail of the text that could still become a stop string, so streamed text never
shows a part of a stop string that is later cut off.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5
_MAX_CONTINUATION_TOKENS = 3  # a UTF-8 character has at most 3 continuation bytes, each at least one token


class StreamingDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids or [])
        # ids before read_offset are emitted (or are the prompt); a prompt that ends inside a character leaves
        # that character to the stream, shown whole once its remaining bytes arrive.
        self.read_offset = self._boundary_at_or_before(len(self.ids))
        self.prefix_offset = self._boundary_at_or_before(max(self.read_offset - _CONTEXT_TOKENS, 0))  # left context

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _boundary_at_or_before(self, position: int) -> int:
        """The nearest character boundary at or before `position` (at most 3 tokens back), else `position`."""
        for back in range(min(_MAX_CONTINUATION_TOKENS, position) + 1):
            if self._is_boundary(position - back):
                return position - back
        return position  # genuinely invalid bytes (or U+FFFD itself): no boundary to find

    def _is_boundary(self, end: int) -> bool:
        """Whether ids[:end] ends with a whole character: some of the last tokens (up to the 4 bytes of a
        character) decode cleanly on their own. A window inside a character's bytes starts or ends in U+FFFD."""
        first = max(end - _MAX_CONTINUATION_TOKENS - 1, 0)
        windows = (self._decode(self.ids[start:end]) for start in range(first, end))
        return end == 0 or any(not (text.startswith(REPLACEMENT) or text.endswith(REPLACEMENT)) for text in windows)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) and not final:
            return ""  # e.g. a special token that decodes to nothing, or bytes that do not form a character yet
        if full_text.endswith(REPLACEMENT) and not final:
            return ""  # an incomplete UTF-8 sequence: wait for its remaining bytes
        delta = full_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class StopMatcher:
    """Finds the first stop string in streamed text; releases text that can no longer be part of one."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self.text = ""  # everything received
        self.released = 0  # characters of `text` handed out
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add text; return what may be shown now. After a stop string, returns "" forever."""
        if self.stopped:
            return ""
        self.text += delta
        # Released text holds no stop string and ends with no start of one, so a match begins after it.
        hits = [i for i in (self.text.find(s, self.released) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self.text) - self._held_back()
        out = self.text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return out

    def flush(self) -> str:
        """At the end of the stream without a stop string: the held-back tail."""
        if self.stopped:
            return ""
        out = self.text[self.released :]
        self.released = len(self.text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
