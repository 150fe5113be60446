"""OpenAI-compatible HTTP serving with continuous batching (`jetmoe serve`)."""

from .app import create_app
from .scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]
