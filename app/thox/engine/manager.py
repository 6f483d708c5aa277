"""Which models are resident: lazy loading, a memory budget with
least-recently-used eviction, and unloading after ``models.keep_alive``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ..config import Config
from ..errors import ModelBroken, ModelNotFound, Overloaded
from ..store import ModelStore
from ..store.store import Manifest
from .context import choose_n_ctx
from .model import LoadedModel, MemoryPlan, Shape, plan_memory
from .scheduler import ModelWorker

log = logging.getLogger("thox.engine")

# names from the product guide that are catalog models, not installed by default
PULLABLE_HINT = "thox-coder-"


@dataclass
class Settings:
    n_ctx: int
    n_threads: int
    n_gpu_layers: int
    queue_size: int
    memory_budget: int
    keep_alive: int
    parallel: int | str = 4        # slots per model, or "auto"

    @classmethod
    def from_config(cls, cfg: Config) -> "Settings":
        return cls(n_ctx=int(cfg.get("engine.n_ctx")), n_threads=int(cfg.get("engine.n_threads")),
                   n_gpu_layers=int(cfg.get("engine.n_gpu_layers")),
                   queue_size=int(cfg.get("api.queue_size")),
                   memory_budget=int(cfg.get("models.memory_budget")),
                   keep_alive=int(cfg.get("models.keep_alive")),
                   parallel=cfg.get("engine.parallel"))


AUTO_MAX_PARALLEL = 8     # engine.parallel=auto never gives a model more slots than this


def estimate_memory(m: Manifest, n_ctx: int, parallel: int = 1, shape: Shape | None = None) -> int:
    """Bytes model ``m`` occupies with ``parallel`` slots of ``n_ctx`` tokens
    (weights, every slot's KV cache, compute buffers, embedding context)."""
    return plan_memory(m.size, shape, n_ctx, parallel).total


class ModelManager:
    def __init__(self, store: ModelStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.workers: dict[str, ModelWorker] = {}
        self.estimates: dict[str, int] = {}
        self.broken: dict[str, str] = {}
        self.loading: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._shapes: dict[tuple[str, str], Shape | None] = {}
        self.plans: dict[str, MemoryPlan] = {}
        self._reaper: asyncio.Task | None = None

    def manifest(self, model_id: str) -> Manifest:
        try:
            return self.store.get(model_id)
        except ModelNotFound:
            if model_id.startswith(PULLABLE_HINT):
                raise ModelNotFound(f"The model '{model_id}' is not installed on this device. Install it with "
                                    f"`thox models pull {model_id}`", param="model") from None
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None

    def shape(self, m: Manifest) -> Shape | None:
        """Layer, head and vocabulary sizes from the GGUF header (cached per file)."""
        key = (m.id, m.sha256)
        if key not in self._shapes:
            from ..store.gguf_meta import read_metadata
            try:
                self._shapes[key] = Shape.from_gguf(read_metadata(self.store.path(m.id)))
            except (ModelBroken, OSError):
                self._shapes[key] = None
        return self._shapes[key]

    def n_ctx_for(self, m: Manifest) -> int:
        """The context of each of ``m``'s slots (see thox.engine.context)."""
        shape = self.shape(m)
        p = self.settings.parallel
        fixed = p if isinstance(p, int) else 1
        return choose_n_ctx(m.id, m.context_length, self.settings.n_ctx, self.settings.memory_budget,
                            lambda n: estimate_memory(m, n, fixed, shape))

    def parallel_for(self, m: Manifest, n_ctx: int) -> int:
        """Slots for ``m``: engine.parallel, or for ``auto`` as many as fit half
        the memory budget (at least 1, at most AUTO_MAX_PARALLEL)."""
        p = self.settings.parallel
        if isinstance(p, int):
            return p
        shape, half = self.shape(m), self.settings.memory_budget // 2
        n = 1
        while n < AUTO_MAX_PARALLEL and estimate_memory(m, n_ctx, n + 1, shape) <= half:
            n += 1
        return n

    def plan(self, m: Manifest) -> tuple[int, int, MemoryPlan]:
        """(n_ctx, slots, memory plan) that ``m`` is loaded with."""
        n_ctx = self.n_ctx_for(m)
        parallel = self.parallel_for(m, n_ctx)
        return n_ctx, parallel, plan_memory(m.size, self.shape(m), n_ctx, parallel)

    async def get(self, model_id: str) -> ModelWorker:
        w = self.workers.get(model_id)
        if w is not None and not w.closed:
            w.last_used = time.monotonic()
            return w
        m = self.manifest(model_id)
        lock = self._locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            w = self.workers.get(model_id)
            if w is not None and not w.closed:
                return w
            return await self._load(m)

    async def _load(self, m: Manifest) -> ModelWorker:
        n_ctx, parallel, plan = await asyncio.to_thread(self.plan, m)
        need = plan.total
        budget = self.settings.memory_budget
        if need > budget:
            raise Overloaded(f"model '{m.id}' needs about {need >> 20} MiB ({parallel} slots of {n_ctx} "
                             f"tokens, KV cache {plan.kv >> 20} MiB) but the memory budget "
                             f"(models.memory_budget) is {budget >> 20} MiB; it does not fit on this device "
                             f"(fewer slots, engine.parallel, or a smaller engine.n_ctx need less)",
                             retry_after=60, code="model_too_large")
        await self._make_room(need, budget)
        path = self.store.path(m.id)
        self.loading.add(m.id)
        try:
            t0 = time.monotonic()
            model = await asyncio.to_thread(LoadedModel, m.id, path, n_ctx=n_ctx,
                                            n_threads=self.settings.n_threads,
                                            n_gpu_layers=self.settings.n_gpu_layers, parallel=parallel)
            log.info("loaded model %s in %.2fs", m.id, time.monotonic() - t0)
        except ModelBroken as e:
            self.broken[m.id] = e.message
            raise
        finally:
            self.loading.discard(m.id)
        self.broken.pop(m.id, None)
        w = ModelWorker(model, self.settings.queue_size)
        self.workers[m.id] = w
        self.estimates[m.id] = need
        self.plans[m.id] = plan
        return w

    def used_memory(self) -> int:
        return sum(self.estimates.get(k, 0) for k in self.workers)

    async def _make_room(self, need: int, budget: int) -> None:
        while self.used_memory() + need > budget:
            idle = [w for w in self.workers.values() if not w.in_use]
            if not idle:
                raise Overloaded("not enough memory to load another model while the loaded ones are busy; "
                                 "retry shortly", retry_after=5, code="model_too_large")
            victim = min(idle, key=lambda w: w.last_used)
            await self.unload(victim.model.id)

    async def unload(self, model_id: str) -> None:
        w = self.workers.pop(model_id, None)
        self.estimates.pop(model_id, None)
        self.plans.pop(model_id, None)
        if w is not None:
            await w.close()
            log.info("unloaded model %s", model_id)

    async def reap_idle(self) -> None:
        now = time.monotonic()
        for mid, w in list(self.workers.items()):
            if not w.in_use and now - w.last_used >= self.settings.keep_alive:
                await self.unload(mid)

    def _warm_shapes(self) -> None:
        """Read every installed model's shape once, off the event loop."""
        try:
            for m in self.store.list():
                self.shape(m)
        except Exception:  # pragma: no cover - only a cache warm-up
            log.exception("reading model shapes failed")

    def start(self) -> None:
        self._warm = asyncio.create_task(asyncio.to_thread(self._warm_shapes))

        async def loop() -> None:
            while True:
                await asyncio.sleep(min(10, max(1, self.settings.keep_alive // 4 or 1)))
                try:
                    await self.reap_idle()
                except Exception:  # pragma: no cover - keep the reaper alive
                    log.exception("idle reaper failed")
        self._reaper = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for mid in list(self.workers):
            await self.unload(mid)

    def slot_usage(self) -> dict[str, dict[str, int]]:
        """Slots of each loaded model: total, busy, idle, and requests waiting."""
        return {mid: w.slot_status() for mid, w in list(self.workers.items())}

    def status(self) -> list[dict]:
        out = []
        for m in self.store.list():
            w = self.workers.get(m.id)
            out.append({
                "id": m.id, "kind": m.kind, "size": m.size,
                "loaded": w is not None, "loading": m.id in self.loading,
                "broken": self.broken.get(m.id),
                "memory_bytes": self.estimates.get(m.id, 0) if w else 0,
                "queue": w.pending if w else 0,
                "kv_cache_bytes": self.plans[m.id].kv if w and m.id in self.plans else 0,
                **(w.slot_status() if w else {"slots": 0, "busy": 0, "idle": 0, "waiting": 0}),
                "idle_seconds": round(time.monotonic() - w.last_used, 1) if w else None,
            })
        return out
