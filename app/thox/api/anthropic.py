"""The Anthropic Messages API (``POST /v1/messages``, ``POST
/v1/messages/count_tokens``) as a translation layer over ``Service.chat``
(chatbridge): content blocks become chat messages, the result becomes
``thinking``/``text``/``tool_use`` blocks or Anthropic's SSE events. Errors on
these routes are in Anthropic's shape (``{"type": "error", "error": {...}}``).
``anthropic-version``, ``anthropic-beta`` and ``?beta=true`` are accepted and
change nothing.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, AsyncIterator, Literal, Union

from pydantic import Field
from quart import Quart

from ..errors import InvalidRequest
from . import chatbridge
from .body import json_body
from .chatbridge import ChatResult, Event
from .errors import restyle_errors
from .response_models import Reply, ToolCallOut
from .schemas import Base, ChatCompletionRequest, MessageCount, Probability, Temperature, TokenCount
from .state import app_state
from .wire import reply, sse_event, stream_response

PREFIX = "/v1/messages"
# HTTP status → Anthropic error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


# -- request ---------------------------------------------------------------------------
class AnthropicTool(Base):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(Base):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(Base):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Base):
    format: OutputFormat | None = None


class MessageParam(Base):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict[str, Any]]]


class CountTokensRequest(Base):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[MessageParam], Field(min_length=1), MessageCount]
    system: Union[str, list[dict[str, Any]], None] = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: TokenCount
    stop_sequences: list[str] | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None


def _text_blocks(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, kind, b in chatbridge.typed_parts(content, where, "expected a string or a list of text blocks"):
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        elif kind in ("image", "document", "search_result"):
            raise InvalidRequest(f"{where}.{i}: '{kind}' blocks are not supported by this model",
                                 param=f"{where}.{i}")
        else:
            raise InvalidRequest(f"{where}.{i}: expected {{'type': 'text', 'text': <string>}}", param=f"{where}.{i}")
    return "\n".join(texts) if len(texts) > 1 and where.startswith("system") else "".join(texts)


def _tools(tools: list[dict[str, Any]] | None) -> list[AnthropicTool]:
    out = []
    for i, t in enumerate(tools or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind not in (None, "custom"):
            raise InvalidRequest(f"tools.{i}: tool type {kind!r} is not supported here; only custom tools "
                                 f"(name, description, input_schema)", param=f"tools.{i}")
        out.append(AnthropicTool.model_validate(t))
    return out


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system is not None:
        system = _text_blocks(req.system, "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, b in enumerate(m.content):
            kind = b.get("type") if isinstance(b, dict) else None
            at = f"{where}.{j}"
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                    raise InvalidRequest(f"{at}: a tool_use block needs string 'id' and 'name'", param=at)
                calls.append({"id": b["id"], "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input") or {})}})
            elif kind == "tool_result" and m.role == "user":
                if not isinstance(b.get("tool_use_id"), str):
                    raise InvalidRequest(f"{at}: a tool_result block needs a string 'tool_use_id'", param=at)
                content = b.get("content", "")
                text = content if isinstance(content, str) else _text_blocks(content, f"{at}.content")
                if b.get("is_error"):
                    text = f"Error: {text}"
                results.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
            elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                continue  # earlier reasoning is not fed back to the model
            elif kind in ("image", "document", "search_result"):
                raise InvalidRequest(f"{at}: '{kind}' blocks are not supported by this model", param=at)
            else:
                raise InvalidRequest(f"{at}: block type {kind!r} is not supported in a '{m.role}' message",
                                     param=at)
        out.extend(results)
        if m.role == "assistant" and (texts or calls):
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif texts or not results:
            out.append({"role": m.role, "content": "".join(texts)})
    return out


def chat_request(req: CountTokensRequest) -> ChatCompletionRequest:
    tools = _tools(req.tools)
    chat: dict[str, Any] = {"model": req.model, "messages": chat_messages(req)}
    if tools:
        chat["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema,
            **({"description": t.description} if t.description is not None else {})}} for t in tools]
    tc = req.tool_choice
    if tc is not None:
        if tc.type == "tool":
            if not tc.name:
                raise InvalidRequest("tool_choice of type 'tool' needs 'name'", param="tool_choice.name")
            chat["tool_choice"] = {"type": "function", "function": {"name": tc.name}}
        elif tools or tc.type == "none":
            chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[tc.type]
    if isinstance(req, MessagesRequest):
        chat["max_completion_tokens"] = req.max_tokens
        for k in ("temperature", "top_p", "top_k"):
            if getattr(req, k) is not None:
                chat[k] = getattr(req, k)
        if req.stop_sequences:
            chat["stop"] = req.stop_sequences
        if req.output_config and req.output_config.format:
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": req.output_config.format.schema_}}
        if req.metadata and isinstance(req.metadata.get("user_id"), str):
            chat["user"] = req.metadata["user_id"]
    return ChatCompletionRequest.model_validate(chat)


# -- response --------------------------------------------------------------------------
StopReason = Literal["end_turn", "max_tokens", "tool_use"]


class ThinkingBlock(Reply):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class TextBlock(Reply):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(Reply):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(Reply):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class AnthropicMessage(Reply):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[Union[ThinkingBlock, TextBlock, ToolUseBlock], Field(discriminator="type")]]
    stop_reason: StopReason
    stop_sequence: None = None
    usage: AnthropicUsage


class MessageTokensCount(Reply):
    input_tokens: int


class AnthropicErrorDetail(Reply):
    type: str
    message: str


class AnthropicError(Reply):
    """Every error on these routes, and the last event of a stream that failed."""
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _tool_use(call: ToolCallOut) -> ToolUseBlock:
    try:
        args = json.loads(call.function.arguments or "{}")
    except ValueError:
        args = {}
    return ToolUseBlock(id="toolu_" + call.id.removeprefix("call_"), name=call.function.name,
                        input=args if isinstance(args, dict) else {"value": args})


def _stop_reason(res: ChatResult) -> StopReason:
    if res.tool_calls:
        return "tool_use"
    return "max_tokens" if res.finish_reason == "length" else "end_turn"


def message(mid: str, model: str, res: ChatResult) -> AnthropicMessage:
    content: list[Any] = []
    if res.reasoning:
        content.append(ThinkingBlock(thinking=res.reasoning))
    if res.text or not res.tool_calls:
        content.append(TextBlock(text=res.text))
    content.extend(_tool_use(c) for c in res.tool_calls)
    return AnthropicMessage(id=mid, model=model, content=content, stop_reason=_stop_reason(res),
                            usage=AnthropicUsage(input_tokens=res.prompt_tokens, output_tokens=res.completion_tokens))


def _event(kind: str, data: dict[str, Any]) -> str:
    return sse_event(kind, {"type": kind, **data})


async def stream_events(mid: str, model: str, source: AsyncIterator[Event], input_tokens: int) -> AsyncIterator[str]:
    yield _event("message_start", {"message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})
    index = -1
    current: str | None = None          # "thinking" | "text" while a block is open

    def start(kind: str) -> str:
        nonlocal index, current
        index, current = index + 1, kind
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else \
            {"type": "text", "text": ""}
        return _event("content_block_start", {"index": index, "content_block": block})

    def stop() -> list[str]:
        nonlocal current
        if current is None:
            return []
        out = []
        if current == "thinking":
            out.append(_event("content_block_delta", {"index": index,
                                                      "delta": {"type": "signature_delta", "signature": ""}}))
        current = None
        return out + [_event("content_block_stop", {"index": index})]

    async for e in source:
        if e.kind in ("reasoning", "text"):
            kind = "thinking" if e.kind == "reasoning" else "text"
            if current != kind:
                for chunk in stop():
                    yield chunk
                yield start(kind)
            delta = {"type": "thinking_delta", "thinking": e.text} if kind == "thinking" else \
                {"type": "text_delta", "text": e.text}
            yield _event("content_block_delta", {"index": index, "delta": delta})
        elif e.kind == "tool_calls":
            for chunk in stop():
                yield chunk
            for call in e.tool_calls:
                block = _tool_use(call)
                index += 1
                yield _event("content_block_start", {"index": index, "content_block": {**block.body(), "input": {}}})
                yield _event("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block.input, ensure_ascii=False)}})
                yield _event("content_block_stop", {"index": index})
        elif e.kind == "finish":
            res = e.result
            assert res is not None
            for chunk in stop():
                yield chunk
            if index < 0:                       # no output at all: one empty text block
                yield start("text")
                for chunk in stop():
                    yield chunk
            yield _event("message_delta", {"delta": {"stop_reason": _stop_reason(res), "stop_sequence": None},
                                           "usage": {"output_tokens": res.completion_tokens,
                                                     "input_tokens": res.prompt_tokens}})
            yield _event("message_stop", {})
            return
        elif e.kind == "error":
            err = e.error
            kind = "api_error" if err is None else "rate_limit_error" if err.type == "rate_limit_error" \
                else "overloaded_error" if err.code == "overloaded" else "api_error"
            message_ = (err.message if err is not None else "") or "generation failed"
            yield _event("error", {"error": {"type": kind, "message": message_}})
            return


# -- errors in Anthropic's shape -------------------------------------------------------------
def anthropic_error(status: int, error: dict[str, Any]) -> AnthropicError:
    return AnthropicError(error=AnthropicErrorDetail(type=ERROR_TYPES.get(status, "api_error"),
                                                     message=error.get("message") or ""))


# -- routes -------------------------------------------------------------------------------------
def register(app: Quart) -> None:
    @app.post(PREFIX)
    async def create_message():
        req = await json_body(MessagesRequest)
        chat = chat_request(req)
        mid = _id("msg")
        service = app_state().service
        if req.stream:
            input_tokens = await service.count_prompt(chat)
            source = await chatbridge.open_stream(service, chat)
            return stream_response(stream_events(mid, req.model, source, input_tokens))
        return reply(message(mid, req.model, await chatbridge.complete(service, chat)))

    @app.post(PREFIX + "/count_tokens")
    async def count_tokens():
        req = await json_body(CountTokensRequest)
        return reply(MessageTokensCount(input_tokens=await app_state().service.count_prompt(chat_request(req))))

    restyle_errors(app, PREFIX, anthropic_error)
