"""API-key check for the /v1 routes: `Authorization: Bearer <key>`, as OpenAI clients send it."""

from __future__ import annotations

import ipaddress
import secrets

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import APIError
from .state import ServingState, serving_state

_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    state: ServingState = Depends(serving_state),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """FastAPI dependency: passes when the server has no key, or the request carries it."""
    if state.api_key is None:
        return
    if credentials is None:
        raise _unauthorized("no API key given: send it as 'Authorization: Bearer <key>'")
    if not secrets.compare_digest(credentials.credentials.encode(), state.api_key.encode()):
        raise _unauthorized("the API key is not valid")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
