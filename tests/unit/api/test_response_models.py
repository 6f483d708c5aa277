"""Response models: which fields are written (always, or only when given),
and that their JSON schema says the same."""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from thox.api.response_models import (ChatChunkChoice, ChatCompletionChunk, ChatDelta, ChatMessage, CompletionChunk,
                                      CompletionUsage, ToolCallOut)


def _chunk(**kw) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="c", created=1, model="m", system_fingerprint="f", choices=[], **kw)


def test_optional_field_is_absent_null_or_set_as_given():
    assert "usage" not in _chunk().body()
    assert _chunk(usage=None).body()["usage"] is None
    assert _chunk(usage=CompletionUsage.of(2, 3, 1)).body()["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}}


def test_assignment_writes_an_optional_field():
    msg = ChatMessage(content="hi")
    assert msg.body() == {"role": "assistant", "content": "hi", "refusal": None}
    msg.tool_calls = [ToolCallOut(id="call_1", function={"name": "f", "arguments": "{}"})]
    msg.reasoning_content = "r"
    assert msg.body() == {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}], "reasoning_content": "r"}


def test_empty_delta_and_nested_sparse_models():
    c = _chunk(usage=None)
    c.choices = [ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason="stop")]
    assert c.body()["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert ChatDelta(role="assistant", content="").body() == {"role": "assistant", "content": ""}


def test_schema_requires_exactly_the_fields_always_written():
    _, defs = models_json_schema([(ChatCompletionChunk, "serialization"), (CompletionChunk, "serialization"),
                                  (ChatMessage, "serialization")])
    s = defs["$defs"]
    assert s["ChatCompletionChunk"]["required"] == ["id", "object", "created", "model", "system_fingerprint",
                                                    "choices"]
    assert s["CompletionChunk"]["required"] == ["id", "object", "created", "model", "choices"]
    assert s["ChatMessage"]["required"] == ["role", "content", "refusal"]
    assert s["ChatDelta"].get("required", []) == []
