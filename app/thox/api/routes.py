"""HTTP routes. Thin: parse, call the service, return. Errors are raised and
turned into the OpenAI shape by errors.py."""

from __future__ import annotations

from typing import Any, AsyncIterator

from quart import Quart, Response, current_app, jsonify

from . import chatbridge
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _ctx() -> dict[str, Any]:
    return current_app.extensions["thox"]


def _respond(result: dict | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return jsonify(result)
    resp = Response(result, headers=SSE_HEADERS)
    resp.timeout = None  # a long generation is not a stalled response
    return resp


def register(app: Quart) -> None:
    from .app import json_body

    @app.get("/v1/models")
    async def list_models():
        return jsonify(_ctx()["service"].list_models())

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str):
        return jsonify(_ctx()["service"].get_model(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions():
        req = await json_body(ChatCompletionRequest)
        return _respond(await chatbridge.chat(_ctx()["service"], req))

    @app.post("/v1/completions")
    async def completions():
        req = await json_body(CompletionRequest)
        return _respond(await _ctx()["service"].completions(req))

    @app.post("/v1/embeddings")
    async def embeddings():
        req = await json_body(EmbeddingRequest)
        return jsonify(await _ctx()["service"].embeddings(req))

    @app.get("/health")
    async def health():
        c = _ctx()
        models = c["manager"].status()
        return jsonify({"status": "ok", "version": c["version"],
                        "model_loaded": any(m["loaded"] for m in models),
                        "models": models})

    @app.get("/openapi.json")
    async def openapi():
        from .openapi import openapi_document
        return jsonify(openapi_document())

    @app.get("/metrics")
    async def metrics():
        m = _ctx()["metrics"]
        return Response(m.render(), headers={"Content-Type": m.content_type})
