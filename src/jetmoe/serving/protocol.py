"""OpenAI request fields: type and range checks, reducing both endpoints to one `GenerationRequest`.

Every problem raises `APIError` (a 400 naming the field). Types are checked strictly (a
string is not a number, a bool is not an integer), as the OpenAI API does. Unknown fields are ignored so
that clients sending newer parameters still work. `top_k`, `repetition_penalty` and `ignore_eos` are
accepted as extensions (the names vLLM uses).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from jetmoe.generation.sampler import SamplingParams

from .errors import bad_request


# Ranges of the integer extensions; seeds are what torch.Generator.manual_seed takes.
TOP_K_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

# ---- typed field access -----------------------------------------------------------------------------------
_MISSING = object()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _field(body: dict, name: str, check, expected: str, default=None, required: bool = False):
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise bad_request(f"missing required field '{name}'", param=name, code="missing_field")
        return default
    if not check(value):
        raise bad_request(f"'{name}' must be {expected}, got {json.dumps(value)[:80]}", param=name, code="invalid_type")
    return value


def _number(body, name, default, low, high, low_open=False):
    value = _field(body, name, _is_number, "a number", default)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise bad_request(f"'{name}' must be in {interval}, got {value}", param=name, code="invalid_value")
    return value


def _integer(body, name, default, low, high):
    """Every integer field has a range: JSON integers are unbounded, torch's are 64-bit."""
    value = _field(body, name, _is_int, "an integer", default)
    if value is not None and not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low}, {high}], got {value}", param=name, code="invalid_value")
    return value


@dataclass
class GenerationRequest:
    """What both endpoints reduce to: prompts (text or token ids), sampling settings, streaming options."""

    prompts: list  # list[str | list[int]]
    params: SamplingParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool


def _check_model(body: dict, served_name: str) -> None:
    model = _field(body, "model", lambda v: isinstance(v, str), "a string", required=True)
    if model != served_name:
        raise bad_request(
            f"the model '{model}' does not exist; this server serves '{served_name}'",
            param="model",
            code="model_not_found",
        )


def _unsupported(body: dict, name: str, allowed) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise bad_request(
            f"'{name}' = {json.dumps(value)[:40]} is not supported by this server", param=name, code="unsupported"
        )


def _sampling(
    body: dict, max_tokens_key: str, max_tokens_limit: int, default_max_tokens: int, extra_stop=()
) -> tuple[SamplingParams, bool]:
    max_tokens = _integer(body, max_tokens_key, None, 1, max_tokens_limit)
    given = max_tokens is not None
    stop = _field(
        body,
        "stop",
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
        "a string or a list of strings",
        [],
    )
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or any(not s for s in stop):
        raise bad_request("'stop' takes at most 4 non-empty strings", param="stop", code="invalid_value")
    _unsupported(body, "n", (1,))
    _unsupported(body, "best_of", (1,))
    _unsupported(body, "logprobs", (False, 0))
    _unsupported(body, "top_logprobs", (0,))
    _unsupported(body, "echo", (False,))
    _unsupported(body, "suffix", ("",))
    _unsupported(body, "logit_bias", ({},))
    _unsupported(body, "tools", ([],))
    _unsupported(body, "tool_choice", ("none",))
    _unsupported(body, "functions", ([],))
    _unsupported(body, "function_call", ("none",))
    _unsupported(body, "response_format", ({"type": "text"},))
    top_k = _integer(body, "top_k", 0, -1, TOP_K_MAX)  # -1 and 0: off
    fields = dict(
        max_tokens=max_tokens if given else default_max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, low_open=True),
        top_k=max(top_k, 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, low_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        seed=_integer(body, "seed", None, SEED_MIN, SEED_MAX),
        stop=tuple(stop) + tuple(extra_stop),
        ignore_eos=_field(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean", False),
    )
    try:
        return SamplingParams(**fields), given
    except ValueError as error:
        raise bad_request(str(error), code="invalid_value") from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = _field(options, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)
    return stream, include_usage


def parse_completion(body: dict, served_name: str, max_tokens_limit: int) -> GenerationRequest:
    _check_model(body, served_name)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad_request("missing required field 'prompt'", param="prompt", code="missing_field")

    def token_list(v):
        return isinstance(v, list) and bool(v) and all(_is_int(t) for t in v)

    if isinstance(prompt, str) or token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists (non-empty)",
            param="prompt",
            code="invalid_type",
        )
    params, given = _sampling(body, "max_tokens", max_tokens_limit, default_max_tokens=16)
    stream, include_usage = _stream_options(body)
    return GenerationRequest(prompts, params, given, stream, include_usage)


def parse_chat(body: dict, served_name: str, max_tokens_limit: int, extra_stop=()) -> tuple[list, GenerationRequest]:
    """(messages, request with an empty prompt list: the app renders the messages with the tokenizer)."""
    _check_model(body, served_name)
    messages = body.get("messages")
    if messages is None:
        raise bad_request("missing required field 'messages'", param="messages", code="missing_field")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    params, given = _sampling(body, key, max_tokens_limit, default_max_tokens=max_tokens_limit, extra_stop=extra_stop)
    stream, include_usage = _stream_options(body)
    return messages, GenerationRequest([], params, given, stream, include_usage)
