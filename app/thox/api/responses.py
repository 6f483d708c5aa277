"""The OpenAI Responses API (``POST /v1/responses``, ``GET``/``DELETE
/v1/responses/{id}``) as a translation layer: a request becomes chat
messages, runs through ``Service.chat`` (chatbridge), and the result becomes
output items (``reasoning``, ``message``, ``function_call``) or the
documented stream of ``response.*`` events. Stored responses live in a
bounded in-memory store (``response_store.py``), so ``previous_response_id``
continues a conversation.
"""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, AsyncIterator, Literal, Union

from pydantic import Field
from quart import Quart, jsonify

from ..errors import InvalidRequest, NotFound
from . import chatbridge
from .body import json_body
from .chatbridge import ChatResult, Event
from .response_models import (DeletedResponse, FunctionCallItem, IncompleteDetails, InputTokensDetails, ItemStatus,
                              MessageItem, OutputItem, OutputText, ReasoningItem, ReasoningText, Reply,
                              ResponseError, ResponseFunctionTool, ResponseObject, ResponseStatus,
                              ResponseTextConfig, ResponseUsage, ToolCallOut)
from .response_store import ResponseStore
from .schemas import Base, ChatCompletionRequest, FunctionDef, MessageCount, Probability, Temperature, TokenCount
from .state import app_state
from .wire import reply, sse_event, stream_response


# -- request --------------------------------------------------------------------------
class FunctionTool(FunctionDef):
    type: Literal["function"]


class NamedFunction(Base):
    type: Literal["function"]
    name: str


class TextFormat(Base):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Base):
    format: TextFormat | None = None


class ResponsesRequest(Base):
    model: Annotated[str, Field(min_length=1)]
    input: Annotated[Union[str, list[dict[str, Any]]], MessageCount]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    text: TextConfig | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    max_output_tokens: TokenCount | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


def _function_tools(tools: list[dict[str, Any]] | None) -> list[FunctionTool]:
    out = []
    for i, t in enumerate(tools or []):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise InvalidRequest(f"tools[{i}]: tool type {kind!r} is not supported here; use "
                                 f"{{'type': 'function', 'name': ..., 'parameters': ...}}", param=f"tools[{i}]")
        out.append(FunctionTool.model_validate(t))
    return out


# -- input items → chat messages ------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, kind, part in chatbridge.typed_parts(content, where, "content must be a string or a list of text parts"):
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise InvalidRequest(f"{where}[{i}]: '{kind}' is not supported by this model", param=f"{where}[{i}]")
        else:
            raise InvalidRequest(f"{where}[{i}]: expected {{'type': 'input_text', 'text': <string>}}",
                                 param=f"{where}[{i}]")
    return "".join(texts)


def input_messages(inp: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the Responses ``input`` (a string or a list of items)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: expected an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"{where}.role: expected user, assistant, system or developer",
                                     param=f"{where}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
                raise InvalidRequest(f"{where}: a function_call needs string 'call_id', 'name' and 'arguments'",
                                     param=where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = out[-1] if out else None
            if last and last["role"] == "assistant" and last.get("_open"):
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call], "_open": True})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{where}: a function_call_output needs a string 'call_id'", param=where)
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": output if isinstance(output, str) else _text_of(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # earlier reasoning is not fed back to the model
        else:
            raise InvalidRequest(f"{where}: input item type {kind!r} is not supported", param=f"{where}.type")
        if kind == "message" and out[-1]["role"] == "assistant":
            out[-1]["_open"] = True   # function calls right after it belong to the same turn
    for m in out:
        m.pop("_open", None)
    return out


def assistant_message(res: ChatResult) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": res.text if (res.text or not res.tool_calls) else None}
    if res.tool_calls:
        msg["tool_calls"] = [c.model_dump() for c in res.tool_calls]
    return msg


# -- building the response ------------------------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _usage(res: ChatResult) -> ResponseUsage:
    return ResponseUsage(input_tokens=res.prompt_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=res.cached_tokens),
                         output_tokens=res.completion_tokens, total_tokens=res.prompt_tokens + res.completion_tokens)


def reasoning_item(rid: str, text: str, status: ItemStatus = "completed") -> ReasoningItem:
    return ReasoningItem(id=rid, status=status, content=[ReasoningText(text=text)]
                         if text or status != "in_progress" else [])


