"""The Quart application: wiring of config, model store, engine, auth,
metrics and routes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import TypeVar

import numpy as np
from pydantic import BaseModel
from quart import Quart, Response, g, request

from .. import __version__
from ..config import Config
from ..engine.manager import ModelManager, Settings
from ..errors import InvalidRequest
from ..store import ModelStore
from . import anthropic, cors, errors, ollama, responses, routes
from .auth import KeyFile, credential
from .metrics import Metrics
from .ratelimit import RateLimiter
from .service import Service

log = logging.getLogger("thox.api")
MAX_JSON_DEPTH = 64
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
INLINE_BODY_BYTES = 64 << 10  # larger bodies are parsed on a worker thread
MAX_JSON_CONTAINERS = 200_000
MAX_JSON_VALUES = 2_000_000
M = TypeVar("M", bound=BaseModel)


def check_json_shape(data: bytes) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH or with more arrays,
    objects or values than parsing may build while it holds the interpreter
    lock (strings left out; vectorized: a body of megabytes takes milliseconds)."""
    bare = _STRING.sub(b"", data)
    brackets = bare.translate(None, _NOT_BRACKET)
    if not brackets:
        return
    opens = np.frombuffer(brackets, dtype=np.uint8)
    is_open = (opens == 0x5B) | (opens == 0x7B)
    steps = np.where(is_open, np.int8(1), np.int8(-1))
    if int(np.cumsum(steps, dtype=np.int32).max()) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep.")
    if int(is_open.sum()) > MAX_JSON_CONTAINERS:
        raise InvalidRequest(f"JSON body has more than {MAX_JSON_CONTAINERS} arrays and objects.")
    if bare.count(b",") >= MAX_JSON_VALUES:
        raise InvalidRequest(f"JSON body has more than {MAX_JSON_VALUES} values.")


def parse_body(data: bytes, model: type[M] | None = None) -> dict | M:
    """``data`` as a JSON object (validated as ``model`` when given), or a 400
    that says what is wrong."""
    if not data or not data.strip():
        raise InvalidRequest("We could not parse the JSON body of your request: the body is empty. "
                             "Send a JSON object with Content-Type: application/json.")
    check_json_shape(data)
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
    return body if model is None else model.model_validate(body)


async def json_body(model: type[M] | None = None) -> dict | M:
    """The request body as a JSON object, validated as ``model`` when given;
    a large body is parsed off the event loop."""
    data = await request.get_data(cache=False)
    if len(data) > INLINE_BODY_BYTES:
        return await asyncio.to_thread(parse_body, data, model)
    return parse_body(data, model)


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
        app.extensions["thox"]["service"].close()

    @app.before_request
    async def _auth() -> None:
        g.t0 = time.monotonic()
        g.extra_headers = {}
        if cors.is_api_path(request.path):
            g.extra_headers = app.extensions["thox"]["ratelimit"].check(request.remote_addr)
            key = credential(request.headers)
            if key is None and request.path.startswith("/api/") and config.get("api.ollama_keyless"):
                g.cors_denied = True  # admitted without a key: no other origin may read the answer
                return
            app.extensions["thox"]["keys"].check(key)

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
    from .. import web
    web.register(app)
    return app
