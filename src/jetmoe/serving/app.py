"""The OpenAI-compatible HTTP app (FastAPI on any ASGI server; `jetmoe serve` runs it under uvicorn).

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events ending with `data: [DONE]`). Requests become engine sequences handed to the `Scheduler`; a handler
only waits for its events, so one slow client never blocks another. A client that disconnects, streaming
or not, has its sequences cancelled, which frees their slots at the next token boundary.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jetmoe.generation.chat import chat_prompt_ids, chat_stop_strings
from jetmoe.generation.engine import Engine

from . import protocol
from .protocol import APIError, GenerationRequest, bad_request
from .scheduler import QueueFull, Scheduler, Ticket, Unavailable

# How often a non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def create_app(
    engine: Engine,
    model_name: str,
    max_queue: int = 64,
    queue_timeout: float = 30.0,
    max_tokens_limit: int | None = None,
) -> FastAPI:
    scheduler = Scheduler(engine, max_queue=max_queue, queue_timeout=queue_timeout)
    limit = min(max_tokens_limit or engine.max_len, engine.max_len)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="jetmoe", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal_error(request, error: Exception):
        return error_response(APIError(500, f"internal error: {error}", type="server_error"))

    @app.get("/health")
    async def health():
        stats = scheduler.stats()
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "max_batch": engine.max_batch, **stats}
        return JSONResponse(body, status_code=200 if ok else 503)

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "jetmoe",
            "max_model_len": engine.max_len,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_name:
            raise APIError(
                404, f"the model '{name}' does not exist", type="not_found_error", param="model", code="model_not_found"
            )
        return model_card()

    # ---- shared request path ------------------------------------------------------------------------------
    def make_sequences(request: GenerationRequest, prompts: list, param: str) -> list:
        """Token ids checked against the vocabulary and the context; max_tokens defaults to what fits."""
        sequences = []
        for prompt in prompts:
            ids = engine.encode(prompt)
            if not ids:
                raise bad_request("the prompt is empty", param=param, code="invalid_value")
            vocab = engine.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param=param, code="invalid_value")
            params = request.params
            room = engine.max_len - len(ids)
            if room < 1 or (request.max_tokens_given and params.max_tokens > room):
                wanted = len(ids) + (params.max_tokens if request.max_tokens_given else 1)
                raise bad_request(
                    f"this model's context holds {engine.max_len} tokens; the request needs {wanted} "
                    f"({len(ids)} in the prompt, {wanted - len(ids)} to generate)",
                    param=param,
                    code="context_length_exceeded",
                )
            if not request.max_tokens_given and params.max_tokens > room:
                params = replace(params, max_tokens=room)
            sequences.append(engine.make_sequence(ids, params))
        return sequences

    async def submit(http_request: Request, sequences: list) -> tuple[list[Ticket], asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tickets = [Ticket(s, loop, queue, index=i) for i, s in enumerate(sequences)]
        try:
            scheduler.submit(tickets)
        except QueueFull as error:
            raise APIError(429, str(error), type="rate_limit_error", code="too_many_requests") from None
        except Unavailable as error:
            raise APIError(503, str(error), type="server_error", code="unavailable") from None
        return tickets, queue

    async def next_event(http_request: Request, tickets, queue: asyncio.Queue, watch: dict):
        """The next (index, Event); None if the client went away (its tickets are then cancelled).

        Events may arrive every few milliseconds for minutes, so the client is checked on a clock, not
        only when the queue is quiet. `watch` carries the time of the last check between calls."""
        while True:
            now = time.monotonic()
            if now - watch.get("checked", now) >= _DISCONNECT_POLL_S:
                watch["checked"] = now
                if await http_request.is_disconnected():
                    scheduler.cancel(tickets)
                    return None
            watch.setdefault("checked", now)
            try:
                return await asyncio.wait_for(queue.get(), timeout=_DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass

    async def collect(http_request: Request, tickets, queue) -> list[tuple[str, str]] | None:
        texts, reasons, pending = [""] * len(tickets), [None] * len(tickets), len(tickets)
        watch = {}
        while pending:
            item = await next_event(http_request, tickets, queue, watch)
            if item is None:
                return None
            index, event = item
            if event.kind == "error":
                scheduler.cancel(tickets)
                raise APIError(event.status, event.message, type="server_error", code="unavailable")
            texts[index] += event.text
            if event.kind == "done":
                reasons[index], pending = event.finish_reason, pending - 1
        return list(zip(texts, reasons))

    def usage_of(tickets) -> dict:
        prompt = sum(len(t.sequence.prompt_ids) for t in tickets)
        return protocol.usage(prompt, sum(len(t.sequence.output_ids) for t in tickets))

    async def read_body(http_request: Request) -> dict:
        return protocol.parse_json_body(await http_request.body())

    def sse(payload) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def stream(http_request, tickets, queue, first_chunks, chunk_for_event, final_chunks):
        """Server-sent events; waits for the first event first, so queue timeouts still answer 503."""
        first = await next_event(http_request, tickets, queue, {})
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[1].kind == "error":
            scheduler.cancel(tickets)
            raise APIError(first[1].status, first[1].message, type="server_error", code="unavailable")

        async def events():
            try:
                for chunk in first_chunks:
                    yield sse(chunk)
                item, pending = first, len(tickets)
                while True:
                    index, event = item
                    if event.kind == "error":  # after streaming started, the error goes in the stream
                        yield sse(APIError(event.status, event.message, type="server_error").body())
                        break
                    yield sse(chunk_for_event(index, event))
                    if event.kind == "done":
                        pending -= 1
                        if not pending:
                            for chunk in final_chunks():
                                yield sse(chunk)
                            break
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                # Normal end: nothing left to cancel. Client gone: the server cancels this generator, and
                # the cancellation frees the slots.
                scheduler.cancel(tickets)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- endpoints ----------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(http_request: Request):
        request = protocol.parse_completion(await read_body(http_request), model_name, limit)
        tickets, queue = await submit(http_request, make_sequences(request, request.prompts, "prompt"))
        request_id, now = protocol.new_id("cmpl"), int(time.time())
        if not request.stream:
            choices = await collect(http_request, tickets, queue)
            if choices is None:
                return JSONResponse({}, status_code=499)
            return protocol.completion_body(request_id, model_name, choices, usage_of(tickets))

        def chunk_for_event(index, event):
            return protocol.completion_chunk(request_id, model_name, now, index, event.text, event.finish_reason)

        def final_chunks():
            if request.include_usage:
                return [protocol.completion_chunk(request_id, model_name, now, usage_counts=usage_of(tickets))]
            return []

        return await stream(http_request, tickets, queue, [], chunk_for_event, final_chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        body = await read_body(http_request)
        messages, request = protocol.parse_chat(body, model_name, limit, extra_stop=chat_stop_strings(engine.tokenizer))
        try:
            prompt_ids = chat_prompt_ids(engine.tokenizer, messages)
        except ValueError as error:
            raise bad_request(str(error), param="messages", code="invalid_value") from None
        tickets, queue = await submit(http_request, make_sequences(request, [prompt_ids], "messages"))
        request_id, now = protocol.new_id("chatcmpl"), int(time.time())
        if not request.stream:
            choices = await collect(http_request, tickets, queue)
            if choices is None:
                return JSONResponse({}, status_code=499)
            text, reason = choices[0]
            return protocol.chat_body(request_id, model_name, text, reason, usage_of(tickets))

        def chunk_for_event(index, event):
            delta = {"content": event.text} if event.text else {}
            return protocol.chat_chunk(request_id, model_name, now, delta, event.finish_reason)

        def final_chunks():
            if request.include_usage:
                return [
                    protocol.chat_chunk(request_id, model_name, now, usage_counts=usage_of(tickets), final_usage=True)
                ]
            return []

        role_chunk = protocol.chat_chunk(request_id, model_name, now, {"role": "assistant", "content": ""})
        return await stream(http_request, tickets, queue, [role_chunk], chunk_for_event, final_chunks)

    return app
