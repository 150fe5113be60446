"""Between a handler and the scheduler: submitting sequences, then waiting for their events, whole or streamed.

A client that disconnects, streaming or not, has its sequences cancelled, which frees their slots at the next
token boundary.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import responses
from .errors import APIError
from .scheduler import QueueFull, Scheduler, Ticket, Unavailable

# How often a waiting handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


class Relay:
    def __init__(self, scheduler: Scheduler, request: Request, tickets: list[Ticket], queue: asyncio.Queue):
        self.scheduler, self.request, self.tickets, self.queue = scheduler, request, tickets, queue
        self._checked: float | None = None  # when the client was last checked

    @classmethod
    def submit(cls, scheduler: Scheduler, request: Request, sequences: list) -> Relay:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        tickets = [Ticket(s, loop, queue, index=i) for i, s in enumerate(sequences)]
        try:
            scheduler.submit(tickets)
        except QueueFull as error:
            raise APIError(429, str(error), type="rate_limit_error", code="too_many_requests") from None
        except Unavailable as error:
            raise APIError(503, str(error), type="server_error", code="unavailable") from None
        return cls(scheduler, request, tickets, queue)

    def usage(self) -> dict:
        prompt = sum(len(t.sequence.prompt_ids) for t in self.tickets)
        return responses.usage(prompt, sum(len(t.sequence.output_ids) for t in self.tickets))

    async def next_event(self):
        """The next (index, Event); None if the client went away (its tickets are then cancelled).

        Events may arrive every few milliseconds for minutes, so the client is checked on a clock, not only
        when the queue is quiet."""
        while True:
            now = time.monotonic()
            if self._checked is None:
                self._checked = now
            elif now - self._checked >= _DISCONNECT_POLL_S:
                self._checked = now
                if await self.request.is_disconnected():
                    self.scheduler.cancel(self.tickets)
                    return None
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=_DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                pass

    def _fail(self, event) -> APIError:
        self.scheduler.cancel(self.tickets)
        return APIError(event.status, event.message, type="server_error", code="unavailable")

    async def collect(self) -> list[tuple[str, str]] | None:
        """(text, finish_reason) per sequence; None if the client went away."""
        texts, reasons, pending = [""] * len(self.tickets), [None] * len(self.tickets), len(self.tickets)
        while pending:
            item = await self.next_event()
            if item is None:
                return None
            index, event = item
            if event.kind == "error":
                raise self._fail(event)
            texts[index] += event.text
            if event.kind == "done":
                reasons[index], pending = event.finish_reason, pending - 1
        return list(zip(texts, reasons))

    async def stream(self, first_chunks, chunk_for_event, final_chunks):
        """Server-sent events; waits for the first event first, so queue timeouts still answer 503."""
        first = await self.next_event()
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[1].kind == "error":
            raise self._fail(first[1])

        async def events():
            try:
                for chunk in first_chunks:
                    yield _sse(chunk)
                item, pending = first, len(self.tickets)
                while True:
                    index, event = item
                    if event.kind == "error":  # after streaming started, the error goes in the stream
                        yield _sse(APIError(event.status, event.message, type="server_error").body())
                        break
                    yield _sse(chunk_for_event(index, event))
                    if event.kind == "done":
                        pending -= 1
                        if not pending:
                            for chunk in final_chunks():
                                yield _sse(chunk)
                            break
                    item = await self.queue.get()
                yield "data: [DONE]\n\n"
            finally:
                # Normal end: nothing left to cancel. Client gone: the server cancels this generator, and the
                # cancellation frees the slots.
                self.scheduler.cancel(self.tickets)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
