"""The Quart application: wiring of config, model store, engine, auth,
metrics and routes."""

from __future__ import annotations

import json
import logging
import re
import time

from quart import Quart, Response, g, request

from .. import __version__
from ..config import Config
from ..engine.manager import ModelManager, Settings
from ..errors import InvalidRequest
from ..store import ModelStore
from . import anthropic, errors, responses, routes
from .auth import KeyFile, credential
from .metrics import Metrics
from .ratelimit import RateLimiter
from .service import Service

log = logging.getLogger("thox.api")
MAX_JSON_DEPTH = 64
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _depth_ok(data: bytes) -> bool:
    depth = 0
    in_str = esc = False
    for ch in data:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return True


async def json_body() -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    data = await request.get_data(cache=False)
    if not data or not data.strip():
        raise InvalidRequest("We could not parse the JSON body of your request: the body is empty. "
                             "Send a JSON object with Content-Type: application/json.")
    if not _depth_ok(data):
        raise InvalidRequest(f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep.")
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest("We could not parse the JSON body of your request: it is not valid UTF-8.") from None
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {e}.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The JSON body must be an object.")
    try:  # JSON may escape lone UTF-16 surrogates ("\ud800"), which are not text
        if SURROGATE_ESCAPE.search(data):  # only then is the whole body re-encoded
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("The JSON body contains a lone UTF-16 surrogate escape, which is not "
                             "valid Unicode text.") from None
    return body


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
    app.extensions["thox"] = {
        "config": config, "store": store, "metrics": metrics, "manager": manager,
        "service": Service(manager, metrics), "keys": KeyFile(config), "version": __version__,
        "ratelimit": RateLimiter(config),
        "started": time.time(),
    }

    @app.before_serving
    async def _start() -> None:
        manager.start()

    @app.after_serving
    async def _stop() -> None:
        await manager.stop()

    @app.before_request
    async def _auth() -> None:
        g.t0 = time.monotonic()
        g.extra_headers = {}
        if request.path.startswith("/v1/") or request.path == "/v1":
            g.extra_headers = app.extensions["thox"]["ratelimit"].check(request.remote_addr)
            app.extensions["thox"]["keys"].check(credential(request.headers))

    @app.after_request
    async def _count(resp: Response) -> Response:
        for k, v in getattr(g, "extra_headers", {}).items():
            resp.headers.setdefault(k, v)
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(rule, request.method, str(resp.status_code)).inc()
        for w in manager.workers.values():
            metrics.queue_depth.labels(w.model.id).set(w.pending)
        return resp

    errors.install(app)
    routes.register(app)
    responses.register(app)
    anthropic.register(app)
    from .. import web
    web.register(app)
    return app
