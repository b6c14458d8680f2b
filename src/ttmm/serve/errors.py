"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers, its own checks, FastAPI's body validation (malformed
JSON, wrong types: 400, not FastAPI's 422), unknown paths and the engine's input errors,
goes through :class:`APIError`, so clients see one shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttmm.merge import MergeError
from ttmm.model import InputError
from ttmm.routing import RoutingError
from ttmm.serve.schemas import ErrorResponse


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

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
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.body()}, status_code=self.status, headers=self.headers or None
        )


def timeout_error(seconds: float) -> APIError:
    return APIError(
        504,
        f"the request took longer than the server's {seconds} s limit",
        type="timeout_error",
        code="timeout",
    )


ERROR_STATUSES = {
    400: "The request is malformed or asks for something this server cannot do.",
    401: "The API key is missing or wrong.",
    403: "The endpoint is turned off on this server (admin endpoints without an admin key).",
    404: "The model, an expert or a resource named in the request does not exist.",
    409: "The action conflicts with the resource's state (e.g. promoting a finished rollout).",
    413: "The request body is larger than the server's limit.",
    429: "Too many requests or streams at once, or the client's rate limit is reached.",
    500: "Generation failed; the server log has the details.",
    504: "The request took longer than the server's time limit.",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for the given error statuses, each with the error schema."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]}
        for status in statuses
    }


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say what the server really answers: validation errors are
    400s with the error schema (see :func:`install_error_handlers`), never FastAPI's 422."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


LIMITED = {  # (request schema, field) -> the ServerSettings limit that bounds it
    ("CompletionRequest", "max_tokens"): "max_tokens_limit",
    ("ChatRequest", "max_tokens"): "max_tokens_limit",
    ("ChatRequest", "max_completion_tokens"): "max_tokens_limit",
    ("ScoreRequest", "max_tokens"): "max_prompt_tokens",
}


def document_limits(app: FastAPI, settings) -> None:
    """State this server's limits (``settings``) as the maximum of the fields they bound, so
    that what the document allows is what the server accepts."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = original()
            components = schema.get("components", {}).get("schemas", {})
            for (name, field), limit in LIMITED.items():
                prop = components.get(name, {}).get("properties", {}).get(field)
                for branch in (prop or {}).get("anyOf", [prop] if prop else []):
                    if branch.get("type") == "integer":
                        branch["maximum"] = getattr(settings, limit)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, code = f"the body is not valid JSON: {first.get('msg')}", "invalid_json"
        elif first.get("type") == "string_pattern_mismatch":  # NonBlank: a text of spaces
            where = ".".join(loc) or "body"
            message, code = f"{where} is blank: routing needs some text", "invalid_value"
        else:
            where = ".".join(loc) or "body"
            message, code = f"{where}: {first.get('msg')}", "invalid_value"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problem(s))"
        return APIError(400, message, param=".".join(loc) or None, code=code).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        # a 405 keeps Starlette's Allow header (the methods the path has; RFC 9110)
        return APIError(
            err.status_code, str(err.detail), type=type_, headers=err.headers
        ).response()

    @app.exception_handler(InputError)
    @app.exception_handler(RoutingError)
    @app.exception_handler(MergeError)
    async def input_error(request: Request, err: ValueError) -> JSONResponse:
        return APIError(400, str(err)).response()
