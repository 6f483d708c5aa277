"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens)
through the anthropic SDK (messages, stream, tools, count_tokens) and raw
requests the way Claude Code sends them (x-api-key, anthropic-version,
anthropic-beta, ?beta=true), with Anthropic's SSE events and error shape."""

from __future__ import annotations

import json

import httpx
import pytest

DEMO = "thox-demo"
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                            "required": ["city"]}}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def claude(server):
    from anthropic import Anthropic
    return Anthropic(base_url=server.url, api_key=server.key, max_retries=0, timeout=120)


def claude_code_headers(server) -> dict[str, str]:
    return {"x-api-key": server.key, "anthropic-version": "2023-06-01", "content-type": "application/json",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}


def anthropic_sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.strip().split("\n"))
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_create_message(claude):
    msg = claude.messages.create(model=DEMO, max_tokens=12, system="Answer briefly.",
                                 extra_body={"temperature": 0, "top_k": 20, "top_p": 0.9},
                                 messages=[{"role": "user", "content": "Say hello."}])
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_") and msg.model == DEMO
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 12
    if msg.stop_reason == "max_tokens":
        assert msg.usage.output_tokens == 12


def test_claude_code_request_shape(server):
    """x-api-key, anthropic-version, anthropic-beta and ?beta=true, system as
    blocks with cache_control, many stop sequences."""
    body = {"model": DEMO, "max_tokens": 8, "stop_sequences": [f"STOP{i}" for i in range(12)],
            "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                        "cache_control": {"type": "ephemeral"}}]}],
            "metadata": {"user_id": "someone"}}
    r = httpx.post(server.url + "/v1/messages?beta=true", json=body, headers=claude_code_headers(server), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message" and r.json()["content"][0]["type"] == "text"


@pytest.mark.parametrize("headers,body,status,kind", [
    ({}, {"model": DEMO, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}, 401,
     "authentication_error"),
    ({"x-api-key": "0" * 64}, {"model": DEMO, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
     401, "authentication_error"),
    (None, {"model": DEMO, "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error"),
    (None, {"model": DEMO, "max_tokens": 4, "messages": []}, 400, "invalid_request_error"),
    (None, {"model": DEMO, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, 400,
     "invalid_request_error"),
    (None, {"model": "no-such-model", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}, 404,
     "not_found_error"),
])
def test_errors_in_anthropic_shape(server, headers, body, status, kind):
    h = claude_code_headers(server) if headers is None else {"anthropic-version": "2023-06-01", **headers}
    r = httpx.post(server.url + "/v1/messages", json=body, headers=h, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"]
    assert set(err) == {"type", "error"}


def test_sdk_raises_typed_errors(claude):
    import anthropic
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error"


def test_stream(claude, server):
    with claude.messages.stream(model=DEMO, max_tokens=16, messages=[{"role": "user", "content": "Count."}],
                                extra_body={"temperature": 0}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    # the raw events, in Anthropic's order
    r = httpx.post(server.url + "/v1/messages", headers=claude_code_headers(server), timeout=120,
                   json={"model": DEMO, "max_tokens": 16, "stream": True,
                         "messages": [{"role": "user", "content": "Count."}]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = anthropic_sse(r.text)
    names = [n for n, _ in events]
    assert all(d["type"] == n for n, d in events)
    assert names[0] == "message_start" and names[1] == "content_block_start"
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0 and start["stop_reason"] is None
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0


def test_tools_round_trip(claude):
    first = claude.messages.create(model=DEMO, max_tokens=160, tools=[WEATHER], tool_choice={"type": "any"},
                                   messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    use = [b for b in first.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and isinstance(use.input["city"], str)
    second = claude.messages.create(model=DEMO, max_tokens=8, tools=[WEATHER], tool_choice={"type": "none"},
                                    messages=[
                                        {"role": "user", "content": "What is the weather in Paris?"},
                                        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
                                        {"role": "user", "content": [
                                            {"type": "tool_result", "tool_use_id": use.id,
                                             "content": [{"type": "text", "text": "sunny, 21 C"}]}]}])
    assert second.content[0].type == "text" and second.stop_reason in ("end_turn", "max_tokens")
    # a named tool, streamed: input_json_delta, parsed by the SDK
    with claude.messages.stream(model=DEMO, max_tokens=160, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "input_json" in kinds or "content_block_delta" in kinds
    block = [b for b in final.content if b.type == "tool_use"][0]
    assert block.name == "get_weather" and "city" in block.input and final.stop_reason == "tool_use"


def test_count_tokens_matches_usage(claude):
    kw = dict(model=DEMO, system="Be brief.", tools=[WEATHER],
              messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    counted = claude.messages.count_tokens(**kw)
    used = claude.messages.create(max_tokens=1, **kw)
    assert counted.input_tokens == used.usage.input_tokens > 0
    plain = claude.messages.count_tokens(model=DEMO, messages=[{"role": "user", "content": "hi"}])
    assert 0 < plain.input_tokens < counted.input_tokens


def test_structured_output(claude):
    from typing import Literal

    from pydantic import BaseModel

    class Paint(BaseModel):
        color: Literal["red", "green", "blue"]
        coats: Literal[1, 2, 3]

    msg = claude.messages.parse(model=DEMO, max_tokens=160, output_format=Paint,
                                messages=[{"role": "user", "content": "Pick a paint color and a number of coats."}])
    assert isinstance(msg.parsed_output, Paint)
