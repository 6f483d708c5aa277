"""Per-model request queue, slots and decode loop.

Like llama.cpp's server, each loaded model has ``parallel`` slots and one
decode-loop thread. A request waits in a bounded queue until a slot is idle
(503 with Retry-After when the queue is full), then takes the idle slot whose
cache shares the longest prefix with its prompt (slots.py). Each step of the
loop:

1. drops requests whose client went away (their slot is free again);
2. evaluates chunks of the waiting prompts, shortest first, up to ``N_BATCH``
   tokens in all, so a long prompt never stalls the running streams for long
   and a short one is not stuck behind it;
3. decodes one token for every generating slot in a single ``llama_decode``
   of a multi-sequence batch, then samples each slot with its own sampler
   chain (grammar, penalties, seed) and hands the text to its stream.

A prompt chunk is a decode call of its own: llama.cpp would split a mixed
batch into per-sequence micro-batches anyway (non-unified KV cache), and
this way every sequence is computed the same however many others run beside
it. Every chunk holds two or more tokens, the last one included (at least the
last two prompt tokens are evaluated even when the whole prompt is cached),
so the first token's logits are the same whatever the cache held, and the
same as llama.cpp gives for the prompt evaluated from scratch.

Tokens travel from the loop thread to the HTTP handler through an
asyncio.Queue, so the event loop never blocks. Embeddings run on a context
and thread of their own (embedder.py) and never wait behind generation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Overloaded
from .embedder import Embedder
from .jobstream import JobStream, JobFailed, JobRequest
from .model import N_BATCH, Batch, LoadedModel
from .slots import Slot, choose_slot
from .textstream import TextStream
from .types import Finished, GenerationJob, Piece

log = logging.getLogger("thox.engine")

@dataclass
class _Active:
    """A request running in a slot."""
    req: JobRequest
    slot: Slot
    sampler: Any
    stream: TextStream
    prompt: list[int]
    limit: int                   # most tokens it may generate
    cached: int                  # prompt tokens taken from the slot's cache
    done: int                    # prompt tokens in the KV cache so far
    feed: int | None = None      # the token to decode next (generating); None while the prompt is evaluated
    n_out: int = 0
    first_at: float | None = None
    exact: bool = True           # every prompt chunk so far had two or more tokens
    started: float = field(default_factory=time.monotonic)


class ModelWorker:
    def __init__(self, model: LoadedModel, queue_size: int):
        self.model = model
        self.queue_size = queue_size
        self.parallel = model.parallel
        self.capacity = self.parallel + queue_size
        self.slots = [Slot(seq=i) for i in range(self.parallel)]
        self.pending = 0            # running + waiting; changed on the event loop only
        self.embed_pending = 0
        self.holds = 0              # requests being prepared on this model (event loop only)
        self.last_used = time.monotonic()
        self.closed = False
        self._inbox: collections.deque[JobRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._batch = Batch(max(N_BATCH, self.parallel))
        self.embedder = model.embedder = Embedder(model)
        self._embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"thox-{model.id}-embed")
        self._thread = threading.Thread(target=self._run, name=f"thox-{model.id}", daemon=True)
        self._thread.start()

    # -- admission (event loop) ----------------------------------------------------
    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.active is not None)

    @property
    def in_use(self) -> bool:
        """Prepared on, running, waiting or embedding: eviction skips it."""
        return bool(self.pending or self.embed_pending or self.holds)

    @contextlib.contextmanager
    def held(self):
        """Keep the model loaded while a request is prepared on it off the loop."""
        self.holds += 1
        try:
            yield self
        finally:
            self.holds -= 1
            self.last_used = time.monotonic()

    def _admit(self) -> None:
        if self.closed:
            raise Overloaded(f"model '{self.model.id}' is being unloaded, retry", retry_after=1)
        if self.pending >= self.capacity:
            raise Overloaded(f"model '{self.model.id}' is busy: {self.pending} requests in progress or "
                             f"queued (limit {self.capacity}: {self.parallel} slots and a queue of "
                             f"{self.queue_size}); retry shortly",
                             retry_after=max(1, self.pending // self.parallel))
        self.pending += 1
        self.last_used = time.monotonic()

    def _release(self) -> None:
        self.pending -= 1
        self.last_used = time.monotonic()

    def stream(self, job: GenerationJob,
               on_finish: Callable[[Finished, float], None] | None = None) -> "JobStream":
        """Reserve a place now (raises Overloaded when slots and queue are
        full) and return an async iterator of Pieces ending with one Finished.
        ``on_finish(finished, admitted_at)`` runs on the event loop when the job
        ends, whether or not anyone is still reading (client disconnects)."""
        self._admit()
        return JobStream(self, job, on_finish)

    def submit(self, req: JobRequest) -> None:
        with self._cond:
            self._inbox.append(req)
            self._cond.notify()

    async def embed(self, inputs: list[list[int]]) -> list:
        """Embeddings on the model's embedding thread, beside generation. A
        bounded queue of their own; cancelling the caller (client gone) stops
        the work before its next input, or inside a long one."""
        if self.closed:
            raise Overloaded(f"model '{self.model.id}' is being unloaded, retry", retry_after=1)
        if self.embed_pending >= self.queue_size + 1:
            raise Overloaded(f"model '{self.model.id}' is busy with {self.embed_pending} embedding requests; "
                             f"retry shortly", retry_after=1)
        self.embed_pending += 1
        self.last_used = time.monotonic()
        cancel = threading.Event()
        try:
            fut = asyncio.get_running_loop().run_in_executor(self._embed_pool, self.embedder.embed, inputs, cancel)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                raise
        finally:
            self.embed_pending -= 1
            self.last_used = time.monotonic()

    async def close(self) -> None:
        self.closed = True
        with self._cond:
            self._stop = True
            self._cond.notify()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join)
        self._embed_pool.shutdown(wait=True)
        await loop.run_in_executor(None, self._close_model)

    def _close_model(self) -> None:
        self._batch.close()
        self.model.close()

    def slot_status(self) -> dict[str, int]:
        busy = self.busy_slots
        return {"slots": self.parallel, "busy": busy, "idle": self.parallel - busy,
                "waiting": max(0, self.pending - busy)}

    # -- the decode loop (its own thread) ---------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._inbox and not self._any_active():
                        self._cond.wait()
                    if self._stop:
                        break
                    gone = [r for r in self._inbox if r.cancel.is_set()]
                    for r in gone:
                        self._inbox.remove(r)
                    new = []
                    idle = [s for s in self.slots if s.active is None]
                    while self._inbox and len(new) < len(idle):
                        new.append(self._inbox.popleft())
                for req in gone:
                    req.emit(Finished("cancelled", len(req.job.prompt_tokens), 0))
                for req in new:
                    self._start(req)
                self._step()
        except BaseException as e:  # pragma: no cover - the loop itself must not die silently
            log.exception("decode loop of %s failed", self.model.id)
            self._fail_all(e)
        finally:
            self._shutdown()

    def _any_active(self) -> bool:
        return any(s.active is not None for s in self.slots)

    def _start(self, req: JobRequest) -> None:
        job, p = req.job, req.job.params
        prompt = job.prompt_tokens
        n_prompt = len(prompt)
        room = self.model.n_ctx - n_prompt
        limit = room if p.max_tokens is None else min(p.max_tokens, room)
        if job.prefix_text:
            req.emit(Piece(job.prefix_text))
        if limit <= 0 or req.cancel.is_set() or n_prompt == 0:
            req.emit(Finished("cancelled" if req.cancel.is_set() else "length", n_prompt, 0))
            return
        try:
            sampler = self.model.make_sampler(p)
        except BaseException as e:
            req.emit(JobFailed(e))
            return
        idle = [s for s in self.slots if s.active is None]
        choice = choose_slot(idle, prompt)
        slot, keep = choice.slot, choice.keep
        if choice.copy_from is not None:
            src = choice.copy_from
            self.model.seq_copy(src.seq, slot.seq)
            slot.tokens[:] = src.tokens
            slot.n_exact = src.n_exact
        if keep < len(slot.tokens):
            if not self.model.seq_rm(slot.seq, keep, -1):
                self.model.seq_rm(slot.seq, 0, -1)
                keep = 0
            del slot.tokens[keep:]
        slot.n_exact = min(slot.n_exact, keep)
        slot.active = _Active(req=req, slot=slot, sampler=sampler, stream=TextStream(p.stop, p.capture_markers),
                              prompt=prompt, limit=limit, cached=keep, done=keep)

    def _step(self) -> None:
        for s in self.slots:
            a = s.active
            if a is not None and a.req.cancel.is_set():
                self._finish(a, "cancelled")
        waiting = [s.active for s in self.slots if s.active is not None and s.active.feed is None]
        budget = N_BATCH
        for a in sorted(waiting, key=lambda a: (len(a.prompt) - a.done, a.started)):
            if budget < 2:
                break
            budget -= self._prompt_chunk(a, budget)
        gen = [s.active for s in self.slots if s.active is not None and s.active.feed is not None]
        if gen:
            self._generate(gen)

    def _prompt_chunk(self, a: _Active, budget: int) -> int:
        """Evaluate the next chunk (at most ``budget`` tokens) of ``a``'s prompt;
        the chunk with its last token also gives the first generated token.
        Returns the tokens evaluated."""
        end = len(a.prompt)
        left = end - a.done
        n = min(budget, left)
        if left - n == 1:
            n -= 1           # never leave a single token for a chunk of its own
        if n < 2 and left >= 2:
            return 0         # no room for a chunk of two this step
        chunk = a.prompt[a.done:a.done + n]
        last = a.done + n == end
        a.exact = a.exact and len(chunk) >= 2
        rc = self.model.decode_chunk(self._batch, chunk, a.done, a.slot.seq, logits_last=last)
        if rc != 0:
            self._fail([a], RuntimeError(f"llama_decode failed ({rc}) while evaluating the prompt"))
            return n
        a.slot.tokens.extend(chunk)
        a.done += n
        if a.exact:
            a.slot.n_exact = a.done
        if last:
            try:
                reason = self._sample(a, n - 1)
            except BaseException as e:
                self._fail([a], e)
                return n
            if reason is not None:
                self._finish(a, reason)
        return n

    def _generate(self, gen: list[_Active]) -> None:
        m, batch = self.model, self._batch
        gen.sort(key=lambda a: a.slot.seq)
        batch.clear()
        for a in gen:
            batch.add(a.feed, len(a.slot.tokens), a.slot.seq, True)
        rc = m.decode(batch)
        if rc != 0:
            self._fail(gen, RuntimeError(f"llama_decode failed ({rc}) during generation"))
            return
        for i, a in enumerate(gen):
            a.slot.tokens.append(a.feed)
            a.feed = None
            try:
                reason = self._sample(a, i)
            except BaseException as e:
                self._fail([a], e)
                continue
            if reason is not None:
                self._finish(a, reason)

    def _sample(self, a: _Active, i: int) -> str | None:
        """Sample slot ``a``'s next token from batch entry ``i``; returns a
        finish reason, or None to go on (``a.feed`` is then the new token)."""
        m, p = self.model, a.req.job.params
        if a.req.cancel.is_set():
            return "cancelled"
        tok = m.sample(a.sampler, i)
        if m.is_eog(tok):
            return "stop"
        a.n_out += 1
        if a.first_at is None:
            a.first_at = time.monotonic()
        lp = [m.logprob(i, tok, p.top_logprobs)] if p.logprobs else []
        text = a.stream.feed(m.piece(tok))
        if text or lp:
            a.req.emit(Piece(text, lp))
        if a.stream.stopped:
            return "stop"
        if a.n_out >= a.limit:
            return "length"
        a.feed = tok
        return None

    def _release_slot(self, a: _Active) -> None:
        self.model.free_sampler(a.sampler)
        a.sampler = None
        a.slot.active = None
        a.slot.last_used = time.monotonic()

    def _finish(self, a: _Active, reason: str) -> None:
        self._release_slot(a)
        tail = a.stream.flush()
        if tail:
            a.req.emit(Piece(tail))
        if a.stream.captured is not None and reason == "stop":
            reason = "capture"
        a.req.emit(Finished(reason, len(a.prompt), a.n_out, captured=a.stream.captured or "",
                            cached_tokens=a.cached, first_token_at=a.first_at))

    def _fail(self, actives: list[_Active], exc: BaseException) -> None:
        """A failed decode: the sequences involved lose their cache, their
        requests get the error."""
        for a in actives:
            self.model.seq_rm(a.slot.seq, 0, -1)
            a.slot.tokens.clear()
            a.slot.n_exact = 0
            self._release_slot(a)
            a.req.emit(JobFailed(exc))

    def _fail_all(self, exc: BaseException) -> None:
        for s in self.slots:
            a = s.active
            if a is not None:
                self._release_slot(a)
                a.req.emit(JobFailed(exc))

    def _shutdown(self) -> None:
        """The loop ends (model unloading): whatever still runs or waits is cancelled."""
        for s in self.slots:
            a = s.active
            if a is not None:
                self._finish(a, "cancelled")
        with self._cond:
            rest, self._inbox = list(self._inbox), collections.deque()
        for req in rest:
            req.emit(Finished("cancelled", len(req.job.prompt_tokens), 0))
