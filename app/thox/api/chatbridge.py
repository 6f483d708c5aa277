"""The one road from the translation layers (Responses, Anthropic Messages,
Ollama) to the engine: each builds a ChatCompletionRequest and runs it through
``Service.chat``, then reads the result here as plain events. Reasoning text
(``<think>…</think>``) is split off here too, for chat completions as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..engine import chat_template
from .schemas import ChatCompletionRequest, CompletionRequest, StreamOptions
from .service import Service, sse

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
    prompt itself (the model's output then starts inside the reasoning)."""
    if not template or THINK_OPEN not in template:
        return False
    try:
        prompt = chat_template.render(template, [{"role": "user", "content": "x"}], tools=None,
                                      bos_token=bos, eos_token=eos)
    except Exception:  # a template that cannot render this probe opens nothing
        return False
    return prompt.rstrip().endswith(THINK_OPEN)


_forced_cache: dict[tuple[str, str], bool] = {}


def think_splitter(service: Service, model_id: str) -> ThinkSplitter:
    w = service.manager.workers.get(model_id)
    forced = False
    if w is not None:
        m = w.model
        key = (m.id, str(m.path))
        if key not in _forced_cache:
            _forced_cache[key] = _forced_open(m.metadata.get("tokenizer.chat_template"), m.bos_token, m.eos_token)
        forced = _forced_cache[key]
    return ThinkSplitter(forced)


def split_reasoning(text: str, splitter: ThinkSplitter) -> tuple[str, str]:
    """(reasoning, content) of a whole generated text."""
    parts = splitter.feed(text) + splitter.flush()
    return ("".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "text"))


# -- chat completions with reasoning split off ----------------------------------------
async def chat(service: Service, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
    """``Service.chat`` with ``<think>`` text moved to ``reasoning_content``
    (in the message, and in the stream deltas)."""
    result = await service.chat(req)
    if isinstance(result, dict):
        for choice in result["choices"]:
            msg = choice["message"]
            if isinstance(msg.get("content"), str):
                reasoning, content = split_reasoning(msg["content"], think_splitter(service, req.model))
                if reasoning:
                    msg["reasoning_content"] = reasoning
                    msg["content"] = content if (content or not msg.get("tool_calls")) else None
        return result
    return _split_stream(result, lambda: think_splitter(service, req.model))


async def _split_stream(body: AsyncIterator[str], make) -> AsyncIterator[str]:
    splitters: dict[int, ThinkSplitter] = {}
    try:
        async for chunk in body:
            obj = _parse_sse(chunk)
            if not isinstance(obj, dict) or len(obj.get("choices") or []) != 1:
                yield chunk
                continue
            choice = obj["choices"][0]
            sp = splitters.setdefault(choice.get("index", 0), make())
            delta = choice.get("delta") or {}
            if sp.passthrough and choice.get("finish_reason") is None:
                yield chunk
                continue
            if choice.get("finish_reason") is not None:
                rest = _delta_of(sp.flush())
                if rest:
                    yield sse({**obj, "choices": [{**choice, "delta": rest, "finish_reason": None}]})
                yield chunk
                continue
            content = delta.get("content")
            if not isinstance(content, str) or (not content and "role" in delta):
                yield chunk
                continue
            new = {k: v for k, v in delta.items() if k != "content"}
            new.update(_delta_of(sp.feed(content)))
            if new or choice.get("logprobs"):
                yield sse({**obj, "choices": [{**choice, "delta": new}]})
    finally:
        await body.aclose()


def _delta_of(parts: list[tuple[str, str]]) -> dict[str, str]:
    d: dict[str, str] = {}
    for kind, text in parts:
        key = "reasoning_content" if kind == "reasoning" else "content"
        d[key] = d.get(key, "") + text
    return d


def _parse_sse(chunk: str) -> Any:
    if not chunk.startswith("data: "):
        return None
    data = chunk[len("data: "):].strip()
    if data == "[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


# -- results as plain data, for the translation layers ------------------------------------
@dataclass
class ChatResult:
    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)   # OpenAI chat tool_calls
    finish_reason: str = "stop"                                       # stop | length | tool_calls
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Event:
    kind: str            # text | reasoning | tool_calls | finish | error
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    result: ChatResult | None = None       # on "finish": the totals
    error: dict[str, Any] | None = None    # on "error": the OpenAI error object


def _usage_into(res: ChatResult, usage: dict[str, Any] | None) -> None:
    if usage:
        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.completion_tokens = int(usage.get("completion_tokens") or 0)
        res.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


async def complete(service: Service, req: ChatCompletionRequest) -> ChatResult:
    """Run ``req`` (not streamed) and return its first choice."""
    req.stream = False
    body = await chat(service, req)
    assert isinstance(body, dict)
    choice = body["choices"][0]
    msg = choice["message"]
    res = ChatResult(text=msg.get("content") or "", reasoning=msg.get("reasoning_content") or "",
                     tool_calls=list(msg.get("tool_calls") or []), finish_reason=choice["finish_reason"])
    _usage_into(res, body.get("usage"))
    return res


async def open_stream(service: Service, req: ChatCompletionRequest) -> AsyncIterator[Event]:
    """Admit ``req`` as a stream (errors are raised here, before any response
    header is sent) and return its events: text and reasoning deltas, tool
    calls, then one ``finish`` with the totals, or an ``error``."""
    req.stream = True
    req.stream_options = StreamOptions(include_usage=True)
    req.n = 1
    body = await chat(service, req)
    assert not isinstance(body, dict)
    return _events(body)


async def open_text_stream(service: Service, req: CompletionRequest) -> AsyncIterator[Event]:
    """``open_stream`` for a legacy completion (raw prompts, fill-in-the-middle)."""
    req.stream = True
    req.stream_options = StreamOptions(include_usage=True)
    req.n = 1
    return _events(await service.completions(req))


async def complete_text(service: Service, req: CompletionRequest) -> ChatResult:
    req.stream = False
    body = await service.completions(req)
    choice = body["choices"][0]
    res = ChatResult(text=choice.get("text") or "", finish_reason=choice["finish_reason"])
    _usage_into(res, body.get("usage"))
    return res


async def _events(body: AsyncIterator[str]) -> AsyncIterator[Event]:
    res = ChatResult()
    text: list[str] = []
    reasoning: list[str] = []
    try:
        async for chunk in body:
            obj = _parse_sse(chunk)
            if not isinstance(obj, dict):
                continue
            if "error" in obj:
                yield Event("error", error=obj["error"])
                return
            if obj.get("usage"):
                _usage_into(res, obj["usage"])
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):
                    reasoning.append(delta["reasoning_content"])
                    yield Event("reasoning", text=delta["reasoning_content"])
                piece = delta.get("content") or choice.get("text")     # chat delta | completion text
                if piece:
                    text.append(piece)
                    yield Event("text", text=piece)
                if delta.get("tool_calls"):
                    calls = [{k: v for k, v in c.items() if k != "index"} for c in delta["tool_calls"]]
                    res.tool_calls.extend(calls)
                    yield Event("tool_calls", tool_calls=calls)
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
        res.text, res.reasoning = "".join(text), "".join(reasoning)
        yield Event("finish", result=res)
    finally:
        await body.aclose()
