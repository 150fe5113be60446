"""The OpenAI-compatible HTTP app (FastAPI on any ASGI server; `jetmoe serve` runs it under uvicorn).

Routes are in `routes.py`; requests become engine sequences handed to the `Scheduler`, which runs them in
continuous batches on a thread of its own.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from jetmoe.generation.engine import Engine

from .auth import require_api_key
from .errors import install_error_handlers
from .memory import ReleaseMemoryAfterLargeBodies
from .prompts import PromptBuilder
from .request_body import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES, BodyLimits
from .routes import api_router, health_router
from .scheduler import Scheduler
from .state import ServingState


def create_app(
    engine: Engine,
    model_name: str,
    max_queue: int = 64,
    queue_timeout: float = 30.0,
    max_tokens_limit: int | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
    api_key: str | None = None,
) -> FastAPI:
    """`api_key`: when given, every /v1 route needs `Authorization: Bearer <api_key>` (/health stays open)."""
    body_limits = BodyLimits(max_bytes=max_request_bytes, timeout_s=body_timeout)
    scheduler = Scheduler(engine, max_queue=max_queue, queue_timeout=queue_timeout)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="jetmoe", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.serving = ServingState(
        engine=engine,
        scheduler=scheduler,
        prompts=PromptBuilder(engine),
        model_name=model_name,
        max_tokens_limit=min(max_tokens_limit or engine.max_len, engine.max_len),
        created=int(time.time()),
        body_limits=body_limits,
        api_key=api_key or None,
    )
    app.add_middleware(ReleaseMemoryAfterLargeBodies)
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(api_router, dependencies=[Depends(require_api_key)])
    return app
