"""The Ollama-native subset (/api/...) through the `ollama` Python client
(list, show, chat, stream, generate, embed) and raw NDJSON; the API key as
auth, and the opt-in api.ollama_keyless."""

from __future__ import annotations

import json

import httpx
import pytest

from thoxtest import Server, make_home

DEMO = "thox-demo"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ol(server):
    from ollama import Client
    return Client(host=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=120)


def test_version_and_list(ol, server):
    r = httpx.get(server.url + "/api/version", headers=server.headers, timeout=30)
    assert r.status_code == 200 and tuple(int(x) for x in r.json()["version"].split(".")) >= (0, 6, 4)
    models = {m.model: m for m in ol.list().models}
    assert {"tiny", "tiny-nofim", DEMO} <= set(models)
    demo = models[DEMO]
    assert demo.size > 0 and demo.digest and demo.details.format == "gguf" and demo.modified_at is not None


def test_show(ol, server):
    info = ol.show(DEMO)
    arch = info.modelinfo["general.architecture"]
    served = server.get(f"/models/{DEMO}").json()["context_length"]
    assert info.modelinfo[f"{arch}.context_length"] == served
    assert "completion" in info.capabilities and "tools" in info.capabilities
    assert "insert" not in info.capabilities                      # the demo model has no FIM tokens
    assert "insert" in ol.show("tiny").capabilities
    assert ol.show(f"{DEMO}:latest").modelinfo == info.modelinfo  # Ollama clients add :latest


def test_chat(ol):
    r = ol.chat(model=DEMO, messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Say hello."}],
                options={"num_predict": 8, "temperature": 0, "top_k": 20, "stop": ["\n\n"]}, stream=False)
    assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant"
    assert isinstance(r.message.content, str) and 0 < r.eval_count <= 8 and r.prompt_eval_count > 0
    assert r.total_duration > 0


def test_chat_stream_ndjson(ol, server):
    parts = list(ol.chat(model=DEMO, messages=[{"role": "user", "content": "Count."}],
                         options={"num_predict": 8, "temperature": 0},
                         stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count > 0
    text = "".join(p.message.content for p in parts)
    assert text
    # raw: one JSON object per line, streaming by default as in Ollama
    r = httpx.post(server.url + "/api/chat", headers=server.headers, timeout=120,
                   json={"model": DEMO, "messages": [{"role": "user", "content": "Count."}],
                         "options": {"num_predict": 4}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length")
    assert all(x["model"] == DEMO and "created_at" in x for x in lines)


def test_chat_tools_and_history(ol):
    def get_weather(city: str) -> str:
        """Current weather in a city.

        Args:
          city: the city
        """
        return f"sunny in {city}"

    r = ol.chat(model=DEMO, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny in Paris", "tool_name": "get_weather"}],
        tools=[get_weather], options={"num_predict": 8}, stream=False)
    assert r.done and r.message.role == "assistant"
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_generate_and_fim(ol):
    r = ol.generate(model=DEMO, prompt="Once upon a time", options={"num_predict": 6}, stream=False)
    assert r.done and isinstance(r.response, str) and 0 < r.eval_count <= 6
    parts = list(ol.generate(model=DEMO, prompt="Once upon a time", options={"num_predict": 6}, stream=True))
    assert parts[-1].done and "".join(p.response for p in parts[:-1])
    fim = ol.generate(model="tiny", prompt="def add(a, b):\n    ", suffix="\n", options={"num_predict": 4},
                      stream=False)
    assert fim.done and fim.prompt_eval_count > 0
    # a raw prompt with the FIM tokens written out is the same prompt
    raw = ol.generate(model="tiny", prompt="<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n<|fim_middle|>",
                      raw=True, options={"num_predict": 4}, stream=False)
    assert raw.prompt_eval_count == fim.prompt_eval_count
    from ollama import ResponseError
    with pytest.raises(ResponseError) as e:
        ol.generate(model=DEMO, prompt="x", suffix="y", stream=False)   # no FIM tokens
    assert e.value.status_code == 400 and "fill-in-the-middle" in e.value.error


def test_embed(ol):
    r = ol.embed(model="tiny", input=["hello", "world"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 64
    assert r.prompt_eval_count > 0


def test_errors_and_auth(server):
    from ollama import Client, ResponseError
    r = httpx.get(server.url + "/api/tags", timeout=30)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    with pytest.raises(ResponseError) as e:
        Client(host=server.url, headers={"Authorization": f"Bearer {server.key}"}).show("no-such-model")
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    r = httpx.post(server.url + "/api/chat", headers=server.headers, json={"model": DEMO, "messages": "x"},
                   timeout=30)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


@pytest.mark.parametrize("message", [
    {"role": "assistant", "content": "", "tool_calls": 5},
    {"role": "assistant", "content": "", "tool_calls": {"function": {"name": "f"}}},
    {"role": "assistant", "content": "", "tool_calls": [{"function": 5}]},
    {"role": "assistant", "content": "", "tool_calls": ["x"]},
    {"role": "user", "content": ["x"]},
    {"role": "robot", "content": "x"},
    "x",
])
def test_malformed_messages_are_400(server, message):
    r = httpx.post(server.url + "/api/chat", headers=server.headers, timeout=30,
                   json={"model": "tiny", "messages": [message], "stream": False})
    assert r.status_code == 400 and isinstance(r.json()["error"], str) and r.json()["error"]


def test_keyless_opt_in(tmp_path_factory, models_dir):
    home = make_home(tmp_path_factory, models_dir, "ollama-keyless")
    s = Server(home, api__ollama_keyless="true")
    try:
        from ollama import Client
        assert [m.model for m in Client(host=s.url).list().models] == ["tiny", "tiny-nofim"]
        # only the Ollama routes, and a wrong key is still wrong
        assert httpx.get(s.base_url + "/models", timeout=30).status_code == 401
        assert httpx.get(s.url + "/api/tags", headers={"Authorization": "Bearer " + "0" * 64},
                         timeout=30).status_code == 401
        # a page on another origin cannot read what it got in without a key
        r = httpx.get(s.url + "/api/tags", headers={"Origin": "http://evil.example"}, timeout=30)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = httpx.get(s.url + "/api/tags", headers={"Origin": "http://evil.example", **s.headers}, timeout=30)
        assert r.headers["access-control-allow-origin"] == "*"
    finally:
        s.stop()
