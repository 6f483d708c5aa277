"""Loading models in the service: lazy load, memory budget with LRU
eviction, keep-alive unload, too-big models, broken models; rate limit."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from thoxtest import Server, make_home, run_thox
from test_api_basics import assert_error

MSG = [{"role": "user", "content": "hi"}]


def loaded(s: Server) -> set[str]:
    return {m["id"] for m in httpx.get(s.url + "/health", timeout=10).json()["models"] if m["loaded"]}


@pytest.fixture
def home(tmp_path_factory, models_dir):
    return make_home(tmp_path_factory, models_dir, "svc", demo=True)


def test_lazy_load_lru_and_too_big(home):
    # tiny models need ~50 MiB by our estimate, the demo model ~150 MiB
    s = Server(home, models__memory_budget="80M")
    try:
        assert loaded(s) == set()
        assert s.post("/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200
        assert loaded(s) == {"tiny"}
        assert s.post("/chat/completions", {"model": "tiny-nofim", "messages": MSG,
                                            "max_tokens": 2}).status_code == 200
        assert loaded(s) == {"tiny-nofim"}          # tiny evicted: least recently used
        r = s.post("/chat/completions", {"model": "thox-demo", "messages": MSG, "max_tokens": 2})
        err = assert_error(r, 503, "model_too_large")
        assert int(r.headers["retry-after"]) >= 1 and "memory" in err["message"]
        assert loaded(s) == {"tiny-nofim"}          # nothing was evicted for a model that cannot fit
        assert {m["id"] for m in s.get("/models").json()["data"]} == {"tiny", "tiny-nofim", "thox-demo"}
    finally:
        s.stop()


def test_concurrent_first_requests_share_one_load(home):
    s = Server(home)
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: s.post("/chat/completions", {
                "model": "thox-demo", "messages": MSG, "max_tokens": 2}).status_code, range(4)))
        assert codes == [200] * 4
        assert s.logs().count("loaded model thox-demo") == 1
    finally:
        s.stop()


def test_keep_alive_unloads_idle_models(home):
    s = Server(home, models__keep_alive="1")
    try:
        assert s.post("/embeddings", {"model": "tiny", "input": "x"}).status_code == 200
        assert loaded(s) == {"tiny"}
        deadline = time.time() + 15
        while loaded(s) and time.time() < deadline:
            time.sleep(0.3)
        assert loaded(s) == set()
        assert s.post("/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


def test_broken_model_is_reported_and_service_stays_up(home):
    path = run_thox(home, "models", "path", "tiny-nofim").stdout.strip()
    with open(path, "r+b") as f:
        f.truncate(4096)
    s = Server(home)
    try:
        r = s.post("/chat/completions", {"model": "tiny-nofim", "messages": MSG})
        err = assert_error(r, 400, "model_broken")
        assert "tiny-nofim" in err["message"]
        h = httpx.get(s.url + "/health", timeout=10).json()
        assert [m for m in h["models"] if m["id"] == "tiny-nofim"][0]["broken"]
        assert s.post("/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


def test_rate_limit(home):
    s = Server(home, api__rate_limit="3", api__rate_limit_loopback="true")
    try:
        rs = [s.get("/models") for _ in range(3)]
        assert all(r.status_code == 200 for r in rs)
        assert rs[0].headers["x-ratelimit-limit-requests"] == "3"
        assert int(rs[0].headers["x-ratelimit-remaining-requests"]) == 2
        r = s.get("/models")
        err = assert_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-reset-requests" in r.headers and "3 requests per minute" in err["message"]
        # loopback is exempt unless configured otherwise (re-read without restart)
        run_thox(home, "config", "set", "api.rate_limit_loopback", "false")
        assert all(s.get("/models").status_code == 200 for _ in range(6))
        run_thox(home, "config", "set", "api.rate_limit", "0")
    finally:
        s.stop()


def _demo_health(s: Server) -> dict:
    return [m for m in httpx.get(s.url + "/health", timeout=10).json()["models"] if m["id"] == "thox-demo"][0]


def test_memory_budget_counts_the_slots_kv_cache(home):
    """Every slot's KV cache is part of a model's memory: eight slots need
    seven slots' KV more than one, and a budget between the two loads the
    model with one slot only."""
    one, eight = {}, {}
    for parallel, into in (("1", one), ("8", eight)):
        s = Server(home, engine__parallel=parallel, models__memory_budget="8G")
        try:
            assert s.post("/chat/completions", {"model": "thox-demo", "messages": MSG,
                                                "max_tokens": 2}).status_code == 200
            into.update(_demo_health(s))
        finally:
            s.stop()
    # the KV cache of a slot is n_ctx tokens of K and V (f16) in every layer: SmolLM2-135M has 30 layers
    # of 3 KV heads of 64 dimensions, and make_home sets engine.n_ctx to 1024
    per_slot = 1024 * 30 * 3 * 64 * 2 * 2
    assert one["slots"] == 1 and eight["slots"] == 8
    assert one["kv_cache_bytes"] == per_slot and eight["kv_cache_bytes"] == 8 * per_slot
    assert 7 * per_slot <= eight["memory_bytes"] - one["memory_bytes"] < 7 * per_slot + (8 << 20)
    between = (one["memory_bytes"] + eight["memory_bytes"]) // 2
    s = Server(home, engine__parallel="8", models__memory_budget=str(between))
    try:
        r = s.post("/chat/completions", {"model": "thox-demo", "messages": MSG, "max_tokens": 2})
        err = assert_error(r, 503, "model_too_large")
        assert "8 slots" in err["message"] and "KV cache" in err["message"]
        run_thox(home, "config", "set", "engine.parallel", "1")
    finally:
        s.stop()
    s = Server(home, models__memory_budget=str(between))
    try:
        assert s.post("/chat/completions", {"model": "thox-demo", "messages": MSG, "max_tokens": 2}).status_code == 200
        assert _demo_health(s)["slots"] == 1
        run_thox(home, "config", "set", "engine.parallel", "auto")
    finally:
        s.stop()
    # auto: as many slots as fit half the budget
    s = Server(home, models__memory_budget=str(2 * one["memory_bytes"] + 3 * per_slot + per_slot // 2))
    try:
        assert s.post("/chat/completions", {"model": "thox-demo", "messages": MSG, "max_tokens": 2}).status_code == 200
        assert _demo_health(s)["slots"] == 2
    finally:
        s.stop()



def test_a_model_being_prepared_on_is_not_evicted(home, monkeypatch):
    """While a request is prepared on a model off the event loop (template,
    tokens), the model is kept: loading another model that needs its memory gets
    503 (retry) and the keep-alive reaper passes it by, instead of freeing the
    model under the preparation thread. The real manager, service and models."""
    import asyncio
    import threading

    from thox.api.metrics import Metrics
    from thox.api.service import Service
    from thox.config import Config
    from thox.engine.manager import ModelManager, Settings
    from thox.errors import Overloaded
    from thox.store.store import ModelStore

    monkeypatch.setenv("THOX_HOME", str(home))
    run_thox(home, "config", "set", "models.memory_budget", "80M")
    run_thox(home, "config", "set", "models.keep_alive", "0")
    cfg = Config()
    manager = ModelManager(ModelStore(cfg.models_dir), Settings.from_config(cfg))
    service = Service(manager, Metrics())

    async def scenario() -> None:
        w = await manager.get("tiny")
        started, release = threading.Event(), threading.Event()

        def prepare() -> list[int]:        # reads the model's vocabulary, as chat_job does
            started.set()
            release.wait(30)
            return w.model.tokenize("hello world")

        job = asyncio.ensure_future(service.prepare_on(w, prepare))
        while not started.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as e:
            await manager.get("tiny-nofim")
        assert e.value.retry_after >= 1 and "busy" in str(e.value)
        await manager.reap_idle()
        assert set(manager.workers) == {"tiny"} and not w.closed
        release.set()
        assert len(await job) > 0
        await manager.reap_idle()                 # no longer in use: keep_alive 0 unloads it
        assert manager.workers == {}
        assert (await manager.get("tiny-nofim")).model.id == "tiny-nofim"
        await manager.stop()

    try:
        asyncio.run(scenario())
    finally:
        service.close()
