"""The OpenAPI 3.1 description of the app's own routes.

Request bodies come straight from the pydantic models in ``schemas.py`` (so
the document never drifts from what the server validates); responses and
errors are described here in the OpenAI shapes the service returns. Served
at ``GET /openapi.json`` and used by the schema-driven fuzz tests.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import models_json_schema

from .. import __version__
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_STR = {"type": "string"}
_INT = {"type": "integer"}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
        "prompt_tokens_details": {"type": "object"},
        "completion_tokens_details": {"type": "object"},
    },
}

_FINISH = {"enum": ["stop", "length", "tool_calls", "content_filter", "function_call", None]}

_TOOL_CALL_OUT = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": _STR, "type": {"const": "function"},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": _STR, "arguments": _STR}},
    },
}

_RESPONSES: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "description": "Every error, in the OpenAI shape.",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {"message": _STR, "type": _STR,
                           "param": _nullable(_STR), "code": _nullable(_STR)},
        }},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}},
    },
    "CompletionUsage": _USAGE,
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR,
            "system_fingerprint": _nullable(_STR),
            "choices": {"type": "array", "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": _INT,
                    "message": {"type": "object", "required": ["role"],
                                "properties": {"role": {"const": "assistant"}, "content": _nullable(_STR),
                                               "refusal": _nullable(_STR),
                                               "tool_calls": {"type": "array", "items": _TOOL_CALL_OUT}}},
                    "logprobs": _nullable({"type": "object"}),
                    "finish_reason": _FINISH,
                }}},
            "usage": _ref("CompletionUsage"),
        },
    },
    "ChatCompletionChunk": {
        "type": "object",
        "description": "One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`.",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": _STR, "object": {"const": "chat.completion.chunk"}, "created": _INT, "model": _STR,
            "system_fingerprint": _nullable(_STR),
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "delta"],
                "properties": {"index": _INT, "delta": {"type": "object"},
                               "logprobs": _nullable({"type": "object"}), "finish_reason": _FINISH}}},
            "usage": _nullable(_ref("CompletionUsage")),
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR,
            "system_fingerprint": _nullable(_STR),
            "choices": {"type": "array", "items": {
                "type": "object", "required": ["index", "text", "finish_reason"],
                "properties": {"index": _INT, "text": _STR, "logprobs": _nullable({"type": "object"}),
                               "finish_reason": _FINISH}}},
            "usage": _ref("CompletionUsage"),
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model", "usage"],
        "properties": {
            "object": {"const": "list"}, "model": _STR,
            "data": {"type": "array", "items": {
                "type": "object", "required": ["object", "index", "embedding"],
                "properties": {"object": {"const": "embedding"}, "index": _INT,
                               "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                       {"type": "string", "contentEncoding": "base64"}]}}}},
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                      "properties": {"prompt_tokens": _INT, "total_tokens": _INT}},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}, "version": _STR, "model_loaded": {"type": "boolean"},
                       "models": {"type": "array", "items": {"type": "object"}}},
    },
}

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 1}}}


def _error(description: str, headers: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": _ref("Error")}}}
    if headers:
        out["headers"] = headers
    return out


def _v1_errors(body: bool) -> dict[str, Any]:
    out = {
        "401": _error("Missing, malformed or wrong API key (`invalid_api_key`)."),
        "404": _error("Unknown model (`model_not_found`)."),
        "405": _error("Method not allowed."),
        "429": _error("Rate limit reached for this client.", _RETRY_AFTER),
    }
    if body:
        out.update({
            "400": _error("Malformed JSON, wrong types, out-of-range values (names the `param`), "
                          "`context_length_exceeded`, or an unusable model (`model_broken`)."),
            "413": _error("Request body over `api.max_body_bytes`."),
            "503": _error("The model's queue is full (`overloaded`): retry after `Retry-After` seconds.",
                          _RETRY_AFTER),
        })
    return out


def _ok(schema: str, description: str, stream: str | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref(schema)}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description":
                                                   f"Server-sent events: `data: <{stream}>` lines, "
                                                   f"then `data: [DONE]`."}}
    return {"description": description, "content": content}


def _post(op_id: str, summary: str, req: str, resp: str, stream: str | None) -> dict[str, Any]:
    return {"post": {
        "operationId": op_id, "summary": summary, "tags": ["OpenAI"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(req)}}},
        "responses": {"200": _ok(resp, "The result (a JSON object, or an event stream when `stream` is true).",
                                 stream), **_v1_errors(body=True)},
    }}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document for this server's routes (a fresh dict each call)."""
    _, defs = models_json_schema(
        [(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
         (EmbeddingRequest, "validation")],
        ref_template=REF)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas.update(copy.deepcopy(_RESPONSES))
    model_param = {"name": "model", "in": "path", "required": True,
                   "description": "A model id as listed by `GET /v1/models`.", "schema": _STR}
    paths: dict[str, Any] = {
        "/v1/models": {"get": {
            "operationId": "listModels", "summary": "The installed models.", "tags": ["OpenAI"],
            "responses": {"200": _ok("ModelList", "The models."), **_v1_errors(body=False)}}},
        "/v1/models/{model}": {"get": {
            "operationId": "retrieveModel", "summary": "One model.", "tags": ["OpenAI"],
            "parameters": [model_param],
            "responses": {"200": _ok("Model", "The model."), **_v1_errors(body=False)}}},
        "/v1/chat/completions": _post("createChatCompletion", "Chat completion (optionally streamed).",
                                      "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
        "/v1/completions": _post("createCompletion", "Legacy text completion, with fill-in-the-middle.",
                                 "CompletionRequest", "Completion", "Completion"),
        "/v1/embeddings": _post("createEmbedding", "Embedding vectors (mean-pooled, L2-normalised).",
                                "EmbeddingRequest", "EmbeddingList", None),
        "/health": {"get": {
            "operationId": "health", "summary": "Liveness, and whether a model is loaded.", "tags": ["Device"],
            "security": [],
            "responses": {"200": _ok("Health", "The service is up.")}}},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics.", "tags": ["Device"], "security": [],
            "responses": {"200": {"description": "Prometheus text exposition format.",
                                  "content": {"text/plain": {"schema": _STR}}}}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document.", "tags": ["Device"], "security": [],
            "responses": {"200": {"description": "The OpenAPI 3.1 document.",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Thox OpenAI-compatible API", "version": __version__,
                 "description": "The local OpenAI-compatible API of a Thox device. Every `/v1` route needs "
                                "`Authorization: Bearer <key>` (`thox config get api.key`); every error "
                                "is `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."},
        "servers": [{"url": "http://thox.local:8080"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "The device's API key (64 hex characters)."}},
        },
    }
