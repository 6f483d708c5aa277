"""The OpenAPI 3.1 description of the app's own routes, served at
``GET /openapi.json`` and used by the schema-driven fuzz tests.

Every request body and every response body comes from the pydantic model
the route validates with or answers through (``schemas.py``,
``response_models.py``, and the Responses, Anthropic and Ollama modules),
so the document cannot drift from what the server accepts and sends. Only
the routes, their status codes and descriptions are written here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from .anthropic import AnthropicError, AnthropicMessage, CountTokensRequest, MessagesRequest, MessageTokensCount
from .ollama_models import (ChatBody, EmbedBody, GenerateBody, OllamaChatResponse, OllamaEmbed, OllamaEmbedding,
                            OllamaError, OllamaGenerateResponse, OllamaLoadedModels, OllamaModels, OllamaRequest,
                            OllamaShow, OllamaVersion)
from .response_models import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, DeletedResponse,
                              EmbeddingList, ErrorResponse, Health, Model, ModelList, ResponseObject)
from .responses import ResponsesRequest
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

REF = "#/components/schemas/{model}"
REQUESTS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest,
                                   MessagesRequest, CountTokensRequest, OllamaRequest, ChatBody, GenerateBody,
                                   EmbedBody]
RESPONSES: list[type[BaseModel]] = [ErrorResponse, Model, ModelList, ChatCompletion, ChatCompletionChunk, Completion,
                                    CompletionChunk, EmbeddingList, Health, ResponseObject, DeletedResponse,
                                    AnthropicMessage, MessageTokensCount, AnthropicError, OllamaError, OllamaVersion,
                                    OllamaModels, OllamaLoadedModels, OllamaShow, OllamaChatResponse,
                                    OllamaGenerateResponse, OllamaEmbed, OllamaEmbedding]
_STR = {"type": "string"}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.",
                                "schema": {"type": "integer", "minimum": 1}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(error: type[BaseModel], body: bool) -> dict[str, Any]:
    """The error answers of an API route, each an ``error`` body."""
    def answer(description: str, headers: dict | None = None) -> dict[str, Any]:
        return {**_json(error, description), **({"headers": headers} if headers else {})}

    out = {"401": answer("Missing, malformed or wrong API key (`invalid_api_key`)."),
           "404": answer("Unknown model (`model_not_found`) or response id."),
           "405": answer("Method not allowed."),
           "429": answer("Rate limit reached for this client.", _RETRY_AFTER)}
    if body:
        out.update({
            "400": answer("Malformed JSON, wrong types, out-of-range values (names the `param`), "
                          "`context_length_exceeded`, or an unusable model (`model_broken`)."),
            "413": answer("Request body over `api.max_body_bytes`."),
            "503": answer("The model's queue is full (`overloaded`): retry after `Retry-After` seconds.",
                          _RETRY_AFTER)})
    return out


def _ok(model: type[BaseModel], description: str, stream: str | None = None,
        stream_type: str = "text/event-stream") -> dict[str, Any]:
    out = _json(model, description)
    if stream:
        out["content"][stream_type] = {"schema": {"type": "string", "description": stream}}
    return out


def _op(method: str, op_id: str, summary: str, tag: str, ok: dict[str, Any], error: type[BaseModel] | None,
        request: type[BaseModel] | None = None, parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if parameters:
        op["parameters"] = parameters
    if request is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    op["responses"] = {"200": ok, **(_errors(error, body=request is not None) if error else {})}
    if error is None:
        op["security"] = []
    return {method: op}


def _sse(chunk: type[BaseModel]) -> str:
    return f"Server-sent events: `data: <{chunk.__name__}>` lines, then `data: [DONE]`."


def _paths() -> dict[str, Any]:
    def param(name: str, description: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "description": description, "schema": _STR}]

    streamed = "The result (a JSON object, or an event stream when `stream` is true)."
    oa, err = "OpenAI", ErrorResponse
    ollama_stream = "The answer, or (unless `stream` is false) NDJSON: one object per line, the last with " \
                    "`done: true` and the counts."
    return {
        "/v1/models": _op("get", "listModels", "The installed models.", oa, _json(ModelList, "The models."), err),
        "/v1/models/{model}": _op("get", "retrieveModel", "One model.", oa, _json(Model, "The model."), err,
                                  parameters=param("model", "A model id as listed by `GET /v1/models`.")),
        "/v1/chat/completions": _op("post", "createChatCompletion", "Chat completion (optionally streamed).", oa,
                                    _ok(ChatCompletion, streamed, _sse(ChatCompletionChunk)), err,
                                    ChatCompletionRequest),
        "/v1/completions": _op("post", "createCompletion", "Legacy text completion, with fill-in-the-middle.", oa,
                               _ok(Completion, streamed, _sse(CompletionChunk)), err, CompletionRequest),
        "/v1/embeddings": _op("post", "createEmbedding", "Embedding vectors (mean-pooled, L2-normalised).", oa,
                              _json(EmbeddingList, "The vectors."), err, EmbeddingRequest),
        "/v1/responses": _op("post", "createResponse", "A Responses API response (optionally streamed).", oa,
                             _ok(ResponseObject, streamed, "Server-sent events: `event: response.*` with "
                                 "`data: <event>`, ending with response.completed, .incomplete or .failed."),
                             err, ResponsesRequest),
        "/v1/responses/{response_id}": {
            **_op("get", "getResponse", "A stored response.", oa, _json(ResponseObject, "The response."), err,
                  parameters=param("response_id", "The id of a stored response.")),
            **_op("delete", "deleteResponse", "Delete a stored response.", oa,
                  _json(DeletedResponse, "It is deleted."), err,
                  parameters=param("response_id", "The id of a stored response."))},
        "/v1/messages": _op("post", "createMessage", "Anthropic Messages (optionally streamed).", "Anthropic",
                            _ok(AnthropicMessage, streamed, "Server-sent events: `event: <type>` with "
                                "`data: <event>`, from message_start to message_stop (or error)."),
                            AnthropicError, MessagesRequest),
        "/v1/messages/count_tokens": _op("post", "countTokens", "Prompt tokens of a Messages request.",
                                         "Anthropic", _json(MessageTokensCount, "The count."), AnthropicError,
                                         CountTokensRequest),
        "/api/version": _op("get", "ollamaVersion", "The Ollama API level served.", "Ollama",
                            _json(OllamaVersion, "The version."), OllamaError),
        "/api/tags": _op("get", "ollamaTags", "The installed models.", "Ollama",
                         _json(OllamaModels, "The models."), OllamaError),
        "/api/ps": _op("get", "ollamaPs", "The loaded models.", "Ollama",
                       _json(OllamaLoadedModels, "The models."), OllamaError),
        "/api/show": _op("post", "ollamaShow", "One model's details.", "Ollama", _json(OllamaShow, "The model."),
                         OllamaError, OllamaRequest),
        "/api/chat": _op("post", "ollamaChat", "Chat.", "Ollama",
                         _ok(OllamaChatResponse, ollama_stream, ollama_stream, "application/x-ndjson"),
                         OllamaError, ChatBody),
        "/api/generate": _op("post", "ollamaGenerate", "Generation from a prompt (raw, or fill-in-the-middle).",
                             "Ollama", _ok(OllamaGenerateResponse, ollama_stream, ollama_stream,
                                           "application/x-ndjson"), OllamaError, GenerateBody),
        "/api/embed": _op("post", "ollamaEmbed", "Embedding vectors.", "Ollama", _json(OllamaEmbed, "The vectors."),
                          OllamaError, EmbedBody),
        "/api/embeddings": _op("post", "ollamaEmbeddings", "One embedding vector (older route).", "Ollama",
                               _json(OllamaEmbedding, "The vector."), OllamaError, EmbedBody),
        "/health": _op("get", "health", "Liveness, and whether a model is loaded.", "Device",
                       _json(Health, "The service is up."), None),
        "/metrics": _op("get", "metrics", "Prometheus metrics.", "Device",
                        {"description": "Prometheus text exposition format.",
                         "content": {"text/plain": {"schema": _STR}}}, None),
        "/openapi.json": _op("get", "openapi", "This document.", "Device",
                             {"description": "The OpenAPI 3.1 document.",
                              "content": {"application/json": {"schema": {"type": "object"}}}}, None),
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document for this server's routes (a fresh dict each call)."""
    _, defs = models_json_schema([(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in RESPONSES],
                                 ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Thox OpenAI-compatible API", "version": __version__,
                 "description": "The local OpenAI-compatible API of a Thox device, with the Anthropic Messages "
                                "and Ollama routes. Every `/v1` and `/api` route needs `Authorization: Bearer "
                                "<key>` (`thox config get api.key`) or `x-api-key: <key>`; every error on the "
                                "OpenAI routes is `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."},
        "servers": [{"url": "http://thox.local:8080"}],
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "schemas": dict(defs.get("$defs", {})),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "The device's API key (64 hex characters)."}},
        },
    }
