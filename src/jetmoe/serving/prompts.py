"""Prompts to engine sequences: tokenised, then checked against the context and the vocabulary, once each.

Tokenising runs on a worker thread, never on the event loop, and only for text that can fit: no token covers
more characters than the longest one in the vocabulary, so a text longer than context x that length cannot
fit and is refused before it is tokenised.
"""

from __future__ import annotations

from dataclasses import replace

from starlette.concurrency import run_in_threadpool

from jetmoe.generation.chat import chat_prompt_ids, normalize_messages
from jetmoe.generation.engine import Engine, Sequence

from .errors import bad_request
from .protocol import GenerationRequest


def longest_token_chars(tokenizer) -> int:
    """Characters in the longest vocabulary entry (byte-level vocabularies spell one byte per character)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


class PromptBuilder:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.vocab_size = engine.model.config.vocab_size
        self.max_chars = engine.max_len * longest_token_chars(engine.tokenizer)

    async def completion_sequences(self, request: GenerationRequest) -> list[Sequence]:
        sequences = []
        for prompt in request.prompts:
            if isinstance(prompt, str):
                self._check_chars(len(prompt), "prompt")
                prompt = await run_in_threadpool(self.engine.encode, prompt)
            sequences.append(self._sequence(request, prompt, "prompt"))
        return sequences

    async def chat_sequence(self, request: GenerationRequest, messages) -> Sequence:
        try:
            messages = normalize_messages(messages)
        except ValueError as error:
            raise bad_request(str(error), param="messages", code="invalid_value") from None
        self._check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await run_in_threadpool(chat_prompt_ids, self.engine.tokenizer, messages)
        return self._sequence(request, ids, "messages")

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise bad_request(
                f"the prompt has {chars} characters; this model's context of {self.engine.max_len} tokens "
                f"holds at most {self.max_chars}",
                param=param,
                code="context_length_exceeded",
            )

    def _sequence(self, request: GenerationRequest, ids: list[int], param: str) -> Sequence:
        """max_tokens defaults to what fits in the context."""
        if not ids:
            raise bad_request("the prompt is empty", param=param, code="invalid_value")
        params, max_len = request.params, self.engine.max_len
        room = max_len - len(ids)
        if room < 1 or (request.max_tokens_given and params.max_tokens > room):
            wanted = len(ids) + (params.max_tokens if request.max_tokens_given else 1)
            raise bad_request(
                f"this model's context holds {max_len} tokens; the request needs {wanted} "
                f"({len(ids)} in the prompt, {wanted - len(ids)} to generate)",
                param=param,
                code="context_length_exceeded",
            )
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise bad_request(f"prompt token ids must be in [0, {self.vocab_size})", param=param, code="invalid_value")
        if not request.max_tokens_given and params.max_tokens > room:
            params = replace(params, max_tokens=room)
        return self.engine.make_sequence(ids, params)
