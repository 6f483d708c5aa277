"""Chat completions through the stock OpenAI Python SDK (and raw SSE)."""

from __future__ import annotations

import json

import httpx
import pytest

from thoxtest import sse_events

MSGS = [{"role": "user", "content": "hi"}]


def test_seed_guide_python_example(tmp_path_factory, models_dir):
    """The product guide's Python call, unmodified but for URL and key."""
    from openai import OpenAI

    from thoxtest import Server, run_thox
    home = tmp_path_factory.mktemp("guide")
    run_thox(home, "models", "import", str(models_dir / "tiny.gguf"), "--id", "thox-coder-14b")
    s = Server(home)
    try:
        client = OpenAI(base_url=s.base_url, api_key=s.key)
        response = client.chat.completions.create(
            model="thox-coder-14b",
            messages=[
                {"role": "system", "content": "You are a helpful coding assistant."},
                {"role": "user", "content": "Write a function to calculate fibonacci"}
            ],
            temperature=0.7,
            max_tokens=500
        )
        assert isinstance(response.choices[0].message.content, str)
        assert response.usage.completion_tokens <= 500
        # the guide's curl bodies, byte for byte
        r = httpx.post(s.base_url + "/chat/completions", headers={"Content-Type": "application/json",
                       "Authorization": f"Bearer {s.key}"}, content='''{
    "model": "thox-coder-14b",
    "messages": [{"role": "user", "content": "Hello!"}],
    "stream": true
  }''', timeout=120)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    finally:
        s.stop()


def test_chat_shape_and_usage(client, server, openapi):
    r = server.post("/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 7})
    body = r.json()
    openapi(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert 0 < u["completion_tokens"] <= 7
    c = body["choices"][0]
    assert c["message"]["role"] == "assistant"
    assert c["finish_reason"] == ("length" if u["completion_tokens"] == 7 else "stop")


@pytest.mark.parametrize("limit_key", ["max_tokens", "max_completion_tokens"])
def test_token_limit_is_respected(client, limit_key):
    for limit in (1, 5, 33):
        r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=1.0, seed=limit,
                                           **{limit_key: limit})
        assert r.usage.completion_tokens <= limit
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == limit


def test_finish_reason_stop_is_truthful(server):
    """Greedy output is deterministic: use a piece of it as a stop string."""
    base = {"model": "thox-demo", "messages": [{"role": "user", "content": "Count from 1 to 20."}],
            "temperature": 0, "max_tokens": 40}
    full = server.post("/chat/completions", base).json()["choices"][0]["message"]["content"]
    assert len(full) > 10
    stop = full[5:8]
    r = server.post("/chat/completions", {**base, "stop": [stop, "zzzz-never"]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    text = r["choices"][0]["message"]["content"]
    assert stop not in text and full.startswith(text) and len(text) <= full.index(stop)
    r = server.post("/chat/completions", {**base, "stop": stop}).json()
    assert r["choices"][0]["message"]["content"] == text


def test_roles_and_content_parts(client):
    r = client.chat.completions.create(model="thox-demo", max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "4"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": "And 3+3?"},
    ])
    assert r.choices[0].message.role == "assistant"
    # "developer" is rendered as "system": the tiny model's ChatML template writes the role name
    # into the prompt byte by byte, so any other rendering changes the prompt's token count
    # ("developer" is 8 tokens, "system" 6, "user" 3)
    counts = {role: client.chat.completions.create(model="tiny", max_tokens=1, messages=[
        {"role": role, "content": "Answer in English."}, *MSGS]).usage.prompt_tokens
        for role in ("developer", "system", "user")}
    assert counts["developer"] == counts["system"] == counts["user"] + 3, counts


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=20, temperature=1.0, top_p=0.9,
              presence_penalty=0.5, frequency_penalty=0.5)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert a == b


def test_n_choices(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens <= 12


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
        assert t.top_logprobs[0].logprob >= t.logprob - 1e-6


def test_json_schema_is_enforced(client):
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green"]},
                                               "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=60, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
        obj = json.loads(r.choices[0].message.content)
        assert obj["color"] in ("red", "green") and isinstance(obj["ok"], bool)


def test_json_object_mode(client):
    r = client.chat.completions.create(
        model="thox-demo", max_tokens=120, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with a JSON object like {"name": "Ann"}.'}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: it must still be a JSON prefix starting an object
        assert r.choices[0].message.content.lstrip().startswith("{")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                     "additionalProperties": False}}}]


