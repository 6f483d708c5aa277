"""The Quart application: wiring of config, model store, engine, auth,
metrics and routes."""

from __future__ import annotations

import logging
import time

from quart import Quart, Response, g, request

from .. import __version__, web
from ..config import Config
from ..engine.manager import ModelManager, Settings
from ..store import ModelStore
from . import anthropic, cors, errors, ollama, responses, routes
from .auth import KeyFile, credential
from .metrics import Metrics
from .ratelimit import RateLimiter
from .response_store import ResponseStore
from .service import Service
from .state import AppState

log = logging.getLogger("thox.api")


def create_app(config: Config | None = None) -> Quart:
    config = config or Config()
    app = Quart("thox")
    app.config["MAX_CONTENT_LENGTH"] = int(config.get("api.max_body_bytes"))
    app.config["JSON_SORT_KEYS"] = False
    app.config["RESPONSE_TIMEOUT"] = None  # long generations are not stalled responses
    app.json.sort_keys = False
    app.json.ensure_ascii = False

    store = ModelStore(config.models_dir)
    store.cleanup_staging()
    metrics = Metrics()
    manager = ModelManager(store, Settings.from_config(config))
    state = AppState(config=config, store=store, manager=manager, service=Service(manager, metrics),
                     metrics=metrics, keys=KeyFile(config), ratelimit=RateLimiter(config),
                     responses=ResponseStore(), version=__version__, started=time.time())
    state.install(app)

    @app.before_serving
    async def _start() -> None:
        manager.start()

    @app.after_serving
    async def _stop() -> None:
        await manager.stop()
        state.service.close()

    @app.before_request
    async def _auth() -> None:
        g.t0 = time.monotonic()
        g.extra_headers = {}
        if cors.is_api_path(request.path):
            g.extra_headers = state.ratelimit.check(request.remote_addr)
            key = credential(request.headers)
            if key is None and request.path.startswith("/api/") and config.get("api.ollama_keyless"):
                g.cors_denied = True  # admitted without a key: no other origin may read the answer
                return
            state.keys.check(key)

    @app.after_request
    async def _count(resp: Response) -> Response:
        for k, v in getattr(g, "extra_headers", {}).items():
            resp.headers.setdefault(k, v)
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(rule, metrics.method_label(request.method), str(resp.status_code)).inc()
        for w in manager.workers.values():
            metrics.queue_depth.labels(w.model.id).set(w.pending)
        return resp

    errors.install(app)
    cors.install(app, config)
    routes.register(app)
    for layer in (responses, anthropic, ollama):
        layer.register(app)
    web.register(app)
    return app
