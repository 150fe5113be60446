"""The HTTP routes: GET /health, GET /v1/models[/{name}], POST /v1/completions, POST /v1/chat/completions.

A generation handler validates the request, hands its sequences to the scheduler and only waits for their
events, so one slow client never blocks another.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from jetmoe.generation.chat import chat_stop_strings

from . import protocol, responses
from .errors import APIError
from .relay import Relay
from .request_body import read_json_object
from .state import ServingState, serving_state

health_router = APIRouter()
api_router = APIRouter(prefix="/v1")


@health_router.get("/health")
async def health(state: ServingState = Depends(serving_state)):
    ok = state.scheduler.alive
    body = {
        "status": "ok" if ok else "unavailable",
        "model": state.model_name,
        "max_batch": state.engine.max_batch,
        **state.scheduler.stats(),
    }
    return JSONResponse(body, status_code=200 if ok else 503)


def _model_card(state: ServingState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "jetmoe",
        "max_model_len": state.engine.max_len,
    }


@api_router.get("/models")
async def models(state: ServingState = Depends(serving_state)):
    return {"object": "list", "data": [_model_card(state)]}


@api_router.get("/models/{name:path}")
async def model(name: str, state: ServingState = Depends(serving_state)):
    if name != state.model_name:
        raise APIError(
            404, f"the model '{name}' does not exist", type="not_found_error", param="model", code="model_not_found"
        )
    return _model_card(state)


@api_router.post("/completions")
async def completions(http_request: Request, state: ServingState = Depends(serving_state)):
    body = await read_json_object(http_request, state.body_limits)
    request = protocol.parse_completion(body, state.model_name, state.max_tokens_limit)
    relay = Relay.submit(state.scheduler, http_request, await state.prompts.completion_sequences(request))
    request_id, now, model_name = responses.new_id("cmpl"), int(time.time()), state.model_name
    if not request.stream:
        choices = await relay.collect()
        if choices is None:
            return JSONResponse({}, status_code=499)
        return responses.completion_body(request_id, model_name, choices, relay.usage())

    def chunk_for_event(index, event):
        return responses.completion_chunk(request_id, model_name, now, index, event.text, event.finish_reason)

    def final_chunks():
        if request.include_usage:
            return [responses.completion_chunk(request_id, model_name, now, usage_counts=relay.usage())]
        return []

    return await relay.stream([], chunk_for_event, final_chunks)


@api_router.post("/chat/completions")
async def chat_completions(http_request: Request, state: ServingState = Depends(serving_state)):
    body = await read_json_object(http_request, state.body_limits)
    stop = chat_stop_strings(state.engine.tokenizer)
    messages, request = protocol.parse_chat(body, state.model_name, state.max_tokens_limit, extra_stop=stop)
    sequence = await state.prompts.chat_sequence(request, messages)
    relay = Relay.submit(state.scheduler, http_request, [sequence])
    request_id, now, model_name = responses.new_id("chatcmpl"), int(time.time()), state.model_name
    if not request.stream:
        choices = await relay.collect()
        if choices is None:
            return JSONResponse({}, status_code=499)
        text, reason = choices[0]
        return responses.chat_body(request_id, model_name, text, reason, relay.usage())

    def chunk_for_event(index, event):
        delta = {"content": event.text} if event.text else {}
        return responses.chat_chunk(request_id, model_name, now, delta, event.finish_reason)

    def final_chunks():
        if request.include_usage:
            return [responses.chat_chunk(request_id, model_name, now, usage_counts=relay.usage(), final_usage=True)]
        return []

    role_chunk = responses.chat_chunk(request_id, model_name, now, {"role": "assistant", "content": ""})
    return await relay.stream([role_chunk], chunk_for_event, final_chunks)