def test_tool_call_forced(client, openapi, server):
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    r = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=80,
                                       tool_choice="required")
    assert r.choices[0].message.tool_calls[0].function.name in ("get_weather", "noop")
    raw = server.post("/chat/completions", {"model": "tiny", "messages": MSGS, "tools": TOOLS, "max_tokens": 80,
                                            "tool_choice": "required"}).json()
    openapi(raw, "CreateChatCompletionResponse")


def test_tool_call_streaming(client):
    stream = client.chat.completions.create(model="tiny", messages=MSGS, tools=TOOLS, max_tokens=80, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, args, reason = "", "", None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    assert name == "get_weather" and reason == "tool_calls"
    assert json.loads(args)["city"] in ("Oslo", "Rome")


def test_tool_choice_none_and_auto_answer_text(client):
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model="thox-demo", messages=MSGS, tools=TOOLS, tool_choice=choice,
                                           max_tokens=5, temperature=0)
        c = r.choices[0]
        # a greeting gets a text answer, cut at max_tokens or ended by the model
        assert c.message.tool_calls is None and c.message.content, (choice, c)
        assert c.finish_reason == ("length" if r.usage.completion_tokens == 5 else "stop"), (choice, c, r.usage)


def test_stream_chunks(server, openapi):
    r = server.post("/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 6, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = sse_events(r)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    for c in chunks:
        openapi(c, "CreateChatCompletionStreamResponse")
        assert c["object"] == "chat.completion.chunk" and "usage" not in c
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_stream_include_usage(client):
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, stream=True, logprobs=True,
                                            seed=6, stream_options={"include_usage": True})
    chunks = list(stream)
    last, u = chunks[-1], chunks[-1].usage
    assert last.choices == [] and 0 < u.completion_tokens <= 6
    assert all(c.usage is None for c in chunks[:-1])
    # the usage counts what was streamed: one logprobs entry per generated token, and
    # the prompt counted as for the same messages without streaming
    streamed = sum(len(c.choices[0].logprobs.content) for c in chunks[:-1] if c.choices[0].logprobs)
    assert streamed == u.completion_tokens
    assert chunks[-2].choices[0].finish_reason == ("length" if u.completion_tokens == 6 else "stop")
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1).usage
    assert u.prompt_tokens == plain.prompt_tokens and u.total_tokens == u.prompt_tokens + u.completion_tokens


@pytest.mark.parametrize("system", [None, "You are a careful assistant who writes plainly. " * 70])
def test_stream_equals_non_stream(client, system):
    """The same greedy request gives the same text streamed and not, whatever
    the KV cache holds: first from an empty cache, then with its prompt cached,
    then after other requests took the slots (a long prompt: several chunks)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Say hello"}]
    kw = dict(model="thox-demo", messages=msgs, max_tokens=15, temperature=0)

    def streamed() -> str:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)

    full = client.chat.completions.create(**kw).choices[0].message.content
    assert streamed() == full
    for i in range(5):
        client.chat.completions.create(model="thox-demo", max_tokens=2, temperature=0,
                                       messages=msgs[:-1] + [{"role": "user", "content": f"Count to {i}"}])
    assert streamed() == full
    assert client.chat.completions.create(**kw).choices[0].message.content == full


def test_prefix_cache_reused_on_follow_up(server):
    convo = [{"role": "system", "content": "You are terse. " * 30}, {"role": "user", "content": "Name a color."}]
    r1 = server.post("/chat/completions", {"model": "thox-demo", "messages": convo, "max_tokens": 8,
                                           "temperature": 0}).json()
    convo += [r1["choices"][0]["message"], {"role": "user", "content": "Another one."}]
    r2 = server.post("/chat/completions", {"model": "thox-demo", "messages": convo, "max_tokens": 8,
                                           "temperature": 0}).json()
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r1["usage"]["prompt_tokens"] - 2, (cached, r1["usage"])


@pytest.mark.parametrize("schema", [
    {"enum": []}, {"type": "strange"}, {"type": "string", "pattern": "[unclosed"},
    {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, {"anyOf": []}, {"oneOf": [{"enum": []}]},
    {"type": "array", "items": {"enum": []}, "minItems": 1},
])
def test_bad_json_schemas_are_400_and_server_survives(server, schema):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    r = server.post("/chat/completions", body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"].startswith("response_format")
    r = server.post("/chat/completions", {**body, "stream": True})
    assert r.status_code in (200, 400)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    r = server.post("/chat/completions", {"model": "tiny", "messages": MSGS, "max_tokens": 5, "tools": bad_tool,
                                          "tool_choice": "required"})
    assert r.status_code in (200, 400), r.text
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_stream_with_n_choices(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason}
    assert set(finished) == {0, 1}
    assert chunks[-1].usage.completion_tokens <= 8
