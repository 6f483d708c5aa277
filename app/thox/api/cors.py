"""Cross-origin access to the API for browser clients (web playgrounds, Open
WebUI direct connections, Jan).

``api.cors_origins`` lists the origins allowed to read API responses, or
``*`` for any. The API authenticates with a key in a header and never with
cookies, so an allowed origin gains nothing a page could not do with the key
anyway; a page without the key still gets 401. CORS headers are only sent on
the key-protected API paths (``/v1/…`` and ``/api/…``), never on the web page
(whose admin session is a cookie). A preflight ``OPTIONS`` is answered here,
before authentication: it never needs the key.
"""

from __future__ import annotations

import re

from quart import Quart, Response, g, request

from ..config import Config, parse_origins

API_PREFIXES = ("/v1/", "/api/")
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = ["Authorization", "Content-Type", "x-api-key", "anthropic-version", "anthropic-beta",
                 "OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta", "X-Stainless-*"]
EXPOSE_HEADERS = ("Retry-After, x-ratelimit-limit-requests, x-ratelimit-remaining-requests, "
                  "x-ratelimit-reset-requests, x-request-id")
MAX_AGE = "600"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES) or path in ("/v1", "/api")


class Cors:
    def __init__(self, config: Config):
        self.config = config

    def allowed(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for ``origin``, or None."""
        if not origin:
            return None
        try:
            origins = parse_origins(self.config.get("api.cors_origins"))
        except ValueError:
            return None
        if "*" in origins:
            return "*"
        return origin if origin.rstrip("/").lower() in {o.lower() for o in origins} else None

    def preflight(self) -> Response:
        resp = Response("", status=204)
        allow = self.allowed(request.headers.get("Origin"))
        resp.headers["Allow"] = ALLOW_METHODS
        if allow and is_api_path(request.path):
            asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
            extra = [h for h in asked if _HEADER_NAME.match(h) and h.lower().startswith("x-stainless-")]
            resp.headers["Access-Control-Allow-Origin"] = allow
            resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
            resp.headers["Access-Control-Allow-Headers"] = ", ".join(
                [h for h in ALLOW_HEADERS if "*" not in h] + extra)
            resp.headers["Access-Control-Max-Age"] = MAX_AGE
        resp.headers["Vary"] = "Origin"
        return resp

    def decorate(self, resp: Response) -> Response:
        if not is_api_path(request.path) or getattr(g, "cors_denied", False):
            return resp
        allow = self.allowed(request.headers.get("Origin"))
        if allow:
            resp.headers["Access-Control-Allow-Origin"] = allow
            resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        resp.vary.add("Origin")
        return resp


def install(app: Quart, config: Config) -> None:
    """Register the preflight answer (before any other before_request, so
    before authentication) and the CORS headers on API responses."""
    cors = Cors(config)

    async def _preflight():
        if request.method == "OPTIONS":
            return cors.preflight()
        return None

    app.before_request_funcs.setdefault(None, []).insert(0, _preflight)

    @app.after_request
    async def _cors(resp: Response) -> Response:
        return cors.decorate(resp)
