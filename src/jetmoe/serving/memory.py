"""Handing memory back after a large request body.

The `jetmoe` command line makes glibc keep freed memory for reuse (jetmoe.cpu_runtime), so what one large
body cost in parsing would otherwise stay with the process for good.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from jetmoe.cpu_runtime import release_free_memory

LARGE_BODY_BYTES = 2**20


class ReleaseMemoryAfterLargeBodies:
    """ASGI middleware: once a request whose body reached LARGE_BODY_BYTES is answered, trim the heap."""

    def __init__(self, app, threshold: int = LARGE_BODY_BYTES):
        self.app, self.threshold = app, threshold

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            if received >= self.threshold:
                await run_in_threadpool(release_free_memory)
