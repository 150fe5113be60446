"""Prompts to engine sequences: tokenised, then checked against the context and the vocabulary, once each."""

from __future__ import annotations

from dataclasses import replace

from jetmoe.generation.chat import chat_prompt_ids
from jetmoe.generation.engine import Engine, Sequence

from .errors import bad_request
from .protocol import GenerationRequest


class PromptBuilder:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.vocab_size = engine.model.config.vocab_size

    def completion_sequences(self, request: GenerationRequest) -> list[Sequence]:
        return [self._sequence(request, self.engine.encode(p), "prompt") for p in request.prompts]

    def chat_sequence(self, request: GenerationRequest, messages) -> Sequence:
        try:
            ids = chat_prompt_ids(self.engine.tokenizer, messages)
        except ValueError as error:
            raise bad_request(str(error), param="messages", code="invalid_value") from None
        return self._sequence(request, ids, "messages")

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
