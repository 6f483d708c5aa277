"""HTTP routes of the OpenAI API and the device. Thin: parse, call the
service, serialise its response model. Errors are raised and turned into the
OpenAI shape by errors.py."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from quart import Quart, Response, jsonify

from . import chatbridge
from .body import json_body
from .openapi import openapi_document
from .response_models import Health, Reply
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .state import app_state
from .wire import openai_events, reply, stream_response


def _respond(result: Reply | AsyncGenerator) -> Response:
    if isinstance(result, Reply):
        return reply(result)
    return stream_response(openai_events(result))


def register(app: Quart) -> None:
    @app.get("/v1/models")
    async def list_models():
        return reply(app_state().service.list_models())

    @app.get("/v1/models/<path:model_id>")
    async def get_model(model_id: str):
        return reply(app_state().service.get_model(model_id))

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
        return reply(await app_state().service.embeddings(req))

    @app.get("/health")
    async def health():
        state = app_state()
        models = state.manager.status()
        return reply(Health(version=state.version, model_loaded=any(m["loaded"] for m in models), models=models))

    @app.get("/openapi.json")
    async def openapi():
        return jsonify(openapi_document())

    @app.get("/metrics")
    async def metrics():
        m = app_state().metrics
        return Response(m.render(), headers={"Content-Type": m.content_type})
