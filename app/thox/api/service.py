"""The OpenAI use cases, between thin routes and the engine: prepare jobs
off the event loop, admit them, collect or stream their output, count
tokens, and answer with the models of ``response_models.py``. A stream is an
async generator of chunks, ending in an ``ErrorResponse`` when it fails after
its first chunk; ``wire.openai_events`` writes it out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, Union

from ..engine.manager import ModelManager
from ..engine.scheduler import JobStream, ModelWorker
from ..engine.types import Finished, GenerationJob
from ..errors import ModelBroken, ThoxError
from ..store.store import Manifest
from . import modelinfo
from . import translate as tr
from .metrics import Metrics
from .response_models import (ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                              ChatLogprobs, ChatMessage, Completion, CompletionChoice, CompletionChunk,
                              CompletionLogprobs, CompletionUsage, EmbeddingList, ErrorDetail, ErrorResponse, Model,
                              ModelCapabilities, ModelList, ToolCallDelta)
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger("thox.api")
T = TypeVar("T")
PREPARE_THREADS = 4
ChatStream = AsyncGenerator[Union[ChatCompletionChunk, ErrorResponse], None]
CompletionStream = AsyncGenerator[Union[CompletionChunk, ErrorResponse], None]


class Service:
    def __init__(self, manager: ModelManager, metrics: Metrics):
        self.manager = manager
        self.metrics = metrics
        metrics.track_slots(manager.slot_usage)
        # request preparation (templates, tokenizing, grammars) runs here, off the event loop
        self._prepare_pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="thox-prepare")

    async def prepare(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a preparation thread."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    async def prepare_on(self, w: ModelWorker, fn: Callable[..., T], *args: Any) -> T:
        """``prepare`` for work that reads ``w``'s model (vocabulary, template):
        the model is not evicted or unloaded until it is done."""
        with w.held():
            return await self.prepare(fn, *args)

    def close(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    # -- models --------------------------------------------------------------
    def model_object(self, m: Manifest) -> Model:
        n_ctx = modelinfo.context_length(self.manager, m)
        return Model(id=m.id, created=m.created, owned_by="thox", context_length=n_ctx, max_model_len=n_ctx,
                     capabilities=ModelCapabilities(**modelinfo.capabilities(m)))

    def list_models(self) -> ModelList:
        return ModelList(data=[self.model_object(m) for m in self.manager.store.list()])

    def get_model(self, model_id: str) -> Model:
        return self.model_object(self.manager.manifest(model_id))

    async def _worker(self, model_id: str) -> ModelWorker:
        w = await self.manager.get(model_id)
        self.metrics.loaded.labels(model_id).set(1)
        return w

    def _admit(self, w: ModelWorker, job: GenerationJob) -> JobStream:
        model_id = w.model.id

        def account(fin: Finished, admitted_at: float) -> None:
            self.metrics.tokens.labels(model_id).inc(fin.completion_tokens)
            self.metrics.prompt_tokens.labels(model_id).inc(fin.prompt_tokens)
            if fin.first_token_at is not None:
                self.metrics.ttft.labels(model_id).observe(fin.first_token_at - admitted_at)
            if fin.finish_reason == "cancelled":
                self.metrics.disconnects.inc()
            self.metrics.queue_depth.labels(model_id).set(w.pending)

        s = w.stream(job, account)
        self.metrics.queue_depth.labels(model_id).set(w.pending)
        return s

    async def _collect(self, stream: JobStream) -> tuple[str, list, Finished]:
        text, lps = [], []
        async for ev in stream:
            if isinstance(ev, Finished):
                return "".join(text), lps, ev
            text.append(ev.text)
            lps.extend(ev.logprobs)
        raise RuntimeError("generation ended without a result")  # pragma: no cover

    # -- chat -------------------------------------------------------------------
    async def chat_job(self, req: ChatCompletionRequest, w: ModelWorker) -> GenerationJob:
        """The job for ``req`` on ``w``'s model (template, tokens, grammar),
        prepared off the event loop. A template that cannot render marks the
        model broken, as ``/health`` shows."""
        try:
            return await self.prepare_on(w, tr.chat_job, req, w.model)
        except ModelBroken as e:
            self.manager.broken[req.model] = e.message
            raise

    async def count_prompt(self, req: ChatCompletionRequest) -> int:
        """Prompt tokens of ``req`` as the model would see them (nothing is generated)."""
        job = await self.chat_job(req, await self._worker(req.model))
        return len(job.prompt_tokens)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletion | ChatStream:
        w = await self._worker(req.model)
        job = await self.chat_job(req, w)
        n = req.n or 1
        if req.stream:
            first = self._admit(w, job)
            return self._chat_stream(req, w, job, first, n)
        choices: list[ChatChoice] = []
        p_tok, c_tok, cached = 0, 0, 0
        for i in range(n):
            text, lps, fin = await self._collect(self._admit(w, job))
            p_tok, c_tok, cached = fin.prompt_tokens, c_tok + fin.completion_tokens, max(cached, fin.cached_tokens)
            calls = tr.parse_tool_calls(fin.captured) if fin.captured else None
            if fin.captured and not calls:
                text += fin.captured  # not a well-formed call: give the text back
            msg = ChatMessage(content=text if (text or not calls) else None)
            if calls:
                msg.tool_calls = calls
            choices.append(ChatChoice(index=i, message=msg, logprobs=tr.chat_logprobs(lps) if req.logprobs else None,
                                      finish_reason=tr.finish_reason(fin, calls)))
        return ChatCompletion(id=tr.new_id("chatcmpl"), created=tr.now(), model=req.model, choices=choices,
                              usage=CompletionUsage.of(p_tok, c_tok, cached), system_fingerprint=tr.FINGERPRINT)

    async def _stream_jobs(self, w: ModelWorker, jobs: list[GenerationJob], first: JobStream,
                           per_job: Callable[[int, JobStream], AsyncIterator[Any]],
                           tail: Callable[[], list[Any]]) -> AsyncGenerator[Any, None]:
        """The chunks of ``jobs`` run one after another: ``per_job(i, stream)``
        makes each job's (the first was admitted before the headers went out),
        ``tail()`` what follows the last. An error after the headers went out
        becomes a final ``ErrorResponse``; an abandoned stream frees its queue place."""
        stream: JobStream | None = first
        try:
            for i, job in enumerate(jobs):
                stream = stream or self._admit(w, job)
                async for chunk in per_job(i, stream):
                    yield chunk
                stream = None
            for chunk in tail():
                yield chunk
        except ThoxError as e:
            yield ErrorResponse(error=ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code))
        finally:
            if stream is not None:
                stream.close()

    def _chat_stream(self, req: ChatCompletionRequest, w: ModelWorker, job: GenerationJob,
                     first: JobStream, n: int) -> ChatStream:
        rid, created, model = tr.new_id("chatcmpl"), tr.now(), req.model
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        tokens = {"prompt": 0, "completion": 0}

        def chunk(i: int, delta: ChatDelta, reason: str | None = None,
                  logprobs: ChatLogprobs | None = None) -> ChatCompletionChunk:
            return tr.chat_chunk(rid, model, created, [ChatChunkChoice(
                index=i, delta=delta, logprobs=logprobs, finish_reason=reason)], None, include_usage)

        async def per_job(i: int, stream: JobStream) -> AsyncIterator[ChatCompletionChunk]:
            yield chunk(i, ChatDelta(role="assistant", content=""))
            async for ev in stream:
                if isinstance(ev, Finished):
                    tokens["prompt"] = ev.prompt_tokens
                    tokens["completion"] += ev.completion_tokens
                    calls = tr.parse_tool_calls(ev.captured) if ev.captured else None
                    if ev.captured and not calls:
                        yield chunk(i, ChatDelta(content=ev.captured))
                    if calls:
                        yield chunk(i, ChatDelta(tool_calls=[ToolCallDelta(index=k, **c.model_dump())
                                                             for k, c in enumerate(calls)]))
                    yield chunk(i, ChatDelta(), tr.finish_reason(ev, calls))
                    return
                if ev.text or ev.logprobs:
                    yield chunk(i, ChatDelta(content=ev.text), None,
                                tr.chat_logprobs(ev.logprobs) if req.logprobs else None)

        def tail() -> list[ChatCompletionChunk]:
            if not include_usage:
                return []
            return [tr.chat_chunk(rid, model, created, [],
                                  CompletionUsage.of(tokens["prompt"], tokens["completion"]), True)]

        return self._stream_jobs(w, [job] * n, first, per_job, tail)

    # -- legacy completions -------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> Completion | CompletionStream:
        w = await self._worker(req.model)
        prompts = await self.prepare_on(w, tr.completion_prompts, req, w.model)
        params = tr.sampling(req, req.max_tokens)
        params.logprobs = req.logprobs is not None
        params.top_logprobs = req.logprobs or 0
        jobs = []
        for toks, text in prompts:
            for _ in range(req.n or 1):
                jobs.append(GenerationJob(prompt_tokens=toks, params=params,
                                          prefix_text=text if req.echo else ""))
        if req.stream:
            first = self._admit(w, jobs[0])
            return self._completion_stream(req, w, jobs, first)
        choices: list[CompletionChoice] = []
        p_tok, c_tok = 0, 0
        for i, job in enumerate(jobs):
            text, lps, fin = await self._collect(self._admit(w, job))
            if i % (req.n or 1) == 0:
                p_tok += fin.prompt_tokens
            c_tok += fin.completion_tokens
            choices.append(CompletionChoice(index=i, text=text, finish_reason=tr.finish_reason(fin, None),
                                            logprobs=tr.completion_logprobs(lps, len(job.prefix_text))
                                            if req.logprobs is not None else None))
        return Completion(id=tr.new_id("cmpl"), created=tr.now(), model=req.model, choices=choices,
                          usage=CompletionUsage.of(p_tok, c_tok), system_fingerprint=tr.FINGERPRINT)

    def _completion_stream(self, req: CompletionRequest, w: ModelWorker, jobs: list[GenerationJob],
                           first: JobStream) -> CompletionStream:
        rid, created, model = tr.new_id("cmpl"), tr.now(), req.model
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        tokens = {"prompt": 0, "completion": 0}

        def chunk(i: int, text: str, reason: str | None, lp: CompletionLogprobs | None = None) -> CompletionChunk:
            return tr.completion_chunk(rid, model, created, [CompletionChoice(
                index=i, text=text, finish_reason=reason, logprobs=lp)])

        async def per_job(i: int, stream: JobStream) -> AsyncIterator[CompletionChunk]:
            offset = 0
            async for ev in stream:
                if isinstance(ev, Finished):
                    if i % (req.n or 1) == 0:
                        tokens["prompt"] += ev.prompt_tokens
                    tokens["completion"] += ev.completion_tokens
                    yield chunk(i, "", tr.finish_reason(ev, None))
                    return
                lp = tr.completion_logprobs(ev.logprobs, offset) if req.logprobs is not None else None
                offset += len(ev.text)
                yield chunk(i, ev.text, None, lp)

        def tail() -> list[CompletionChunk]:
            if not include_usage:
                return []
            return [tr.completion_chunk(rid, model, created, [],
                                        CompletionUsage.of(tokens["prompt"], tokens["completion"]))]

        return self._stream_jobs(w, jobs, first, per_job, tail)

    # -- embeddings -----------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingList:
        w = await self._worker(req.model)
        inputs = await self.prepare_on(w, tr.embedding_inputs, req.input, w.model)
        vectors = await w.embed(inputs)
        n_tokens = sum(len(t) for t in inputs)
        self.metrics.prompt_tokens.labels(req.model).inc(n_tokens)
        return tr.embedding_response(req.model, vectors, req.encoding_format or "float", req.dimensions, n_tokens)
