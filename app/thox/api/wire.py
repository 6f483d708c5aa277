"""How answers go out: a response model as a JSON body, and streams written
as they are produced, as server-sent events (the OpenAI routes, the
Responses API, Anthropic Messages) or NDJSON (Ollama)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from quart import Response, jsonify

from .response_models import ErrorResponse, Reply

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache",
                  "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def reply(body: Reply) -> Response:
    """``body`` as the JSON response."""
    return jsonify(body.body())


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII text as is."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def sse_event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {dumps(data)}\n\n"


async def openai_events(items: AsyncGenerator[Reply, None]) -> AsyncIterator[str]:
    """The body of an OpenAI stream: each chunk as a ``data:`` event, then
    ``data: [DONE]``; a stream that fails ends with its error event instead."""
    try:
        async for item in items:
            yield sse_data(item.body())
            if isinstance(item, ErrorResponse):
                return
        yield DONE
    finally:
        await items.aclose()


def stream_response(body: AsyncIterator[str], headers: dict[str, str] = SSE_HEADERS) -> Response:
    resp = Response(body, headers=headers)
    resp.timeout = None  # a long generation is not a stalled response
    return resp
