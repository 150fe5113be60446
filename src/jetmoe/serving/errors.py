"""OpenAI-style errors: every failure answers `{"error": {"message", "type", "param", "code"}}` with its status."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status in (429, 503) else {}
    return JSONResponse(error.body(), status_code=error.status, headers={**headers, **error.headers})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal_error(request, error: Exception):
        return error_response(APIError(500, f"internal error: {error}", type="server_error"))
