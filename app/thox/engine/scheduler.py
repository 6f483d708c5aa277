"""Per-model request queue and worker thread.

Like llama.cpp's server (HTTP ⟂ task queue ⟂ slot), each loaded model has one
worker thread that runs one job at a time, and a bounded number of requests
that may wait for it. Tokens travel from the worker thread to the HTTP
handler through an asyncio.Queue, so the event loop never blocks. When the
consumer goes away (client disconnect), the job's cancel flag is set and the
worker stops at the next token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import Overloaded
from .model import LoadedModel
from .types import Finished, GenerationJob, Piece


@dataclass
class _Failed:
    exc: BaseException


class ModelWorker:
    def __init__(self, model: LoadedModel, queue_size: int):
        self.model = model
        self.queue_size = queue_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"thox-{model.id}")
        self.pending = 0            # running + waiting; changed on the event loop only
        self.last_used = time.monotonic()
        self.closed = False

    def _admit(self) -> None:
        if self.closed:
            raise Overloaded(f"model '{self.model.id}' is being unloaded, retry", retry_after=1)
        if self.pending >= self.queue_size + 1:
            raise Overloaded(f"model '{self.model.id}' is busy: {self.pending} requests in progress or "
                             f"queued (limit {self.queue_size + 1}); retry shortly",
                             retry_after=max(1, self.pending))
        self.pending += 1
        self.last_used = time.monotonic()

    def _release(self) -> None:
        self.pending -= 1
        self.last_used = time.monotonic()

    def stream(self, job: GenerationJob,
               on_finish: Callable[[Finished, float], None] | None = None) -> "JobStream":
        """Reserve a place in the queue now (raises Overloaded when full) and
        return an async iterator of Pieces ending with one Finished.
        ``on_finish(finished, admitted_at)`` runs on the event loop when the job
        ends, whether or not anyone is still reading (client disconnects)."""
        self._admit()
        return JobStream(self, job, on_finish)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread (embeddings, tokenizing)."""
        self._admit()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._release()

    async def close(self) -> None:
        self.closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.model.close)
        self._executor.shutdown(wait=False)


class JobStream:
    """One admitted job. Iterating runs it on the worker; closing it (or
    dropping it, even unstarted) cancels the job and frees its queue place."""

    def __init__(self, worker: ModelWorker, job: GenerationJob,
                 on_finish: Callable[[Finished, float], None] | None = None):
        self._worker = worker
        self._job = job
        self._on_finish = on_finish
        self.admitted_at = time.monotonic()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._started = False
        self._done = False

    def __aiter__(self) -> "JobStream":
        return self

    def _start(self) -> None:
        self._started = True
        loop = asyncio.get_running_loop()
        job, cancel, queue, model = self._job, self._cancel, self._queue, self._worker.model
        on_finish, admitted = self._on_finish, self.admitted_at

        def emit(ev: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
            if on_finish is not None and isinstance(ev, Finished):
                loop.call_soon_threadsafe(on_finish, ev, admitted)

        def run() -> None:
            if cancel.is_set():
                emit(Finished("cancelled", len(job.prompt_tokens), 0))
                return
            try:
                model.generate(job, emit, cancel)
            except BaseException as e:  # delivered to the handler, raised there
                emit(_Failed(e))

        fut = loop.run_in_executor(self._worker._executor, run)
        fut.add_done_callback(lambda f: f.exception())

    async def __anext__(self) -> Piece | Finished:
        if self._done:
            raise StopAsyncIteration
        if not self._started:
            self._start()
        try:
            ev = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if isinstance(ev, _Failed):
            self.close()
            raise ev.exc
        if isinstance(ev, Finished):
            self.close()
        return ev

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._cancel.set()
            self._worker._release()

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            self._cancel.set()
            self._worker.pending -= 1
