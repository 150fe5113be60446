"""Continuous batching: one thread owns the engine and runs one batched decode step at a time.

HTTP handlers submit `Ticket`s (each wraps one engine `Sequence`) and read events back on their own asyncio
queue. Between two decode steps the thread drops cancelled sequences (their slots free at once), fails
tickets that waited too long, and prefills waiting tickets into free slots: a new request joins the running
batch at the next token boundary.

Limits: at most `engine.max_batch` sequences run and at most `max_queue` wait; a submission beyond that is
refused (`QueueFull`, HTTP 429). A ticket that waits longer than `queue_timeout` seconds for a slot gets a
503. A stopped or crashed scheduler refuses everything (`Unavailable`, HTTP 503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from jetmoe.generation.engine import Engine, Sequence

logger = logging.getLogger("jetmoe.serving")


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass
class Event:
    kind: str  # "text" (a piece of output, possibly ""), "done", or "error"
    text: str = ""
    finish_reason: str | None = None
    status: int = 0  # for errors
    message: str = ""


class Ticket:
    """One sequence in the scheduler, and the way back to the coroutine waiting for it."""

    def __init__(self, sequence: Sequence, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int = 0):
        self.sequence = sequence
        self.index = index  # the choice index within its HTTP request
        self.submitted_at = time.monotonic()
        self._loop = loop
        self._queue = queue

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (self.index, event))
        except RuntimeError:
            pass  # the event loop is gone (server shutting down): nobody is listening


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int = 64, queue_timeout: float = 30.0):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if queue_timeout <= 0:
            raise ValueError(f"queue_timeout must be > 0, got {queue_timeout}")
        self.engine = engine
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}  # id(sequence) -> ticket, touched by the scheduler thread only
        self._to_cancel: list[Ticket] = []
        self._admitted = 0  # running + about to run; kept under the lock for submit()'s capacity check
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="jetmoe-scheduler", daemon=True)
        self.error: BaseException | None = None

    # ---- called from the HTTP side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stats(self) -> dict:
        with self._cond:
            return {"running": self._admitted, "waiting": len(self._waiting)}

    def submit(self, tickets: list[Ticket]) -> None:
        """Queue tickets, all or none."""
        with self._cond:
            if not self.alive:
                raise Unavailable("the generation scheduler is not running")
            capacity = self.engine.max_batch + self.max_queue - self._admitted - len(self._waiting)
            if len(tickets) > capacity:
                raise QueueFull(
                    f"the server is at capacity ({self.engine.max_batch} running, {len(self._waiting)} waiting, "
                    f"queue limit {self.max_queue}); retry later"
                )
            self._waiting.extend(tickets)
            self._cond.notify_all()

    def cancel(self, tickets: list[Ticket]) -> None:
        """The client is gone: drop waiting tickets now, running ones at the next token boundary."""
        with self._cond:
            for ticket in tickets:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                elif not ticket.sequence.finished:
                    self._to_cancel.append(ticket)
            self._cond.notify_all()

    # ---- the scheduler thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopped or self._waiting or self._running or self._to_cancel):
                        self._cond.wait()
                    if self._stopped:
                        break
                    cancelled, self._to_cancel = self._to_cancel, []
                    self._expire_waiting()
                    for ticket in cancelled:
                        if self._running.pop(id(ticket.sequence), None) is not None:
                            self.engine.cancel(ticket.sequence)
                            self._admitted -= 1
                    admitted = []
                    while self._waiting and self.engine.free_slots - len(admitted) > 0:
                        admitted.append(self._waiting.popleft())
                    self._admitted += len(admitted)
                for ticket in admitted:
                    self._start(ticket)
                if self.engine.running:
                    self._step()
        except BaseException as error:  # a bug must not leave clients hanging
            logger.exception("scheduler crashed")
            self.error = error
            self._fail_all(f"generation failed: {error}")
        finally:
            with self._cond:
                self._stopped = True
            self._fail_all("the server is shutting down")

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        while self._waiting and now - self._waiting[0].submitted_at > self.queue_timeout:
            ticket = self._waiting.popleft()
            ticket.emit(
                Event(
                    "error",
                    status=503,
                    message=f"no generation slot freed up within {self.queue_timeout:g} s; retry later",
                )
            )

    def _start(self, ticket: Ticket) -> None:
        self._running[id(ticket.sequence)] = ticket
        try:
            output = self.engine.add(ticket.sequence)
        except Exception as error:  # this request fails; the others carry on
            logger.exception("prefill failed")
            self._abort([ticket], f"generation failed: {error}")
            return
        self._deliver(output)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # the whole batch is lost; the server keeps serving new requests
            logger.exception("decode step failed")
            self._abort(list(self._running.values()), f"generation failed: {error}")
            return
        for output in outputs:
            self._deliver(output)

    def _abort(self, tickets: list[Ticket], message: str) -> None:
        for ticket in tickets:
            self.engine.cancel(ticket.sequence)
            if self._running.pop(id(ticket.sequence), None) is not None:
                with self._cond:
                    self._admitted -= 1
            ticket.emit(Event("error", status=500, message=message))

    def _deliver(self, output) -> None:
        ticket = self._running.get(id(output.sequence))
        if ticket is None:
            return
        if output.text:
            ticket.emit(Event("text", text=output.text))
        if output.finished:
            ticket.emit(Event("done", finish_reason=output.sequence.finish_reason))
            del self._running[id(output.sequence)]
            with self._cond:
                self._admitted -= 1

    def _fail_all(self, message: str) -> None:
        with self._cond:
            tickets = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
            self._admitted = 0
        for ticket in tickets:
            ticket.emit(Event("error", status=503, message=message))
