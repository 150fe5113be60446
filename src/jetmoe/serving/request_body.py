"""Reading a request body: bounded in size and in time, then parsed into a JSON object of bounded nesting.

Errors close the connection when the body was not read to its end (413, 408): what is left of it is never read.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fastapi import Request

from .errors import APIError, bad_request

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_BODY_TIMEOUT_S = 30.0
MAX_JSON_DEPTH = 64  # OpenAI requests nest a handful of levels; json.loads recurses, so deep input must stop early
_CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # for the whole body to arrive

    def __post_init__(self):
        if self.max_bytes < 1 or not self.timeout_s > 0:
            raise ValueError(f"body limits must be positive, got {self.max_bytes} bytes, {self.timeout_s} s")


async def read_json_object(request: Request, limits: BodyLimits) -> dict:
    return parse_json_object(await read_bounded(request, limits))


async def read_bounded(request: Request, limits: BodyLimits) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise _too_large(limits.max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise _too_large(limits.max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {limits.timeout_s:g} s",
            code="request_timeout",
            headers=_CLOSE,
        ) from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {max_bytes} bytes",
        code="request_too_large",
        headers=_CLOSE,
    )


def parse_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_encoding"
        ) from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as error:  # JSONDecodeError, or an integer of more digits than Python converts
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    if _nesting_exceeds(body, raw, MAX_JSON_DEPTH):
        raise _too_deep()
    return body


def _too_deep() -> APIError:
    return bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def _nesting_exceeds(value, raw: bytes, limit: int) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= limit:  # too few brackets to nest that deep: no walk needed
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
