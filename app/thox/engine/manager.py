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
from .model import LoadedModel
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

    @classmethod
    def from_config(cls, cfg: Config) -> "Settings":
        return cls(n_ctx=int(cfg.get("engine.n_ctx")), n_threads=int(cfg.get("engine.n_threads")),
                   n_gpu_layers=int(cfg.get("engine.n_gpu_layers")),
                   queue_size=int(cfg.get("api.queue_size")),
                   memory_budget=int(cfg.get("models.memory_budget")),
                   keep_alive=int(cfg.get("models.keep_alive")))


def estimate_memory(m: Manifest, n_ctx: int) -> int:
    """Weights plus a generous allowance for KV cache and compute buffers."""
    kv = n_ctx * 160 * 1024 if m.size > (1 << 30) else n_ctx * 16 * 1024
    return int(m.size * 1.1) + kv + (32 << 20)


class ModelManager:
    def __init__(self, store: ModelStore, settings: Settings):
        self.store = store
        self.settings = settings
        self.workers: dict[str, ModelWorker] = {}
        self.estimates: dict[str, int] = {}
        self.broken: dict[str, str] = {}
        self.loading: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task | None = None

    def manifest(self, model_id: str) -> Manifest:
        try:
            return self.store.get(model_id)
        except ModelNotFound:
            if model_id.startswith(PULLABLE_HINT):
                raise ModelNotFound(f"The model '{model_id}' is not installed on this device. Install it with "
                                    f"`thox models pull {model_id}`", param="model") from None
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None

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
        need = estimate_memory(m, self.settings.n_ctx)
        budget = self.settings.memory_budget
        if need > budget:
            raise Overloaded(f"model '{m.id}' needs about {need >> 20} MiB but the memory budget "
                             f"(models.memory_budget) is {budget >> 20} MiB; it does not fit on this device",
                             retry_after=60, code="model_too_large")
        await self._make_room(need, budget)
        path = self.store.path(m.id)
        self.loading.add(m.id)
        try:
            t0 = time.monotonic()
            model = await asyncio.to_thread(LoadedModel, m.id, path, n_ctx=self.settings.n_ctx,
                                            n_threads=self.settings.n_threads,
                                            n_gpu_layers=self.settings.n_gpu_layers)
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
        return w

    def used_memory(self) -> int:
        return sum(self.estimates.get(k, 0) for k in self.workers)

    async def _make_room(self, need: int, budget: int) -> None:
        while self.used_memory() + need > budget:
            idle = [w for w in self.workers.values() if w.pending == 0]
            if not idle:
                raise Overloaded("not enough memory to load another model while the loaded ones are busy; "
                                 "retry shortly", retry_after=5, code="model_too_large")
            victim = min(idle, key=lambda w: w.last_used)
            await self.unload(victim.model.id)

    async def unload(self, model_id: str) -> None:
        w = self.workers.pop(model_id, None)
        self.estimates.pop(model_id, None)
        if w is not None:
            await w.close()
            log.info("unloaded model %s", model_id)

    async def reap_idle(self) -> None:
        now = time.monotonic()
        for mid, w in list(self.workers.items()):
            if w.pending == 0 and now - w.last_used >= self.settings.keep_alive:
                await self.unload(mid)

    def start(self) -> None:
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
                "idle_seconds": round(time.monotonic() - w.last_used, 1) if w else None,
            })
        return out
