"""The one road from the translation layers (Responses, Anthropic Messages,
Ollama) to the engine: each builds a ChatCompletionRequest and runs it through
``Service.chat``, then reads the result here as a ``ChatResult`` or as plain
events. Reasoning text (``<think>…</think>``) is split off here too, for chat
completions as well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from ..engine import chat_template
from ..errors import InvalidRequest
from .response_models import (ChatCompletion, ChatCompletionChunk, ChatDelta, Completion, CompletionChunk,
                              CompletionUsage, ErrorDetail, ErrorResponse, FinishReason, ToolCallOut)
from .schemas import ChatCompletionRequest, CompletionRequest, StreamOptions
from .service import ChatStream, CompletionStream, Service

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# -- content ---------------------------------------------------------------------------
def typed_parts(content: Any, where: str, expected: str) -> Iterator[tuple[int, str | None, Any]]:
    """Each part of a message's content list with its index and its ``type`` (None where the
    part is not an object); content that is not a list is a 400 saying ``{where}: {expected}``."""
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: {expected}", param=where)
    for i, part in enumerate(content):
        yield i, part.get("type") if isinstance(part, dict) else None, part

# -- reasoning ---------------------------------------------------------------------
def _held_back(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Splits generated text into reasoning and content, chunk by chunk: a
    leading ``<think>`` (or a prompt that already opened one) starts reasoning,
    ``</think>`` ends it. Text that may be part of a tag is held back until the
    next chunk decides."""

    def __init__(self, forced_open: bool = False):
        self.state = "thinking" if forced_open else "start"
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self.buf, self.state = s[len(THINK_OPEN):], "thinking"
                    continue
                if THINK_OPEN.startswith(s):
                    return out                     # too short to tell yet
                self.state = "content"
                continue
            if self.state == "thinking":
                i = self.buf.find(THINK_CLOSE)
                if i >= 0:
                    if i:
                        out.append(("reasoning", self.buf[:i]))
                    self.buf, self.state = self.buf[i + len(THINK_CLOSE):], "after"
                    continue
                keep = _held_back(self.buf, THINK_CLOSE)
                if len(self.buf) > keep:
                    out.append(("reasoning", self.buf[:len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep:]
                return out
            if self.state == "after":              # the blank line after </think> is no content
                s = self.buf.lstrip()
                if not s:
                    self.buf = ""
                    return out
                self.buf, self.state = s, "content"
                continue
            if self.buf:
                out.append(("text", self.buf))
                self.buf = ""
            return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.buf = self.buf, ""
        if not rest or self.state == "after":
            return []
        return [("reasoning" if self.state == "thinking" else "text", rest)]

    @property
    def passthrough(self) -> bool:
        """Nothing held back and no reasoning can follow: text goes out as is."""
        return self.state == "content" and not self.buf


def _forced_open(template: str | None, bos: str, eos: str) -> bool:
    """Whether the model's chat template opens ``<think>`` in the generation
    prompt itself (the model's output then starts inside the reasoning).
    Renders the template: CPU work for a preparation thread."""
    if not template or THINK_OPEN not in template:
        return False
    try:
        prompt = chat_template.render(template, [{"role": "user", "content": "x"}], tools=None,
                                      bos_token=bos, eos_token=eos)
    except Exception:  # a template that cannot render this probe opens nothing
        return False
    return prompt.rstrip().endswith(THINK_OPEN)


_forced_cache: dict[tuple[str, str], bool] = {}


async def forced_open(service: Service, model_id: str) -> bool:
    """``_forced_open`` for the model (loaded here when it is not yet),
    worked out once per model id and file, on the service's preparation threads."""
    m = (await service.manager.get(model_id)).model
    key = (m.id, str(m.path))
    if key not in _forced_cache:
        _forced_cache[key] = await service.prepare(
            _forced_open, m.metadata.get("tokenizer.chat_template"), m.bos_token, m.eos_token)
    return _forced_cache[key]


def split_reasoning(text: str, splitter: ThinkSplitter) -> tuple[str, str]:
    """(reasoning, content) of a whole generated text."""
    parts = splitter.feed(text) + splitter.flush()
    return ("".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "text"))


# -- chat completions with reasoning split off ----------------------------------------
async def chat(service: Service, req: ChatCompletionRequest) -> ChatCompletion | ChatStream:
    """``Service.chat`` with ``<think>`` text moved to ``reasoning_content``
    (in the message, and in the stream deltas)."""
    forced = await forced_open(service, req.model)
    result = await service.chat(req)
    if isinstance(result, ChatCompletion):
        for choice in result.choices:
            msg = choice.message
            if isinstance(msg.content, str):
                reasoning, content = split_reasoning(msg.content, ThinkSplitter(forced))
                if reasoning:
                    msg.reasoning_content = reasoning
                    msg.content = content if (content or not msg.tool_calls) else None
        return result
    return _split_stream(result, lambda: ThinkSplitter(forced))


async def _split_stream(body: ChatStream, make: Callable[[], ThinkSplitter]) -> ChatStream:
    splitters: dict[int, ThinkSplitter] = {}
    try:
        async for chunk in body:
            if not isinstance(chunk, ChatCompletionChunk) or len(chunk.choices) != 1:
                yield chunk
                continue
            choice = chunk.choices[0]
            sp = splitters.setdefault(choice.index, make())
            delta = choice.delta
            if sp.passthrough and choice.finish_reason is None:
                yield chunk
                continue
            if choice.finish_reason is not None:
                rest = _delta_of(sp.flush())
                if rest.model_fields_set:
                    yield chunk.model_copy(update={"choices": [
                        choice.model_copy(update={"delta": rest, "finish_reason": None})]})
                yield chunk
                continue
            content = delta.content
            if content is None or (not content and "role" in delta.model_fields_set):
                yield chunk
                continue
            new = _delta_of(sp.feed(content), {k: getattr(delta, k) for k in delta.model_fields_set
                                              if k != "content"})
            if new.model_fields_set or choice.logprobs:
                yield chunk.model_copy(update={"choices": [choice.model_copy(update={"delta": new})]})
    finally:
        await body.aclose()


def _delta_of(parts: list[tuple[str, str]], keep: dict[str, Any] | None = None) -> ChatDelta:
    """A delta with ``keep``'s fields and the reasoning and content of ``parts``."""
    d: dict[str, Any] = dict(keep or {})
    for kind, text in parts:
        key = "reasoning_content" if kind == "reasoning" else "content"
        d[key] = d.get(key, "") + text
    return ChatDelta(**d)


# -- results as plain data, for the translation layers ------------------------------------
@dataclass
class ChatResult:
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def count(self, usage: CompletionUsage | None) -> None:
        if usage is not None:
            self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            self.cached_tokens = usage.prompt_tokens_details.cached_tokens


@dataclass
class Event:
    kind: str            # text | reasoning | tool_calls | finish | error
    text: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)
    result: ChatResult | None = None       # on "finish": the totals
    error: ErrorDetail | None = None       # on "error": the OpenAI error object


