"""OpenAI response bodies and streaming chunks for completions and chat completions."""

from __future__ import annotations

import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(request_id, model, choices, usage_counts) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage_counts,
    }


def chat_body(request_id, model, text, reason, usage_counts) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        ],
        "usage": usage_counts,
    }


def completion_chunk(request_id, model, created, index=None, text="", reason=None, usage_counts=None) -> dict:
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_counts,
    }


def chat_chunk(request_id, model, created, delta=None, reason=None, usage_counts=None, final_usage=False) -> dict:
    choices = [] if final_usage else [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": reason}]
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_counts,
    }
