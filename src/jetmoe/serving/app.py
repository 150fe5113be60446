"""The OpenAI-compatible HTTP app (FastAPI on any ASGI server; `jetmoe serve` runs it under uvicorn).

Routes are in `routes.py`; requests become engine sequences handed to the `Scheduler`, which runs them in
continuous batches on a thread of its own.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from jetmoe.generation.engine import Engine

from .errors import install_error_handlers
from .prompts import PromptBuilder
from .routes import api_router, health_router
from .scheduler import Scheduler
from .state import ServingState


def create_app(
    engine: Engine,
    model_name: str,
    max_queue: int = 64,
    queue_timeout: float = 30.0,
    max_tokens_limit: int | None = None,
) -> FastAPI:
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
    )
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(api_router)
    return app
