"""The event-loop side of one admitted job: the decode-loop thread emits its
pieces through ``loop.call_soon_threadsafe`` into an asyncio.Queue, and the
HTTP handler iterates them; closing the stream (or dropping it) cancels the job."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .types import Finished, GenerationJob, Piece

Emit = Callable[[Any], None]


@dataclass
class JobFailed:
    exc: BaseException


@dataclass
class JobRequest:
    job: GenerationJob
    emit: Emit
    cancel: threading.Event


class Worker(Protocol):
    """What a stream needs of its model's worker (scheduler.ModelWorker)."""
    pending: int

    def submit(self, req: JobRequest) -> None: ...
    def _release(self) -> None: ...


class JobStream:
    """One admitted job. Iterating runs it on the model's decode loop; closing
    it (or dropping it, even unstarted) cancels the job and frees its place."""

    def __init__(self, worker: Worker, job: GenerationJob,
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
        queue, on_finish, admitted = self._queue, self._on_finish, self.admitted_at

        def emit(ev: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
                if on_finish is not None and isinstance(ev, Finished):
                    loop.call_soon_threadsafe(on_finish, ev, admitted)
            except RuntimeError:    # the event loop is gone (shutting down)
                pass

        self._worker.submit(JobRequest(self._job, emit, self._cancel))

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
        if isinstance(ev, JobFailed):
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
