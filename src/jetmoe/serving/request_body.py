"""Reading a request body: raw bytes to a JSON object, or a 400 saying what is wrong with it."""

from __future__ import annotations

import json

from fastapi import Request

from .errors import bad_request


async def read_json_object(request: Request) -> dict:
    return parse_json_object(await request.body())


def parse_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise bad_request(
            f"the request body is not valid UTF-8 (byte {error.start})", code="invalid_encoding"
        ) from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body
