"""HTTP routes. Thin: parse, call the service, return. Errors are raised and
turned into the OpenAI shape by errors.py."""

from __future__ import annotations

from typing import AsyncIterator

from quart import Quart, Response, jsonify

from . import chatbridge
from .body import json_body
from .openapi import openapi_document
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .state import app_state

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def _respond(result: dict | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return jsonify(result)
    resp = Response(result, headers=SSE_HEADERS)
    resp.timeout = None  # a long generation is not a stalled response
    return resp


def register(app: Quart) -> None:
    @app.get("/v1/models")
    async def list_models():
        return jsonify(app_state().service.list_models())

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str):
        return jsonify(app_state().service.get_model(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions():
        req = await json_body(ChatCompletionRequest)
        return _respond(await chatbridge.chat(app_state().service, req))

    @app.post("/v1/completions")
    async def completions():
        req = await json_body(CompletionRequest)
        return _respond(await app_state().service.completions(req))

    @app.post("/v1/embeddings")
    async def embeddings():
        req = await json_body(EmbeddingRequest)
        return jsonify(await app_state().service.embeddings(req))

    @app.get("/health")
    async def health():
        state = app_state()
        models = state.manager.status()
        return jsonify({"status": "ok", "version": state.version,
                        "model_loaded": any(m["loaded"] for m in models),
                        "models": models})

    @app.get("/openapi.json")
    async def openapi():
        return jsonify(openapi_document())

    @app.get("/metrics")
    async def metrics():
        m = app_state().metrics
        return Response(m.render(), headers={"Content-Type": m.content_type})
