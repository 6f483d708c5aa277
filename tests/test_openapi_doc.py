"""The server's own /openapi.json against what the server sends: every
route's answers (JSON bodies, stream chunks, NDJSON lines, errors) validate
against the schema the document gives for that route and status, so the
document generated from the response models describes the wire."""

from __future__ import annotations

import json

import httpx
import pytest
from jsonschema import Draft202012Validator

from thoxtest import sse_events

MSGS = [{"role": "user", "content": "hi"}]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def doc(server):
    r = httpx.get(server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def _errors(doc: dict, schema: dict, body) -> list[str]:
    v = Draft202012Validator({**schema, "components": doc["components"]})
    return [f"{list(e.path)}: {e.message[:200]}" for e in sorted(v.iter_errors(body), key=lambda e: e.path)][:5]


def answers(doc: dict, method: str, path: str, status: int, body, media: str = "application/json") -> None:
    """``body`` validates against the document's schema for that answer."""
    schema = doc["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]
    errors = _errors(doc, schema, body)
    assert not errors, f"{method.upper()} {path} {status}: " + "; ".join(errors)


def is_a(doc: dict, name: str, body) -> None:
    errors = _errors(doc, {"$ref": f"#/components/schemas/{name}"}, body)
    assert not errors, f"{name}: " + "; ".join(errors)


def test_every_reference_resolves_and_every_operation_answers(doc):
    names = set(doc["components"]["schemas"])
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"].removeprefix("#/components/schemas/"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(doc)
    assert refs <= names, f"unresolved: {sorted(refs - names)}"
    expected = {"/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                "/v1/responses", "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens",
                "/api/version", "/api/tags", "/api/ps", "/api/show", "/api/chat", "/api/generate", "/api/embed",
                "/api/embeddings", "/health", "/metrics", "/openapi.json"}
    assert set(doc["paths"]) == expected
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "200" in op["responses"], (method, path)
            if "requestBody" in op:
                assert "400" in op["responses"], (method, path)


def test_openai_routes(server, doc):
    h = server.headers
    answers(doc, "get", "/v1/models", 200, server.get("/models").json())
    answers(doc, "get", "/v1/models/{model}", 200, server.get("/models/tiny").json())
    answers(doc, "get", "/health", 200, httpx.get(server.url + "/health", timeout=30).json())
    chat = {"model": "tiny", "messages": MSGS, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "n": 2}
    answers(doc, "post", "/v1/chat/completions", 200, server.post("/chat/completions", chat).json())
    r = server.post("/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r)
    assert events[-1] == "[DONE]" and len(events) > 3
    for e in events[:-1]:
        is_a(doc, "ChatCompletionChunk", e)
    comp = {"model": "tiny", "prompt": ["a", "b"], "max_tokens": 3, "logprobs": 1, "echo": True}
    answers(doc, "post", "/v1/completions", 200, server.post("/completions", comp).json())
    r = server.post("/completions", {**comp, "stream": True, "stream_options": {"include_usage": True}})
    for e in sse_events(r)[:-1]:
        is_a(doc, "CompletionChunk", e)
    for fmt in ("float", "base64"):
        body = server.post("/embeddings", {"model": "tiny", "input": ["a", "b"], "encoding_format": fmt}).json()
        answers(doc, "post", "/v1/embeddings", 200, body)
    answers(doc, "post", "/v1/chat/completions", 404,
            server.post("/chat/completions", {"model": "nope", "messages": MSGS}).json())
    answers(doc, "post", "/v1/chat/completions", 400,
            server.post("/chat/completions", {"model": "tiny", "messages": []}).json())
    answers(doc, "get", "/v1/models", 401, httpx.get(server.base_url + "/models", timeout=30).json())
    assert h  # the key was sent on every other call


def test_responses_routes(server, doc):
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    body = server.post("/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 3, "instructions": "x",
                                      "metadata": {"k": "v"}, "user": "u"}).json()
    answers(doc, "post", "/v1/responses", 200, body)
    answers(doc, "post", "/v1/responses", 200, server.post("/responses", {
        "model": "tiny", "input": "hi", "max_output_tokens": 40, "tools": tools, "tool_choice": "required"}).json())
    answers(doc, "get", "/v1/responses/{response_id}", 200, server.get(f"/responses/{body['id']}").json())
    r = httpx.delete(f"{server.base_url}/responses/{body['id']}", headers=server.headers, timeout=30)
    answers(doc, "delete", "/v1/responses/{response_id}", 200, r.json())
    answers(doc, "get", "/v1/responses/{response_id}", 404, server.get(f"/responses/{body['id']}").json())
    r = server.post("/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 3, "stream": True})
    last = json.loads(r.text.strip().rsplit("data: ", 1)[-1])
    answers(doc, "post", "/v1/responses", 200, last["response"])


def test_anthropic_routes(server, doc):
    msg = {"model": "tiny", "max_tokens": 40, "messages": MSGS}
    answers(doc, "post", "/v1/messages", 200, server.post("/messages", msg).json())
    answers(doc, "post", "/v1/messages", 200, server.post("/messages", {
        **msg, "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": {"type": "any"}}).json())
    answers(doc, "post", "/v1/messages/count_tokens", 200,
            server.post("/messages/count_tokens", {"model": "tiny", "messages": MSGS}).json())
    answers(doc, "post", "/v1/messages", 404, server.post("/messages", {**msg, "model": "nope"}).json())
    answers(doc, "post", "/v1/messages", 400, server.post("/messages", {**msg, "max_tokens": 0}).json())


def test_ollama_routes(server, doc):
    h = server.headers

    def call(method: str, path: str, body=None) -> httpx.Response:
        return httpx.request(method, server.url + path, json=body, headers=h, timeout=120)
    for path in ("/api/version", "/api/tags", "/api/ps"):
        answers(doc, "get", path, 200, call("GET", path).json())
    answers(doc, "post", "/api/show", 200, call("POST", "/api/show", {"model": "tiny:latest"}).json())
    opts = {"num_predict": 3, "temperature": 0}
    answers(doc, "post", "/api/chat", 200,
            call("POST", "/api/chat", {"model": "tiny", "messages": MSGS, "options": opts, "stream": False}).json())
    lines = [json.loads(x) for x in call("POST", "/api/chat", {"model": "tiny", "messages": MSGS,
                                                                "options": opts}).text.splitlines()]
    assert lines[-1]["done"] is True
    for line in lines:
        is_a(doc, "OllamaChatResponse", line)
    answers(doc, "post", "/api/generate", 200,
            call("POST", "/api/generate", {"model": "tiny", "prompt": "hi", "options": opts, "stream": False}).json())
    for line in call("POST", "/api/generate", {"model": "tiny", "prompt": "hi", "raw": True,
                                               "options": opts}).text.splitlines():
        is_a(doc, "OllamaGenerateResponse", json.loads(line))
    answers(doc, "post", "/api/embed", 200, call("POST", "/api/embed", {"model": "tiny", "input": ["a"]}).json())
    answers(doc, "post", "/api/embeddings", 200,
            call("POST", "/api/embeddings", {"model": "tiny", "prompt": "a"}).json())
    answers(doc, "post", "/api/chat", 404, call("POST", "/api/chat", {"model": "nope", "messages": MSGS}).json())


def test_ollama_chat_without_messages_loads_the_model(server, doc):
    """As in Ollama: a chat with no messages loads the model and answers at once."""
    r = httpx.post(server.url + "/api/chat", json={"model": "tiny-nofim:latest"}, headers=server.headers, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["done"] is True and body["done_reason"] == "load" and body["model"] == "tiny-nofim"
    assert body["message"] == {"role": "assistant", "content": ""}
    answers(doc, "post", "/api/chat", 200, body)
    loaded = httpx.get(server.url + "/api/ps", headers=server.headers, timeout=30).json()["models"]
    assert "tiny-nofim" in {m["name"] for m in loaded}