def message_item(mid: str, text: str, status: ItemStatus = "completed") -> MessageItem:
    return MessageItem(id=mid, status=status, content=[OutputText(text=text)] if status != "in_progress" else [])


def function_item(call: ToolCallOut, status: ItemStatus = "completed") -> FunctionCallItem:
    return FunctionCallItem(id="fc_" + call.id.removeprefix("call_"), call_id=call.id, name=call.function.name,
                            arguments=call.function.arguments if status == "completed" else "", status=status)


class Turn:
    """One Responses request on its way through: the chat request it became
    and the response object it will be."""

    def __init__(self, req: ResponsesRequest, store: ResponseStore):
        self.req = req
        self.store = store
        self.id = _new_id("resp")
        self.created = int(time.time())
        tools = _function_tools(req.tools)
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            _, history = store.get(req.previous_response_id)
        self.history = history + input_messages(req.input)
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + self.history
        if not messages:
            raise InvalidRequest("input is empty", param="input")
        chat: dict[str, Any] = {"model": req.model, "messages": messages}
        if tools:
            chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in tools]
        if isinstance(req.tool_choice, NamedFunction):
            chat["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
        elif req.tool_choice is not None:
            chat["tool_choice"] = req.tool_choice
        fmt = req.text.format if req.text else None
        if fmt is not None and fmt.type != "text":
            chat["response_format"] = ({"type": "json_object"} if fmt.type == "json_object" else
                                       {"type": "json_schema", "json_schema": {
                                           "name": fmt.name, "schema": fmt.schema_ or {"type": "object"},
                                           **({"strict": fmt.strict} if fmt.strict is not None else {})}})
        for k in ("temperature", "top_p", "user"):
            if getattr(req, k) is not None:
                chat[k] = getattr(req, k)
        if req.max_output_tokens is not None:
            chat["max_completion_tokens"] = req.max_output_tokens
        self.chat = ChatCompletionRequest.model_validate(chat)
        self.tools = tools

    def response(self, status: ResponseStatus, output: list[OutputItem], res: ChatResult | None,
                 error: ResponseError | None = None) -> ResponseObject:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format \
            else {"type": "text"}
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else \
            (req.tool_choice or "auto")
        body = ResponseObject(
            id=self.id, created_at=self.created, status=status,
            completed_at=int(time.time()) if status == "completed" else None, error=error,
            incomplete_details=IncompleteDetails() if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, model=req.model,
            output=output, parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id, store=req.store is not False,
            temperature=1.0 if req.temperature is None else req.temperature,
            text=ResponseTextConfig(format=fmt), tool_choice=choice,
            tools=[ResponseFunctionTool(name=t.name, description=t.description, parameters=t.parameters,
                                        strict=bool(t.strict)) for t in self.tools],
            top_p=1.0 if req.top_p is None else req.top_p, metadata=req.metadata or {})
        if res is not None:
            body.usage = _usage(res)
        if req.user is not None:
            body.user = req.user
        return body

    def finish(self, output: list[OutputItem], res: ChatResult) -> ResponseObject:
        body = self.response("incomplete" if res.finish_reason == "length" else "completed", output, res)
        if self.req.store is not False:
            self.store.put(body.body(), self.history + [assistant_message(res)])
        return body

    # -- whole ---------------------------------------------------------------------------
    def output_of(self, res: ChatResult) -> list[OutputItem]:
        out: list[OutputItem] = []
        if res.reasoning:
            out.append(reasoning_item(_new_id("rs"), res.reasoning))
        if res.text or not res.tool_calls:
            out.append(message_item(_new_id("msg"), res.text,
                                    "incomplete" if res.finish_reason == "length" else "completed"))
        out.extend(function_item(c) for c in res.tool_calls)
        return out

    # -- streamed --------------------------------------------------------------------------
    async def events(self, source: AsyncIterator[Event]) -> AsyncIterator[str]:
        seq = 0
        output: list[OutputItem] = []
        current: dict[str, Any] | None = None     # the open reasoning or message item
        parts: list[str] = []

        def ev(kind: str, **fields: Any) -> str:
            nonlocal seq
            data = {"type": kind, "sequence_number": seq,
                    **{k: v.body() if isinstance(v, Reply) else v for k, v in fields.items()}}
            seq += 1
            return sse_event(kind, data)

        def open_item(kind: str) -> list[str]:
            nonlocal current, parts
            current, parts = {"kind": kind, "id": _new_id("rs" if kind == "reasoning" else "msg"),
                              "index": len(output)}, []
            item = (reasoning_item(current["id"], "", "in_progress") if kind == "reasoning"
                    else message_item(current["id"], "", "in_progress"))
            output.append(item)
            out = [ev("response.output_item.added", output_index=current["index"], item=item)]
            if kind == "text":
                out.append(ev("response.content_part.added", item_id=current["id"], output_index=current["index"],
                              content_index=0, part=OutputText(text="")))
            return out

        def close_item(status: ItemStatus = "completed") -> list[str]:
            nonlocal current
            if current is None:
                return []
            text, idx, iid = "".join(parts), current["index"], current["id"]
            item: OutputItem
            if current["kind"] == "reasoning":
                item = reasoning_item(iid, text, status)
                out = [ev("response.reasoning_text.done", item_id=iid, output_index=idx, content_index=0, text=text)]
            else:
                item = message_item(iid, text, status)
                out = [ev("response.output_text.done", item_id=iid, output_index=idx, content_index=0, text=text,
                          logprobs=[]),
                       ev("response.content_part.done", item_id=iid, output_index=idx, content_index=0,
                          part=OutputText(text=text))]
            output[idx] = item
            out.append(ev("response.output_item.done", output_index=idx, item=item))
            current = None
            return out

        yield ev("response.created", response=self.response("in_progress", [], None))
        yield ev("response.in_progress", response=self.response("in_progress", [], None))
        async for e in source:
            if e.kind in ("reasoning", "text"):
                if current is None or current["kind"] != e.kind:
                    for chunk in close_item() + open_item(e.kind):
                        yield chunk
                assert current is not None
                parts.append(e.text)
                kind = "response.reasoning_text.delta" if e.kind == "reasoning" else "response.output_text.delta"
                extra = {} if e.kind == "reasoning" else {"logprobs": []}
                yield ev(kind, item_id=current["id"], output_index=current["index"], content_index=0,
                         delta=e.text, **extra)
            elif e.kind == "tool_calls":
                for chunk in close_item():
                    yield chunk
                for call in e.tool_calls:
                    idx, item = len(output), function_item(call, "in_progress")
                    output.append(item)
                    yield ev("response.output_item.added", output_index=idx, item=item)
                    args = call.function.arguments
                    yield ev("response.function_call_arguments.delta", item_id=item.id, output_index=idx,
                             delta=args)
                    yield ev("response.function_call_arguments.done", item_id=item.id, output_index=idx,
                             name=call.function.name, arguments=args)
                    output[idx] = function_item(call)
                    yield ev("response.output_item.done", output_index=idx, item=output[idx])
            elif e.kind == "finish":
                res = e.result
                assert res is not None
                status: ItemStatus = "incomplete" if res.finish_reason == "length" else "completed"
                for chunk in close_item(status):
                    yield chunk
                if not any(i.type in ("message", "function_call") for i in output):
                    for chunk in open_item("text") + close_item(status):   # no answer: one empty message
                        yield chunk
                body = self.finish(output, res)
                yield ev("response.incomplete" if body.status == "incomplete" else "response.completed",
                         response=body)
                return
            elif e.kind == "error":
                for chunk in close_item("incomplete"):
                    yield chunk
                err = e.error
                code = "rate_limit_exceeded" if err is not None and err.type == "rate_limit_error" else "server_error"
                yield ev("response.failed", response=self.response("failed", output, None, ResponseError(
                    code=code, message=(err.message if err is not None else "") or "generation failed")))
                return


# -- routes ------------------------------------------------------------------------------------
def register(app: Quart) -> None:
    @app.post("/v1/responses")
    async def create_response():
        req = await json_body(ResponsesRequest)
        turn = Turn(req, app_state().responses)
        if req.stream:
            return stream_response(turn.events(await chatbridge.open_stream(app_state().service, turn.chat)))
        res = await chatbridge.complete(app_state().service, turn.chat)
        return reply(turn.finish(turn.output_of(res), res))

    @app.get("/v1/responses/<rid>")
    async def get_response(rid: str):
        return jsonify(app_state().responses.get(rid)[0])

    @app.delete("/v1/responses/<rid>")
    async def delete_response(rid: str):
        if not app_state().responses.delete(rid):
            raise NotFound(f"Response with id '{rid}' not found.", param="response_id")
        return reply(DeletedResponse(id=rid))
