"""What the route handlers share: the engine, its scheduler and the server's settings (`app.state.serving`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from jetmoe.generation.engine import Engine

from .prompts import PromptBuilder
from .request_body import BodyLimits
from .scheduler import Scheduler


@dataclass
class ServingState:
    engine: Engine
    scheduler: Scheduler
    prompts: PromptBuilder
    model_name: str
    max_tokens_limit: int  # the largest max_tokens accepted
    created: int  # the model card's creation time
    body_limits: BodyLimits
    api_key: str | None  # None: /v1 routes are open


def serving_state(request: Request) -> ServingState:
    """FastAPI dependency: the state of the app handling `request`."""
    return request.app.state.serving