async def complete(service: Service, req: ChatCompletionRequest) -> ChatResult:
    """Run ``req`` (not streamed) and return its first choice."""
    req.stream = False
    body = await chat(service, req)
    assert isinstance(body, ChatCompletion)
    choice = body.choices[0]
    msg = choice.message
    res = ChatResult(text=msg.content or "", reasoning=msg.reasoning_content or "",
                     tool_calls=list(msg.tool_calls or []), finish_reason=choice.finish_reason)
    res.count(body.usage)
    return res


async def open_stream(service: Service, req: ChatCompletionRequest) -> AsyncIterator[Event]:
    """Admit ``req`` as a stream (errors are raised here, before any response
    header is sent) and return its events: text and reasoning deltas, tool
    calls, then one ``finish`` with the totals, or an ``error``."""
    req.stream = True
    req.stream_options = StreamOptions(include_usage=True)
    req.n = 1
    body = await chat(service, req)
    assert not isinstance(body, ChatCompletion)
    return _events(body)


async def open_text_stream(service: Service, req: CompletionRequest) -> AsyncIterator[Event]:
    """``open_stream`` for a legacy completion (raw prompts, fill-in-the-middle)."""
    req.stream = True
    req.stream_options = StreamOptions(include_usage=True)
    req.n = 1
    body = await service.completions(req)
    assert not isinstance(body, Completion)
    return _events(body)


async def complete_text(service: Service, req: CompletionRequest) -> ChatResult:
    req.stream = False
    body = await service.completions(req)
    assert isinstance(body, Completion)
    choice = body.choices[0]
    res = ChatResult(text=choice.text, finish_reason=choice.finish_reason or "stop")
    res.count(body.usage)
    return res


async def _events(body: Union[ChatStream, CompletionStream]) -> AsyncIterator[Event]:
    res = ChatResult()
    text: list[str] = []
    reasoning: list[str] = []
    try:
        async for chunk in body:
            if isinstance(chunk, ErrorResponse):
                yield Event("error", error=chunk.error)
                return
            res.count(chunk.usage)
            for choice in chunk.choices:
                if isinstance(chunk, CompletionChunk):
                    piece, calls = choice.text, []
                else:
                    delta = choice.delta
                    if delta.reasoning_content:
                        reasoning.append(delta.reasoning_content)
                        yield Event("reasoning", text=delta.reasoning_content)
                    piece = delta.content
                    calls = [ToolCallOut(id=c.id, function=c.function) for c in delta.tool_calls or []]
                if piece:
                    text.append(piece)
                    yield Event("text", text=piece)
                if calls:
                    res.tool_calls.extend(calls)
                    yield Event("tool_calls", tool_calls=calls)
                if choice.finish_reason:
                    res.finish_reason = choice.finish_reason
        res.text, res.reasoning = "".join(text), "".join(reasoning)
        yield Event("finish", result=res)
    finally:
        await body.aclose()
