"""The Responses API (/v1/responses): the openai SDK's client.responses
(create, stream, tools, structured output, previous_response_id), the
OpenAI Agents SDK with its default Responses model, raw SSE checked event by
event against the shared OpenAPI spec, and the bounded response store."""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import pytest
from pydantic import Field

DEMO = "thox-demo"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                               "required": ["city"], "additionalProperties": False}}

pytestmark = pytest.mark.timeout(300)

# each stream event's own schema in the spec (ResponseStreamEvent is their anyOf)
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
    "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent"}


def check_events(openapi, events: list[tuple[str, dict]]) -> None:
    for name, data in events:
        assert data["type"] == name
        openapi(data, EVENT_SCHEMAS[name])
        openapi(data, "ResponseStreamEvent")
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


def sse_named_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a Responses SSE body."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.strip().split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_create_text(client, server, openapi):
    r = client.responses.create(model=DEMO, input="Say hello.", instructions="Answer briefly.",
                                max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == DEMO
    assert r.status in ("completed", "incomplete")
    assert isinstance(r.output_text, str) and r.output_text
    msg = [o for o in r.output if o.type == "message"][0]
    assert msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 12
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    # the same call raw, validated against the spec
    raw = server.post("/responses", {"model": DEMO, "input": [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        "max_output_tokens": 12})
    assert raw.status_code == 200, raw.text
    openapi(raw.json(), "Response")


def test_stream_event_sequence(client, server, openapi):
    with client.responses.stream(model=DEMO, input="Count to five.", max_output_tokens=16,
                                 temperature=0) as stream:
        events = list(stream)
        kinds = [e.type for e in events]
        # the SDK's final response exists for response.completed; an answer cut
        # at max_output_tokens ends with response.incomplete (as OpenAI's does)
        final = stream.get_final_response() if kinds[-1] == "response.completed" else events[-1].response
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds and "response.output_text.done" in kinds
    assert kinds.index("response.output_item.added") < kinds.index("response.content_part.added") \
        < kinds.index("response.output_text.delta") < kinds.index("response.output_text.done") \
        < kinds.index("response.content_part.done") < kinds.index("response.output_item.done")
    assert final.output_text and final.usage.output_tokens > 0
    # raw: every event is in the spec, sequence numbers count up from 0, the deltas add up
    r = server.post("/responses", {"model": DEMO, "input": "Count to five.", "max_output_tokens": 16,
                                   "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_named_events(r.text)
    check_events(openapi, events)
    deltas = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    done = [d for n, d in events if n == "response.output_text.done"][0]
    assert deltas == done["text"] == events[-1][1]["response"]["output"][0]["content"][0]["text"]
    openapi(events[-1][1]["response"], "Response")


def test_function_call_and_result(client, server, openapi):
    first = client.responses.create(model=DEMO, input="What is the weather in Paris?", tools=[WEATHER_TOOL],
                                    tool_choice="required", max_output_tokens=160)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)
    # the tool's result goes back as input items; the answer is a message
    second = client.responses.create(model=DEMO, tools=[WEATHER_TOOL], max_output_tokens=12, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}], tool_choice="none")
    assert [o.type for o in second.output] == ["message"]
    asked = client.responses.create(model=DEMO, tools=[WEATHER_TOOL], max_output_tokens=1, tool_choice="none",
                                    input=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert second.usage.input_tokens > asked.usage.input_tokens + 8     # the call and its result are in the prompt
    # streamed: the arguments arrive as function_call_arguments events
    r = server.post("/responses", {"model": DEMO, "input": "Weather in Oslo?", "tools": [WEATHER_TOOL],
                                   "tool_choice": {"type": "function", "name": "get_weather"},
                                   "max_output_tokens": 160, "stream": True})
    events = sse_named_events(r.text)
    check_events(openapi, events)
    names = [n for n, _ in events]
    assert "response.function_call_arguments.delta" in names and "response.function_call_arguments.done" in names
    done = [d for n, d in events if n == "response.function_call_arguments.done"][0]
    assert done["name"] == "get_weather" and "city" in json.loads(done["arguments"])
    final = events[-1][1]["response"]
    assert final["output"][-1]["type"] == "function_call" and final["output"][-1]["arguments"] == done["arguments"]
    with client.responses.stream(model=DEMO, input="Weather in Rome?", tools=[WEATHER_TOOL],
                                 tool_choice="required", max_output_tokens=160) as stream:
        for _ in stream:
            pass
        fc = [o for o in stream.get_final_response().output if o.type == "function_call"]
    assert fc and fc[0].name == "get_weather"


def test_structured_output(client):
    from pydantic import BaseModel
    from typing import Literal

    class Paint(BaseModel):
        color: Literal["red", "green", "blue"]
        coats: Literal[1, 2, 3]

    r = client.responses.parse(model=DEMO, input="Pick a paint color and a number of coats.", text_format=Paint,
                               max_output_tokens=160)
    assert isinstance(r.output_parsed, Paint)
    r = client.responses.create(model=DEMO, input="A JSON object please.", max_output_tokens=40,
                                text={"format": {"type": "json_object"}})
    assert r.text.format.type == "json_object"


def test_previous_response_id_get_delete(client, server, openapi):
    import openai
    first = client.responses.create(model=DEMO, input="My name is Ada.", max_output_tokens=8)
    assert first.store is True
    second = client.responses.create(model=DEMO, previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=8)
    assert second.previous_response_id == first.id
    # the earlier turn (input and output) is part of the new prompt
    alone = client.responses.create(model=DEMO, input="What is my name?", max_output_tokens=8)
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    got = server.get(f"/responses/{first.id}")
    assert got.status_code == 200 and got.json()["id"] == first.id
    openapi(got.json(), "Response")
    assert client.responses.retrieve(first.id).output_text == first.output_text
    d = httpx.delete(f"{server.base_url}/responses/{first.id}", headers=server.headers, timeout=30)
    assert d.status_code == 200 and d.json() == {"id": first.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(first.id),
                 lambda: client.responses.delete(first.id),
                 lambda: client.responses.create(model=DEMO, previous_response_id=first.id, input="x")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        openapi(e.value.response.json(), "ErrorResponse")
        assert first.id in e.value.response.json()["error"]["message"]
    # store: false keeps nothing
    kept = client.responses.create(model=DEMO, input="hi", max_output_tokens=2, store=False)
    assert server.get(f"/responses/{kept.id}").status_code == 404


@pytest.mark.parametrize("body,param", [
    ({"model": DEMO}, "input"),
    ({"model": DEMO, "input": 5}, "input"),
    ({"model": DEMO, "input": [{"type": "message", "role": "pirate", "content": "x"}]}, "input[0].role"),
    ({"model": DEMO, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"model": DEMO, "input": "x", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"model": DEMO, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": DEMO, "input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
])
def test_bad_requests(server, openapi, body, param):
    r = server.post("/responses", body)
    assert r.status_code == 400, r.text
    openapi(r.json(), "ErrorResponse")
    assert r.json()["error"]["param"] == param


def test_store_is_bounded():
    from thox.api.responses import ResponseStore
    store = ResponseStore(max_items=3, max_bytes=10_000)
    for i in range(5):
        store.put({"id": f"r{i}"}, [{"role": "user", "content": "x"}])
    assert [k for k in ("r0", "r1", "r2", "r3", "r4") if store.delete(k)] == ["r2", "r3", "r4"]
    store.put({"id": "big"}, [{"role": "user", "content": "y" * 20_000}])
    store.put({"id": "small"}, [])
    assert not store.delete("big") and store.delete("small") and store.bytes == 0


def test_openai_agents_sdk(server):
    """A tool-using agent with the Agents SDK's default model (the Responses API)."""
    import asyncio

    from agents import (Agent, ModelSettings, RunConfig, Runner, function_tool, set_default_openai_client,
                        set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=server.base_url, api_key=server.key, max_retries=0),
                              use_for_tracing=False)
    seen: list[str] = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=20)]) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    agent = Agent(name="weather", instructions="Use the tool to answer.", model=DEMO, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=160),
                  tool_use_behavior="stop_on_first_tool")
    config = RunConfig(tracing_disabled=True)

    async def run() -> tuple[str, list[str], str]:
        result = await Runner.run(agent, "What is the weather in Paris?", run_config=config)
        streamed = Runner.run_streamed(agent, "And in Oslo?", run_config=config)
        kinds = [e.type async for e in streamed.stream_events()]
        return result.final_output, kinds, streamed.final_output

    final, kinds, streamed_final = asyncio.run(run())
    assert len(seen) == 2 and final == f"sunny in {seen[0]}", (seen, final, kinds, streamed_final)
    assert "raw_response_event" in kinds and streamed_final == f"sunny in {seen[1]}"
