"""A subset of Ollama's native API for clients that speak only it (VS Code
Copilot's Ollama provider, Open WebUI's Ollama connection, the ``ollama``
libraries): ``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``,
``/api/chat``, ``/api/generate`` (NDJSON streams, on by default as in
Ollama), ``/api/embed`` and ``/api/embeddings``. Same models, same engine:
chat goes through ``Service.chat`` (chatbridge), raw and fill-in-the-middle
generation through ``Service.completions``, embeddings through
``Service.embeddings``. Errors are ``{"error": "message"}``.

Authentication is the API key, like every API route; ``api.ollama_keyless``
lets requests without any key through on these routes (for clients that
cannot send one).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from quart import Quart, Response

from ..errors import InvalidRequest
from ..store.store import Manifest
from . import chatbridge, modelinfo
from .body import json_body
from .chatbridge import ChatResult, Event
from .errors import restyle_errors
from .ollama_models import (ChatBody, EmbedBody, GenerateBody, OllamaChatResponse, OllamaDetails,
                            OllamaEmbed, OllamaEmbedding, OllamaError, OllamaGenerateResponse, OllamaLoadedModel,
                            OllamaLoadedModels, OllamaMessage, OllamaModel, OllamaModels, OllamaRequest, OllamaShow,
                            OllamaToolCall, OllamaToolFunction, OllamaVersion)
from .response_models import EmbeddingList, Reply, ToolCallOut
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from .state import app_state
from .wire import NDJSON_HEADERS, dumps, reply, stream_response

PREFIX = "/api/"
# the Ollama API level these routes follow (clients check it before use)
OLLAMA_VERSION = "0.12.0"


def resolve(name: str | None) -> str:
    """The installed model ``name`` names; Ollama clients may add ``:latest``."""
    if not name:
        raise InvalidRequest("model is required", param="model")
    store = app_state().manager.store
    if not store.has(name) and name.endswith(":latest") and store.has(name.removesuffix(":latest")):
        return name.removesuffix(":latest")
    app_state().manager.manifest(name)     # raises the not-found error
    return name


# -- model listing -------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _details(m: Manifest) -> OllamaDetails:
    return OllamaDetails(family=m.architecture, families=[m.architecture])


def _listing(m: Manifest) -> dict[str, Any]:
    """The fields of ``OllamaModel`` for ``m``."""
    return {"name": m.id, "model": m.id, "modified_at": _iso(m.created), "size": m.size,
            "digest": m.sha256, "details": _details(m)}


def _capabilities(m: Manifest) -> list[str]:
    caps = modelinfo.capabilities(m)
    names = {"completion": "completion", "tools": "tools", "fim": "insert", "embeddings": "embedding",
             "vision": "vision"}
    return [name for key, name in names.items() if caps.get(key)]


# -- options → chat/completion fields ---------------------------------------------------------
def _sampling(body: OllamaRequest) -> dict[str, Any]:
    o = body.options or {}
    out: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                     ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty")):
        if o.get(src) is not None:
            out[dst] = o[src]
    if isinstance(out.get("temperature"), int) and not isinstance(out["temperature"], bool):
        out["temperature"] = float(out["temperature"])
    if isinstance(o.get("num_predict"), int) and o["num_predict"] > 0:
        out["max_tokens"] = o["num_predict"]
    stop = o.get("stop")
    if stop:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    return out


def _format(fmt: Any) -> dict[str, Any] | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": fmt}}
    raise InvalidRequest("format must be \"json\" or a JSON schema object", param="format")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages as chat messages. Ollama's tool calls carry no ids, so
    each gets one here and each tool message answers the oldest open call."""
    out: list[dict[str, Any]] = []
    open_calls: list[str] = []
    n = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"messages[{i}]: expected a role of system, user, assistant or tool",
                                 param=f"messages[{i}].role")
        if m.get("images"):
            raise InvalidRequest(f"messages[{i}]: images are not supported by this model", param=f"messages[{i}]")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        if m["role"] == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise InvalidRequest(f"messages[{i}].tool_calls must be a list", param=f"messages[{i}].tool_calls")
            calls = []
            for c in m["tool_calls"]:
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise InvalidRequest(f"messages[{i}].tool_calls: each needs function.name", param=f"messages[{i}]")
                args = f.get("arguments") or {}
                n += 1
                cid = c.get("id") if isinstance(c.get("id"), str) else f"call_{n}"
                open_calls.append(cid)
                calls.append({"id": cid, "type": "function", "function": {
                    "name": f["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
            out.append({"role": "assistant", "content": content or None, "tool_calls": calls})
        elif m["role"] == "tool":
            cid = m.get("tool_call_id") if isinstance(m.get("tool_call_id"), str) else \
                (open_calls.pop(0) if open_calls else f"call_{n + 1}")
            out.append({"role": "tool", "tool_call_id": cid, "content": content})
        else:
            out.append({"role": m["role"], "content": content})
    return out


def chat_request(body: ChatBody) -> ChatCompletionRequest:
    chat: dict[str, Any] = {"model": resolve(body.model_name), "messages": chat_messages(body.messages)}
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.get("function") or {}} for t in body.tools]
    fmt = _format(body.format)
    if fmt:
        chat["response_format"] = fmt
    chat.update(_sampling(body))
    return ChatCompletionRequest.model_validate(chat)


# -- output ----------------------------------------------------------------------------------------
def _output(res: ChatResult) -> dict[str, Any]:
    """The answer's fields for ``_answer``: text, and reasoning and tool calls when there are any."""
    out: dict[str, Any] = {"content": res.text}
    if res.reasoning:
        out["thinking"] = res.reasoning
    if res.tool_calls:
        out["tool_calls"] = _tool_calls(res.tool_calls)
    return out


def _stats(res: ChatResult, t0: float) -> dict[str, Any]:
    total = int((time.monotonic() - t0) * 1e9)
    return {"done_reason": "length" if res.finish_reason == "length" else "stop",
            "total_duration": total, "load_duration": 0, "prompt_eval_count": res.prompt_tokens,
            "prompt_eval_duration": 0, "eval_count": res.completion_tokens, "eval_duration": total}


def _tool_calls(calls: list[ToolCallOut]) -> list[OllamaToolCall]:
    out = []
    for c in calls:
        try:
            args = json.loads(c.function.arguments or "{}")
        except ValueError:
            args = {}
        out.append(OllamaToolCall(id=c.id, function=OllamaToolFunction(
            name=c.function.name, arguments=args if isinstance(args, dict) else {})))
    return out


def _answer(model: str, chat: bool, **fields: Any) -> Reply:
    """A chat or generate answer; ``content``, ``thinking`` and ``tool_calls``
    go into the message of a chat answer, the rest at the top."""
    inner = {k: fields.pop(k) for k in ("content", "thinking", "tool_calls") if k in fields}
    if chat:
        return OllamaChatResponse(model=model, created_at=_iso(time.time()), message=OllamaMessage(**inner),
                                  **fields)
    inner.pop("tool_calls", None)
    if "content" in inner:
        inner["response"] = inner.pop("content")
    return OllamaGenerateResponse(model=model, created_at=_iso(time.time()), **inner, **fields)


def _line(obj: Reply) -> str:
    return dumps(obj.body()) + "\n"


async def _ndjson(source: AsyncIterator[Event], model: str, t0: float, chat: bool) -> AsyncIterator[str]:
    async for e in source:
        if e.kind == "text":
            yield _line(_answer(model, chat, content=e.text))
        elif e.kind == "reasoning":
            yield _line(_answer(model, chat, thinking=e.text))
        elif e.kind == "tool_calls" and chat:
            yield _line(_answer(model, chat, tool_calls=_tool_calls(e.tool_calls)))
        elif e.kind == "finish":
            assert e.result is not None
            yield _line(_answer(model, chat, done=True, **_stats(e.result, t0)))
            return
        elif e.kind == "error":
            yield _line(OllamaError(error=(e.error.message if e.error else "") or "generation failed"))
            return


def _stream(source: AsyncIterator[Event], model: str, t0: float, chat: bool) -> Response:
    return stream_response(_ndjson(source, model, t0, chat), NDJSON_HEADERS)


# -- routes ---------------------------------------------------------------------------------------
def register(app: Quart) -> None:
    @app.get("/api/version")
    async def ollama_version():
        return reply(OllamaVersion(version=OLLAMA_VERSION))

    @app.get("/api/tags")
    async def ollama_tags():
        return reply(OllamaModels(models=[OllamaModel(**_listing(m)) for m in app_state().manager.store.list()]))

    @app.get("/api/ps")
    async def ollama_ps():
        manager = app_state().manager
        loaded = []
        for mid, w in list(manager.workers.items()):
            m = manager.manifest(mid)
            loaded.append(OllamaLoadedModel(**_listing(m), expires_at=_iso(time.time() + manager.settings.keep_alive),
                                            context_length=int(w.model.n_ctx)))
        return reply(OllamaLoadedModels(models=loaded))

    @app.post("/api/show")
    async def ollama_show():
        body = await json_body(OllamaRequest)
        manager = app_state().manager
        m = manager.manifest(resolve(body.model_name))
        n_ctx = modelinfo.context_length(manager, m)
        return reply(OllamaShow(
            modelfile=f"# served by thox\nFROM {m.id}\n", parameters=f"num_ctx {n_ctx}", details=_details(m),
            model_info={"general.architecture": m.architecture, f"{m.architecture}.context_length": n_ctx},
            capabilities=_capabilities(m), modified_at=_iso(m.created)))

    @app.post("/api/chat")
    async def ollama_chat():
        t0 = time.monotonic()
        body = await json_body(ChatBody)
        if not body.messages:           # Ollama loads the model and answers at once
            model = resolve(body.model_name)
            await app_state().manager.get(model)
            return reply(_answer(model, True, content="", done=True, done_reason="load"))
        req = chat_request(body)
        if body.stream is not False:
            return _stream(await chatbridge.open_stream(app_state().service, req), req.model, t0, chat=True)
        res = await chatbridge.complete(app_state().service, req)
        return reply(_answer(req.model, True, **_output(res), done=True, **_stats(res, t0)))

    @app.post("/api/generate")
    async def ollama_generate():
        t0 = time.monotonic()
        body = await json_body(GenerateBody)
        model = resolve(body.model_name)
        if body.images:
            raise InvalidRequest("images are not supported by this model", param="images")
        if not body.prompt and body.suffix is None:
            await app_state().manager.get(model)
            return reply(_answer(model, False, content="", done=True, done_reason="load"))
        fmt = _format(body.format)
        if body.raw or body.suffix is not None:
            if fmt:
                raise InvalidRequest("format needs a chat prompt (raw is false, no suffix)", param="format")
            fields = _sampling(body)
            fields.setdefault("max_tokens", None)
            req: Any = CompletionRequest.model_validate({"model": model, "prompt": body.prompt or "",
                                                         **({"suffix": body.suffix} if body.suffix is not None
                                                            else {}), **fields})
            if body.stream is not False:
                return _stream(await chatbridge.open_text_stream(app_state().service, req), model, t0, chat=False)
            res = await chatbridge.complete_text(app_state().service, req)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                [{"role": "user", "content": body.prompt}]
            chat: dict[str, Any] = {"model": model, "messages": messages, **_sampling(body)}
            if fmt:
                chat["response_format"] = fmt
            req = ChatCompletionRequest.model_validate(chat)
            if body.stream is not False:
                return _stream(await chatbridge.open_stream(app_state().service, req), model, t0, chat=False)
            res = await chatbridge.complete(app_state().service, req)
        return reply(_answer(model, False, **_output(res), done=True, **_stats(res, t0)))

    async def _embed(body: EmbedBody, inputs: Any) -> tuple[EmbeddingList, float]:
        t0 = time.monotonic()
        req = EmbeddingRequest.model_validate({"model": resolve(body.model_name), "input": inputs,
                                               **({"dimensions": body.dimensions} if body.dimensions else {})})
        return await app_state().service.embeddings(req), t0

    @app.post("/api/embed")
    async def ollama_embed():
        body = await json_body(EmbedBody)
        if body.input is None:
            raise InvalidRequest("input is required", param="input")
        out, t0 = await _embed(body, body.input)
        return reply(OllamaEmbed.model_construct(     # the vectors are not validated again
            model=out.model, embeddings=[d.embedding for d in out.data],
            total_duration=int((time.monotonic() - t0) * 1e9), prompt_eval_count=out.usage.prompt_tokens))

    @app.post("/api/embeddings")
    async def ollama_embeddings():
        body = await json_body(EmbedBody)
        if not body.prompt:
            raise InvalidRequest("prompt is required", param="prompt")
        out, _ = await _embed(body, body.prompt)
        return reply(OllamaEmbedding.model_construct(embedding=out.data[0].embedding))

    restyle_errors(app, PREFIX, lambda status, error: OllamaError(error=error.get("message") or ""))
