"""Models, auth, health, metrics and every error shape, over real HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from thoxtest import run_thox

ROUTES = [("GET", "/models"), ("GET", "/models/tiny"), ("POST", "/chat/completions"),
          ("POST", "/completions"), ("POST", "/embeddings")]


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text and "<html" not in r.text.lower()
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_list_and_get_models(client, server, openapi):
    ids = {m.id for m in client.models.list()}
    assert {"tiny", "tiny-nofim", "thox-demo"} <= ids
    r = server.get("/models")
    openapi(r.json(), "ListModelsResponse")
    m = server.get("/models/tiny").json()
    openapi(m, "Model")
    assert m["id"] == "tiny" and m["object"] == "model"


def test_unknown_model_is_404(server):
    assert_error(server.get("/models/nope"), 404, "model_not_found")
    r = server.post("/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert_error(r, 404, "model_not_found", "model")


def test_guide_model_names_point_at_pull(server):
    for name in ("thox-coder-7b", "thox-coder-14b", "thox-coder-32b"):
        r = server.post("/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]})
        err = assert_error(r, 404, "model_not_found")
        assert f"thox models pull {name}" in err["message"]


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer wrong", "Basic abc", "Bearer " + "0" * 64])
def test_auth_refused(server, method, path, auth):
    headers = {} if auth is None else {"Authorization": auth}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "prompt": "x", "input": "x"}
    r = httpx.request(method, server.base_url + path, headers=headers,
                      json=body if method == "POST" else None, timeout=30)
    err = assert_error(r, 401, "invalid_api_key")
    assert server.key not in err["message"]


def test_health_and_metrics_are_open(server, client):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["model_loaded"] is True
    assert any(m["id"] == "tiny" and m["loaded"] for m in h["models"])
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'thox_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "thox_tokens_generated_total" in text
    assert "thox_time_to_first_token_seconds_bucket" in text
    assert "thox_queue_depth" in text
    assert server.key not in text


def test_key_rotation_without_restart(server):
    old = server.key
    new = run_thox(server.home, "api-key", "generate").stdout.strip()
    assert len(new) == 64 and new != old
    try:
        assert_error(httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {old}"}), 401)
        assert httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        # an `openssl rand -hex 32` style key set through config works too
        run_thox(server.home, "config", "set", "api.key", old)
        assert httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    finally:
        run_thox(server.home, "config", "set", "api.key", old)
    assert old not in server.logs() and new not in server.logs()


CHAT = "/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,param", [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny"}, "messages"),
    ({"messages": MSGS}, "model"),
    ({"model": 5, "messages": MSGS}, "model"),
    ({"model": "tiny", "messages": "hi"}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, "messages[0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"model": "tiny", "messages": MSGS, "temperature": 5}, "temperature"),
    ({"model": "tiny", "messages": MSGS, "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "messages": MSGS, "top_p": -1}, "top_p"),
    ({"model": "tiny", "messages": MSGS, "max_tokens": -3}, "max_tokens"),
    ({"model": "tiny", "messages": MSGS, "max_tokens": 1e30}, "max_tokens"),
    ({"model": "tiny", "messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "tiny", "messages": MSGS, "n": 0}, "n"),
    ({"model": "tiny", "messages": MSGS, "n": 1000}, "n"),
    ({"model": "tiny", "messages": MSGS, "presence_penalty": 3}, "presence_penalty"),
    ({"model": "tiny", "messages": MSGS, "frequency_penalty": -9}, "frequency_penalty"),
    ({"model": "tiny", "messages": MSGS, "stop": [str(i) for i in range(33)]}, "stop"),
    ({"model": "tiny", "messages": MSGS, "stop": 3}, "stop"),
    ({"model": "tiny", "messages": MSGS, "stream": "yes"}, "stream"),
    ({"model": "tiny", "messages": MSGS, "seed": "x"}, "seed"),
    ({"model": "tiny", "messages": MSGS, "top_logprobs": 3}, "body"),
    ({"model": "tiny", "messages": MSGS, "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"model": "tiny", "messages": MSGS, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"model": "tiny", "messages": MSGS, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"model": "tiny", "messages": MSGS, "tool_choice": "required"}, "body"),
    ({"model": "tiny", "messages": MSGS, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_chat_bad_input_names_param(server, body, param):
    assert_error(server.post(CHAT, body), 400, param=param)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1,2]", b"\xff\xfe{}", b'"str"', b"[" * 5000 + b"]" * 5000,
                                 b'{"model": "tiny", "messages": ' + b"[" * 200 + b"]" * 200 + b"}"])
def test_malformed_bodies(server, raw):
    for path in (CHAT, "/completions", "/embeddings"):
        assert_error(server.post(path, raw, headers={**server.headers, "Content-Type": "application/json"}), 400)


def test_unknown_parameters_are_ignored(server):
    r = server.post(CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 2, "frobnicate": {"x": [1]},
                           "user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"})
    assert r.status_code == 200, r.text


def test_context_length_exceeded(server):
    long = "hello " * 2000
    err = assert_error(server.post(CHAT, {"model": "tiny", "messages": [{"role": "user", "content": long}]}),
                       400, "context_length_exceeded", "messages")
    assert "1024" in err["message"] and "tokens" in err["message"]
    err = assert_error(server.post(CHAT, {"model": "tiny", "messages": MSGS, "max_tokens": 5000}),
                       400, "context_length_exceeded")
    assert "5000 in the completion" in err["message"]


def test_unknown_route_and_method(server):
    assert_error(server.get("/nothing"), 404)
    assert_error(httpx.get(server.url + "/nothing", timeout=10), 404)
    assert_error(server.get("/chat/completions"), 405)
    assert_error(httpx.delete(server.base_url + "/models", headers=server.headers), 405)


def test_body_too_large(server):
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert_error(server.post(CHAT, big, headers={**server.headers, "Content-Type": "application/json"}), 413)


def test_key_not_in_process_list_or_errors(server):
    import os
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert server.key.encode() not in f.read()
        except OSError:
            continue
    r = httpx.get(server.base_url + "/models", headers={"Authorization": f"Bearer {server.key}x"})
    assert r.status_code == 401 and server.key not in r.text
