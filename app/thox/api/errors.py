"""Every error the API returns, in the OpenAI shape:
``{"error": {"message", "type", "param", "code"}}``. Registered on the app
by ``install``; routes just raise."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from pydantic import ValidationError
from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import ThoxError
from .response_models import ErrorDetail, ErrorResponse, Reply

log = logging.getLogger("thox.api")

_HTTP_CODES = {400: ("invalid_request_error", "bad_request"), 401: ("invalid_request_error", "invalid_api_key"),
               404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed"),
               413: ("invalid_request_error", "request_too_large"),
               415: ("invalid_request_error", "unsupported_media_type"),
               429: ("rate_limit_error", "rate_limit_exceeded")}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).body()


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    resp = jsonify(error_body(message, type_, param, code))
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def restyle_errors(app: Quart, prefix: str, restyle: Callable[[int, dict[str, Any]], Reply]) -> None:
    """Answer the errors of the routes under ``prefix`` in another API's shape: ``restyle(status,
    error)`` turns the OpenAI error object of a JSON error response into that API's body."""
    @app.after_request
    async def _restyle(resp: Response) -> Response:
        if not request.path.startswith(prefix) or resp.status_code < 400 or resp.mimetype != "application/json":
            return resp
        body = await resp.get_json(force=True, silent=True)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            resp.set_data(json.dumps(restyle(resp.status_code, body["error"]).body(), ensure_ascii=False))
        return resp

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "int", "float", "bool", "dict") or "[" in str(part) or \
                str(part).startswith(("function-", "literal[", "constrained-")):
            continue  # pydantic union-branch labels
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def validation_message(err: ValidationError) -> tuple[str, str]:
    first = err.errors(include_url=False)[0]
    param = _loc(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"Missing required parameter: '{param}'.", param
    return f"Invalid value for '{param}': {msg}.", param


def install(app: Quart) -> None:
    @app.errorhandler(ThoxError)
    async def _thox(e: ThoxError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.errorhandler(ValidationError)
    async def _invalid(e: ValidationError):
        msg, param = validation_message(e)
        return error_response(400, msg, param=param, code="invalid_value")

    @app.errorhandler(HTTPException)
    async def _http(e: HTTPException):
        status = e.code or 500
        type_, code = _HTTP_CODES.get(status, ("invalid_request_error", None))
        if status == 404:
            msg = "Unknown request URL. Please check the URL and method."
        elif status == 405:
            msg = "Method not allowed for this URL."
        elif status == 413:
            msg = f"Request body too large (limit {app.config.get('MAX_CONTENT_LENGTH')} bytes)."
        else:
            msg = e.description or e.name
        headers = {}
        if status == 405 and getattr(e, "valid_methods", None):
            headers["Allow"] = ", ".join(e.valid_methods)
        return error_response(status, msg, type_, None, code, headers)

    @app.errorhandler(Exception)
    async def _unexpected(e: Exception):
        # a bug: log it (never the request body or headers) and answer in shape
        log.exception("internal error")
        return error_response(500, "The server had an error while processing your request.",
                              "server_error", None, "internal_error")
